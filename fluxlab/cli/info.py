"""`fluxlab models`, `device`, `show` and `bench`: what is here, what this machine does, what an image holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import UserError
from . import app, escape, out, say
from .options import parse_int_list

Opt = typer.Option


@app.command()
def models(as_json: Annotated[bool, Opt("--json", help="Machine-readable output.")] = False):
    """List the catalog's models and whether each is in the local hub cache."""
    from ..service.info import models as rows

    data = rows()
    if as_json:
        out.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table("name", "repo", "family", "steps", "guidance", "license", "size", "local")
    for column in table.columns[:2]:
        column.no_wrap = True  # names and repos are what people copy; they never truncate
    for r in data:
        g = {"none": "none (distilled)", "embedded": f"{r['guidance']:g} embedded", "cfg": f"{r['guidance']:g} CFG"}
        lic = r["license"] + (" (gated)" if r["gated"] else "")
        local = "-" if r["cached_gb"] is None else f"{r['cached_gb']:.1f} GB"
        size = f"~{r['size_gb']:.0f} GB"
        if r["bundled"]:
            local, size = f"bundled ({r['cached_gb'] * 1000:.0f} MB)", f"{r['size_gb'] * 1000:.0f} MB"
        table.add_row(r["name"], r["repo"] or "(bundled)", r["family"], str(r["steps"]), g[r["guidance_mode"]], lic,
                      size, local)
    out.print(table)
    from ..caption.catalog import CAPTIONERS

    captioners = Table("captioner", "repo", "size", "license", "what it writes")
    for c in CAPTIONERS.values():
        captioners.add_row(c.name, c.repo or "(bundled)", f"{c.size_gb:.1f} GB" if c.size_gb else "-", c.license,
                           c.description)
    out.print(captioners)
    out.print("Get one: hf download REPO (gated repos: accept the license on its page, then hf auth login).")


@app.command("device")
def device_info(device: Annotated[str, Opt(help="auto|cpu|cuda|cuda:N|mps.")] = "auto"):
    """What this machine offers: device, the dtype auto picks, free memory, quantization modes, threads."""
    from ..service.info import device as info

    d = info(device)
    out.print(f"device: {d['device']}")
    out.print(f"dtype auto: {d['dtype_auto']}" + (" (CPU with AMX)" if d["amx"] else ""))
    out.print("bf16 weights compute in " + ("bf16" if d["bf16_compute"] else "fp32 (faster than bf16 on this CPU)"))
    out.print(f"free memory: {d['free_gb']:.1f} GB")
    out.print(f"quantization: {', '.join(d['quantization'])}")
    out.print(f"cpu flags: {', '.join(d['cpu_flags']) or '-'}")
    out.print(f"threads: {d['threads']} ({d['threads_reason']})")


@app.command()
def show(
    image: Annotated[str, typer.Argument(help="A PNG written by fluxlab.")],
    as_json: Annotated[bool, Opt("--json", help="Print the record as JSON.")] = False,
):
    """Print the settings an image was made with."""
    from ..service.info import show as record

    rec = record(image)
    if as_json:
        out.print_json(rec.model_dump_json(exclude_none=True))
        return
    for k, v in rec.flat().items():
        out.print(f"[bold]{k:>16}[/bold]  " + escape(str(v)))


@app.command()
def bench(
    model: Annotated[str, Opt("-m", "--model")] = "flux2-klein-4b",
    sizes: Annotated[str | None, Opt(help="Square sizes to time, e.g. 512,1024 (default: half the model's "
                                          "default size, and the default).")] = None,
    steps: Annotated[int | None, Opt(help="Steps (default: the model's).")] = None,
    batch: Annotated[int, Opt(help="Images per forward pass.")] = 1,
    find_max: Annotated[bool, Opt(help="Search the largest size, then batch, that fit the budget.")] = False,
    budget: Annotated[str | None, Opt(help="Memory budget, e.g. 6GB (default: the device's free memory).")] = None,
    memory: Annotated[str, Opt(help="Memory plan: auto | speed | balanced | low.")] = "auto",
    dtype: Annotated[str, Opt()] = "auto",
    device: Annotated[str, Opt()] = "auto",
    cache: Annotated[list[str] | None, Opt("--cache", help="Also time each size with step caching, e.g. fbc:0.1 "
                                                          "(repeatable): a row per cache beside the plain one.")]
    = None,
    compile: Annotated[bool, Opt("--compile", help="Then compile the transformer's blocks (torch.compile) and time "
                                                    "every row again; the compile time is its own column.")] = False,
):
    """Time a model on this machine: phases, it/s, peak memory; --find-max; saves a hardware profile."""
    from rich.table import Table

    from ..runtime.loading import locate
    from ..service.api import load
    from ..service.bench import compile_transformer, default_sizes, measure, write_profile
    from ..service.bench import find_max as search

    if batch < 1:
        raise UserError(f"--batch {batch} is invalid; it must be 1 or more")
    from ..spec.values import parse_cache

    caches = [c for c in (cache or []) if parse_cache(c) is not None]
    spec = locate(model).spec
    size_list = parse_int_list(sizes, "--sizes") if sizes else (default_sizes(spec) if spec else [512, 1024])
    if not size_list:
        raise UserError("--sizes is empty; give sizes like --sizes 512,1024")
    if spec is not None:
        for s in size_list:
            if s % 16 or not spec.min_side <= s <= spec.max_side:
                raise UserError(f"size {s} is not valid for {spec.name}: a multiple of 16 from {spec.min_side} to "
                                f"{spec.max_side}")
    pipe = load(model, device=device, dtype=dtype, notify=say, memory=memory, budget=budget)
    measure(pipe, min(size_list), 1, 1)  # warm-up: loads the models and fills caches; not reported
    table = Table(title=f"{pipe.label} on {pipe.device}", title_justify="left")
    for name in ("size", "batch", "cache", "compiled", "encode s", "denoise s", "decode s", "total s", "it/s",
                 "peak host GB", "peak device GB"):
        table.add_column(name, no_wrap=True)

    def row(m):
        s = m.seconds
        compiled = f"yes ({s['compile']:.1f} s to compile)" if "compile" in s else "-"
        table.add_row(f"{m.width}x{m.height}", str(m.batch), m.cache or "-", compiled, f"{s['encode']:.2f}",
                      f"{s['denoise']:.2f}", f"{s['decode']:.2f}", f"{s['total']:.2f}", f"{m.it_per_s or 0:.2f}",
                      f"{m.peak_host_gb:.2f}", "-" if m.peak_device_gb is None else f"{m.peak_device_gb:.2f}")

    runs = []
    for size in size_list:
        m = measure(pipe, size, batch, steps)
        runs.append(m)
        row(m)
        for c in caches:  # not in the profile: it describes the machine, the cache the request
            row(measure(pipe, size, batch, steps, cache=c))
    if compile:  # the same rows again on the compiled transformer (not in the profile either)
        import dataclasses
        import time

        compile_transformer(pipe)
        for size in size_list:
            for c in [None, *caches]:
                t0 = time.perf_counter()
                measure(pipe, size, batch, steps, cache=c)  # the first run at a size compiles
                first = time.perf_counter() - t0
                m = measure(pipe, size, batch, steps, cache=c)
                row(dataclasses.replace(m, seconds={**m.seconds, "compile": round(max(first - m.seconds["total"],
                                                                                      0.0), 3)}))
    max_size = max_batch = None
    if find_max:
        from ..runtime.executor import device_budget
        from ..runtime.memory import parse_size

        limit = parse_size(budget) if budget else device_budget(pipe.device)
        max_size, max_batch, tried = search(pipe, limit, steps, on_try=lambda m, plan: row(m))
        runs += tried
    out.print(table)
    if find_max:
        out.print(f"largest size that fits {limit / 2**30:.1f} GB: {max_size}x{max_size}"
                  + (f", batch {max_batch}" if max_batch else "") if max_size else "nothing fits this budget")
    out.print(escape(f"profile saved to {write_profile(pipe, runs, max_size, max_batch)}"))
