"""Parameter grids (seed 000, exercise 1): one prompt, two axes of settings, every cell an image.

Writes each cell's PNG (with its record), a labelled contact sheet and a CSV of settings, time and peak memory
per cell. Every cell goes through service.generate on one pooled model: the model stays loaded, each distinct
prompt is encoded once across the grid, and a LoRA scale axis switches adapter scales without reloading.

Axis fields are the request's own scalar fields (their types read from GenerateRequest), plus `size` (WxH:
width and height together) and `lora_scale` (the scale of every LoRA given).
"""

from __future__ import annotations

import csv
import io
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, did_you_mean
from ..spec.request import GenerateRequest, ModelRef, Runtime

NOT_AXES = {"prompt", "seeds", "num_images", "images", "init", "mask", "aspect"}
MAX_CELLS = 400


def _scalar_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if len(args) == 1 and args[0] in (int, float, str) else None
    return annotation if annotation in (int, float, str) else None


def axis_fields() -> dict[str, object]:
    """Axis name -> value parser, derived from the request's fields (declared once, on GenerateRequest)."""
    out: dict[str, object] = {}
    for name, f in GenerateRequest.model_fields.items():
        kind = _scalar_type(f.annotation)
        if name not in NOT_AXES and kind is not None:
            out[name] = kind
    return {**out, "size": "size", "lora_scale": float}


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
    fields = axis_fields()
    if "=" not in text:
        raise UserError(f"axis {text!r} is not FIELD=V1,V2,... (e.g. steps=10,25,50)")
    name, _, raw = text.partition("=")
    name = name.strip()
    if name not in fields:
        raise UserError(f"unknown axis field {name!r}{did_you_mean(name, fields)}; valid: {', '.join(fields)}")
    items = [v.strip() for v in raw.split(",") if v.strip()]
    if not items:
        raise UserError(f"axis {text!r} has no values")
    if len(items) > 50:
        raise UserError(f"axis {name} has {len(items)} values; at most 50")
    kind = fields[name]
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
    lora_scale: float | None = None
    path: Path | None = None
    seconds: float = 0.0
    host_peak: int = 0
    device_peak: int | None = None
    image: object = None
    metadata: dict | None = field(default=None, repr=False)


def plan_cells(base: dict, x: Axis, y: Axis | None) -> list[Cell]:
    ys = y.values if y else (None,)
    cells = []
    for r, yv in enumerate(ys):
        for c, xv in enumerate(x.values):
            fields = {**base, **x.fields(xv), **(y.fields(yv) if y else {})}
            scale = fields.pop("lora_scale", None)
            cells.append(Cell(r, c, fields, scale))
    if len(cells) > MAX_CELLS:
        raise UserError(f"the grid has {len(cells)} cells; at most {MAX_CELLS}")
    return cells


def check_axes(x: Axis, y: Axis | None, model: ModelRef) -> None:
    if y and y.field == x.field:
        raise UserError(f"both axes vary {x.field}; choose two different fields")
    if "lora_scale" in (x.field, getattr(y, "field", None)) and not model.loras:
        raise UserError("a lora_scale axis needs at least one --lora")


def cell_ref(model: ModelRef, cell: Cell) -> ModelRef:
    if cell.lora_scale is None:
        return model
    return model.model_copy(update={"loras": tuple(lo.model_copy(update={"scale": cell.lora_scale})
                                                   for lo in model.loras)})


def prepare_cells(cells: list[Cell], model: ModelRef, runtime: Runtime, check_files: bool = True) -> list:
    """Every cell resolved (and its files read) before any weights load."""
    from ..spec.request import make_request
    from .generate import prepare

    return [prepare(make_request(**c.fields), cell_ref(model, c), runtime, check_files) for c in cells]


def run_grid(cells: list[Cell], prepared: list, out_dir: Path, pool=None, events=None, cancel=None,
             on_cell: Callable | None = None) -> list[Cell]:
    """Generate every cell (one image each) on one pooled model and write its PNG into out_dir."""
    from ..files import check_writable
    from ..runtime.devices import resolve_device
    from ..runtime.monitor import PeakMemory
    from ..runtime.pool import ModelPool
    from .generate import generate
    from .outputs import save_png

    check_writable(out_dir, "grid folder")
    own = pool is None
    pool = pool or ModelPool(max_models=1)
    try:
        for cell, prep in zip(cells, prepared, strict=True):
            with PeakMemory(resolve_device(prep.runtime.device)) as peak:
                t0 = time.perf_counter()
                res = next(iter(generate(prep, pool=pool, events=events, cancel=cancel)))
                cell.seconds = time.perf_counter() - t0
            cell.host_peak, cell.device_peak = peak.host_peak, peak.device_peak
            cell.image, cell.metadata = res.image, res.metadata
            cell.path = save_png(res.image, out_dir / f"cell-r{cell.row}-c{cell.col}.png", res.metadata, res.timings)
            if on_cell is not None:
                on_cell(cell)
    finally:
        if own:
            pool.release()
    return cells


def csv_columns() -> list[str]:
    """The request's settings as columns (derived from GenerateRequest), then the measurements."""
    settings = [f for f in axis_fields() if f not in ("size", "preset", "template")]
    return ["row", "col", "x_field", "x_value", "y_field", "y_value", "prompt", *settings, "seconds",
            "peak_host_rss_mb", "peak_device_mb", "file"]


def write_csv(cells: list[Cell], x: Axis, y: Axis | None, path: Path) -> None:
    from ..files import atomic_write

    cols = csv_columns()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for c in cells:
        req = c.metadata["request"]
        values = {"row": c.row, "col": c.col, "x_field": x.field, "x_value": x.label(x.values[c.col]),
                  "y_field": y.field if y else "", "y_value": y.label(y.values[c.row]) if y else "",
                  "lora_scale": "" if c.lora_scale is None else c.lora_scale,
                  "seconds": f"{c.seconds:.3f}", "peak_host_rss_mb": f"{c.host_peak / 2**20:.1f}",
                  "peak_device_mb": "" if c.device_peak is None else f"{c.device_peak / 2**20:.1f}",
                  "file": c.path.name}
        w.writerow([values[k] if k in values else ("" if req.get(k) is None else req.get(k)) for k in cols])
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


@dataclass
class GridResult:
    cells: list
    sheet: Path
    csv: Path


def grid(prompt: str, x: Axis, y: Axis | None, base: dict, model: ModelRef, runtime: Runtime, out_dir: Path, *,
         pool=None, events=None, cancel=None, on_cell: Callable | None = None) -> GridResult:
    """The whole grid: cells checked before loading, run on one model, then the CSV and the contact sheet."""
    from .outputs import save_png

    check_axes(x, y, model)
    cells = plan_cells({"prompt": prompt, **base}, x, y)
    prepared = prepare_cells(cells, model, runtime)
    out_dir = Path(out_dir)
    run_grid(cells, prepared, out_dir, pool, events, cancel, on_cell)
    write_csv(cells, x, y, out_dir / "grid.csv")
    title = f"{prompt} | {cells[0].metadata['model']['name']} | seed {base.get('seed', '')}"
    axes = {"x": f"{x.field}=" + ",".join(map(x.label, x.values)),
            "y": None if y is None else f"{y.field}=" + ",".join(map(y.label, y.values))}
    sheet = save_png(contact_sheet(cells, x, y, title), out_dir / "sheet.png", {"grid": axes, "prompt": prompt})
    return GridResult(cells, sheet, out_dir / "grid.csv")
