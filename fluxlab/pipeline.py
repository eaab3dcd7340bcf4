"""Loaded models and the generation stages: validate -> encode prompt -> schedule -> prepare latents ->
denoise -> decode. (Saving is the caller's: the CLI writes PNGs, the Python API returns images.)

Our own loop over diffusers' model classes rather than a diffusers pipeline's __call__: the stages are
plain functions over a typed request, so samplers, schedules, batching, memory plans and editing inputs
plug in without forking the loop, and every stage can be timed and tested on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .catalog import ModelSpec
from .families import Conditioning, get_family
from .request import GenerateRequest, Job, make_request, resolve

log = logging.getLogger("fluxlab")


@dataclass
class Result:
    """One generated image with everything needed to reproduce it."""

    image: Any  # PIL.Image.Image
    seed: int
    metadata: dict
    latents: Any = None  # the denormalised latents the VAE decoded (B=1), for inspection and parity checks
    timings: dict = field(default_factory=dict)


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
            cond = self.family.encode(new, self.device)
            for i, p in enumerate(new):
                self._prompt_cache[p] = cond.select([i])
        parts = [self._prompt_cache[p] for p in prompts]
        ids = parts[0].ids if parts[0].ids.ndim == 2 else torch.cat([c.ids for c in parts])
        pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
        return Conditioning(torch.cat([c.embeds for c in parts]), ids, pooled)

    def schedule(self, job: Job):
        """The sigmas (float32 tensor, N+1 values from 1 to 0) and the shift mu used to get them."""
        import torch

        from .schedule import flow_sigmas, flux1_mu, flux2_mu

        h, w = self.family.latent_grid(job.width, job.height)
        cfg = self.components.scheduler_config or {}
        mu = flux2_mu(h * w, job.steps) if self.spec.family == "flux2" else flux1_mu(h * w, cfg)
        sigmas = flow_sigmas(job.steps, mu, cfg)
        return torch.from_numpy(sigmas).to(self.device), mu

    def prepare_latents(self, job: Job, seeds):
        x = self.family.noise(seeds, job.width, job.height, self.dtype).to(self.device)
        return x, self.family.image_ids(len(seeds), job.width, job.height, self.device)

    def denoise(self, job: Job, x, img_ids, cond: Conditioning, uncond: Conditioning | None, sigmas,
                callback=None):
        from .sampling import sample_euler

        family, guidance = self.family, job.guidance

        def model(x, sigma):
            # The reference feeds the model sigma*1000 (float32), cast to the latents' dtype, then /1000.
            t = (sigma * 1000).expand(x.shape[0]).to(x.dtype)
            v = family.velocity(x, t, cond, img_ids, guidance)
            if uncond is not None:  # real CFG: a second pass with the negative prompt
                v_u = family.velocity(x, t, uncond, img_ids, guidance)
                v = v_u + guidance * (v - v_u)
            return v

        return sample_euler(model, x, sigmas, callback=callback)

    def decode(self, x, job: Job):
        z = self.family.unpack(x, job.width, job.height)
        return z, self.family.decode(z)

    # -- the whole run ------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | None = None, *, batch_size: int | None = None,
                 callback: Callable | None = None, **fields) -> list[Result]:
        """Generate images. Takes a GenerateRequest or its fields as keywords (prompt=..., width=...)."""
        import torch

        timings: dict[str, float] = {}
        with _timed(timings, "validate"):
            job = self.validate(request, fields)
        use_cfg = self.spec.guidance_mode == "cfg" and job.guidance > 1.0
        results: list[Result] = []
        with torch.inference_mode():
            with _timed(timings, "encode"):
                self.encode_prompts([job.prompt] + ([job.negative] if use_cfg else []))
            sigmas, mu = self.schedule(job)
            bs = batch_size or min(len(job.seeds), 4)
            for start in range(0, len(job.seeds), bs):
                seeds = job.seeds[start:start + bs]
                cond = self.encode_prompts([job.prompt] * len(seeds))
                uncond = self.encode_prompts([job.negative] * len(seeds)) if use_cfg else None
                with _timed(timings, "prepare"):
                    x, img_ids = self.prepare_latents(job, seeds)
                with _timed(timings, "denoise"):
                    x = self.denoise(job, x, img_ids, cond, uncond, sigmas, callback=callback)
                with _timed(timings, "decode"):
                    z, images = self.decode(x, job)
                    pils = to_pil(images)
                for i, seed in enumerate(seeds):
                    results.append(Result(pils[i], seed, self.metadata(job, seed, mu), z[i:i + 1]))
        timings = {"load": round(self.load_seconds, 4), **{k: round(v, 4) for k, v in timings.items()}}
        for r in results:
            r.timings = timings
        return results

    def metadata(self, job: Job, seed: int, mu: float) -> dict:
        from .devices import dtype_name

        return {
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
            "sampler": "euler",
            "schedule": {"name": "default", "mu": round(mu, 6)},
            "dtype": dtype_name(self.dtype),
            "device": self.device.type,
        }


def load(model: str, device: str = "auto", dtype: str = "auto", transformer: str | None = None,
         notify: Callable[[str], None] | None = None) -> Pipeline:
    """Load a model (catalog name, local diffusers directory, or hub repo id) and keep it in memory.

        pipe = fluxlab.load("flux2-klein-4b")
        image = pipe.generate(prompt="a lighthouse at dusk", seed=7)[0].image
    """
    from .devices import resolve_device, resolve_dtype
    from .loading import fetch, load_components, locate

    t0 = time.perf_counter()
    source = fetch(locate(model))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    components = load_components(source.path, dt, dev, transformer_file=transformer)
    return Pipeline(source.spec, source.label, components, dev, dt, transformer_file=transformer,
                    load_seconds=time.perf_counter() - t0, notify=notify)
