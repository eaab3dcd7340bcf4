"""`fluxlab grid`: vary one or two settings over a grid of cells (service.grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app, escape, out, say
from .options import MODEL, REQUEST, RUNTIME, options

Opt = typer.Option


@app.command()
@options(REQUEST, MODEL, RUNTIME)
def grid(
    prompt: Annotated[str, typer.Argument(help="The prompt every cell shares.")],
    x: Annotated[str, Opt("--x", help="Column axis FIELD=V1,V2,... e.g. steps=10,25,50 (any request setting, "
                                      "size=WxH, lora_scale).")],
    y: Annotated[str | None, Opt("--y", help="Row axis, e.g. guidance=3,7,12.")] = None,
    model: Annotated[str, Opt("-m", "--model", help="Catalog name, local diffusers dir, or hub repo id.")] =
        "flux2-klein-4b",
    lora: Annotated[list[str] | None, Opt("--lora", help="LoRA FILE[:SCALE] (repeatable: stacked).")] = None,
    transformer: Annotated[str | None, Opt(help="Single-file transformer .safetensors over the base model.")] =
        None,
    out_dir: Annotated[str, Opt("-o", "--out", help="Folder for the cells, sheet.png and grid.csv.")] = "grid",
    quiet: Annotated[bool, Opt("-q", "--quiet")] = False,
    **kw,
):
    """Vary one or two settings over a grid: every cell's image, a labelled contact sheet and a CSV."""
    from ..service import events as ev
    from ..service.grid import grid as run
    from ..service.grid import parse_axis
    from ..spec.request import ModelRef, Runtime, lora_ref
    from ..spec.typed import validate

    ax, ay = parse_axis(x), (parse_axis(y) if y else None)
    base, ref, rt = REQUEST.take(kw), MODEL.take(kw), RUNTIME.take(kw)
    base.setdefault("seed", 0)  # every cell shares one seed unless an axis varies it
    ref["name"] = model
    if lora is not None:
        ref["loras"] = [lora_ref(v).model_dump(exclude_none=True) for v in lora]
    if transformer is not None:
        ref["transformer"] = {"path": transformer}

    def events(event):
        if isinstance(event, ev.Notice) and not quiet:
            say(event.text)

    def said(cell):
        if not quiet:
            out.print(escape(f"cell r{cell.row} c{cell.col}: {cell.seconds:.2f} s -> {cell.path}"))

    result = run(prompt, ax, ay, base, validate(ModelRef, ref, "model"), validate(Runtime, rt, "runtime"),
                 Path(out_dir), events=events, on_cell=said)
    out.print(escape(f"wrote {len(result.cells)} images, {result.sheet} and {result.csv}"))
