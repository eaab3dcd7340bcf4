"""The editing proof: change what the prompt says, keep what it does not, with img2img and with a reference.

    python -m fluxlab.demo.edit

Each case starts from a rendered scene (say a red circle in the top left on a gray background) and asks for
one change by describing the result without saying where it is ("a blue circle on a gray background"): the
colour or the shape changes, and the position and background should come from the input image. Three ways:

* text only (no input image): the baseline; position and background can only match by chance;
* img2img (--init, strength 0.7 and 0.5);
* reference edit (--image): klein's in-context editing, which the demo model learned from before/after pairs.

Measured per case: the prompt's colour and shape are drawn; the position (3x3 cell) is the input's; the shape's
centre moved less than 4 px; the background is the input's (within 30 levels).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data
from .evaluate import read, spot


@dataclass
class Kept:
    n: int = 0
    asked: int = 0  # colour and shape as the prompt says
    position: int = 0
    spot: int = 0
    background: int = 0
    moved: list = field(default_factory=list)

    def rates(self) -> dict[str, float]:
        return {k: getattr(self, k) / max(1, self.n) for k in ("asked", "position", "spot", "background")}


def cases(count: int = 40, seed: int = 0):
    """(before, after) scene pairs: half change the colour, half the shape; sizes, places, backgrounds vary."""
    rng = random.Random(f"edit-proof|{seed}")
    scenes = list(data.scenes("train")) + list(data.scenes("heldout"))
    out = []
    for i in range(count):
        before = rng.choice(scenes)
        if i % 2 == 0:
            after = data.Scene(rng.choice([c for c in data.COLOURS if c != before.colour]), before.shape,
                               before.position, before.size, before.background)
        else:
            after = data.Scene(before.colour, rng.choice([s for s in data.SHAPES if s != before.shape]),
                               before.position, before.size, before.background)
        out.append((before, after))
    return out


def measure(pipe, mode: str, count: int = 40, strength: float = 0.7, folder: Path | None = None) -> Kept:
    k = Kept()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (before, after) in enumerate(cases(count)):
            init = Path(tmp) / f"case{i}.png"
            image = data.render(before, jitter=f"proof|{i}")
            image.save(init)
            fields = {"prompt": after.short_caption("position"), "seed": i}
            if mode == "img2img":
                fields.update(init=str(init), strength=strength)
            elif mode == "reference":
                fields.update(images=[str(init)])
            out = pipe.generate(**fields)[0].image
            if folder is not None:
                out.save(folder / f"{mode}{strength if mode == 'img2img' else ''}-{i:02d}.png")
            r = read(out)
            (x0, bg0), (x1, bg1) = spot(image), spot(out)
            k.n += 1
            k.asked += r.colour == after.colour and r.shape == after.shape
            k.position += r.position == before.position
            moved = float(np.hypot(x1[0] - x0[0], x1[1] - x0[1])) if x1 is not None else 99.0
            k.moved.append(moved)
            k.spot += moved < 4
            k.background += float(np.abs(bg1 - bg0).max()) < 30
    return k


def main(argv: list[str] | None = None) -> None:
    from .. import load

    ap = argparse.ArgumentParser(prog="python -m fluxlab.demo.edit", description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--strength", type=float, action="append", default=None,
                    help="img2img strength (repeatable; default 0.7 and 0.5)")
    ap.add_argument("--save", type=Path, default=None, help="folder to keep the edited images in")
    a = ap.parse_args(argv)
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
    pipe = load(a.model, notify=lambda m: None)
    print("| edit | cases | prompt's colour and shape | position kept | moved < 4 px | background kept |"
          " median move (px) |")
    print("|---|---|---|---|---|---|---|")
    runs = [("text", "text only (baseline)", 0.0)]
    runs += [("img2img", f"img2img, strength {st:g}", st) for st in a.strength or (0.7, 0.5)]
    runs += [("reference", "reference image", 0.0)]
    for mode, label, strength in runs:
        k = measure(pipe, mode, a.cases, strength=strength, folder=a.save)
        r = k.rates()
        print(f"| {label} | {k.n} | {r['asked']:.0%} | {r['position']:.0%} | {r['spot']:.0%} | "
              f"{r['background']:.0%} | {np.median(k.moved):.1f} |")


if __name__ == "__main__":
    main()
