"""service.generate: the one path from a request to images, for every front end.

    for result in generate(request, model_ref, runtime, events=print, cancel=token, out=FileOutput("out/")):
        ...

1. prepare: locate the model, resolve the request once (seeds drawn), read and pin the LoRA files, check the
   runtime, all before any weights load, so bad input fails in milliseconds;
2. check that the outputs can be written (before loading, too);
3. take the base model from the pool (loading it if needed) and switch the job's LoRAs on it;
4. run the job (runtime.model.LoadedModel.run), turning steps into events, checking the cancel token at every
   step, and writing each image atomically with its record as soon as its batch is decoded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from .. import __version__
from ..errors import UserError
from ..spec.request import GenerateRequest, ModelRef, Runtime, model_ref
from ..spec.resolve import Job, resolve
from .events import CancelToken, Finished, Image, Loading, Notice, Preview, Started, Step, emit


@dataclass
class Prepared:
    """A request resolved against its model, with everything read and pinned, before any weights load."""

    job: Job
    ref: ModelRef  # LoRAs and the transformer file pinned by SHA-256; dtype as asked
    runtime: Runtime
    source: object  # runtime.loading.ModelSource
    loras: list  # [(Lora, scale)]


def as_ref(model: ModelRef | str) -> ModelRef:
    return model if isinstance(model, ModelRef) else model_ref(model)


def prepare(request: GenerateRequest, model: ModelRef | str, runtime: Runtime | None = None,
            check_files: bool = True) -> Prepared:
    """Resolve `request` for `model` (once), read its LoRAs and check the runtime, loading no weights.

    check_files=False (a server taking a job for its worker) skips what needs torch: the device check and reading
    the LoRA files (their SHA-256 is already pinned); the worker's own prepare does both before it runs."""
    from ..runtime.loading import check_model_files, fetch, locate

    ref, runtime = as_ref(model), runtime or Runtime()
    if check_files:
        check_runtime(runtime, ref)
    source = locate(ref.name)
    job = resolve(request, source.spec) if source.spec is not None else None  # before any download
    if job is not None and check_files:
        check_split(runtime, ref, source.spec, job)
    source = fetch(source, ref.revision)
    if job is None:
        job = resolve(request, source.spec)
    check_model_files(source.path)
    if not check_files:
        return Prepared(job, ref, runtime, source, [])
    ref, loras = pin_files(ref, source)
    return Prepared(job, ref, runtime, source, loras)


def check_runtime(runtime: Runtime, ref: ModelRef) -> None:
    """Device, dtype, budget and quantization checked before anything loads."""
    from ..runtime.memory import parse_size

    if runtime.budget is not None and parse_size(runtime.budget) <= 0:
        raise UserError(f"--budget {runtime.budget} must be more than 0")
    from ..runtime.devices import resolve_device

    device = resolve_device(runtime.device)
    from ..runtime.model import streams_from_disk

    streams_from_disk(runtime, device, ref)
    if ref.quantize:
        from ..runtime.quantize import supported_modes

        ok = supported_modes(device)
        if ref.quantize not in ok:
            raise UserError(f"--quantize {ref.quantize} is not supported on {device.type}; this device supports: "
                            f"{', '.join(ok)}")


def check_split(runtime: Runtime, ref: ModelRef, spec, job) -> None:
    """Several devices with a --budget: refused before anything loads when the model fits neither split over
    them nor, as the fallback, streamed through the largest (from the catalog's declared sizes)."""
    from ..runtime.memory import GB, catalog_sizes, human, make_plan, parse_size, split_plan

    devices = tuple(runtime.device.split(","))
    if len(devices) < 2 or runtime.budget is None:
        return
    dtype_bytes = 4 if (ref.dtype if ref.dtype != "auto" else spec.dtype) == "fp32" else 2
    sizes = catalog_sizes(spec.sizes_gb, dtype_bytes, 4 if spec.dtype == "fp32" else 2)
    if sizes is None:
        return
    budget = parse_size(runtime.budget)
    kw = dict(text_tokens=spec.max_sequence_length, dtype_bytes=dtype_bytes)
    split = split_plan(sizes, devices, (budget,) * len(devices), job.width, job.height, 1,
                       reserve=min(GB // 2, budget // 8), **kw)
    if not split.fits and not make_plan(sizes, job.width, job.height, 1, budget, mode="low", **kw).fits:
        need = sizes.transformer + sizes.text_encoder + sizes.vae
        raise UserError(f"--budget {runtime.budget} on each of {', '.join(devices)} cannot hold {spec.name} even split "
                        f"or streamed (about {human(need)} of weights); give more devices or a larger budget")


def pin_files(ref: ModelRef, source) -> tuple[ModelRef, list]:
    """Read each LoRA once (format, family, SHA-256) and check the transformer file; a recorded SHA-256 that no
    longer matches is refused rather than silently used."""
    from ..runtime import loras as L

    read = []
    pinned = []
    for lo in ref.loras:
        lora = L.read(lo.path)
        if lo.sha256 is not None and lo.sha256 != lora.sha256:
            raise UserError(f"LoRA {lo.path} has changed since it was recorded (SHA-256 differs)")
        if lora.family != source.spec.family:
            raise UserError(f"{lo.path} is a {lora.family} LoRA; {source.label} is a {source.spec.family} model")
        read.append((lora, lo.scale))
        pinned.append(lo.model_copy(update={"sha256": lora.sha256}))
    transformer = ref.transformer
    if transformer is not None:
        from ..runtime.singlefile import check_transformer_file

        check_transformer_file(transformer.path)
    return ref.model_copy(update={"loras": tuple(pinned), "transformer": transformer}), read


def image_record(prep: Prepared, model, result, threads: int | None = None) -> dict:
    """What the image records: its own request (one prompt, one seed, every value explicit), the model
    reference and runtime as run, and what was resolved along the way."""
    from ..runtime.devices import dtype_name
    from ..spec.record import ImageRecord

    job = prep.job
    resolved = {
        "family": model.spec.family,
        "guidance_mode": model.spec.guidance_mode,
        "schedule": {"name": job.schedule, "mu": None if result.mu is None else round(result.mu, 6)},
        "steps_run": job.steps_run,
    }
    if model.upcast:
        resolved["compute"] = "fp32"
    if model.plan is not None and getattr(model.plan, "budget", None) != 0:  # 0: nothing was planned
        resolved["memory_plan"] = model.plan.as_dict()
    record = ImageRecord(
        fluxlab=__version__,
        request=job.record(result.prompt, result.seed),
        model=prep.ref.model_copy(update={"name": model.label, "dtype": dtype_name(model.dtype)}),
        runtime=prep.runtime.model_copy(update={"device": ",".join(str(d) for d in model.devices),
                                                "threads": threads if model.device.type == "cpu" else None}),
        resolved=resolved,
    )
    return record.model_dump(mode="json", exclude_none=True)


class _Progress:
    """Steps -> Step events with an ETA for the whole job; previews when asked."""

    def __init__(self, model, job: Job, runtime: Runtime, events, cancel: CancelToken | None):
        self.model, self.job, self.runtime, self.events, self.cancel = model, job, runtime, events, cancel
        self.t0 = time.perf_counter()
        self.done_images = 0

    def __call__(self, info) -> None:
        if self.cancel is not None:
            self.cancel.check()
        i, n, seeds = info["i"] + 1, info["steps"], info["seeds"]
        fraction = (self.done_images + len(seeds) * i / n) / self.job.count
        elapsed = time.perf_counter() - self.t0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        emit(self.events, Step(i, n, None if eta is None else round(eta, 2), seeds, info["prompt_index"],
                               self.done_images, self.job.count, info["denoised"]))
        every, vae_every = self.runtime.preview_every, self.runtime.preview_vae_every
        use_vae = vae_every > 0 and i % vae_every == 0
        if self.events is not None and (use_vae or (every > 0 and i % every == 0)):
            images = self.model.preview(info["denoised"], self.job, use_vae=use_vae)
            emit(self.events, Preview(i, n, images, seeds, "vae" if use_vae else "fast"))


def generate(request: GenerateRequest | Prepared, model: ModelRef | str | None = None, runtime: Runtime | None = None,
             *, events: Callable | None = None, cancel: CancelToken | None = None, out=None, pool=None,
             loaded=None) -> Iterator:
    """Generate the request's images, yielding each (runtime.model.Result, with `.metadata` and `.path`) as soon
    as its batch is decoded. `out` (outputs.FileOutput or anything with check(seeds) and `reproducible`) writes
    them; `pool` keeps models loaded across calls (default: a pool of one, released at the end); `loaded` runs
    on a model the caller holds."""
    if not isinstance(request, Prepared) and loaded is not None:
        model, runtime = model or loaded.ref, runtime or loaded.runtime
    prep = request if isinstance(request, Prepared) else prepare(request, model, runtime)
    job, rt = prep.job, prep.runtime

    def notify(text: str) -> None:
        emit(events, Notice(text))

    for text in job.notices:
        notify(text)
    writer = None
    if out is not None:
        from .outputs import Writer

        writer = Writer(out.check([seed for _, _, seed in job.items()]), out.reproducible)
    from ..runtime.threads import apply_threads

    applied = apply_threads(rt.threads)
    own_pool = None
    if loaded is None:
        if pool is None:
            from ..runtime.pool import ModelPool

            pool = own_pool = ModelPool(max_models=1)
        if not any(m.ref == prep.ref.base() for m in pool.loaded()):
            emit(events, Loading(prep.source.label))
        loaded = pool.get(prep.ref, rt, notify, source=prep.source)
    try:
        yield from _run(prep, loaded, events, cancel, writer, pool, applied)
    finally:
        if own_pool is not None:
            own_pool.release()


PHASES = ("load", "inputs", "encode", "prepare", "denoise", "decode")


def rewritten(model, job: Job) -> Job:
    """The job with its prompts upsampled by the model's text encoder (runtime.upsample), seeded by its first
    seed; the prompts as written are kept for the record."""
    from ..runtime.upsample import upsample
    from ..spec.images import decode

    temperature, max_tokens = job.upsample
    images = [decode(i, None, "reference image") for i in job.images]  # the pixels the generation reads
    t0 = time.perf_counter()
    new = upsample(model, list(job.prompts), images=images, temperature=temperature, max_tokens=max_tokens,
                   seed=job.seeds[0], notify=model.notify)
    for text in new:
        model.notify(f"upsampled prompt ({time.perf_counter() - t0:.1f} s): {text}")
    return replace(job, prompts=tuple(new), upsample=None, upsampled_from=tuple(job.prompts))


def _run(prep: Prepared, model, events, cancel, writer, pool, applied) -> Iterator:
    from ..runtime.threads import tell_busy

    job, rt, threads = prep.job, prep.runtime, applied.count
    load_before = model.load_seconds - (pool.last_load_seconds if pool is not None else 0.0)
    encode_before = model.encode_seconds
    with model.notifying(lambda text: emit(events, Notice(text))):
        if job.upsample:
            job = rewritten(model, job)
            prep = replace(prep, job=job)
        model.adapters.activate(prep.loras, fuse=prep.ref.fuse_lora)
        for text in truncation_notices(model, job):
            model.notify(text)
        if rt.release_encoders:
            texts = list(job.prompts)
            if model.spec.guidance_mode == "cfg" and job.guidance > 1.0:
                texts.append(job.negative)
            model.encode_all(texts, release=True)
        # Loading and encoding done before the first batch are counted in its timings (what its PNGs record).
        ahead = {"load": model.load_seconds - load_before, "encode": model.encode_seconds - encode_before}
        tell_busy(applied, model.notify)
        emit(events, Started(job.count, job.steps_run, model.label, round(ahead["load"], 4)))
        progress = _Progress(model, job, rt, events, cancel)
        batches: dict[tuple, dict] = {}
        saving = 0.0
        for k, result in enumerate(model.run(job, rt.batch_size, progress)):
            if not batches:
                for key, value in ahead.items():
                    result.timings[key] = round(result.timings.get(key, 0.0) + value, 4)
            batches.setdefault((result.prompt_index, result.batch), result.timings)
            result.metadata = image_record(prep, model, result, threads)
            if writer is not None:
                t0 = time.perf_counter()
                result.path = writer.write(result, k)
                saving += time.perf_counter() - t0
            progress.done_images = k + 1
            emit(events, Image(result, result.path, k))
            yield result
    emit(events, Finished(summarize(batches.values(), job.count, model, saving, threads)))


def summarize(batch_timings, images: int, model, saving: float = 0.0, threads: int | None = None) -> dict:
    """Phase totals over the batches (each batch's timings once), rates, and where it ran (with how many torch
    threads)."""
    batch_timings = list(batch_timings)
    phases = {k: round(sum(t.get(k, 0.0) for t in batch_timings), 4) for k in PHASES}
    phases["save"] = round(saving, 4)
    return {"images": images, "phases_s": phases, "it_per_s": [t.get("it_per_s") for t in batch_timings],
            "device": str(model.device), "threads": threads, "model": model.label}


def truncation_notices(model, job: Job) -> list[str]:
    """One notice per prompt the text encoder will cut short, saying how many tokens are dropped."""
    out = []
    texts = dict.fromkeys([*job.prompts, *([job.negative] if job.negative else [])])
    for text in texts:
        with contextlib.suppress(Exception):  # a tokenizer without a count for this text: nothing to say
            used, total = model.family.token_count(text)
            if total > used:
                kind = "negative prompt" if text == job.negative and text not in job.prompts else "prompt"
                out.append(f"the {kind} is {total} tokens; {model.label} reads {used}: the last {total - used} "
                           f"are dropped")
    return out


def run_all(request, model=None, runtime=None, **kw) -> list:
    """generate(), collected."""
    return list(generate(request, model, runtime, **kw))


def new_pool(budget: int | None = None, max_models: int | None = None):
    """A pool that keeps models loaded across calls (front ends that serve many jobs hold one)."""
    from ..runtime.pool import ModelPool

    return ModelPool(budget=budget, max_models=max_models)
