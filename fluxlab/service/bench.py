"""`fluxlab bench`: measure a model on this machine (seed 000's hardware challenge) and keep a profile.

For each size: phase times, it/s and peak memory. `find_max` searches the largest square size and then the
largest batch that fit the memory budget: on a GPU by running them (an out-of-memory error is the answer),
elsewhere by the planner's prediction checked against the measured peak. The hardware profile written to
the config directory records the measured activation memory against the planner's estimate; the planner
scales its estimate by that ratio afterwards.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..runtime.memory import GB

SIZES = (256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048)


@dataclass
class Measurement:
    width: int
    height: int
    batch: int
    steps: int
    seconds: dict
    it_per_s: float | None
    peak_host_gb: float
    peak_device_gb: float | None
    ok: bool = True
    cache: str | None = None


def default_sizes(spec) -> list[int]:
    """Sizes worth timing for a model: half its default size and the default (the demo: 64 and 128)."""
    d = max(spec.default_size)
    half = max(spec.min_side, d // 2 // 16 * 16)
    return [half, d] if half < d else [d, min(2 * d, spec.max_side)]


def compile_transformer(pipe) -> None:
    """torch.compile on the transformer's repeated blocks (diffusers' regional compilation: each block type is
    compiled once and reused by every block of it), for `fluxlab bench --compile`. The first run at each size pays
    the compilation."""
    # graph breaks allowed: a step cache hooks the blocks in Python
    pipe.components.transformer.compile_repeated_blocks()


def measure(pipe, size: int, batch: int = 1, steps: int | None = None, seed: int = 0,
            cache: str | None = None) -> Measurement:
    """Time one generation on a loaded api.Pipeline: phases, it/s, peak memory (with step caching: `cache`)."""
    from ..runtime.monitor import PeakMemory

    with PeakMemory(pipe.device) as peak:
        t0 = time.perf_counter()
        results = pipe.generate(prompt="a lighthouse on a cliff at dusk", width=size, height=size, steps=steps,
                                seed=seed, num_images=batch, batch_size=batch, cache=cache)
        total = time.perf_counter() - t0
    t = results[0].timings
    secs = {k: t.get(k, 0.0) for k in ("encode", "prepare", "denoise", "decode")}
    secs["total"] = round(total, 3)
    return Measurement(size, size, batch, results[0].metadata["request"]["steps"], secs, t.get("it_per_s"),
                       round(peak.host_peak / GB, 3),
                       None if peak.device_peak is None else round(peak.device_peak / GB, 3), cache=cache)


def find_max(pipe, budget: int, steps: int | None = None, on_try=None) -> tuple[int | None, int | None, list]:
    """Largest square size, then largest batch at that size, that fit `budget` bytes."""
    from ..runtime.executor import model_sizes
    from ..runtime.memory import make_plan, split_plan
    from ..runtime.model import is_oom

    tried, best_size = [], None
    sizes = [s for s in SIZES if pipe.spec.min_side <= s <= pipe.spec.max_side]
    devices = tuple(str(d) for d in pipe.devices)

    def fits(size, batch):
        if len(devices) > 1:  # one model over several devices: the budget is each one's
            plan = split_plan(model_sizes(pipe.components), devices, (budget,) * len(devices), size, size, batch,
                              text_tokens=pipe.spec.max_sequence_length)
        else:
            plan = make_plan(model_sizes(pipe.components), size, size, batch, budget, mode=pipe.memory,
                             text_tokens=pipe.spec.max_sequence_length)
        if not plan.fits or plan.batch_size < batch:
            return False, plan
        try:
            m = measure(pipe, size, batch, steps)
        except Exception as e:
            if is_oom(e):
                return False, plan
            raise
        tried.append(m)
        if on_try is not None:
            on_try(m, plan)
        peak = m.peak_device_gb if m.peak_device_gb is not None else m.peak_host_gb
        return peak * GB <= budget, plan

    for size in sizes:
        ok, _ = fits(size, 1)
        if not ok:
            break
        best_size = size
    best_batch = None
    if best_size is not None:
        best_batch = 1
        for batch in (2, 4, 8, 16):
            ok, _ = fits(best_size, batch)
            if not ok:
                break
            best_batch = batch
    return best_size, best_batch, tried


def write_profile(pipe, measurements: list, max_size, max_batch) -> str:
    """Save what was measured; `activation_scale` corrects the planner's activation estimate on a GPU."""
    from ..runtime.executor import model_sizes
    from ..runtime.memory import activation_bytes
    from ..runtime.profile import device_name
    from ..runtime.profile import write_profile as store

    scale = None
    gpu = [m for m in measurements if m.peak_device_gb is not None]
    if gpu:
        sizes = model_sizes(pipe.components)
        weights = sizes.transformer + sizes.vae
        ratios = []
        for m in gpu:
            predicted = activation_bytes(m.width, m.height, m.batch, sizes.hidden, pipe.spec.max_sequence_length,
                                         2)
            ratios.append(max(m.peak_device_gb * GB - weights, 0) / predicted)
        scale = round(max(ratios), 3)
    return store({
        "device": device_name(pipe.device), "model": pipe.label, "max_size": max_size, "max_batch": max_batch,
        "activation_scale": scale, "measurements": [asdict(m) for m in measurements],
    })
