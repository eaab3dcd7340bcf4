"""Read colour, shape and position back from a demo image, without a learned model.

* background: the median colour of the border pixels;
* the shape: pixels far from the background (plus a small opening against speckle);
* colour: the named colour nearest to the shape's median pixel;
* position: the shape's centroid in a 3x3 grid;
* shape: a ring if its centre is background (a hole), otherwise the ideal circle,
  square or upward triangle of the same area and centroid that overlaps it best (intersection over union), which
  holds up on the soft edges of generated images, where ratios with fixed thresholds did not.

Rules rather than a classifier network so that what it measures is plain and it needs no training; its
accuracy on ground-truth renders is checked in the tests (>= 98%).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import COLOURS, POSITIONS


@dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None
    position: str | None


def background(a: np.ndarray) -> np.ndarray:
    """The background colour of an (H, W, 3) image: the median of its border pixels."""
    return np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)


def foreground(image):
    """(pixels, background colour, mask of the shape).

    First the pixels far from the background; then, with the shape's colour known (their median), the pixels
    nearer to the shape's colour than to the background's, which drops the pale halos a VAE leaves around
    shapes (they would make a circle look ragged)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    bg = background(a)
    far = np.linalg.norm(a - bg, axis=2) > 60
    if not far.any():
        return a, bg, far
    fg = np.median(a[far], axis=0)
    near_fg = np.linalg.norm(a - fg, axis=2) < np.linalg.norm(a - bg, axis=2)
    return a, bg, far & near_fg


def spot(image):
    """(x, y) centroid of the shape in pixels and the background colour; None for x, y if there is no shape."""
    _, bg, mask = foreground(image)
    if not mask.any():
        return None, bg
    ys, xs = np.nonzero(mask)
    return (xs.mean(), ys.mean()), bg


def read(image) -> Reading:
    a, _, mask = foreground(image)
    h, w, _ = a.shape
    if mask.sum() < 0.005 * h * w:
        return Reading(None, None, None)
    pixels = a[mask]
    rgb = np.median(pixels, axis=0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(np.array(COLOURS[c]) - rgb))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    cell = (min(int(cx * 3), 2), min(int(cy * 3), 2))
    position = next(name for name, pos in POSITIONS.items() if pos == cell)
    cx, cy = int(xs.mean()), int(ys.mean())
    if not mask[max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2].any():
        shape = "ring"
    else:
        shape = max(TEMPLATES, key=lambda name: iou(mask, template(name, mask.sum(), xs.mean(), ys.mean(), h, w)))
    return Reading(colour, shape, position)


TEMPLATES = ("circle", "square", "triangle")


def template(shape: str, area: float, cx: float, cy: float, h: int, w: int):
    """The ideal shape of the given area with its centroid at (cx, cy), drawn as in fluxlab.demo.data."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= area / np.pi
    if shape == "square":
        s = np.sqrt(area) / 2
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    # Upward triangle (apex r above the centre, base 0.8 r below, half-width r): area 1.8 r^2, centroid 0.2 r
    # below the drawing centre.
    r = np.sqrt(area / 1.8)
    top, base = cy - 0.2 * r - r, cy - 0.2 * r + 0.8 * r
    half = r * (y - top) / (base - top)
    return (y >= top) & (y <= base) & (np.abs(x - cx) <= half)


def iou(a, b) -> float:
    return (a & b).sum() / max(1, (a | b).sum())


# -- measuring a model -----------------------------------------------------------------------------------------
@dataclass
class Tally:
    n: int = 0
    colour: int = 0
    shape: int = 0
    position: int = 0
    all: int = 0

    def add(self, r: Reading, colour: str | None, shape: str | None, position: str | None) -> None:
        """Count one image; an attribute the prompt did not state (None) counts as right."""
        ok = [colour in (None, r.colour), shape in (None, r.shape), position in (None, r.position)]
        self.n += 1
        self.colour += ok[0]
        self.shape += ok[1]
        self.position += ok[2]
        self.all += all(ok)

    def rates(self) -> dict[str, float]:
        return {k: getattr(self, k) / max(1, self.n) for k in ("colour", "shape", "position", "all")}


def adherence(pipe, scenes, seeds: int = 1, save=None, **fields) -> Tally:
    """Generate every scene's caption with `seeds` seeds and count what the images show."""
    t = Tally()
    for i, s in enumerate(scenes):
        for k in range(seeds):
            r = pipe.generate(prompt=s.caption, seed=1000 * k + i, **fields)[0]
            if save is not None:
                save(r.image, s, k)
            t.add(read(r.image), s.colour, s.shape, s.position)
    return t


def ground_truth() -> Tally:
    """The evaluator on the renders themselves (the images a perfect model would make), each shifted a little off
    its spot (up to 0.08 of a grid cell), as generated shapes may be."""
    from .data import render, scenes

    t = Tally()
    for i, s in enumerate(list(scenes("train")) + list(scenes("heldout"))):
        t.add(read(render(s, seed=i, wobble=0.08)), s.colour, s.shape, s.position)
    return t


def table(rows: dict[str, Tally]) -> str:
    lines = ["| prompts | images | colour | shape | position | all three |", "|---|---|---|---|---|---|"]
    for name, t in rows.items():
        r = t.rates()
        cells = " | ".join(f"{r[k]:.1%}" for k in ("colour", "shape", "position", "all"))
        lines.append(f"| {name} | {t.n} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .. import load
    from .data import scenes

    ap = argparse.ArgumentParser(prog="python -m fluxlab.demo.evaluate",
                                 description="Prompt adherence of the demo model on held-out and training prompts.")
    ap.add_argument("-m", "--model", default="demo", help="catalog name or pipeline directory (default: demo)")
    ap.add_argument("--seeds", type=int, default=2, help="images per prompt")
    ap.add_argument("--train-prompts", type=int, default=84, help="training prompts to compare with (0: none)")
    ap.add_argument("--save", default=None, help="folder to keep the generated images in")
    a = ap.parse_args(argv)
    pipe = load(a.model, notify=lambda m: None)
    keep = None
    if a.save:
        from pathlib import Path

        folder = Path(a.save)
        folder.mkdir(parents=True, exist_ok=True)

        def keep(image, s, k):
            image.save(folder / f"{s.caption.replace(' ', '_')}-{k}.png")

    held = list(scenes("heldout"))
    train = list(scenes("train"))[:: max(1, len(list(scenes("train"))) // max(1, a.train_prompts))][: a.train_prompts]
    rows = {"evaluator on ground-truth renders": ground_truth(),
            f"held-out combinations ({len(held)} prompts)": adherence(pipe, held, a.seeds, keep)}
    if train:
        rows[f"training combinations ({len(train)} prompts)"] = adherence(pipe, train, a.seeds, keep)
    print(table(rows))


if __name__ == "__main__":
    main()
