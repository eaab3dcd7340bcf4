"""`fluxlab batch`: resumable batch generation, from one process to a Ray cluster.

    from fluxlab import batch
    plan = batch.make_plan("prompts.txt", "demo", seeds="0-7", steps=20)
    report = batch.run(plan, "out/", engine="auto")      # local | accelerate | ray
    batch.status("out/"), batch.verify("out/")

A rerun of the same plan into the same folder skips every finished image and makes only the missing ones; a
folder holding another batch is refused, naming what differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import engines
from .plan import BatchPlan, open_dir, parse_seeds, pin_loras, read_prompts, rebuild_manifest, status, verify

__all__ = ["BatchPlan", "Report", "engines", "make_plan", "rebuild_manifest", "run", "status", "verify"]


@dataclass
class Report:
    total: int
    done_before: int
    made: int = 0
    failed: int = 0
    skipped: int = 0  # done by an earlier attempt of a retried batch
    seconds: float = 0.0
    engine: str = "local"
    failures: list = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.made / self.seconds if self.seconds else 0.0


def make_plan(prompts: str | Path, model, seeds: str | list[int] = "0", runtime=None, **fields) -> BatchPlan:
    """A plan from a prompts file (.txt or .jsonl), a model (name or ModelRef), seeds and shared request fields.
    On the CPU every worker computes with `runtime.threads` threads (default 1), so that every engine makes the
    same bits."""
    from ..spec.request import GenerateRequest, ModelRef, Runtime
    from ..spec.typed import validate

    ref = model if isinstance(model, ModelRef) else validate(ModelRef, {"name": model}, "model")
    rt = runtime if isinstance(runtime, Runtime) else validate(Runtime, runtime or {}, "runtime")
    if rt.threads is None:
        rt = rt.model_copy(update={"threads": 1})
    seed_list = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds)
    base = {k: v for k, v in fields.items() if v is not None}
    for key in ("seed", "seeds", "num_images", "prompt"):
        if key in base:
            from ..errors import UserError

            raise UserError(f"a batch takes its prompts from the file and its seeds from --seeds, not {key}")
    validate(GenerateRequest, {"prompt": "x", **base}, "batch settings")
    return BatchPlan(pin_loras(ref), rt, base, read_prompts(prompts), seed_list, str(prompts))


def check(plan: BatchPlan, check_files: bool = True) -> None:
    """The shared settings checked against the model before anything runs (a bad line fails alone later), as
    generate checks them: device, memory plan, LoRA files and a single-file transformer (check_files=False, a
    server taking the batch for its worker: what needs torch is checked by the worker)."""
    from ..service.generate import prepare
    from ..spec.request import make_request

    first = next((row for row in plan.prompts if isinstance(row, dict) and isinstance(row.get("prompt"), str)), None)
    if first is not None:
        prepare(make_request(**{**plan.base, "prompt": first["prompt"], "seed": plan.seeds[0]}), plan.model,
                plan.runtime, check_files=check_files)


def run(plan: BatchPlan, out: str | Path, engine: str = "auto", workers: int = 2, address: str | None = None,
        gpus_per_worker: float = 0.0, on_row: Callable | None = None, cancel=None) -> Report:
    """Make every image of `plan` that `out` does not hold yet; returns what was done."""
    from . import engines
    from .plan import FAILURES, MANIFEST, append_line, done_items

    out = Path(out)
    engine = engines.choose(engine, address)
    check(plan)
    open_dir(plan, out)
    items = plan.items()
    done = done_items(out, items)
    pending = [i for i in items if i.index not in done]
    report = Report(len(items), len(done), engine=engine)
    rank, _ = engines.process_share()
    t0 = time.perf_counter()

    def row(r: dict) -> None:
        if r["status"] == "done":
            if r.get("skipped"):
                report.skipped += 1
            else:
                report.made += 1
                append_line(out / MANIFEST, {k: r[k] for k in ("index", "prompt_index", "seed", "file", "sha256")})
        else:
            report.failed += 1
            report.failures.append({"index": r["index"], "file": r["file"], "error": r["error"]})
            append_line(out / FAILURES, {"index": r["index"], "error": r["error"]})
        if on_row is not None:
            on_row(r, report)

    if engine == "ray":
        engines.run_ray(plan, out, pending, row, workers, address, gpus_per_worker)
    elif engine == "accelerate":
        engines.run_accelerate(plan, out, pending, row, cancel)
    else:
        engines.run_local(plan, out, pending, row, cancel)
    report.seconds = time.perf_counter() - t0
    if engine == "accelerate" and engines.process_share()[1] > 1:
        total_up(report)
    if rank == 0:
        rebuild_manifest(out)
    return report


def total_up(report: Report) -> None:
    """Under `accelerate launch`: every process's counts summed into each report (a gloo all-reduce, which also
    waits for the slowest process), so the summary tells the whole batch's work."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    counts = torch.tensor([report.made, report.failed, report.skipped], dtype=torch.float64)
    dist.all_reduce(counts)
    seconds = torch.tensor([report.seconds], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    report.made, report.failed, report.skipped = (int(x) for x in counts.tolist())
    report.seconds = float(seconds.item())
    dist.destroy_process_group()
