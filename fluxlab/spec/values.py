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
MAX_SEED = 2**32 - 1
MAX_STEPS = 500
MAX_IMAGES = 1000


CACHE_THRESHOLD = 0.1  # First Block Cache: 1.58x on the demo at 20 steps, adherence -1.2 points (bench/RESULTS.md)


def parse_cache(text: str | None) -> tuple[str, float] | None:
    """'fbc' | 'fbc:T' | 'none' -> ('fbc', T) or None."""
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
    raise UserError(f"unknown cache {text!r}; valid: fbc, fbc:THRESHOLD (e.g. fbc:0.1), none")


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
