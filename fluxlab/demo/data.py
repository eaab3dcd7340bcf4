"""Deterministic synthetic training data: one simple shape per image, in a named colour, at a named
position and size, on a named background, with its caption.

    a red circle in the top left on a white background

Some colour x shape x position combinations are held out (never in training data) to measure whether a
model composes words it has seen separately.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 205, 40), "purple": (150, 60, 180), "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Position name -> (column, row) in a 3x3 grid.
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
SIZES = {"small": 0.14, "large": 0.22}  # radius as a fraction of the image side
PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
          "center": "in the center"}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str
    background: str

    @property
    def caption(self) -> str:
        where = PHRASE.get(self.position, f"in the {self.position}")
        size = "" if self.size == "large" else "small "
        return f"a {size}{self.colour} {self.shape} {where} on a {self.background} background"


def held_out(colour: str, shape: str, position: str) -> bool:
    """About one combination in ten, fixed by a hash: never shown in training."""
    return hashlib.sha256(f"{colour}|{shape}|{position}".encode()).digest()[0] < 26


def scenes(split: str = "train"):
    """Every scene of a split ('train' or 'heldout'), in a fixed order."""
    for colour, shape, position, size, bg in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS):
        if (split == "heldout") == held_out(colour, shape, position):
            yield Scene(colour, shape, position, size, bg)


def render(scene: Scene, side: int = 64, seed: int = 0):
    """Draw a scene; a small seeded jitter of the centre keeps images of one scene from being identical."""
    from PIL import Image, ImageDraw

    rng = random.Random(f"{scene}|{seed}")
    col, row = POSITIONS[scene.position]
    cell = side / 3
    cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    r = SIZES[scene.size] * side
    im = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.886  # the square of equal area to the circle
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return im
