"""The limits and fixed vocabularies a request is checked against: size presets, ranges, schedule names."""

from __future__ import annotations

import math

from ..errors import UserError

# Seed 000's presets: the common FLUX resolutions by aspect ratio, plus the two smaller squares.
ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "9:16": (576, 1024),
    "3:4": (768, 1024),
    "4:3": (1024, 768),
    "16:9": (1024, 576),
    "512": (512, 512),
    "768": (768, 768),
}
RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")


def sizes_for(default_size: tuple[int, int], min_side: int, max_side: int) -> dict[str, tuple[int, int]]:
    """Size presets for one model: each aspect ratio at the model's own area (what it was made for; larger when
    the short side would fall under the model's minimum), multiples of 16 inside its side range; then its largest
    square. The demo's are 64-256 px, FLUX's around 1 MP."""
    area = default_size[0] * default_size[1]
    lo = -(-min_side // 16) * 16

    def side(x: float) -> int:
        return min(max_side, max(lo, round(x / 16) * 16))

    out = {}
    for ratio in RATIOS:
        a, b = (int(x) for x in ratio.split(":"))
        w, h = (area * a / b) ** 0.5, (area * b / a) ** 0.5
        k = max(1.0, lo / min(w, h))
        out[ratio] = (side(w * k), side(h * k))
    out["largest"] = (max_side - max_side % 16, max_side - max_side % 16)
    return out


MAX_SEED = 2**32 - 1
MAX_STEPS = 500
MAX_IMAGES = 1000


CACHE_THRESHOLD = 0.1  # First Block Cache: 1.58x on the demo at 20 steps, adherence -1.2 points (bench/RESULTS.md)


TAYLOR_INTERVAL = 3  # TaylorSeer: a full step in 3 after the first ones: 1.82x on the demo, adherence kept (RESULTS)
TAYLOR_WARMUP = 3  # the steps TaylorSeer always runs in full first (diffusers' default)


def parse_cache(text: str | None) -> tuple[str, float] | None:
    """'fbc' | 'fbc:T' | 'taylorseer' | 'taylorseer:N' | 'none' -> ('fbc', T) / ('taylorseer', N) or None."""
    if text is None or text == "none":
        return None
    kind, _, value = text.partition(":")
    if kind == "fbc":
        try:
            t = float(value) if value else CACHE_THRESHOLD
        except ValueError:
            t = float("nan")
        if not math.isfinite(t) or not 0 < t <= 1:
            raise UserError(f"cache {text!r}: the threshold must be a number above 0 and at most 1, e.g. fbc:0.05")
        return "fbc", t
    if kind == "taylorseer":
        if value and not (value.isascii() and value.isdigit() and 2 <= int(value) <= 20):
            raise UserError(f"cache {text!r}: the interval must be a whole number of steps from 2 to 20, e.g. "
                            f"taylorseer:{TAYLOR_INTERVAL}")
        return "taylorseer", int(value) if value else TAYLOR_INTERVAL
    raise UserError(f"unknown cache {text!r}; valid: fbc, fbc:THRESHOLD (e.g. fbc:0.1), taylorseer, "
                    f"taylorseer:INTERVAL (e.g. taylorseer:{TAYLOR_INTERVAL}), none")


def parse_schedule(text: str) -> tuple[str, float | None]:
    """'default' | 'linear' | 'shift:S' -> (kind, S)."""
    if text in ("default", "linear"):
        return text, None
    if text.startswith("shift:"):
        try:
            value = float(text.split(":", 1)[1])
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0 or value > 1000:
            raise UserError(f"schedule {text!r}: the shift must be a positive number up to 1000, e.g. shift:3")
        return "shift", value
    raise UserError(f"unknown schedule {text!r}; valid: default, linear, shift:S (e.g. shift:3)")
