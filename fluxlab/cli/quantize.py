"""`fluxlab quantize MODEL --to q8_0|q4_0 -o FILE.gguf`: a transformer as a GGUF file."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app, escape, out


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Catalog name, local diffusers directory or hub repo id.")],
    to: Annotated[str, typer.Option("--to", help="q8_0 (about 1/2 of bf16) or q4_0 (about 1/4).")],
    output: Annotated[str, typer.Option("-o", "--output", help="The .gguf file to write.")],
):
    """Write a model's transformer as a GGUF file; load it with `generate -m MODEL --transformer FILE.gguf`."""
    from ..service.quantize import quantize as run

    r = run(model, to, output)
    out.print(escape(f"wrote {r['path']}: {r['family']} transformer, {r['quantized']} tensors {r['type']}, "
                     f"{r['kept']} kept F32; {r['bytes'] / 2**20:.1f} MiB ({r['ratio']:.2f}x the "
                     f"{r['source_bytes'] / 2**20:.1f} MiB source)"))
