"""Parameter grids (seed 000, exercise 1): one prompt, two axes of request fields, every cell an image.

Writes each cell's PNG (with metadata), a labelled contact sheet and a CSV of settings, time and peak
memory per cell. The model stays loaded and every distinct prompt is encoded once across the grid.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, did_you_mean

# Axis field -> how its values are parsed. "size" is WxH and sets width and height together.
AXIS_FIELDS = {
    "steps": int, "guidance": float, "seed": int, "width": int, "height": int, "eta": float,
    "sampler": str, "schedule": str, "preset": str, "template": str, "negative": str, "size": "size",
}


@dataclass(frozen=True)
class Axis:
    field: str
    values: tuple

    def fields(self, value) -> dict:
        if self.field == "size":
            return {"width": value[0], "height": value[1]}
        return {self.field: value}

    def label(self, value) -> str:
        return f"{value[0]}x{value[1]}" if self.field == "size" else str(value)


def parse_axis(text: str) -> Axis:
    """'steps=10,25,50' -> Axis('steps', (10, 25, 50)), with one clear line for anything malformed."""
    if "=" not in text:
        raise UserError(f"axis {text!r} is not FIELD=V1,V2,... (e.g. steps=10,25,50)")
    name, _, raw = text.partition("=")
    name = name.strip()
    if name not in AXIS_FIELDS:
        valid = ", ".join(AXIS_FIELDS)
        raise UserError(f"unknown axis field {name!r}{did_you_mean(name, AXIS_FIELDS)}; valid: {valid}")
    items = [v.strip() for v in raw.split(",") if v.strip()]
    if not items:
        raise UserError(f"axis {text!r} has no values")
    kind = AXIS_FIELDS[name]
    values = []
    for v in items:
        try:
            if kind == "size":
                w, h = v.lower().split("x")
                values.append((int(w), int(h)))
            else:
                values.append(kind(v))
        except ValueError:
            want = "WxH sizes like 512x512" if kind == "size" else f"{kind.__name__} values"
            raise UserError(f"axis {name}: {v!r} is not valid; expected {want}") from None
    return Axis(name, tuple(values))


@dataclass
class Cell:
    row: int
    col: int
    fields: dict
    path: Path | None = None
    seconds: float = 0.0
    host_peak: int = 0
    device_peak: int | None = None
    image: object = None
    metadata: dict | None = None


def plan_cells(base: dict, x: Axis, y: Axis | None) -> list[Cell]:
    ys = y.values if y else (None,)
    cells = []
    for r, yv in enumerate(ys):
        for c, xv in enumerate(x.values):
            fields = {**base, **x.fields(xv), **(y.fields(yv) if y else {})}
            cells.append(Cell(r, c, fields))
    return cells


def run_grid(pipe, cells: list[Cell], out_dir: Path, on_cell=None) -> list[Cell]:
    """Generate every cell (one image each) and write its PNG into out_dir."""
    from .monitor import PeakMemory
    from .output import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        with PeakMemory(pipe.device) as peak:
            t0 = time.perf_counter()
            res = pipe.generate(**cell.fields)[0]
            cell.seconds = time.perf_counter() - t0
        cell.host_peak, cell.device_peak = peak.host_peak, peak.device_peak
        cell.image, cell.metadata = res.image, res.metadata
        cell.path = save_png(res.image, out_dir / f"cell-r{cell.row}-c{cell.col}.png", res.metadata, res.timings)
        if on_cell is not None:
            on_cell(cell)
    return cells


def write_csv(cells: list[Cell], x: Axis, y: Axis | None, path: Path) -> None:
    from .output import atomic_write

    cols = ["row", "col", "x_field", "x_value", "y_field", "y_value", "prompt", "seed", "width", "height", "steps",
            "guidance", "sampler", "schedule", "seconds", "peak_host_rss_mb", "peak_device_mb", "file"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for c in cells:
        m = c.metadata
        w.writerow([
            c.row, c.col, x.field, x.label(x.values[c.col]),
            y.field if y else "", y.label(y.values[c.row]) if y else "",
            m["prompt"], m["seed"], m["width"], m["height"], m["steps"], m["guidance"], m["sampler"],
            m["schedule"]["name"], f"{c.seconds:.3f}", f"{c.host_peak / 2**20:.1f}",
            "" if c.device_peak is None else f"{c.device_peak / 2**20:.1f}", c.path.name,
        ])
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def contact_sheet(cells: list[Cell], x: Axis, y: Axis | None, title: str):
    """A labelled sheet: axis titles, a value label per column and row, and the time under each cell."""
    from PIL import Image, ImageDraw, ImageFont

    thumb = 256
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    nrows = len(y.values) if y else 1
    ncols = len(x.values)
    left = 120 if y else 10
    top, pad, below = 70, 8, 20
    first = cells[0].image
    cw, ch = (thumb, max(1, round(thumb * first.height / first.width))) if first.width >= first.height else \
        (max(1, round(thumb * first.width / first.height)), thumb)
    sheet = Image.new("RGB", (left + ncols * (cw + pad) + pad, top + nrows * (ch + below + pad) + pad), "white")
    d = ImageDraw.Draw(sheet)
    d.text((pad, 6), title[:150], fill="black", font=font)
    d.text((left, 28), f"x: {x.field}", fill="black", font=font)
    if y:
        d.text((pad, top - 22), f"y: {y.field}", fill="black", font=font)
    for c, v in enumerate(x.values):
        d.text((left + c * (cw + pad) + cw // 2 - 20, top - 20), x.label(v), fill="black", font=font)
    if y:
        for r, v in enumerate(y.values):
            d.text((pad, top + r * (ch + below + pad) + ch // 2), y.label(v), fill="black", font=font)
    for cell in cells:
        im = cell.image
        scale = min(cw / im.width, ch / im.height)  # fit the cell, enlarging small images too
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.NEAREST if scale > 1 else Image.LANCZOS)
        x0 = left + cell.col * (cw + pad) + (cw - im.width) // 2
        y0 = top + cell.row * (ch + below + pad) + (ch - im.height) // 2
        sheet.paste(im, (x0, y0))
        d.text((left + cell.col * (cw + pad), top + cell.row * (ch + below + pad) + ch + 2),
               f"{cell.seconds:.2f} s", fill="dimgray", font=small)
    return sheet
