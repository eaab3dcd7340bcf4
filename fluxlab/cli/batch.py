"""`fluxlab batch`: many prompts x seeds into a folder, resumable, on one process, accelerate or a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..spec.request import GenerateRequest
from . import app, err, escape, out, say
from .options import MODEL, RUNTIME, group, options

Opt = typer.Option
BATCH_REQUEST = group(GenerateRequest, skip=("prompt", "seed", "seeds", "num_images"))


@app.command()
@options(BATCH_REQUEST, MODEL, RUNTIME)
def batch(
    target: Annotated[str, typer.Argument(help="PROMPTS.txt or PROMPTS.jsonl to run; or `status DIR` / `verify DIR`.",
                                          metavar="PROMPTS|status|verify")],
    folder: Annotated[str | None, typer.Argument(help="The batch folder, for status and verify.")] = None,
    model: Annotated[str, Opt("-m", "--model", help="Catalog name, local diffusers dir, or hub repo id.")] =
        "flux2-klein-4b",
    seeds: Annotated[str, Opt(help="Seeds for every prompt: 0-7, 1,5,9 or 0-3,10.")] = "0",
    out_dir: Annotated[str | None, Opt("--out", "-o", help="The batch folder (created; a rerun resumes it).")] =
        None,
    engine: Annotated[str, Opt(help="auto | local | accelerate | ray (auto: ray given an address, accelerate "
                                    "under accelerate launch, else local).")] = "auto",
    workers: Annotated[int, Opt(help="Ray: worker actors.", min=1, max=10_000)] = 2,
    ray_address: Annotated[str | None, Opt(help="Ray: the cluster to join (default: $RAY_ADDRESS, else a local "
                                                "one).")] = None,
    gpus_per_worker: Annotated[float, Opt(help="Ray: GPUs per worker actor.", min=0)] = 0.0,
    lora: Annotated[list[str] | None, Opt("--lora", help="LoRA FILE[:SCALE] (repeatable: stacked).")] = None,
    transformer: Annotated[str | None, Opt(help="Single-file transformer .safetensors over the base model.")] =
        None,
    quiet: Annotated[bool, Opt("-q", "--quiet", help="Print only the summary.")] = False,
    **kw,
):
    """Generate every prompt x seed into a folder; rerun to resume; `status DIR`, `verify DIR` to check."""
    from .. import batch as B

    if target in ("status", "verify"):
        if not folder:
            raise UserError(f"fluxlab batch {target} DIR: give the batch folder")
        return _status(Path(folder)) if target == "status" else _verify(Path(folder))
    if folder:
        raise UserError(f"unexpected argument {folder!r}: the folder goes in --out")
    if not out_dir:
        raise UserError("fluxlab batch PROMPTS --out DIR: give the folder the images go to")
    from ..spec.request import lora_ref

    request, ref, rt = BATCH_REQUEST.take(kw), MODEL.take(kw), RUNTIME.take(kw)
    ref["name"] = model
    if lora:
        ref["loras"] = [lora_ref(x).model_dump(exclude_none=True) for x in lora]
    if transformer:
        ref["transformer"] = {"path": transformer}
    plan = B.make_plan(target, ref_of(ref), seeds, rt, **request)
    bar = _Bar(quiet)
    with bar:
        report = B.run(plan, out_dir, engine, workers, ray_address, gpus_per_worker, on_row=bar.row)
    if report.engine != "accelerate" or B.engines.process_share()[0] == 0:
        out.print(escape(f"{out_dir}: made {report.made} images ({report.done_before} done before, {report.failed} "
                         f"failed) in {report.seconds:.1f} s, {report.images_per_s:.2f} images/s, engine "
                         f"{report.engine}"))
    for f in report.failures[:10]:
        say(f"{f['file']} failed: {f['error']}")


def ref_of(fields: dict):
    from ..spec.request import ModelRef
    from ..spec.typed import validate

    return validate(ModelRef, fields, "model")


class _Bar:
    """One progress bar across the workers: done/total, images per second, time left (on a terminal)."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress, self.task = quiet, None, None

    def __enter__(self):
        if not self.quiet and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def row(self, r: dict, report) -> None:
        if self.progress is None:
            return
        import time

        if self.task is None:
            self.t0 = time.perf_counter()
            self.task = self.progress.add_task("batch", total=report.total, completed=report.done_before, rate="")
        made = report.made + report.failed
        rate = made / max(time.perf_counter() - self.t0, 1e-6)
        self.progress.update(self.task, completed=report.done_before + made + report.skipped,
                             rate=f"{rate:.2f} images/s")


def _status(folder: Path) -> None:
    from .. import batch as B

    s = B.status(folder)
    out.print(f"{s['done']} done, {s['pending']} pending, {s['failed']} failed, of {s['total']}")
    for f in s["failures"]:
        out.print(escape(f"failed {f['file']}: {f['error']}"))


def _verify(folder: Path) -> None:
    from .. import batch as B

    problems = B.verify(folder)
    B.rebuild_manifest(folder)
    if problems:
        for p in problems:
            out.print(escape(p))
        out.print(f"{len(problems)} problem(s)")
        raise typer.Exit(1)
    out.print(f"all {B.status(folder)['total']} images present, readable and as the batch asked")

