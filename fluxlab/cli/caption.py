"""`fluxlab caption`: a caption beside each image of a training set that has none (service.caption)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app, escape, out, say

Opt = typer.Option


@app.command()
def caption(
    source: Annotated[str, typer.Argument(help="A folder of images, a .zip of them, or one image.")],
    captioner: Annotated[str, Opt("-m", "--model", help="Captioner: florence-2-large, florence-2-base, "
                                                        "qwen2.5-vl-3b, demo, a local folder or a hub repo.")]
        = "florence-2-large",
    trigger: Annotated[str | None, Opt(help="Put this trigger word in each caption (once).")] = None,
    detail: Annotated[str, Opt(help="short | detailed.")] = "short",
    prefix: Annotated[str, Opt(help="Text before each caption.")] = "",
    suffix: Annotated[str, Opt(help="Text after each caption.")] = "",
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace existing captions.")] = False,
    dry_run: Annotated[bool, Opt("--dry-run", help="Print the captions, write nothing.")] = False,
    out_path: Annotated[str | None, Opt("--out", help="For a zip: the new folder or .zip (default: "
                                                      "NAME-captioned/ beside it).")] = None,
    caption_ext: Annotated[str, Opt("--caption-ext", help="Caption file extension.")] = "txt",
    device: Annotated[str, Opt(help="cpu | cuda | cuda:N.")] = "cpu",
):
    """Caption a training set: IMAGE.txt beside each image that has none, never overwriting without --overwrite."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from ..service.caption import Captioned
    from ..service.caption import caption as run

    with Progress(TextColumn("captioning"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=out, transient=True) as bar:
        task = bar.add_task("caption", total=None)

        def events(event):
            if isinstance(event, Captioned):
                bar.update(task, total=event.n, completed=event.i)

        result = run(source, captioner, trigger=trigger, detail=detail, prefix=prefix, suffix=suffix,
                     overwrite=overwrite, dry_run=dry_run, out=out_path, caption_ext=caption_ext, device=device,
                     events=events)
    table = Table("image", "caption", "")
    for row in result.rows:
        table.add_row(escape(row.image), escape(row.caption), row.status)
    out.print(table)
    written = "would write" if dry_run else "wrote"
    say(f"{written} {sum(r.status != 'kept' for r in result.rows)} caption(s), kept {result.kept} existing, in "
        f"{result.folder}")
