"""`fluxlab train`: a LoRA from an ai-toolkit YAML, from a folder of images, or a run resumed (service.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from . import app, escape, out, say

Opt = typer.Option


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="ai-toolkit-style YAML (job: extension).")] = None,
    images: Annotated[str | None, Opt(help="One-line training: a folder or .zip of images (+ .txt captions).")] =
        None,
    trigger: Annotated[str | None, Opt(help="Trigger word for one-line training, e.g. 'zxq person'.")] = None,
    steps: Annotated[int, Opt(help="One-line training: steps.")] = 1000,
    model: Annotated[str, Opt("-m", "--model", help="One-line training: base model.")] = "flux2-klein-4b",
    name: Annotated[str, Opt(help="One-line training: run name.")] = "lora",
    out_dir: Annotated[str, Opt("--out", help="One-line training: training folder.")] = "outputs/training",
    resolution: Annotated[int | None, Opt(help="One-line training: resolution (default: the model's size, "
                                               "1024 for FLUX models).")] = None,
    caption: Annotated[str | None, Opt("--caption", help="One-line training: caption the images that have none "
                                                         "first, with this captioner (demo, florence-2-large, "
                                                         "...).")] = None,
    resume: Annotated[str | None, Opt(help="Continue the run in this folder from its last checkpoint.")] = None,
    device: Annotated[str | None, Opt(help="Override the config's device.")] = None,
    threads: Annotated[int | None, Opt(help="torch threads (default: this process's share of the CPUs).", min=1,
                                       max=1024)] = None,
):
    """Train a LoRA: from a YAML config, from a folder of images (--images), or --resume a run."""
    from ..service import events as ev
    from ..service.train import one_line
    from ..service.train import train as run
    from ..spec.trainconfig import load_yaml

    if caption and not images:
        raise UserError("--caption goes with --images (in a config, set datasets[].auto_caption)")
    if resume:
        if config or images:
            raise UserError("--resume continues a run with its own config; give only the run folder")
        folder = Path(resume)
        if not folder.is_dir():
            raise UserError(f"--resume {resume}: no such run folder")
        job = load_yaml(folder / "config.yaml")
    elif config:
        if images:
            raise UserError("give a config file or --images, not both")
        job = load_yaml(config)
    elif images:
        if not trigger:
            raise UserError("one-line training needs --trigger WORD (what prompts will use to call the concept)")
        job = one_line(images, trigger, steps, model, name, out_dir, resolution, device)
        if caption:
            from ..caption.models import resolve

            resolve(caption)  # a captioner that is none is refused now, not after the run folder is made
            for d in job.process.datasets:
                d.auto_caption = caption
    else:
        raise UserError("fluxlab train CONFIG.yaml, or fluxlab train --images DIR --trigger WORD, or --resume RUN")
    if resume and Path(resume).resolve() != (Path(job.process.training_folder) / job.config.name).resolve():
        raise UserError(f"--resume {resume}: its config.yaml names another run folder "
                        f"({Path(job.process.training_folder) / job.config.name}); was the folder moved?")

    def events(event):
        if isinstance(event, ev.Notice):
            say(event.text)

    result = run(job, events=events, device=device, resume=bool(resume), threads=threads)
    if result.rank == 0:
        out.print(escape(f"trained: {result.lora}"))
