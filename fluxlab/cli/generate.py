"""`fluxlab generate`: flags -> GenerateRequest / ModelRef / Runtime -> service.generate -> progress, files, summary."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..spec.prompts import read_prompt_file
from . import app, err, escape, out, say
from .options import MODEL, REQUEST, RUNTIME, options

Opt = typer.Option
DEFAULT_MODEL = "flux2-klein-4b"


def from_image(path: str, request: dict, model: dict, runtime: dict, name: str | None):
    """Settings recorded in a fluxlab PNG, under the flags given now (which win)."""
    from ..service.outputs import read_record

    record = read_record(path)
    base = record.request.model_dump(exclude_none=True)
    if {"aspect", "preset", "width", "height"} & set(request):  # an explicit size replaces the recorded one
        base.pop("width", None), base.pop("height", None)
    if "seeds" in request:
        base.pop("seed", None)
    merged_model = {**record.model.model_dump(exclude_none=True), **model}
    if name is not None:
        merged_model["name"] = name
    return {**base, **request}, merged_model, {**record.runtime.model_dump(exclude_none=True), **runtime}


class Console:
    """The CLI's event consumer: notices, a progress bar on a terminal, preview files, and a line per image."""

    def __init__(self, quiet: bool, previews: str | None):
        self.quiet, self.previews = quiet, Path(previews) if previews else None
        self.bar, self.task, self.key = None, None, None
        self.summary: dict = {}
        self.written: list = []

    def __call__(self, event) -> None:
        from ..service import events as ev

        if isinstance(event, ev.Notice):
            if not self.quiet:
                say(event.text)
        elif isinstance(event, ev.Step) and self.bar is not None:
            if self.key != (event.prompt_index, event.seeds):
                self.key = (event.prompt_index, event.seeds)
                self.task = self.bar.add_task(f"seed {', '.join(map(str, event.seeds))}", total=event.n)
            self.bar.update(self.task, completed=event.i)
        elif isinstance(event, ev.Preview) and self.previews is not None:
            from ..service.outputs import save_png

            for img, seed in zip(event.images, event.seeds, strict=True):
                save_png(img, self.previews / f"seed{seed}-step{event.i:03d}-{event.kind}.png",
                         {"seed": seed, "step": event.i})
        elif isinstance(event, ev.Image):
            self.written.append(event.path)
            r = event.result.metadata["request"]
            steps = r["steps"]
            ran = event.result.metadata["resolved"].get("steps_run", steps)
            said = f"{ran} of {steps} steps" if ran != steps else f"{steps} steps"
            if self.quiet:
                out.print(escape(str(event.path)))
            else:
                out.print(escape(f"wrote {event.path}  (seed {r['seed']}, {r['width']}x{r['height']}, {said})"))
        elif isinstance(event, ev.Finished):
            self.summary = event.summary

    @contextlib.contextmanager
    def progress(self):
        """A rich progress bar on a terminal; nothing when quiet or when stderr is not a terminal."""
        if self.quiet or not err.is_terminal:
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class Rate(TextColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.2f} it/s" if speed else "-- it/s")

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""),
                      TimeRemainingColumn(), console=err, transient=False) as bar:
            self.bar = bar
            yield


@app.command()
@options(REQUEST, MODEL, RUNTIME)
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    model: Annotated[str | None, Opt("-m", "--model", help=f"Catalog name, local diffusers dir, or hub repo id "
                                                            f"(default: {DEFAULT_MODEL}).")] = None,
    prompt_file: Annotated[str | None, Opt(help="Prompts, one per line (# comments and blanks skipped).")] = None,
    lora: Annotated[list[str] | None, Opt("--lora", help="LoRA FILE[:SCALE] (repeatable: stacked).")] = None,
    transformer: Annotated[str | None, Opt(help="Single-file transformer .safetensors over the base model.")] =
        None,
    out_path: Annotated[str | None, Opt("-o", "--out", help="FILE.png or a folder (default: outputs/).")] = None,
    from_png: Annotated[str | None, Opt("--from", help="Regenerate a fluxlab PNG with its settings.")] = None,
    previews: Annotated[str | None, Opt(help="Save each step's clean estimate as PNGs in this folder.")] = None,
    preview_every: Annotated[int, Opt(help="Decode previews with the VAE every k steps (0: cheap only).")] = 0,
    report: Annotated[str | None, Opt(help="Write timings and peak memory as JSON to this file.")] = None,
    reproducible: Annotated[bool, Opt(help="Leave run timings out of the PNG: same request, same bytes.")] =
        False,
    quiet: Annotated[bool, Opt("-q", "--quiet", help="Print only the written paths.")] = False,
    server: Annotated[str | None, Opt(help="Send the job to a `fluxlab serve` server at this URL instead of "
                                           "running it here.")] = None,
    token: Annotated[str | None, Opt(help="The server's token (default: $FLUXLAB_TOKEN).")] = None,
    **kw,
):
    """Generate images from a text prompt (or a prompt file)."""
    from ..files import check_file_target, check_writable
    from ..runtime.monitor import PeakMemory
    from ..service.generate import generate as run
    from ..service.outputs import FileOutput
    from ..spec.request import GenerateRequest, ModelRef, Runtime, lora_ref
    from ..spec.typed import validate

    request, ref, rt = REQUEST.take(kw), MODEL.take(kw), RUNTIME.take(kw)
    if lora is not None:
        ref["loras"] = [lora_ref(x).model_dump(exclude_none=True) for x in lora]
    if transformer is not None:
        ref["transformer"] = {"path": transformer}
    if preview_every < 0:
        raise UserError(f"--preview-every {preview_every} is invalid; it must be 0 or more")
    if prompt is not None:
        request["prompt"] = prompt
    if from_png:
        request, ref, rt = from_image(from_png, request, ref, rt, model)
    else:
        ref["name"] = model or DEFAULT_MODEL
    if prompt_file:
        if prompt is not None:
            raise UserError("give either a prompt or --prompt-file, not both")
        prompts = read_prompt_file(prompt_file)
        request["prompt"] = prompts if len(prompts) > 1 else prompts[0]
    if "prompt" not in request:
        raise UserError("no prompt given: fluxlab generate \"a prompt\" (or --prompt-file FILE, or --from IMAGE.png)")
    rt.update(release_encoders=True, preview_every=1 if previews else 0, preview_vae_every=preview_every)
    req = validate(GenerateRequest, request)
    if server:
        return remote(server, token, req, validate(ModelRef, ref, "model"), out_path, reproducible, quiet)
    model_ref = validate(ModelRef, ref, "model")
    runtime = validate(Runtime, rt, "runtime")
    target = FileOutput(out_path, reproducible)
    if report:
        check_file_target(Path(report), "--report")
    if previews:
        check_writable(Path(previews), "--previews folder")

    console = Console(quiet, previews)
    with PeakMemory() as peak, console.progress():
        for _ in run(req, model_ref, runtime, events=console, out=target):
            pass
    summary = {**console.summary, "peak_host_rss_bytes": peak.host_peak, "peak_device_bytes": peak.device_peak,
               "images_written": [str(p) for p in console.written]}
    if not quiet:
        print_summary(summary)
    if report:
        from ..files import atomic_write

        atomic_write(Path(report), lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


def remote(url: str, token: str | None, req, ref, out_path: str | None, reproducible: bool, quiet: bool) -> None:
    """The same request run by a server: inputs uploaded, outputs downloaded under the CLI's own names."""
    import shutil
    import tempfile

    from ..client import Client
    from ..service.outputs import FileOutput, read_record, save_png

    target = FileOutput(out_path, reproducible)
    fields = req.model_dump(exclude_none=True)
    for key in ("init", "mask"):
        if key in fields:
            fields[key] = fields[key]["path"]
    if "images" in fields:
        fields["images"] = [x["path"] for x in fields["images"]]
    if ref.loras:
        fields["lora"] = [f"{lo.path}:{lo.scale}" for lo in ref.loras]
    with Client(url, token) as client, tempfile.TemporaryDirectory() as tmp:
        job = client.predict(ref.name, **fields)
        if job["status"] != "succeeded":
            raise UserError(f"the server's prediction {job['id']} {job['status']}: {job.get('error') or ''}".strip())
        files = [client.download(u, Path(tmp) / f"{i}.png") for i, u in enumerate(job["output"] or [])]
        records = [read_record(f) for f in files]
        for f, rec, path in zip(files, records, target.check([r.seed for r in records]), strict=True):
            if reproducible:
                from PIL import Image

                with Image.open(f) as im:
                    save_png(im.copy(), path, rec.model_dump(mode="json", exclude_none=True,
                                                             exclude={"timings"}))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, path)
            r = rec.request
            out.print(escape(str(path) if quiet else f"wrote {path}  (seed {r.seed}, {r.width}x{r.height}, "
                                                      f"{r.steps} steps, on {url})"))


def print_summary(summary: dict) -> None:
    from rich.table import Table

    t = Table("phase", "seconds", title="timings", title_justify="left")
    for k, v in summary.get("phases_s", {}).items():
        t.add_row(k, f"{v:.2f}")
    rates = [r for r in summary.get("it_per_s", []) if r]
    if rates:
        t.add_row("denoise rate", f"{sum(rates) / len(rates):.2f} it/s")
    t.add_row("peak host RSS", f"{summary['peak_host_rss_bytes'] / 2**30:.2f} GiB")
    if summary["peak_device_bytes"] is not None:
        t.add_row("peak device memory", f"{summary['peak_device_bytes'] / 2**30:.2f} GiB")
    err.print(t)
