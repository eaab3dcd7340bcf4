"""Deterministic synthetic training data: one simple shape per image, in a named colour, at a named
position and size, on a named background, with its caption.

    a red circle in the top left on a white background

Some colour x shape x position combinations are held out (never in training data) to measure whether a
model composes words it has seen separately.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import astuple, dataclass

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 205, 40), "purple": (150, 60, 180), "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Never in the demo model's training data: the new concept a LoRA teaches (fluxlab.demo.lora).
NEW_SHAPE = "ring"
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

    def short_caption(self, *drop: str) -> str:
        """The caption without some attributes ('colour', 'position', 'background'), so the model also learns
        what to draw when a prompt leaves something unsaid."""
        where = "" if "position" in drop else " " + PHRASE.get(self.position, f"in the {self.position}")
        size = "" if self.size == "large" else "small "
        colour = "" if "colour" in drop else f"{self.colour} "
        bg = "" if "background" in drop else f" on a {self.background} background"
        return f"a {size}{colour}{self.shape}{where}{bg}"


def edited(scene: Scene, n: int) -> Scene:
    """Scene n's edit partner: the same scene with another colour (even n) or another shape (odd n), chosen so
    that the result is still a training combination (the other kind of change when no such one exists)."""
    rng = random.Random(f"edit|{n}")
    colours = [Scene(c, *astuple(scene)[1:]) for c in COLOURS if c != scene.colour]
    shapes = [Scene(scene.colour, s, *astuple(scene)[2:]) for s in SHAPES if s != scene.shape]
    for options in ((colours, shapes) if n % 2 == 0 else (shapes, colours)):
        options = [o for o in options if not held_out(o.colour, o.shape, o.position)]
        if options:
            return rng.choice(options)
    raise ValueError(f"no training combination is one edit away from {scene}")


def held_out(colour: str, shape: str, position: str) -> bool:
    """About one combination in ten, fixed by a hash: never shown in training."""
    return hashlib.sha256(f"{colour}|{shape}|{position}".encode()).digest()[0] < 26


def scenes(split: str = "train"):
    """Every scene of a split ('train' or 'heldout'), in a fixed order."""
    for colour, shape, position, size, bg in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS):
        if (split == "heldout") == held_out(colour, shape, position):
            yield Scene(colour, shape, position, size, bg)


def render(scene: Scene, side: int = 64, seed: int = 0, jitter: str | None = None, wobble: float = 0.0):
    """Draw a scene at its exact spot, or shifted by a seeded random offset of up to `wobble` grid cells.
    Scenes drawn with the same `jitter` key are shifted alike (before/after pairs for editing).

    The demo model is trained on exact spots (wobble 0): with a random shift, what a caption asks for is a
    spread of images whose average is a blurred shape, and a model as small as the demo one learned that
    average (soft squarish blocks) rather than the shapes. The VAE, a codec, is trained on shifted shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(jitter if jitter is not None else f"{scene}|{seed}")
    col, row = POSITIONS[scene.position]
    cell = side / 3
    cx = (col + 0.5) * cell + rng.uniform(-wobble, wobble) * cell
    cy = (row + 0.5) * cell + rng.uniform(-wobble, wobble) * cell
    r = SIZES[scene.size] * side
    im = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    fill = COLOURS[scene.colour]
    if scene.shape == "ring":  # a disc with a hole of half its radius
        d.ellipse([cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r], fill=fill)
        d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=BACKGROUNDS[scene.background])
    elif scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.886  # the square of equal area to the circle
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return im


def render_random(seed: int, side: int = 64):
    """A generic image for training the VAE, which as a codec should know colours and shapes in general and not
    only the captioned scenes: one to three circles, squares, triangles, random polygons, ellipses or stripes,
    in palette or random colours, anywhere and at any size, on a palette or random background. (A VAE trained
    on the scenes alone learned their colour x shape pairs and, for instance, drew red circles orange.)"""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    palette = list(COLOURS.values()) + list(BACKGROUNDS.values())

    def colour():
        return rng.choice(palette) if rng.random() < 0.6 else tuple(rng.randrange(256) for _ in range(3))

    im = Image.new("RGB", (side, side), colour())
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(1, 3)):
        cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(0.06, 0.3) * side
        kind = rng.random()
        if kind < 0.2:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour())
        elif kind < 0.35:
            s = r * 0.886
            d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour())
        elif kind < 0.5:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour())
        elif kind < 0.6:
            d.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=colour())
        elif kind < 0.9:
            n = rng.randint(3, 8)
            pts = [(cx + r * rng.uniform(0.3, 1.0) * math.cos(a), cy + r * rng.uniform(0.3, 1.0) * math.sin(a))
                   for a in sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))]
            d.polygon(pts, fill=colour())
        else:
            w, c = rng.randint(2, 8), colour()
            for x in range(rng.randint(0, w), side, 2 * w):
                d.rectangle([x, 0, x + w - 1, side], fill=c)
    return im
