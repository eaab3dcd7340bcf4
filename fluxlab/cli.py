"""The `fluxlab` command line. Command bodies are thin: parse -> resolve -> run -> save.

torch, diffusers and transformers are imported inside commands, never at module level, so `fluxlab --help`
answers instantly.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    name="fluxlab",
    help="A lab for FLUX image models: generate, inspect, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _say(msg: str) -> None:
    err.print(f"[yellow]note:[/yellow] {msg}")


Opt = typer.Option


def _request_fields(prompt, width, height, aspect, steps, guidance, negative, seed, seeds, num_images, sampler,
                    schedule, eta, preset, template) -> dict:
    """The request fields the user actually gave (None = not given), with --seeds parsed."""
    fields = dict(prompt=prompt, width=width, height=height, aspect=aspect, steps=steps, guidance=guidance,
                  negative=negative, seed=seed, num_images=num_images, sampler=sampler, schedule=schedule, eta=eta,
                  preset=preset, template=template)
    if seeds is not None:
        fields["seeds"] = parse_int_list(seeds, "--seeds")
    return {k: v for k, v in fields.items() if v is not None}


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of whole numbers, e.g. 1,5,9") from None


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path} ({e})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (blank lines and # comments are skipped)")
    return prompts


SAMPLER_HELP = ("euler (reference) | heun | dpmpp_2m | ddim (on a rectified flow DDIM's update equals Euler's; "
                "kept for the familiar name) | euler_ancestral (stochastic, see --eta).")


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    model: Annotated[str, Opt("-m", "--model", help="Catalog name, local diffusers dir, or hub repo id.")] =
        "flux2-klein-4b",
    width: Annotated[int | None, Opt("-W", "--width", help="Width in pixels (multiple of 16).")] = None,
    height: Annotated[int | None, Opt("-H", "--height", help="Height in pixels (multiple of 16).")] = None,
    aspect: Annotated[str | None, Opt(help="Size preset: 1:1 9:16 3:4 4:3 16:9 512 768.")] = None,
    steps: Annotated[int | None, Opt(help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[float | None, Opt(help="Guidance scale (default: the model's).")] = None,
    negative: Annotated[str | None, Opt(help="Negative prompt (base models with real CFG).")] = None,
    seed: Annotated[int | None, Opt(help="Seed 0..4294967295 (random when omitted).")] = None,
    seeds: Annotated[str | None, Opt(help="Explicit seeds, e.g. 1,5,9 (one image each).")] = None,
    num_images: Annotated[int | None, Opt("-n", "--num-images", help="Images with seeds S, S+1, ...")] = None,
    prompt_file: Annotated[str | None, Opt(help="Prompts, one per line (# comments and blanks skipped).")] = None,
    batch_size: Annotated[int | None, Opt(help="Images per forward pass (default: from free memory).")] = None,
    sampler: Annotated[str | None, Opt(help=SAMPLER_HELP)] = None,
    schedule: Annotated[str | None, Opt(help="default (the model's) | linear | shift:S.")] = None,
    eta: Annotated[float | None, Opt(help="Re-noising for stochastic samplers, 0..1 (default 1).")] = None,
    preset: Annotated[str | None, Opt(help="preview | balanced | quality, or a saved preset.")] = None,
    template: Annotated[str | None, Opt(help="Prompt template: photo, oil-painting, ... or a saved one.")] = None,
    image: Annotated[list[str] | None, Opt("--image", "-i", help="Reference image (repeatable): FLUX.2 editing, "
                                           "or the image to edit with flux1-kontext-dev.")] = None,
    init: Annotated[str | None, Opt(help="Start image for img2img or inpainting.")] = None,
    strength: Annotated[float | None, Opt(help="img2img strength, 0 < S <= 1 (default 0.6; 1.0 with --mask).")] =
        None,
    mask: Annotated[str | None, Opt(help="Inpainting mask for --init: white = repaint.")] = None,
    dtype: Annotated[str, Opt(help="auto|bf16|fp16|fp32 (auto: bf16 where fast).")] = "auto",
    device: Annotated[str, Opt(help="auto|cpu|cuda|cuda:N|mps.")] = "auto",
    memory: Annotated[str, Opt(help="Memory plan: auto | speed | balanced | low.")] = "auto",
    budget: Annotated[str | None, Opt(help="Plan for this much device memory, e.g. 6GB.")] = None,
    quantize: Annotated[str | None, Opt(help="Quantize weights: int8 (any device) | fp8 | nf4 (CUDA).")] = None,
    lora: Annotated[list[str] | None, Opt("--lora", help="LoRA FILE[:SCALE] (repeatable: stacked).")] = None,
    fuse_lora: Annotated[bool, Opt(help="Merge the LoRAs into the weights (faster steps).")] = False,
    out_path: Annotated[str | None, Opt("-o", "--out", help="FILE.png or a directory (default: outputs/).")] =
        None,
    transformer: Annotated[str | None, Opt(help="Single-file transformer .safetensors over the base model.")] =
        None,
    from_image: Annotated[str | None, Opt("--from", help="Regenerate a fluxlab PNG with its settings.")] = None,
    previews: Annotated[str | None, Opt(help="Save each step's clean estimate as PNGs in this directory.")] = None,
    preview_every: Annotated[int, Opt(help="Decode previews with the VAE every k steps (0: cheap only).")] = 0,
    report: Annotated[str | None, Opt(help="Write timings and peak memory as JSON to this file.")] = None,
    reproducible: Annotated[bool, Opt(help="Leave run timings out of the PNG: same request, same bytes.")] =
        False,
    quiet: Annotated[bool, Opt("-q", "--quiet", help="Print only the written paths.")] = False,
):
    """Generate images from a text prompt (or a prompt file)."""
    from .request import make_request

    given = _request_fields(prompt, width, height, aspect, steps, guidance, negative, seed, seeds, num_images,
                            sampler, schedule, eta, preset, template)
    given |= {k: v for k, v in dict(images=image, init=init, strength=strength, mask=mask).items() if v is not None}
    if from_image:
        model, transformer, dtype, given = _from_image(from_image, model, transformer, dtype, given)
    prompts = [given.pop("prompt")] if "prompt" in given else []
    if prompt_file:
        if prompts:
            raise UserError("give either a prompt or --prompt-file, not both")
        prompts = read_prompt_file(prompt_file)
    if not prompts:
        raise UserError("no prompt given: fluxlab generate \"a prompt\" (or --prompt-file FILE, or --from IMAGE.png)")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is invalid; it must be 1 or more")
    if preview_every < 0:
        raise UserError(f"--preview-every {preview_every} is invalid; it must be 0 or more")
    _check_memory_flags(memory, budget, quantize)
    requests = [make_request(prompt=p, **given) for p in prompts]

    # Validate against the model before loading any weights, so bad input fails in milliseconds.
    from .loading import locate
    from .request import resolve

    source = locate(model)
    if source.spec is not None:  # known before download: catalog names and local directories
        for r in requests:
            resolve(r, source.spec)

    from .monitor import PeakMemory
    from .output import output_paths, save_png
    from .pipeline import load

    notify = (lambda m: None) if quiet else _say
    with err.status("loading model...", spinner="dots") if not quiet and err.is_terminal else \
            contextlib.nullcontext():
        pipe = load(model, device=device, dtype=dtype, transformer=transformer, notify=notify, memory=memory,
                    budget=budget, quantize=quantize, loras=lora, fuse_lora=fuse_lora)
    jobs = [resolve(r, pipe.spec) for r in requests]
    pipe.encode_jobs(jobs)  # then the text encoders are released before the transformer loads
    total = sum(len(j.seeds) for j in jobs)
    paths = iter(output_paths(out_path, total, [s for j in jobs for s in j.seeds]))
    previewer = _Previewer(pipe, previews, preview_every) if previews else None
    written, rows = [], []
    with PeakMemory(pipe.device) as peak, _progress(quiet) as bar:
        for n, (r, job) in enumerate(zip(requests, jobs, strict=True)):
            for res in pipe.generate_iter(r, batch_size=batch_size, callback=_step_callback(bar, previewer, job)):
                p = next(paths)
                t0 = time.perf_counter()
                save_png(res.image, p, res.metadata, None if reproducible else res.timings)
                rows.append({**res.timings, "save": round(time.perf_counter() - t0, 4), "seed": res.seed,
                             "path": str(p), "batch": (n, res.batch)})
                written.append(p)
                if quiet:
                    out.print(str(p))
                else:
                    out.print(f"wrote {p}  (seed {res.seed}, {job.width}x{job.height}, {job.steps} steps)")
    summary = _summary(rows, peak, pipe)
    if not quiet:
        _print_summary(summary)
    if report:
        from .output import atomic_write

        atomic_write(Path(report), lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


def _check_memory_flags(memory: str, budget: str | None, quantize: str | None) -> None:
    """Memory flags checked before any weights load."""
    from .memory import MODES, parse_size
    from .quantize import MODES as QMODES

    if memory not in MODES:
        raise UserError(f"unknown memory mode {memory!r}; valid: {', '.join(MODES)}")
    if budget is not None and parse_size(budget) <= 0:
        raise UserError(f"--budget {budget} must be more than 0")
    if quantize is not None and quantize not in QMODES:
        raise UserError(f"unknown quantization {quantize!r}; valid: {', '.join(QMODES)}")


def _from_image(path, model, transformer, dtype, given):
    """Settings recorded in a fluxlab PNG, under the flags given now (which win)."""
    from .output import read_metadata

    meta = read_metadata(path)
    base = {k: meta[k] for k in ("prompt", "negative", "width", "height", "steps", "guidance", "seed", "sampler",
                                 "eta") if meta.get(k) is not None}
    if isinstance(meta.get("schedule"), dict):
        base["schedule"] = meta["schedule"].get("name", "default")
    if "aspect" in given or "preset" in given:
        base.pop("width", None), base.pop("height", None)
    if "seeds" in given:
        base.pop("seed", None)
    base |= _recorded_inputs(meta)
    model = meta["model"] if model == "flux2-klein-4b" else model
    transformer = transformer or meta.get("transformer_file")
    dtype = meta.get("dtype", dtype) if dtype == "auto" else dtype
    return model, transformer, dtype, {**base, **given}


def _recorded_inputs(meta: dict) -> dict:
    """The input images an edit was made from, checked to be the same files (by SHA-256) as then."""
    from .images import inspect

    fields: dict = {}
    for row in meta.get("inputs", []):
        path = row["path"]
        if not Path(path).is_file():
            raise UserError(f"this image was made from {row['role']} {row['file']} ({path}), which is no longer "
                            f"there; pass it again with --{'image' if row['role'] == 'reference' else row['role']}")
        if inspect(path, row["role"]).sha256 != row["sha256"]:
            raise UserError(f"{row['role']} {path} has changed since this image was made (SHA-256 differs)")
        if row["role"] == "reference":
            fields.setdefault("images", []).append(path)
        else:
            fields[row["role"]] = path
    if "strength" in meta:
        fields["strength"] = meta["strength"]
    return fields


class _Previewer:
    """Writes each step's clean estimate: cheap projection every step, the VAE every k steps."""

    def __init__(self, pipe, folder: str, every: int):
        self.pipe, self.dir, self.every = pipe, Path(folder), every

    def __call__(self, info, job):
        from .output import save_png

        i = info["i"]
        use_vae = self.every > 0 and (i + 1) % self.every == 0
        for img, seed in zip(self.pipe.preview(info["denoised"], job, use_vae=use_vae), info["seeds"], strict=True):
            kind = "vae" if use_vae else "fast"
            save_png(img, self.dir / f"seed{seed}-step{i + 1:03d}-{kind}.png", {"seed": seed, "step": i + 1})


def _step_callback(bar, previewer, job):
    state = {}

    def cb(info):
        if bar is not None:
            key = info["seeds"]
            if state.get("key") != key:
                state["key"] = key
                state["task"] = bar.add_task(f"seed {', '.join(map(str, key))}", total=info["steps"])
            bar.update(state["task"], completed=info["i"] + 1)
        if previewer is not None:
            previewer(info, job)

    return cb


@contextlib.contextmanager
def _progress(quiet: bool):
    """A rich progress bar on a terminal; nothing when quiet or when stderr is not a terminal."""
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            from rich.text import Text

            return Text(f"{speed:.2f} it/s" if speed else "-- it/s")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""),
                  TimeRemainingColumn(), console=err, transient=False) as bar:
        yield bar


def _summary(rows, peak, pipe) -> dict:
    phases = ("load", "encode", "prepare", "denoise", "decode", "save")
    total = {k: 0.0 for k in phases}
    seen_batches = set()
    for r in rows:
        if r["batch"] not in seen_batches:  # images of one batch share the batch's phase times
            seen_batches.add(r["batch"])
            for k in ("prepare", "denoise", "decode"):
                total[k] += r.get(k) or 0.0
        total["save"] += r["save"]
    # Loading is lazy and prompts are encoded up front (encode_jobs): the pipeline keeps both totals.
    total["load"], total["encode"] = pipe.load_seconds, pipe.encode_seconds
    return {
        "images": len(rows),
        "phases_s": {k: round(v, 4) for k, v in total.items()},
        "it_per_s": [r.get("it_per_s") for r in rows],
        "peak_host_rss_bytes": peak.host_peak,
        "peak_device_bytes": peak.device_peak,
        "device": str(pipe.device),
        "images_written": [r["path"] for r in rows],
    }


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    t = Table("phase", "seconds", title="timings", title_justify="left")
    for k, v in summary["phases_s"].items():
        t.add_row(k, f"{v:.2f}")
    rates = [r for r in summary["it_per_s"] if r]
    if rates:
        t.add_row("denoise rate", f"{sum(rates) / len(rates):.2f} it/s")
    t.add_row("peak host RSS", f"{summary['peak_host_rss_bytes'] / 2**30:.2f} GiB")
    if summary["peak_device_bytes"] is not None:
        t.add_row("peak device memory", f"{summary['peak_device_bytes'] / 2**30:.2f} GiB")
    err.print(t)


@app.command()
def models(
    as_json: Annotated[bool, Opt("--json", help="Machine-readable output.")] = False,
):
    """List the catalog's models and whether each is in the local hub cache."""
    import json

    from .catalog import CATALOG

    cached = _cached_repos()
    rows = []
    for spec in CATALOG.values():
        size = sum(spec.sizes_gb.values())
        have = cached.get(spec.repo)
        if spec.bundled:  # shipped inside the package
            have = sum(f.stat().st_size for f in (Path(__file__).parent / spec.bundled).rglob("*") if f.is_file())
        rows.append({
            "name": spec.name, "repo": spec.repo, "family": spec.family, "steps": spec.steps,
            "guidance": spec.guidance, "guidance_mode": spec.guidance_mode, "text_encoder": spec.text_encoder,
            "license": spec.license, "gated": spec.gated, "size_gb": round(size, 3), "bundled": bool(spec.bundled),
            "cached_gb": None if have is None else round(have / 1e9, 3),
        })
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("name", "family", "steps", "guidance", "text encoder", "license", "size", "local cache")
    for r in rows:
        g = {"none": "none (distilled)", "embedded": f"{r['guidance']:g} embedded", "cfg": f"{r['guidance']:g} CFG"}
        lic = r["license"] + (" (gated)" if r["gated"] else "")
        local = "-" if r["cached_gb"] is None else f"{r['cached_gb']:.1f} GB"
        size = f"~{r['size_gb']:.0f} GB"
        if r["bundled"]:
            local, size = f"bundled ({r['cached_gb'] * 1000:.0f} MB)", f"{r['size_gb'] * 1000:.0f} MB"
        table.add_row(r["name"], r["family"], str(r["steps"]), g[r["guidance_mode"]], r["text_encoder"], lic,
                      size, local)
    out.print(table)
    out.print("Get one: hf download REPO (gated repos: accept the license on its page, then hf auth login).")


def _cached_repos() -> dict[str, int]:
    """Bytes in the local hub cache per model repo (empty when there is no cache)."""
    try:
        from huggingface_hub import scan_cache_dir

        return {r.repo_id: r.size_on_disk for r in scan_cache_dir().repos if r.repo_type == "model"}
    except Exception:  # no cache directory yet, or an unreadable one: nothing is cached
        return {}


@app.command()
def show(
    image: Annotated[Path, typer.Argument(help="A PNG written by fluxlab.")],
    as_json: Annotated[bool, Opt("--json", help="Print the metadata as JSON.")] = False,
):
    """Print the settings an image was made with."""
    import json

    from .output import read_metadata

    meta = read_metadata(image)
    if as_json:
        out.print_json(json.dumps(meta))
        return
    for k, v in meta.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif k == "inputs":
            v = "; ".join(f"{r['role']} {r['path']} (sha256 {r['sha256'][:16]}...)" for r in v)
        out.print(f"[bold]{k:>16}[/bold]  {v}")


@app.command()
def grid(
    prompt: Annotated[str, typer.Argument(help="The prompt every cell shares.")],
    x: Annotated[str, Opt("--x", help="Column axis FIELD=V1,V2,... e.g. steps=10,25,50.")],
    y: Annotated[str | None, Opt("--y", help="Row axis, e.g. guidance=3,7,12.")] = None,
    model: Annotated[str, Opt("-m", "--model")] = "flux2-klein-4b",
    width: Annotated[int | None, Opt("-W", "--width")] = None,
    height: Annotated[int | None, Opt("-H", "--height")] = None,
    steps: Annotated[int | None, Opt()] = None,
    guidance: Annotated[float | None, Opt()] = None,
    negative: Annotated[str | None, Opt()] = None,
    seed: Annotated[int, Opt(help="The seed every cell shares (unless an axis varies it).")] = 0,
    sampler: Annotated[str | None, Opt(help=SAMPLER_HELP)] = None,
    schedule: Annotated[str | None, Opt()] = None,
    preset: Annotated[str | None, Opt()] = None,
    template: Annotated[str | None, Opt()] = None,
    dtype: Annotated[str, Opt()] = "auto",
    device: Annotated[str, Opt()] = "auto",
    transformer: Annotated[str | None, Opt()] = None,
    out_dir: Annotated[str, Opt("-o", "--out", help="Directory for the cells, sheet.png and grid.csv.")] = "grid",
    quiet: Annotated[bool, Opt("-q", "--quiet")] = False,
):
    """Vary one or two settings over a grid: every cell's image, a labelled contact sheet and a CSV."""
    from .grid import contact_sheet, parse_axis, plan_cells, run_grid, write_csv
    from .loading import locate
    from .output import save_png
    from .request import make_request, resolve

    ax, ay = parse_axis(x), (parse_axis(y) if y else None)
    if ay and ay.field == ax.field:
        raise UserError(f"both axes vary {ax.field}; choose two different fields")
    base = _request_fields(prompt, width, height, None, steps, guidance, negative, seed, None, None, sampler,
                           schedule, None, preset, template)
    cells = plan_cells(base, ax, ay)
    source = locate(model)
    for cell in cells:  # every cell is checked before any weights load
        req = make_request(**cell.fields)
        if source.spec is not None:
            resolve(req, source.spec)

    from .pipeline import load

    notify = (lambda m: None) if quiet else _say
    pipe = load(model, device=device, dtype=dtype, transformer=transformer, notify=notify)
    folder = Path(out_dir)

    def said(cell):
        if not quiet:
            out.print(f"cell r{cell.row} c{cell.col}: {cell.seconds:.2f} s -> {cell.path}")

    run_grid(pipe, cells, folder, on_cell=said)
    write_csv(cells, ax, ay, folder / "grid.csv")
    title = f"{prompt} | {pipe.label} | seed {seed}"
    save_png(contact_sheet(cells, ax, ay, title), folder / "sheet.png", {"grid": {"x": x, "y": y}, "prompt": prompt})
    out.print(f"wrote {len(cells)} images, {folder / 'sheet.png'} and {folder / 'grid.csv'}")


@app.command()
def bench(
    model: Annotated[str, Opt("-m", "--model")] = "flux2-klein-4b",
    sizes: Annotated[str, Opt(help="Square sizes to time, e.g. 512,1024.")] = "512,1024",
    steps: Annotated[int | None, Opt(help="Steps (default: the model's).")] = None,
    batch: Annotated[int, Opt(help="Images per forward pass.")] = 1,
    find_max: Annotated[bool, Opt(help="Search the largest size, then batch, that fit the budget.")] = False,
    budget: Annotated[str | None, Opt(help="Memory budget, e.g. 6GB (default: the device's free memory).")] = None,
    memory: Annotated[str, Opt(help="Memory plan: auto | speed | balanced | low.")] = "auto",
    dtype: Annotated[str, Opt()] = "auto",
    device: Annotated[str, Opt()] = "auto",
):
    """Time a model on this machine: phases, it/s, peak memory; --find-max; saves a hardware profile."""
    from rich.table import Table

    from .benchmark import find_max as search
    from .benchmark import measure, write_profile
    from .executor import device_budget
    from .memory import parse_size
    from .pipeline import load

    size_list = parse_int_list(sizes, "--sizes")
    _check_memory_flags(memory, budget, None)
    pipe = load(model, device=device, dtype=dtype, notify=_say, memory=memory, budget=budget)
    measure(pipe, min(size_list), 1, 1)  # warm-up: loads the models and fills caches; not reported
    table = Table("size", "batch", "encode s", "denoise s", "decode s", "total s", "it/s", "peak host GB",
                  "peak device GB", title=f"{pipe.label} on {pipe.device}", title_justify="left")

    def row(m):
        s = m.seconds
        table.add_row(f"{m.width}x{m.height}", str(m.batch), f"{s['encode']:.2f}", f"{s['denoise']:.2f}",
                      f"{s['decode']:.2f}", f"{s['total']:.2f}", f"{m.it_per_s or 0:.2f}", f"{m.peak_host_gb:.2f}",
                      "-" if m.peak_device_gb is None else f"{m.peak_device_gb:.2f}")

    runs = []
    for size in size_list:
        m = measure(pipe, size, batch, steps)
        runs.append(m)
        row(m)
    max_size = max_batch = None
    if find_max:
        limit = parse_size(budget) if budget else device_budget(pipe.device)
        max_size, max_batch, tried = search(pipe, limit, steps, on_try=lambda m, plan: row(m))
        runs += tried
    out.print(table)
    if find_max:
        out.print(f"largest size that fits {parse_size(budget) / 2**30 if budget else limit / 2**30:.1f} GB: "
                  f"{max_size}x{max_size}" + (f", batch {max_batch}" if max_batch else "") if max_size else
                  "nothing fits this budget")
    out.print(f"profile saved to {write_profile(pipe, runs, max_size, max_batch)}")


@app.command("device")
def device_info(device: Annotated[str, Opt(help="auto|cpu|cuda|cuda:N|mps.")] = "auto"):
    """What this machine offers: device, the dtype auto picks, free memory, quantization modes."""
    from .devices import cpu_has_fast_bf16, dtype_name, resolve_device, resolve_dtype
    from .executor import device_budget
    from .memory import GB
    from .quantize import supported_modes

    dev = resolve_device(device)
    name = dev.type
    if dev.type == "cuda":
        import torch

        name = f"{torch.cuda.get_device_name(dev)} ({dev})"
    out.print(f"device: {name}")
    out.print(f"dtype auto: {dtype_name(resolve_dtype('auto', dev))}"
              + (" (CPU with AMX)" if dev.type == "cpu" and cpu_has_fast_bf16() else ""))
    out.print(f"free memory: {device_budget(dev) / GB:.1f} GB")
    out.print(f"quantization: {', '.join(supported_modes(dev))}")


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="ai-toolkit-style YAML (job: extension).")] = None,
    images: Annotated[str | None, Opt(help="One-line training: a folder or .zip of images (+ .txt captions).")] =
        None,
    trigger: Annotated[str | None, Opt(help="Trigger word for one-line training, e.g. 'zxq person'.")] = None,
    steps: Annotated[int, Opt(help="One-line training: steps.")] = 1000,
    model: Annotated[str, Opt("-m", "--model", help="One-line training: base model.")] = "flux2-klein-4b",
    name: Annotated[str, Opt(help="One-line training: run name.")] = "lora",
    out_dir: Annotated[str, Opt("--out", help="One-line training: training folder.")] = "output",
    resolution: Annotated[int | None, Opt(help="One-line training: resolution (default: the model's size, "
                                               "1024 for FLUX models).")] = None,
    resume: Annotated[str | None, Opt(help="Continue the run in this folder from its last checkpoint.")] = None,
    device: Annotated[str | None, Opt(help="Override the config's device.")] = None,
):
    """Train a LoRA: from a YAML config, from a folder of images (--images), or --resume a run."""
    from .loading import quiet_libraries
    from .trainconfig import load_yaml, one_line
    from .trainer import Trainer

    if resume:
        job = load_yaml(Path(resume) / "config.yaml")
    elif config:
        if images:
            raise UserError("give a config file or --images, not both")
        job = load_yaml(config)
    elif images:
        if not trigger:
            raise UserError("one-line training needs --trigger WORD (what prompts will use to call the concept)")
        job = one_line(images, trigger, steps, model, name, out_dir, resolution)
    else:
        raise UserError("fluxlab train CONFIG.yaml, or fluxlab train --images DIR --trigger WORD, or --resume RUN")
    quiet_libraries()
    trainer = Trainer(job, notify=_say, device=device)
    trainer.setup()
    final = trainer.train(resume=bool(resume))
    if trainer.rank == 0:
        out.print(f"trained: {final}")


lora_app = typer.Typer(help="Inspect and convert LoRA files.", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


@lora_app.command("info")
def lora_info(
    file: Annotated[str, typer.Argument(help="A LoRA .safetensors file.")],
    as_json: Annotated[bool, Opt("--json")] = False,
):
    """Format, model family, rank, targeted blocks and metadata of a LoRA file."""
    from . import lora as L

    data = L.info(L.read(file))
    if as_json:
        out.print_json(json.dumps(data))
        return
    for k, v in data.items():
        out.print(f"[bold]{k:>9}[/bold]  {v}")


@lora_app.command("convert")
def lora_convert(
    src: Annotated[str, typer.Argument(help="LoRA file to read (any supported format).")],
    dst: Annotated[str, typer.Argument(help="File to write.")],
    to: Annotated[str, Opt("--to", help="diffusers | kohya | ai-toolkit | comfyui")],
):
    """Rewrite a LoRA under another tool's key names (the weight update stays the same)."""
    from . import lora as L

    if to not in L.WRITE_FORMATS:
        raise UserError(f"unknown LoRA format {to!r}; valid: {', '.join(L.WRITE_FORMATS)}")
    lo = L.read(src)
    L.write(lo, to, dst)
    out.print(f"wrote {dst} ({to}, {lo.family}, rank {lo.rank}, {len(lo.modules)} modules) from {lo.format}")


preset_app = typer.Typer(help="Named sets of generation settings (stored in your config directory).",
                         no_args_is_help=True)
template_app = typer.Typer(help="Prompt templates with a {prompt} placeholder.", no_args_is_help=True)
app.add_typer(preset_app, name="preset")
app.add_typer(template_app, name="template")


@preset_app.command("save")
def preset_save(
    name: Annotated[str, typer.Argument(help="Preset name.")],
    width: Annotated[int | None, Opt("-W", "--width")] = None,
    height: Annotated[int | None, Opt("-H", "--height")] = None,
    aspect: Annotated[str | None, Opt()] = None,
    steps: Annotated[int | None, Opt()] = None,
    guidance: Annotated[float | None, Opt()] = None,
    negative: Annotated[str | None, Opt()] = None,
    sampler: Annotated[str | None, Opt(help=SAMPLER_HELP)] = None,
    schedule: Annotated[str | None, Opt()] = None,
    eta: Annotated[float | None, Opt()] = None,
):
    """Save the given flags as a preset (use it with generate --preset NAME)."""
    from .presets import save_preset
    from .request import make_request

    values = {k: v for k, v in dict(width=width, height=height, aspect=aspect, steps=steps, guidance=guidance,
                                     negative=negative, sampler=sampler, schedule=schedule, eta=eta).items()
              if v is not None}
    make_request(prompt="", **values)  # the same type checks as a generation request
    if sampler:
        from .sampling import get_sampler

        get_sampler(sampler)
    if schedule:
        from .request import parse_schedule

        parse_schedule(schedule)
    f = save_preset(name, values)
    out.print(f"saved preset {name} to {f}")


@preset_app.command("list")
def preset_list():
    """Built-in and saved presets."""
    from .presets import BUILTIN_PRESETS, user_presets

    for kind, presets in BUILTIN_PRESETS.items():
        label = "distilled models (fixed steps: size changes)" if kind == "distilled" else "other models"
        for name, values in presets.items():
            out.print(f"{name:<12} built-in, {label}: {values}")
    for name, values in user_presets().items():
        out.print(f"{name:<12} saved: {values}")


@preset_app.command("delete")
def preset_delete(name: Annotated[str, typer.Argument()]):
    """Delete a saved preset."""
    from .presets import delete_preset

    delete_preset(name)
    out.print(f"deleted preset {name}")


@template_app.command("save")
def template_save(name: Annotated[str, typer.Argument()], text: Annotated[str, typer.Argument()]):
    """Save a template; {prompt} marks where the prompt goes."""
    from .presets import save_template

    out.print(f"saved template {name} to {save_template(name, text)}")


@template_app.command("list")
def template_list():
    """Built-in and saved templates."""
    from .presets import BUILTIN_TEMPLATES, user_templates

    for name, text in {**BUILTIN_TEMPLATES, **user_templates()}.items():
        out.print(f"[bold]{name}[/bold]: {text}")


@template_app.command("delete")
def template_delete(name: Annotated[str, typer.Argument()]):
    """Delete a saved template."""
    from .presets import delete_template

    delete_template(name)
    out.print(f"deleted template {name}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: one line and exit 2 for user errors, 130 on Ctrl-C, never a traceback for those."""
    try:
        # Without standalone mode typer returns the exit code (130 after Ctrl-C) instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code == 130:
            err.print("interrupted")
        return code if isinstance(code, int) else 0
    except UserError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    except typer.TyperException as e:  # click usage errors (typer vendors click): bad flag, bad number
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
            return 0
        err.print(f"[red]error:[/red] {e.format_message()}")
        return 2
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return 130
    except typer.Exit as e:
        return e.exit_code


def run() -> None:
    sys.exit(main())
