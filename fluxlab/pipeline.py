"""Loaded models and the generation stages: validate -> encode prompt -> schedule -> prepare latents ->
denoise -> decode. (Saving is the caller's: the CLI writes PNGs, the Python API returns images.)

Our own loop over diffusers' model classes rather than a diffusers pipeline's __call__: the stages are
plain functions over a typed request, so samplers, schedules, batching, memory plans and editing inputs
plug in without forking the loop, and every stage can be timed and tested on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .catalog import ModelSpec
from .errors import UserError
from .families import Conditioning, References, get_family
from .request import GenerateRequest, Job, make_request, resolve

log = logging.getLogger("fluxlab")


@dataclass
class Result:
    """One generated image with everything needed to reproduce it."""

    image: Any  # PIL.Image.Image
    seed: int
    metadata: dict
    latents: Any = None  # the denormalised latents the VAE decoded (B=1), for inspection and parity checks
    timings: dict = field(default_factory=dict)  # of the batch this image was made in
    batch: int = 0  # which forward-pass batch of its request produced it


@contextmanager
def _timed(timings: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def to_pil(images) -> list:
    """[-1, 1] image tensors -> PIL images, rounding as diffusers' image processor does."""
    import numpy as np
    from PIL import Image

    x = (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


class Pipeline:
    """Models kept loaded between calls; `generate()` takes the same fields as the CLI."""

    def __init__(self, spec: ModelSpec, label: str, components, device, dtype, *, transformer_file=None,
                 load_seconds: float = 0.0, notify: Callable[[str], None] | None = None):
        self.spec = spec
        self.label = label
        self.components = components
        self.device = device
        self.dtype = dtype
        self.transformer_file = transformer_file
        self.load_seconds = load_seconds
        self.notify = notify or log.warning
        self.family = get_family(spec.family)(components, max_sequence_length=spec.max_sequence_length)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._rgb = None  # latent -> RGB preview projection, fitted on first use
        self.kv_cache = True  # reuse reference K/V across steps on models that support it (klein KV)
        self.memory = "auto"  # planner mode: auto | speed | balanced | low
        self.budget: int | None = None  # device bytes to plan for (None: what the device has free)
        self.plan = None
        self.quantized: str | None = None
        self.upcast = False  # bf16 weights computed in fp32 (see devices.upcast_linears)
        self.loras: list[dict] = []  # applied LoRA files with their scales (recorded in the metadata)
        if spec.kv_references:
            components.after_load.setdefault("transformer", []).append(self.family.use_kv_processors)
        self.encode_seconds = 0.0

    # -- stages -------------------------------------------------------------------------------------
    def validate(self, request: GenerateRequest | None, fields: dict) -> Job:
        req = request if request is not None else make_request(**fields)
        job = resolve(req, self.spec)
        for n in job.notices:
            self.notify(n)
        return job

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Embeddings for `prompts`, encoding each distinct text once (and remembering it across calls)."""
        import torch

        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            with torch.no_grad():
                cond = self.family.encode(new, self.device)
            for i, p in enumerate(new):
                self._prompt_cache[p] = cond.select([i])
        parts = [self._prompt_cache[p] for p in prompts]
        ids = parts[0].ids if parts[0].ids.ndim == 2 else torch.cat([c.ids for c in parts])
        pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
        return Conditioning(torch.cat([c.embeds for c in parts]), ids, pooled)

    def schedule(self, job: Job):
        """The sigmas (float32 tensor, N+1 values from 1 to 0) and the shift mu used (None if unshifted)."""
        import torch

        from .request import parse_schedule
        from .schedule import flow_sigmas, flux1_mu, flux2_mu, linear_sigmas

        kind, shift = parse_schedule(job.schedule)
        mu = None
        if kind == "default":
            h, w = self.family.latent_grid(job.width, job.height)
            cfg = self.components.scheduler_config or {}
            mu = flux2_mu(h * w, job.steps) if self.spec.family == "flux2" else flux1_mu(h * w, cfg)
            sigmas = flow_sigmas(job.steps, mu, cfg)
            mu = mu if cfg.get("use_dynamic_shifting", False) else None
        elif kind == "linear":
            sigmas = linear_sigmas(job.steps)
        else:
            sigmas = flow_sigmas(job.steps, None, {"use_dynamic_shifting": False, "shift": shift})
        return torch.from_numpy(sigmas).to(self.device), mu

    def prepare_inputs(self, job: Job) -> dict:
        """Decode and encode a request's input images once: reference tokens, init pixels, mask."""
        import torch
        from diffusers.image_processor import VaeImageProcessor

        from .images import load_mask, load_rgb

        out: dict = {"refs": None, "init": None, "mask": None}
        vae_c = self.components.config("vae").latent_channels
        refs = [load_rgb(i.path, self.notify, "reference image") for i in job.images]
        if job.init is not None:
            init = load_rgb(job.init.path, self.notify, "init image")
            proc = VaeImageProcessor(vae_scale_factor=self.family.vae_scale * 2, vae_latent_channels=vae_c)
            out["init"] = proc.preprocess(init, height=job.height, width=job.width).to(torch.float32)
            if job.mask is not None:
                mask = load_mask(job.mask.path, init.size, self.notify)
                mproc = VaeImageProcessor(vae_scale_factor=self.family.vae_scale * 2, vae_latent_channels=vae_c,
                                          do_normalize=False, do_binarize=True, do_convert_grayscale=True)
                m = mproc.preprocess(mask, height=job.height, width=job.width)
                if self.spec.fill:  # Fill conditions on the mask instead of re-imposing the known region
                    out["fill_mask"] = m.to(self.device, self.dtype)
                    return out
                out["mask"] = self.family.mask_tokens(m, job.width, job.height).to(self.device, self.dtype)
                if self.spec.family == "flux2":  # klein inpainting sees the init image as its first reference
                    refs = [init, *refs]
        if refs:
            out["refs"] = self._reference_tokens(refs)
        return out

    def _reference_tokens(self, images: list) -> References:
        """Reference images -> tokens. FLUX.2: area-capped, cropped to multiples of 16, VAE-encoded one by one.
        Kontext (FLUX.1): resized to the closest Kontext training resolution."""
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        from .request import kontext_size

        m = self.family.vae_scale * 2
        latent_c = self.components.config("vae").latent_channels
        latents = []
        if self.spec.family == "flux1":
            proc = VaeImageProcessor(vae_scale_factor=m)
            for img in images:
                w, h = kontext_size(img.width, img.height)
                pixels = proc.preprocess(proc.resize(img, h, w), h, w)
                latents.append(self.family.encode_image(pixels.to(self.dtype)))
        else:
            proc = Flux2ImageProcessor(vae_scale_factor=m, vae_latent_channels=latent_c)
            cap = 1024 * 1024 if len(images) > 1 else 2024 * 2024
            for img in images:
                if img.width * img.height > cap:
                    img = proc._resize_to_target_area(img, cap)
                w, h = img.width // m * m, img.height // m * m
                pixels = proc.preprocess(img, height=h, width=w, resize_mode="crop")
                latents.append(self.family.encode_image(pixels.to(self.dtype)))
        tokens, ids = self.family.reference_tokens(latents)
        return References(tokens.to(self.device, self.dtype), ids.to(self.device), kv=self.spec.kv_references,
                          reuse=self.kv_cache)

    def prepare_latents(self, job: Job, generators, inputs: dict | None = None, sigma0=None):
        """Starting latents, one CPU generator per image (so batching never changes an image).

        With an init image: its latents mixed with the noise at the first kept sigma (img2img); returns the
        noise and the init tokens too, which inpainting needs at every step.
        """
        x_ids = self.family.image_ids(len(generators), job.width, job.height, self.device)
        init = None if inputs is None else inputs["init"]
        if init is None:
            return self.family.noise(generators, job.width, job.height, self.dtype).to(self.device), x_ids, None
        pixels = init.to(self.device, self.dtype)
        import torch

        # Each image's generator first draws its VAE sample (FLUX.1), then its noise: the reference's order.
        z = torch.cat([self.family.encode_image(pixels, g) for g in generators])
        init_tokens = self.family.pack(z).to(self.dtype)
        noise = self.family.noise(generators, job.width, job.height, self.dtype).to(self.device)
        s0 = sigma0.to(self.dtype)
        return s0 * noise + (1.0 - s0) * init_tokens, x_ids, (noise, init_tokens)

    def denoise(self, job: Job, x, img_ids, cond: Conditioning, uncond: Conditioning | None, sigmas,
                generators=None, callback=None, refs=None, inpaint=None, extra=None):
        """Run the sampler. `refs` are reference tokens; `inpaint` = (mask, noise, init tokens) re-imposes the
        known region after every step, on the init image's own noise path."""
        import torch

        from .sampling import get_sampler

        family, guidance, device = self.family, job.guidance, self.device

        def model(x, sigma):
            # The reference feeds the model sigma*1000 (float32), cast to the latents' dtype, then /1000.
            t = (sigma * 1000).expand(x.shape[0]).to(x.dtype)
            v = family.velocity(x, t, cond, img_ids, guidance, refs, extra)
            if uncond is not None:  # real CFG: a second pass with the negative prompt
                v_u = family.velocity(x, t, uncond, img_ids, guidance, refs, extra)
                v = v_u + guidance * (v - v_u)
            return v

        post = None
        if inpaint is not None:
            mask, noise0, init_tokens = inpaint
            last = len(sigmas) - 2

            def post(i, x):
                s = sigmas[i + 1].to(x.dtype)
                known = init_tokens if i == last else s * noise0 + (1.0 - s) * init_tokens
                return (1 - mask) * known + mask * x

        def noise(i, shape):  # fresh noise for stochastic samplers, continuing each image's own generator
            return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators]).to(device)

        sampler = get_sampler(job.sampler).fn
        return sampler(model, x, sigmas, callback=callback, noise=noise, eta=job.eta, post=post)

    def decode(self, x, job: Job):
        z = self.family.unpack(x, job.width, job.height)
        return z, self.family.decode(z)

    # -- previews -----------------------------------------------------------------------------------
    def preview(self, denoised, job: Job, use_vae: bool = False) -> list:
        """Images of the model's current clean estimate: the VAE decode, or a cheap linear projection."""
        import torch

        z = self.family.unpack(denoised, job.width, job.height)
        if use_vae:
            return to_pil(self.family.decode(z))
        w, b = self._rgb_projection()
        rgb = torch.einsum("bchw,cr->brhw", z.float(), w) + b.view(1, 3, 1, 1)
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=self.family.vae_scale, mode="nearest")
        return to_pil(rgb)

    def _rgb_projection(self):
        """A least-squares map from this model's VAE latents to RGB, fitted once on synthetic images.

        Fitted rather than hard-coded so that it is right for every VAE, real or tiny, with no tables to copy.
        """
        if self._rgb is None:
            import torch

            vae, scale = self.components.vae, self.family.vae_scale
            g = torch.Generator().manual_seed(0)
            size = 8 * scale
            imgs = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, size=(size, size),
                                                   mode="bilinear", align_corners=False)
            with torch.inference_mode():
                z = vae.encode(imgs.to(self.device, vae.dtype)).latent_dist.mode().float().cpu()
            target = torch.nn.functional.avg_pool2d(imgs, scale)
            zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            zf = torch.cat([zf, torch.ones(zf.shape[0], 1)], dim=1)
            sol = torch.linalg.lstsq(zf, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
            self._rgb = (sol[:-1].to(self.device), sol[-1].to(self.device))
        return self._rgb

    # -- the whole run ------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | None = None, **kw) -> list[Result]:
        """Generate images. Takes a GenerateRequest or its fields as keywords (prompt=..., width=...)."""
        return list(self.generate_iter(request, **kw))

    def generate_iter(self, request: GenerateRequest | None = None, *, batch_size: int | None = None,
                      callback: Callable | None = None, **fields) -> Iterator[Result]:
        """Like generate(), yielding each image as soon as its batch is decoded.

        `callback(info)` is called at every step with i, steps, x, sigma, denoised and the batch's seeds.
        Out of device memory, the plan steps down (memory.next_smaller) and the batch is retried.
        """
        import torch

        encode_before = self.encode_seconds
        job = self.validate(request, fields)
        use_cfg = self.spec.guidance_mode == "cfg" and job.guidance > 1.0
        plan = self.plan_for(job, batch_size)
        with torch.inference_mode():
            cond1 = self._encode_timed([job.prompt])
            uncond1 = self._encode_timed([job.negative]) if use_cfg else None
            sigmas, mu = self.schedule(job)
            if job.init is not None:  # img2img: keep the last int(N * strength) steps of the schedule
                from .request import kept_steps

                sigmas = sigmas[job.steps - kept_steps(job.steps, job.strength):]
            timings0: dict = {}
            with _timed(timings0, "inputs"):
                inputs = self.prepare_inputs(job)
            remaining, batch_index = list(job.seeds), 0
            while remaining:
                seeds = tuple(remaining[:plan.batch_size])
                timings = {"load": round(self.load_seconds, 4), **timings0,
                           "encode": round(self.encode_seconds - encode_before, 4)}
                try:
                    batch = self._batch(job, seeds, sigmas, inputs, cond1, uncond1, timings, callback)
                except Exception as e:
                    if not _is_oom(e):
                        raise
                    plan = self._step_down(plan, e)
                    continue
                timings0, encode_before = {}, self.encode_seconds
                for i, seed in enumerate(seeds):
                    yield Result(batch[0][i], seed, self.metadata(job, seed, mu), batch[1][i:i + 1], batch[2],
                                 batch_index)
                remaining, batch_index = remaining[len(seeds):], batch_index + 1

    def _batch(self, job, seeds, sigmas, inputs, cond1, uncond1, timings, callback):
        """One forward-pass batch: noise -> denoise -> decode. Returns (PIL images, latents, timings)."""
        import torch

        cond = _repeat(cond1, len(seeds))
        uncond = _repeat(uncond1, len(seeds)) if uncond1 is not None else None
        step_cb = None
        if callback is not None:
            def step_cb(info):
                callback({**info, "steps": len(sigmas) - 1, "seeds": seeds})
        self._load("transformer", "vae")
        timings["load"] = round(self.load_seconds, 4)
        with _timed(timings, "prepare"):
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            x, img_ids, known = self.prepare_latents(job, generators, inputs, sigmas[0])
        inpaint = (inputs["mask"], *known) if inputs["mask"] is not None else None
        extra = None
        if inputs.get("fill_mask") is not None:
            pixels = inputs["init"].to(self.device, self.dtype)
            extra = self.family.fill_condition(pixels, inputs["fill_mask"], generators, job.width, job.height)
        refs = inputs["refs"]
        if refs is not None and refs.kv:  # a fresh cache per batch (its K/V carry the batch size)
            refs = dataclasses.replace(refs, cache=None)
        with _timed(timings, "denoise"):
            x = self.denoise(job, x, img_ids, cond, uncond, sigmas, generators, callback=step_cb, refs=refs,
                             inpaint=inpaint, extra=extra)
        with _timed(timings, "decode"):
            z, images = self.decode(x, job)
            pils = to_pil(images)
        timings = {k: round(v, 4) for k, v in timings.items()}
        timings["it_per_s"] = round((len(sigmas) - 1) / timings["denoise"], 3) if timings["denoise"] else None
        return pils, z, timings

    def encode_jobs(self, jobs, release: bool = True) -> None:
        """Encode every prompt (and negative) the jobs need, then, with `release`, drop the text encoders.

        A run that knows all its prompts up front never needs the encoders again; releasing them before the
        transformer loads keeps one big model in memory at a time.
        """
        import torch

        with torch.inference_mode():
            for job in jobs:
                cfg = self.spec.guidance_mode == "cfg" and job.guidance > 1.0
                self._encode_timed([job.prompt] + ([job.negative] if cfg else []))
        if release:
            self.components.release("text_encoder", "text_encoder_2")

    def _encode_timed(self, prompts):
        if any(p not in self._prompt_cache for p in prompts):
            self._load("text_encoder", "text_encoder_2")
        t0 = time.perf_counter()
        try:
            return self.encode_prompts(prompts)
        finally:
            self.encode_seconds += time.perf_counter() - t0

    def _load(self, *names) -> None:
        """Load components now (they load on first use), counting the time as loading, not as the phase."""
        t0 = time.perf_counter()
        for n in names:
            getattr(self.components, n)
        self.load_seconds += time.perf_counter() - t0

    # -- memory -------------------------------------------------------------------------------------
    def plan_for(self, job: Job, batch_size: int | None = None):
        """The memory plan for a job: planned against the device budget on a GPU or when a --budget is set;
        on a CPU without one, everything stays resident in host memory (batch 1: on a CPU a larger batch is
        no faster, it only adds memory)."""
        from .executor import model_sizes
        from .memory import Plan, make_plan

        wanted = batch_size or min(len(job.seeds), 16)
        if self.budget is None and self.device.type != "cuda":
            # Nothing to plan against: keep the placement in force (resident unless set_plan chose one).
            placed = self.plan or Plan("resident", 1, False, None, 0, 0, True)
            return dataclasses.replace(placed, batch_size=batch_size or 1)
        from .executor import device_budget

        budget = self.budget if self.budget is not None else device_budget(self.device) + self._placed_bytes()
        h, w = self.family.latent_grid(job.width, job.height)
        from .benchmark import load_profile

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

    def set_plan(self, plan) -> None:
        from .executor import apply

        if not plan.fits:
            self.notify(f"{plan.line()}; trying anyway")
        else:
            self.notify(plan.line())
        apply(self.components, plan, self.device)
        self.plan = plan

    def _placed_bytes(self) -> int:
        """Device bytes our own models hold now (free memory plus these is what a plan may use)."""
        if self.plan is None or self.device.type != "cuda":
            return 0
        import torch

        return torch.cuda.memory_allocated(self.device)

    def _step_down(self, plan, error):
        import gc

        from .memory import next_smaller

        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        smaller = next_smaller(plan)
        if smaller is None:
            smallest = plan.line().removeprefix("plan: ")
            raise UserError(f"out of memory even with the smallest plan tried ({smallest}); "
                            f"use a smaller size or --quantize int8") from None
        self.notify(f"out of memory with {plan.line().removeprefix('plan: ')}; retrying with "
                    f"{smaller.line().removeprefix('plan: ')}")
        self.set_plan(smaller)
        return smaller

    def metadata(self, job: Job, seed: int, mu: float | None) -> dict:
        from .devices import dtype_name

        meta = {
            "fluxlab": __version__,
            "model": self.label,
            "family": self.spec.family,
            "transformer_file": self.transformer_file,
            "prompt": job.prompt,
            "negative": job.negative,
            "seed": seed,
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "guidance": job.guidance,
            "guidance_mode": self.spec.guidance_mode,
            "sampler": job.sampler,
            "schedule": {"name": job.schedule, "mu": None if mu is None else round(mu, 6)},
            "dtype": dtype_name(self.dtype),
            "device": self.device.type,
        }
        if job.eta:
            meta["eta"] = job.eta
        if self.quantized:
            meta["quantize"] = self.quantized
        if self.upcast:
            meta["compute"] = "fp32"
        if self.loras:
            meta["loras"] = self.loras
        if self.plan is not None and self.plan.budget:
            meta["memory_plan"] = self.plan.as_dict()
        if job.strength is not None:
            meta["strength"] = job.strength
        inputs = job.inputs()
        if inputs:
            meta["inputs"] = inputs
        return meta


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def torch_bits(dtype) -> int:
    import torch

    return torch.finfo(dtype).bits


def _repeat(cond: Conditioning, n: int) -> Conditioning:
    """One prompt's conditioning for a batch of n images (the encoder ran once)."""
    ids = cond.ids if cond.ids.ndim == 2 else cond.ids.expand(n, -1, -1)
    pooled = None if cond.pooled is None else cond.pooled.expand(n, -1)
    return Conditioning(cond.embeds.expand(n, -1, -1), ids, pooled)


def load(model: str, device: str = "auto", dtype: str = "auto", transformer: str | None = None,
         notify: Callable[[str], None] | None = None, lean: bool = True, memory: str = "auto",
         budget: str | int | None = None, quantize: str | None = None, compute: str = "auto",
         loras: list | None = None, fuse_lora: bool = False) -> Pipeline:
    """Load a model (catalog name, local diffusers directory, or hub repo id) and keep it in memory.

        pipe = fluxlab.load("flux2-klein-4b")
        image = pipe.generate(prompt="a lighthouse at dusk", seed=7)[0].image

    memory (auto | speed | balanced | low) and budget ("6GB") steer the memory planner; quantize (int8 | fp8 |
    nf4) quantizes the transformer's and text encoders' weights. compute="auto" runs bf16 weights' matmuls in
    fp32 on CPUs without AMX, where that is faster (devices.upcast_linears); "native" keeps bf16 arithmetic.
    loras: [(path, scale), ...] or ["path:scale", ...], stacked; fuse_lora merges them into the weights.
    """
    from .loading import fetch, load_components, locate, quiet_libraries

    quiet_libraries()
    import torch

    from .devices import cpu_has_fast_bf16, resolve_device, resolve_dtype
    from .memory import MODES, parse_size

    if memory not in MODES:
        raise UserError(f"unknown memory mode {memory!r}; valid: {', '.join(MODES)}")
    budget_bytes = parse_size(budget) if isinstance(budget, str) else budget
    t0 = time.perf_counter()
    source = fetch(locate(model))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    # Models load into host memory; on a GPU the memory plan then decides what goes on the device.
    stage = dev if dev.type == "cpu" else torch.device("cpu")
    components = load_components(source.path, dt, stage, transformer_file=transformer, lean=lean)
    pipe = Pipeline(source.spec, source.label, components, dev, dt, transformer_file=transformer,
                    notify=notify)
    pipe.memory, pipe.budget = memory, budget_bytes
    if quantize:
        from .quantize import quantize_on_load

        quantize_on_load(components, quantize, stage, pipe.notify)
        pipe.quantized = quantize
    if loras:
        from .lora import apply as apply_loras
        from .lora import apply_text_encoder, parse_spec, read

        # Read and checked now (a wrong file fails before any weights load), applied as each model loads.
        specs = [parse_spec(x) if isinstance(x, str) else tuple(x) for x in loras]
        read_loras = [(read(path), scale) for path, scale in specs]
        for lo, _ in read_loras:
            if lo.family != source.spec.family:
                raise UserError(f"{lo.path} is a {lo.family} LoRA; {source.label} is a {source.spec.family} model")
        components.after_load.setdefault("transformer", []).append(
            lambda t: apply_loras(pipe, read_loras, fuse=fuse_lora, transformer=t))
        for name in ("text_encoder", "text_encoder_2"):
            components.after_load.setdefault(name, []).append(
                lambda m, name=name: apply_text_encoder(read_loras, name, m))
        pipe.loras = [{"file": Path(lo.path).name, "path": str(Path(lo.path).resolve()), "scale": s,
                       "format": lo.format} for lo, s in read_loras]
    if compute not in ("auto", "native"):
        raise UserError(f"unknown compute mode {compute!r}; valid: auto, native")
    if compute == "auto" and dev.type == "cpu" and dt == torch.bfloat16 and not cpu_has_fast_bf16():
        from .devices import upcast_linears

        for name in ("transformer", "text_encoder", "text_encoder_2"):
            components.after_load.setdefault(name, []).append(upcast_linears)
        # The VAE is small (84 M parameters) and convolution-bound: it simply runs in fp32.
        components.after_load.setdefault("vae", []).append(lambda vae: vae.to(torch.float32))
        pipe.upcast = True
        pipe.notify("bf16 weights, fp32 matmuls: this CPU has no AMX, where fp32 multiplies faster than bf16")
    pipe.load_seconds = time.perf_counter() - t0
    return pipe
