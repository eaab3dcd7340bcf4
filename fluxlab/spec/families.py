"""What a model family decides before any weights exist: the size an input image is used at.

The torch-free half of a family adapter. `core.families` builds the full adapters on these classes, so the rule
lives once and the resolver asks the family instead of branching on its name.
"""

from __future__ import annotations

import math

SIZE_MULTIPLE = 16  # VAE 8x downsampling times the 2x2 latent patch

# FLUX.1 Kontext's training resolutions (width, height), as BFL's Kontext code and diffusers' Kontext pipeline
# list them; an input image is used at the one closest to its aspect ratio.
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
]


def area_capped_size(w: int, h: int, count: int, max_side: int) -> tuple[int, int]:
    """The size an input image is used at: its pixel count capped (1024^2 when several references, BFL's
    2024^2 for one), its sides capped to the model's limit, then floored to multiples of 16."""
    cap = 1024 * 1024 if count > 1 else 2024 * 2024
    if w * h > cap:
        scale = math.sqrt(cap / (w * h))
        w, h = int(w * scale), int(h * scale)
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = int(w * scale), int(h * scale)
    m = SIZE_MULTIPLE
    return max(m, w // m * m), max(m, h // m * m)


def kontext_size(w: int, h: int) -> tuple[int, int]:
    """The Kontext training resolution closest in aspect to w x h."""
    _, kw, kh = min((abs(w / h - a / b), a, b) for a, b in KONTEXT_RESOLUTIONS)
    return kw // SIZE_MULTIPLE * SIZE_MULTIPLE, kh // SIZE_MULTIPLE * SIZE_MULTIPLE


class FamilyRules:
    name: str

    def output_size(self, w: int, h: int, references: int, init: bool, max_side: int) -> tuple[int, int]:
        """The output size when none is given and an input image sets it (w x h: the init image, else the first
        reference; `references`: how many references there are)."""
        return area_capped_size(w, h, 1 if init else references, max_side)


class Flux1Rules(FamilyRules):
    name = "flux1"

    def output_size(self, w, h, references, init, max_side):
        if not init:  # Kontext: the input's preferred Kontext resolution
            return kontext_size(w, h)
        return area_capped_size(w, h, 1, max_side)


class Flux2Rules(FamilyRules):
    name = "flux2"


RULES: dict[str, FamilyRules] = {"flux1": Flux1Rules(), "flux2": Flux2Rules()}
