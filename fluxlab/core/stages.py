"""The generation stages: encode prompt -> schedule -> prepare inputs -> prepare latents -> denoise -> decode.

Each stage is a function over a resolved `Job` and a loaded model (anything with `family`, `components`,
`device`, `dtype` and `spec`: runtime.model.LoadedModel). Task variants (references, img2img, inpainting, Fill)
add inputs; they do not fork the loop, and nothing here branches on the model family: the family adapter
answers.

Our own loop over diffusers' model classes rather than a diffusers pipeline's __call__: the stages are plain
functions, so samplers, schedules, batching, memory plans and editing inputs plug in without forking the loop,
and every stage can be timed and tested on its own. Loading, memory placement and batching are the runtime's
(runtime.model); what to run and where the images go are the service's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.resolve import Job, kept_steps, parse_schedule
from .families import Conditioning, References


def sigmas_for(model, job: Job):
    """The sigmas (float32 tensor, N+1 values from 1 to 0; an img2img job keeps its last int(N * strength)
    steps) and the shift mu used (None if unshifted)."""
    import torch

    from .schedule import flow_sigmas, linear_sigmas

    kind, shift = parse_schedule(job.schedule)
    mu = None
    if kind == "default":
        h, w = model.family.latent_grid(job.width, job.height)
        cfg = model.components.scheduler_config or {}
        mu = model.family.mu(h * w, job.steps, cfg)
        sigmas = flow_sigmas(job.steps, mu, cfg)
        mu = mu if cfg.get("use_dynamic_shifting", False) else None
    elif kind == "linear":
        sigmas = linear_sigmas(job.steps)
    else:
        sigmas = flow_sigmas(job.steps, None, {"use_dynamic_shifting": False, "shift": shift})
    sigmas = torch.from_numpy(sigmas).to(model.device)
    if job.init is not None:
        sigmas = sigmas[job.steps - kept_steps(job.steps, job.strength):]
    return sigmas, mu


@dataclass
class Inputs:
    """A job's input images, decoded and encoded once: reference tokens, init pixels, inpainting mask tokens,
    or Fill's mask (Fill conditions on the mask instead of re-imposing the known region)."""

    refs: References | None = None
    init: object = None
    mask: object = None
    fill_mask: object = None


def prepare_inputs(model, job: Job, notify=None) -> Inputs:
    """Decode the job's input images (from the bytes read when the request was resolved) and encode them."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from ..spec.images import decode, decode_mask

    out = Inputs()
    family = model.family
    vae_c = model.components.config("vae").latent_channels
    refs = [decode(i, notify, "reference image") for i in job.images]
    if job.init is not None:
        init = decode(job.init, notify, "init image")
        proc = VaeImageProcessor(vae_scale_factor=family.vae_scale * 2, vae_latent_channels=vae_c)
        out.init = proc.preprocess(init, height=job.height, width=job.width).to(torch.float32)
        if job.mask is not None:
            mask = decode_mask(job.mask, init.size, notify)
            mproc = VaeImageProcessor(vae_scale_factor=family.vae_scale * 2, vae_latent_channels=vae_c,
                                      do_normalize=False, do_binarize=True, do_convert_grayscale=True)
            m = mproc.preprocess(mask, height=job.height, width=job.width)
            if model.spec.fill:
                out.fill_mask = m.to(model.device, model.dtype)
                return out
            out.mask = family.mask_tokens(m, job.width, job.height).to(model.device, model.dtype)
            refs = family.inpaint_references(init, refs)
    if refs:
        tokens, ids = family.reference_tokens(family.reference_latents(refs, model.dtype))
        out.refs = References(tokens.to(model.device, model.dtype), ids.to(model.device),
                              kv=model.spec.kv_references, reuse=model.kv_cache)
    return out


def prepare_latents(model, job: Job, generators, inputs: Inputs | None = None, sigma0=None):
    """Starting latents, one CPU generator per image (so batching never changes an image), and their ids.

    With an init image: its latents mixed with the noise at the first kept sigma (img2img); returns the noise and
    the init tokens too, which inpainting needs at every step.
    """
    import torch

    family, device, dtype = model.family, model.device, model.dtype
    x_ids = family.image_ids(len(generators), job.width, job.height, device)
    if inputs is None or inputs.init is None:
        return family.noise(generators, job.width, job.height, dtype).to(device), x_ids, None
    pixels = inputs.init.to(device, dtype)
    # Each image's generator first draws its VAE sample (FLUX.1), then its noise: the reference's order.
    z = torch.cat([family.encode_image(pixels, g) for g in generators])
    init_tokens = family.pack(z).to(dtype)
    noise = family.noise(generators, job.width, job.height, dtype).to(device)
    s0 = sigma0.to(dtype)
    return s0 * noise + (1.0 - s0) * init_tokens, x_ids, (noise, init_tokens)


def denoise(model, job: Job, x, img_ids, cond: Conditioning, uncond: Conditioning | None, sigmas,
            generators=None, callback=None, refs=None, inpaint=None, extra=None):
    """Run the sampler. `refs` are reference tokens; `inpaint` = (mask, noise, init tokens) re-imposes the known
    region after every step, on the init image's own noise path."""
    import torch

    from .sampling import get_sampler

    family, guidance, device = model.family, job.guidance, model.device
    context = step_cache(model, job.cache)

    def velocity(x, sigma):
        # The reference feeds the model sigma*1000 (float32), cast to the latents' dtype, then /1000.
        t = (sigma * 1000).expand(x.shape[0]).to(x.dtype)
        with context("cond"):
            v = family.velocity(x, t, cond, img_ids, guidance, refs, extra)
        if uncond is not None:  # real CFG: a second pass with the negative prompt
            with context("uncond"):
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

    try:
        return get_sampler(job.sampler)(velocity, x, sigmas, callback=callback, noise=noise, eta=job.eta, post=post)
    finally:
        context.close()


class step_cache:
    """Step caching on the transformer for one denoising run (`cache` "fbc:T": First Block Cache, "taylorseer:N":
    TaylorSeer), and the context each transformer call runs in: "cond" and "uncond" calls keep their own state, as
    diffusers' pipelines name them. First Block Cache: diffusers' hook on FLUX.1; on FLUX.2, which that hook cannot
    run, core.stepcache. TaylorSeer: diffusers' hook on both. Off (None): contexts that do nothing, so every pixel
    is as before. `close()` leaves the pooled model as it was."""

    def __init__(self, model, cache: str | None):
        self.transformer, self.own = model.components.transformer, None
        self.on = bool(cache)
        if not cache:
            return
        from ..spec.values import TAYLOR_WARMUP, parse_cache

        kind, value = parse_cache(cache)
        if kind == "taylorseer":
            # diffusers' TaylorSeer hook, which runs on both families: after the first 3 steps, a full step every
            # `value`-th; the steps between predict the transformer's output from a first-order Taylor expansion
            # of the last full ones. Lite mode skips whole steps (all blocks); the default mode predicts only the
            # attention outputs and measured 1.04x on the demo against lite's 1.82x (bench/RESULTS.md).
            from diffusers.hooks import TaylorSeerCacheConfig

            self.transformer.enable_cache(TaylorSeerCacheConfig(
                cache_interval=int(value), disable_cache_before_step=TAYLOR_WARMUP, max_order=1,
                taylor_factors_dtype=self.transformer.dtype, use_lite_mode=True))
            return
        threshold = value
        if model.family.family == "flux2":
            from .stepcache import FirstBlockCache

            self.own = FirstBlockCache(self.transformer, threshold).install()
        else:
            from diffusers.hooks import FirstBlockCacheConfig

            self.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))

    def __call__(self, name: str):
        import contextlib

        if not self.on:
            return contextlib.nullcontext()
        return self.own.context(name) if self.own is not None else self.transformer.cache_context(name)

    def close(self) -> None:
        if self.own is not None:
            self.own.remove()
        elif self.on:
            self.transformer._reset_stateful_cache()
            self.transformer.disable_cache()


def decode(model, x, job: Job):
    """Tokens -> (denormalised VAE latents, [-1, 1] images)."""
    z = model.family.unpack(x, job.width, job.height)
    return z, model.family.decode(z)


def to_pil(images) -> list:
    """[-1, 1] image tensors -> PIL images, rounding as diffusers' image processor does."""
    import numpy as np
    from PIL import Image

    x = (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


def rgb_projection(model):
    """A least-squares map from this model's VAE latents to RGB, fitted once on synthetic images.

    Fitted rather than hard-coded so that it is right for every VAE, real or tiny, with no tables to copy.
    """
    import torch

    vae, scale = model.components.vae, model.family.vae_scale
    g = torch.Generator().manual_seed(0)
    size = 8 * scale
    imgs = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, size=(size, size),
                                           mode="bilinear", align_corners=False)
    with torch.inference_mode():
        z = vae.encode(imgs.to(model.device, vae.dtype)).latent_dist.mode().float().cpu()
    target = torch.nn.functional.avg_pool2d(imgs, scale)
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    zf = torch.cat([zf, torch.ones(zf.shape[0], 1)], dim=1)
    sol = torch.linalg.lstsq(zf, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return sol[:-1].to(model.device), sol[-1].to(model.device)


def preview(model, denoised, job: Job, projection=None) -> list:
    """Images of the model's current clean estimate: the VAE decode (no `projection`), or the cheap linear
    projection (`projection` = rgb_projection(model)), upsampled to the image's size."""
    import torch

    z = model.family.unpack(denoised, job.width, job.height)
    if projection is None:
        return to_pil(model.family.decode(z))
    w, b = projection
    rgb = torch.einsum("bchw,cr->brhw", z.float(), w) + b.view(1, 3, 1, 1)
    rgb = torch.nn.functional.interpolate(rgb, scale_factor=model.family.vae_scale, mode="nearest")
    return to_pil(rgb)
