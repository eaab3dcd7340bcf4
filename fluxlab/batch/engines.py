"""Where a batch's items run: this process (local), processes started by `accelerate launch`, or a Ray cluster.

Every engine runs an item the same way (`run_item`: service.generate on a pooled model, one image per call,
written atomically under its deterministic name), with the same thread count, so an image is the same bits
whichever engine made it. Scaling out is Ray Data's job: a pool of actors (`ActorPoolStrategy`), each loading the
model once and writing its images itself; Ray retries a killed actor's batch (at-least-once), and a rerun item
finds its file already there or writes the same bytes again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .plan import BatchPlan, Item


class ItemOutput:
    """One item's file: the output policy service.generate writes through. Without the run's timings (they differ
    from run to run), so the same item is the same bytes whichever engine, process or machine made it."""

    reproducible = True

    def __init__(self, path: Path):
        self.path = Path(path)

    def check(self, seeds: list[int]) -> list[Path]:
        if len(seeds) != 1:
            raise UserError(f"a batch item makes one image; this one asks for {len(seeds)} (give one seed per item)")
        return [self.path]


class Runner:
    """Runs items on one pooled model; used by every engine (a Ray actor holds one)."""

    def __init__(self, plan: BatchPlan, out: Path):
        from ..service.generate import new_pool

        self.plan, self.out = plan, Path(out)
        self.pool = new_pool(max_models=1)  # service.generate applies the plan's thread count

    def run(self, item: Item) -> dict:
        """Make one item; a failure of its own (a bad setting, a bad line) is returned, not raised."""
        from ..service.generate import generate
        from ..spec.request import make_request

        row = {"index": item.index, "prompt_index": item.prompt_index, "seed": item.seed, "file": item.file,
               "worker": os.getpid()}
        path = self.out / item.file
        if path.is_file():  # done before (a retried batch, a resumed run): the same request, the same bytes
            return {**row, "status": "done", "sha256": _sha(path), "skipped": True}
        try:
            if item.error:
                raise UserError(item.error)
            request = make_request(**item.request)
            for _ in generate(request, self.plan.model, self.plan.runtime, pool=self.pool, out=ItemOutput(path)):
                pass
        except UserError as e:
            return {**row, "status": "failed", "error": str(e)}
        return {**row, "status": "done", "sha256": _sha(path), "skipped": False}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_prompt(items: list[Item]) -> list[Item]:
    """Items grouped by prompt (each prompt's seeds together), so a worker encodes each prompt once."""
    return sorted(items, key=lambda i: (i.prompt_index, i.index))


# -- engines ------------------------------------------------------------------------------------------------------
def run_local(plan: BatchPlan, out: Path, items: list[Item], on_row: Callable, cancel=None) -> None:
    runner = Runner(plan, out)
    try:
        for item in by_prompt(items):
            if cancel is not None and cancel.cancelled:
                from ..service.events import Cancelled

                raise Cancelled("canceled")
            on_row(runner.run(item))
    finally:
        runner.pool.release()


def process_share() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_accelerate(plan: BatchPlan, out: Path, items: list[Item], on_row: Callable, cancel=None) -> None:
    """This process's share of the items (every world-th, offset by rank): no process group is needed, since
    items are independent and every write is its own file."""
    rank, world = process_share()
    run_local(plan, out, by_prompt(items)[rank::world], on_row, cancel)


class RayWorker:
    """A Ray Data actor: loads the model once (its constructor), then makes batches of items and returns rows of
    path and status (never pixels: the images go to the shared folder)."""

    def __init__(self, out: str):
        from .plan import load_plan

        # The plan from the batch folder's job.json (the folder is shared anyway): a small constructor argument,
        # so Ray keeps it inline instead of in the object store, where a restartable actor's arguments trouble it.
        self.runner = Runner(load_plan(Path(out)), Path(out))
        folder = Path(out) / ".workers"
        folder.mkdir(exist_ok=True)
        (folder / f"{os.uname().nodename}-{os.getpid()}").write_text(str(time.time()))

    def __call__(self, batch: dict) -> dict:
        rows = []
        for k in range(len(batch["index"])):
            item = Item(int(batch["index"][k]), int(batch["prompt_index"][k]), int(batch["seed"][k]),
                        _json(batch["request"][k]), batch["error"][k] or None)
            rows.append(self.runner.run(item))
        keys = ("index", "prompt_index", "seed", "file", "status", "sha256", "error", "worker", "skipped")
        return {key: [r.get(key) for r in rows] for key in keys}


def _json(text):
    import json

    return json.loads(text)


def run_ray(plan: BatchPlan, out: Path, items: list[Item], on_row: Callable, workers: int = 2,
            address: str | None = None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 0.5,
            batch_size: int | None = None) -> None:
    """Ray Data over the pending items: `map_batches` with a pool of `workers` actors (ActorPoolStrategy), each
    with fractional CPUs (so the dataset's own tasks always find a CPU) and `gpus_per_worker` GPUs."""
    import json

    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'fluxlab[ray]'") from None
    verbose = os.environ.get("FLUXLAB_VERBOSE") == "1"
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    if not verbose:
        quiet_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for quiet in ("print_on_execution_start", "verbose_stats_logs"):  # Ray Data's own notes (newer versions)
        if hasattr(ctx, quiet):
            setattr(ctx, quiet, False)
    ordered = by_prompt(items)
    rows = [{"index": i.index, "prompt_index": i.prompt_index, "seed": i.seed, "request": json.dumps(i.request),
             "error": i.error or ""} for i in ordered]
    # A batch per prompt's seeds (one encode per actor and prompt); an explicit size, as GPU actors require.
    size = batch_size or max(1, min(len(plan.seeds), 16))
    ds = ray.data.from_items(rows).map_batches(
        RayWorker, fn_constructor_kwargs={"out": str(out)}, batch_size=size,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None, batch_format="numpy")
    if not verbose:
        quiet_ray()  # again: Ray Data sets its loggers up as the dataset is built
    for row in ds.iter_rows():
        on_row({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})


def quiet_ray() -> None:
    """fluxlab shows one progress bar of its own: Ray's and Ray Data's notes and INFO lines only with --verbose."""
    import logging

    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logging.getLogger(name).setLevel(logging.ERROR)


def _ray_installed() -> str:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("the ray engine needs Ray: pip install 'fluxlab[ray]'") from None
    return "ray"


def choose(engine: str, address: str | None) -> str:
    """auto: ray when an address is given (or RAY_ADDRESS), accelerate under a multi-process launch, else local."""
    if engine != "auto":
        if engine not in ("local", "accelerate", "ray"):
            raise UserError(f"unknown engine {engine!r}; valid: auto, local, accelerate, ray")
        return _ray_installed() if engine == "ray" else engine
    if address or os.environ.get("RAY_ADDRESS"):
        return _ray_installed()
    if process_share()[1] > 1:
        return "accelerate"
    return "local"

