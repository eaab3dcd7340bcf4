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
