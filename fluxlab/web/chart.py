"""The loss chart as the server draws it (an SVG, for the page without JavaScript): step and loss axes, the raw
losses faint and their exponential moving average over them, on a linear or log scale. Pure: numbers in, markup
out. The page's script draws the same chart live on a canvas (app.js drawLoss), with the same smoothing."""

from __future__ import annotations

import math
from html import escape

SMOOTHING = 0.9  # the moving average's weight on the past, as TensorBoard's default slider
W, H, LEFT, BOTTOM, TOP, RIGHT = 640, 240, 56, 28, 10, 10


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased at the start (so the first points are not pulled toward 0)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def loss_svg(losses: list[float], log: bool = False) -> str:
    if not losses:
        return f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="loss chart: no steps yet" class="chart"></svg>'
    f = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    ys = [f(v) for v in losses]
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    n = len(losses)

    def px(i: int) -> float:
        return LEFT + (W - LEFT - RIGHT) * (i / (n - 1) if n > 1 else 0)

    def py(y: float) -> float:
        return TOP + (H - TOP - BOTTOM) * (1 - (y - lo) / span)

    def line(values, cls):
        pts = " ".join(f"{px(i):.1f},{py(f(v)):.1f}" for i, v in enumerate(values))
        return f'<polyline class="{cls}" fill="none" points="{pts}"/>'

    label = "log10 loss" if log else "loss"
    top, bottom = (10 ** hi, 10 ** lo) if log else (hi, lo)
    return (f'<svg viewBox="0 0 {W} {H}" role="img" class="chart" aria-label="loss over {n} steps'
            f'{", log scale" if log else ""}">'
            f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}"/>'
            f'<line class="axis" x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}"/>'
            f'<text x="2" y="{TOP + 10}">{top:.4g}</text><text x="2" y="{H - BOTTOM}">{bottom:.4g}</text>'
            f'<text x="2" y="{H / 2}">{escape(label)}</text>'
            f'<text x="{LEFT}" y="{H - 6}">step 1</text><text x="{W - RIGHT - 70}" y="{H - 6}">step {n}</text>'
            f'{line(losses, "raw")}{line(smoothed(losses), "smooth")}</svg>')
