"""A loaded model and the running of a resolved job on it: batches, memory plans, out-of-memory retries.

`load(ref, runtime)` builds a `LoadedModel` in one place (nothing set on it afterwards but its placement): the
located model, its lazily loaded components, the family adapter, the prompt cache and the LoRA adapters.
`LoadedModel.run(job)` runs the generation stages (core.stages) for every prompt and seed of a job, in batches
the memory plan allows, stepping the plan down when the device runs out of memory. What to run, events,
cancelling and where images go are the service's (service.generate); which models stay loaded is the pool's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core import stages
from ..core.families import Conditioning, get_family
from ..errors import UserError
from ..spec.request import ModelRef, Runtime
from ..spec.resolve import Job

log = logging.getLogger("fluxlab")


@dataclass
class Result:
    """One generated image with everything needed to reproduce it."""

    image: Any  # PIL.Image.Image
    seed: int
    prompt: str
    latents: Any = None  # the denormalised latents the VAE decoded (B=1), for inspection and parity checks
    timings: dict = field(default_factory=dict)  # of the batch this image was made in
    batch: int = 0  # which forward-pass batch of its prompt produced it
    prompt_index: int = 0
    mu: float | None = None  # the schedule's shift
    metadata: dict = field(default_factory=dict)  # the image record (service.outputs writes it into the PNG)
    path: Any = None  # where it was written, if it was


@contextlib.contextmanager
def timed(timings: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def torch_bits(dtype) -> int:
    import torch

    return torch.finfo(dtype).bits


class LoadedModel:
    """Models kept loaded between jobs, with what they have learned (prompt embeddings, LoRA adapters)."""

    def __init__(self, ref: ModelRef, runtime: Runtime, source, components, device, dtype, *, upcast: bool,
                 load_seconds: float, notify: Callable[[str], None], devices: list | None = None):
        from .adapters import Adapters

        self.ref, self.runtime = ref, runtime
        self.spec, self.label, self.path = source.spec, source.label, source.path
        self.components, self.device, self.dtype = components, device, dtype
        # Several devices: one model split over them (memory.split_plan); `device` is then the main one, where the
        # loop's tensors live.
        self.devices = devices or [device]
        self.upcast = upcast  # bf16 weights computed in fp32 (devices.upcast_linears)
        self.load_seconds = load_seconds
        self.encode_seconds = 0.0
        self.notify = notify
        self.family = get_family(self.spec.family)(components, max_sequence_length=self.spec.max_sequence_length)
        self.kv_cache = runtime.kv_cache  # reuse reference K/V across steps on models that support it (klein KV)
        self.memory = runtime.memory
        from .memory import parse_size

        self.budget: int | None = parse_size(runtime.budget) if runtime.budget else None
        self.plan = None
        self.prompt_cache: dict[tuple, Conditioning] = {}
        self._rgb = None
        if self.spec.kv_references:
            components.after_load.setdefault("transformer", []).append(self.family.use_kv_processors)
        self.adapters = Adapters(self)  # after the other load hooks: LoRAs wrap the layers as finally placed

    @property
    def quantized(self) -> str | None:
        return self.ref.quantize

    @contextlib.contextmanager
    def notifying(self, notify: Callable[[str], None]):
        """Send this model's notices to `notify` for the duration of one job."""
        old, self.notify = self.notify, notify
        try:
            yield
        finally:
            self.notify = old

    # -- prompts -------------------------------------------------------------------------------------
    def _cache_key(self, prompt: str) -> tuple:
        return (self.adapters.signature("text_encoder"), self.adapters.signature("text_encoder_2"), prompt)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Embeddings for `prompts`, encoding each distinct text once (and remembering it across jobs, for the
        text-encoder LoRAs then active)."""
        import torch

        new = [p for p in dict.fromkeys(prompts) if self._cache_key(p) not in self.prompt_cache]
        if new:
            self.load("text_encoder", "text_encoder_2")
            t0 = time.perf_counter()
            with torch.no_grad():
                cond = self.family.encode(new, self.device)
            self.encode_seconds += time.perf_counter() - t0
            for i, p in enumerate(new):
                self.prompt_cache[self._cache_key(p)] = cond.select([i])
        parts = [self.prompt_cache[self._cache_key(p)] for p in prompts]
        ids = parts[0].ids if parts[0].ids.ndim == 2 else torch.cat([c.ids for c in parts])
        pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
        return Conditioning(torch.cat([c.embeds for c in parts]), ids, pooled)

    def is_cached(self, prompt: str) -> bool:
        return self._cache_key(prompt) in self.prompt_cache

    def encode_all(self, prompts: list[str], release: bool = False) -> None:
        """Encode every prompt a run needs up front; with `release`, then drop the text encoders (a one-shot
        run never needs them again, and one big model in memory at a time is the point)."""
        import torch

        with torch.inference_mode():
            self.encode_prompts(prompts)
        if release:
            self.components.release("text_encoder", "text_encoder_2")

    def load(self, *names) -> None:
        """Load components now (they load on first use), counting the time as loading. Never as inference
        tensors, even when asked from inside a generation: LoRA adapters may be added to them later."""
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode(False):
            for n in names:
                getattr(self.components, n)
        self.load_seconds += time.perf_counter() - t0

    # -- running a job --------------------------------------------------------------------------------
    def run(self, job: Job, batch_size: int | None = None, on_step: Callable | None = None,
            prompts: list[int] | None = None) -> Iterator[Result]:
        """Generate every image of `job` (each prompt's seeds in turn; only the prompt indices in `prompts` when
        given), yielding each as soon as its batch is decoded.

        `on_step(info)` is called at every step with i, steps, x, sigma, denoised, the batch's seeds and prompt
        index. The latents are checked after every step: non-finite values stop the run with the step named.
        Out of device memory, the plan steps down (memory.next_smaller) and the batch is retried.
        """
        import torch

        use_cfg = self.spec.guidance_mode == "cfg" and job.guidance > 1.0
        plan = self.plan_for(job, batch_size)
        encode_before, load_before = self.encode_seconds, self.load_seconds
        with torch.inference_mode():
            sigmas, mu = stages.sigmas_for(self, job)
            first: dict = {}
            with timed(first, "inputs"):
                inputs = stages.prepare_inputs(self, job, self.notify)
            for pi, prompt in enumerate(job.prompts):
                if prompts is not None and pi not in prompts:
                    continue
                cond1 = self.encode_prompts([prompt])
                uncond1 = self.encode_prompts([job.negative]) if use_cfg else None
                remaining, batch_index = list(job.seeds), 0
                while remaining:
                    seeds = tuple(remaining[:plan.batch_size])
                    timings = {**first, "load": round(self.load_seconds - load_before, 4),
                               "encode": round(self.encode_seconds - encode_before, 4)}
                    try:
                        images, z, timings = self._batch(job, pi, seeds, sigmas, inputs, cond1, uncond1, timings,
                                                         on_step)
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        plan = self._step_down(plan)
                        continue
                    first, encode_before, load_before = {}, self.encode_seconds, self.load_seconds
                    for i, seed in enumerate(seeds):
                        yield Result(images[i], seed, prompt, z[i:i + 1], timings, batch_index, pi, mu)
                    remaining, batch_index = remaining[len(seeds):], batch_index + 1

    def _batch(self, job, prompt_index, seeds, sigmas, inputs, cond1, uncond1, timings, on_step):
        """One forward-pass batch: noise -> denoise -> decode. Returns (PIL images, latents, timings)."""
        import torch

        cond = cond1.repeat(len(seeds))
        uncond = uncond1.repeat(len(seeds)) if uncond1 is not None else None
        steps = len(sigmas) - 1

        def step(info):
            if not torch.isfinite(info["denoised"]).all():
                raise UserError(f"the latents became non-finite (NaN/Inf) at step {info['i'] + 1} of {steps}; "
                                f"nothing was saved (a LoRA scale too large, or fp16 overflow: try --dtype bf16)")
            if on_step is not None:
                on_step({**info, "steps": steps, "seeds": seeds, "prompt_index": prompt_index})

        self.load("transformer", "vae")
        with timed(timings, "prepare"):
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            x, img_ids, known = stages.prepare_latents(self, job, generators, inputs, sigmas[0])
        inpaint = (inputs.mask, *known) if inputs.mask is not None else None
        extra = None
        if inputs.fill_mask is not None:
            pixels = inputs.init.to(self.device, self.dtype)
            extra = self.family.fill_condition(pixels, inputs.fill_mask, generators, job.width, job.height)
        refs = inputs.refs
        if refs is not None and refs.kv:  # a fresh cache per batch (its K/V carry the batch size)
            refs = dataclasses.replace(refs, cache=None)
        with timed(timings, "denoise"):
            x = stages.denoise(self, job, x, img_ids, cond, uncond, sigmas, generators, callback=step, refs=refs,
                               inpaint=inpaint, extra=extra)
        with timed(timings, "decode"):
            z, images = stages.decode(self, x, job)
            pils = stages.to_pil(images)
        timings = {k: round(v, 4) for k, v in timings.items()}
        timings["it_per_s"] = round(steps / timings["denoise"], 3) if timings["denoise"] else None
        return pils, z, timings

    def preview(self, denoised, job: Job, use_vae: bool = False) -> list:
        """PIL images of a step's clean estimate: cheap linear projection, or the VAE."""
        if use_vae:
            return stages.preview(self, denoised, job)
        if self._rgb is None:
            self._rgb = stages.rgb_projection(self)
        return stages.preview(self, denoised, job, self._rgb)

    # -- memory -------------------------------------------------------------------------------------
    def plan_for(self, job: Job, batch_size: int | None = None):
        """The memory plan for a job: planned against the device budget on a GPU or when a budget is set; on a
        CPU without one, everything stays resident in host memory (batch 1: on a CPU a larger batch is no faster,
        it only adds memory)."""
        from .executor import device_budget, model_sizes
        from .memory import Plan, make_plan
        from .profile import load_profile

        if job.cache:  # the cache decides per forward pass: one image each, so an image depends on its seed alone
            if batch_size and batch_size > 1:
                self.notify(f"--cache {job.cache} runs one image per forward pass; --batch-size {batch_size} is not "
                            f"used")
            batch_size = 1
        wanted = batch_size or min(len(job.seeds), 16)
        if len(self.devices) > 1:
            return self._split_plan_for(job, wanted, batch_size)
        if self.budget is None and self.device.type != "cuda":
            # Nothing to plan against: keep the placement in force (resident unless set_plan chose one).
            placed = self.plan or Plan("resident", 1, False, None, 0, 0, True)
            return dataclasses.replace(placed, batch_size=batch_size or 1)
        budget = self.budget if self.budget is not None else device_budget(self.device) + self._placed_bytes()
        h, w = self.family.latent_grid(job.width, job.height)
        profile = load_profile(self.device) or {}
        plan = make_plan(model_sizes(self.components), job.width, job.height, wanted, budget,
                         mode=self.memory, text_tokens=self.spec.max_sequence_length,
                         dtype_bytes=torch_bits(self.dtype) // 8, ref_tokens=len(job.images) * h * w,
                         activation_scale=profile.get("activation_scale") or 1.0)
        if batch_size and plan.batch_size != batch_size:
            self.notify(f"--batch-size {batch_size} does not fit; using {plan.batch_size}")
        if plan != self.plan:
            self.set_plan(plan)
        return plan

    def _split_plan_for(self, job: Job, wanted: int, batch_size: int | None):
        """The plan over several devices; when even all of them cannot hold the model, the one-device ladder
        (phase offload, streaming) on the device with the most room."""
        from .executor import device_budget, model_sizes
        from .memory import GB, make_plan, split_plan

        def room(d) -> int:  # free memory plus what our own placed models hold there (a replan may move them)
            placed = 0
            if self.plan is not None and d.type == "cuda":
                import torch

                placed = torch.cuda.memory_allocated(d)
            return device_budget(d) + placed

        budgets = tuple(self.budget if self.budget is not None else room(d) for d in self.devices)
        h, w = self.family.latent_grid(job.width, job.height)
        sizes = model_sizes(self.components)
        kw = dict(text_tokens=self.spec.max_sequence_length, dtype_bytes=torch_bits(self.dtype) // 8,
                  ref_tokens=len(job.images) * h * w)
        # The usual half-GB reserve, less on small budgets (tests split megabyte models over "cpu,cpu").
        reserve = min(GB // 2, min(budgets) // 8)
        names = tuple(str(d) for d in self.devices)
        plan = split_plan(sizes, names, budgets, job.width, job.height, wanted, reserve=reserve, **kw)
        if not plan.fits:
            best = max(range(len(budgets)), key=lambda i: (budgets[i], -i))
            self.notify(f"{', '.join(names)} cannot hold the model even split ({plan.line().removeprefix('plan: ')}"
                        f"); planning on {names[best]} alone")
            self.devices = [self.devices[best]]
            self.device = self.devices[0]
            plan = make_plan(sizes, job.width, job.height, wanted, budgets[best], mode=self.memory, **kw)
        if batch_size and plan.batch_size != batch_size:
            self.notify(f"--batch-size {batch_size} does not fit; using {plan.batch_size}")
        if plan != self.plan:
            self.set_plan(plan)
        return plan

    def set_plan(self, plan) -> None:
        from .executor import apply, apply_split
        from .memory import SplitPlan

        self.notify(plan.line() if plan.fits else f"{plan.line()}; trying anyway")
        if isinstance(plan, SplitPlan):
            apply_split(self.components, plan, self.devices)
            self.device = self.devices[plan.main]
        else:
            apply(self.components, plan, self.device)
        self.plan = plan

    def _placed_bytes(self) -> int:
        """Device bytes our own models hold now (free memory plus these is what a plan may use)."""
        if self.plan is None or self.device.type != "cuda":
            return 0
        import torch

        return torch.cuda.memory_allocated(self.device)

    def _step_down(self, plan):
        from .memory import next_smaller

        free_memory(self.device)
        smaller = next_smaller(plan)
        if smaller is None:
            smallest = plan.line().removeprefix("plan: ")
            raise UserError(f"out of memory even with the smallest plan tried ({smallest}); "
                            f"use a smaller size or --quantize int8") from None
        self.notify(f"out of memory with {plan.line().removeprefix('plan: ')}; retrying with "
                    f"{smaller.line().removeprefix('plan: ')}")
        self.set_plan(smaller)
        return smaller

    def resident_bytes(self) -> int:
        """Bytes the loaded components' weights take now."""
        from .quantize import param_bytes

        total = 0
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            if self.components.is_loaded(name):
                m = getattr(self.components, name)
                if m is not None:
                    total += sum(param_bytes(p) for p in m.parameters())
        return total

    def release(self) -> None:
        """Let go of everything this model holds: placement hooks, weights, caches. Memory really returns to the
        system (gc, the CUDA cache, and glibc's heap trimmed)."""
        if self.plan is not None:
            with contextlib.suppress(Exception):
                from .executor import reset

                reset(self.components, "cpu")
        self.components.release(*[n for n in self.components.NAMES if self.components.is_loaded(n)])
        self.components.after_load.clear()
        self.prompt_cache.clear()
        self.adapters = None
        self._rgb = None
        self._writer = None  # runtime.upsample's whole language model, when one was loaded
        self.family = None
        free_memory(self.device)


def free_memory(device=None) -> None:
    """Return freed memory to the system: Python's garbage, the CUDA cache, and the C heap's free pages."""
    gc.collect()
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.empty_cache()
    from .heap import trim

    trim()


def streams_from_disk(runtime: Runtime, device, ref: ModelRef | None = None) -> bool:
    """`--memory low` on a CPU: blocks are read from the model's files as they run (runtime.streaming). What
    changes those weights (quantization, LoRAs) is refused with it; a --transformer file (a GGUF) stays loaded
    while the text encoders stream."""
    if runtime.memory != "low" or device.type != "cpu":
        return False
    clash = [flag for flag, on in (("--quantize", ref.quantize), ("--lora", ref.loras)) if on] \
        if ref is not None else []
    if clash:
        raise UserError(f"--memory low on a CPU streams the blocks from the model's own files and does not combine "
                        f"with {', '.join(clash)}; drop {clash[0]} or use --memory auto")
    return True


def load(ref: ModelRef, runtime: Runtime | None = None, notify: Callable[[str], None] | None = None,
         source=None) -> LoadedModel:
    """Load the base weights `ref` names (LoRAs are activated per job: LoadedModel.adapters) and keep them.

    runtime.compute="auto" runs bf16 weights' matmuls in fp32 on CPUs without AMX, where that is faster
    (devices.upcast_linears); "native" keeps bf16 arithmetic.
    """
    from .loading import fetch, load_components, locate, quiet_libraries

    runtime = runtime or Runtime()
    notify = notify or log.warning
    quiet_libraries()
    import torch

    from .devices import bf16_matmul_is_faster, resolve_devices, resolve_dtype

    t0 = time.perf_counter()
    source = source or fetch(locate(ref.name), ref.revision)
    devices = resolve_devices(runtime.device)
    dev = devices[0]
    dt = resolve_dtype(source.spec.dtype if ref.dtype == "auto" else ref.dtype, dev)
    # Models load into host memory; on a GPU the memory plan then decides what goes on the device.
    stage = dev if dev.type == "cpu" else torch.device("cpu")
    stream = streams_from_disk(runtime, dev, ref)
    if stream:
        what = ("text-encoder layers are read from the model's files as they run; the --transformer file stays "
                "loaded" if ref.transformer else "transformer blocks and text-encoder layers are read from the "
                "model's files as they run")
        notify(f"--memory low: {what} (same image, a fraction of the memory)")
    components = load_components(source.path, dt, stage,
                                 transformer_file=ref.transformer.path if ref.transformer else None,
                                 lean=runtime.lean, quantize=ref.quantize, stream=stream)
    if ref.quantize:
        from .quantize import int8_matmul_is_faster, quantize_on_load

        quantize_on_load(components, ref.quantize, stage, notify,
                         int8_compute=dev.type == "cpu" and ref.quantize == "int8" and int8_matmul_is_faster())
    upcast = False
    if runtime.compute == "auto" and dev.type == "cpu" and dt == torch.bfloat16 and not bf16_matmul_is_faster():
        from .devices import upcast_linears

        for name in ("transformer", "text_encoder", "text_encoder_2"):
            components.after_load.setdefault(name, []).append(upcast_linears)
        # The VAE is small (84 M parameters) and convolution-bound: it simply runs in fp32.
        components.after_load.setdefault("vae", []).append(lambda vae: vae.to(torch.float32))
        upcast = True
        notify("bf16 weights, fp32 matmuls: this CPU multiplies fp32 faster than bf16 (set --compute native to "
               "keep bf16 arithmetic)")
    return LoadedModel(ref, runtime, source, components, dev, dt, upcast=upcast,
                       load_seconds=time.perf_counter() - t0, notify=notify, devices=devices)
