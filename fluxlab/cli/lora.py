"""`fluxlab lora info|convert`: what a LoRA file holds, and the same LoRA in another tool's key names."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from . import app, escape, out

lora_app = typer.Typer(help="Inspect and convert LoRA files.", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


@lora_app.command("info")
def lora_info(
    file: Annotated[str, typer.Argument(help="A LoRA .safetensors file.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Format, model family, rank, targeted blocks and metadata of a LoRA file."""
    from ..service.info import lora_info as info

    data = info(file)
    if as_json:
        out.print_json(json.dumps(data))
        return
    for k, v in data.items():
        out.print(f"[bold]{k:>9}[/bold]  " + escape(str(v)))


@lora_app.command("convert")
def lora_convert(
    src: Annotated[str, typer.Argument(help="LoRA file to read (any supported format).")],
    dst: Annotated[str, typer.Argument(help="File to write (.safetensors).")],
    to: Annotated[str, typer.Option("--to", help="diffusers | kohya | ai-toolkit | comfyui")],
):
    """Rewrite a LoRA under another tool's key names (the weight update stays the same)."""
    from ..service.info import lora_convert as convert

    out.print(escape(convert(src, dst, to)))
