"""Samplers for the rectified-flow ODE dx/dsigma = v(x, sigma), as pure functions with one signature.

    sample_NAME(model, x, sigmas, callback=None, noise=None, eta=0.0, post=None) -> x

`model(x, sigma)` returns the velocity v; everything model-specific (text embeddings, ids, guidance) is bound
in that closure by the caller. `sigmas` is a float32 tensor running from 1 (noise) to 0 (image). On the flow
x_sigma = (1 - sigma) * x0 + sigma * eps the velocity is v = eps - x0, so the model's clean estimate is
x0 = x - sigma * v. `callback(info)` gets a dict with i, x, sigma, sigma_next and denoised (that estimate).
`noise(i, shape)` gives fresh Gaussian noise for stochastic samplers (the caller seeds it per image).
`post(i, x)`, when given, may replace the state after step i (inpainting re-imposes the known region there).

Written here because the diffusers schedulers are stateful objects tied to their pipelines; a sampler over
a velocity closure is a dozen lines, and these shapes follow k-diffusion's (Crowson), which ComfyUI and
others reuse. Updates run in at least float32 and are cast back, as diffusers' flow-match scheduler does.
"""

from __future__ import annotations

from collections.abc import Callable

from ..spec.samplers import sampler_info


def _hi(x):
    """x in at least float32: bf16/fp16 latents are updated in fp32; fp32/fp64 stay as they are."""
    import torch

    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _post(post, i, x):
    return x if post is None else post(i, x)


def _report(callback, i, x, sigmas, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


def sample_euler(model, x, sigmas, callback=None, noise=None, eta=0.0, post=None):
    """Euler steps x <- x + (sigma_{i+1} - sigma_i) * v: the reference FLUX sampler (first order)."""
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i])
        _report(callback, i, x, sigmas, x - sigmas[i] * v)
        x = _post(post, i, (_hi(x) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype))
    return x


def sample_ddim(model, x, sigmas, callback=None, noise=None, eta=0.0, post=None):
    """Deterministic DDIM (Song et al. 2021, eta=0) on the rectified flow.

    DDIM re-noises the clean estimate with the predicted noise: x' = (1 - s') x0 + s' eps, where x0 = x - s v
    and eps = x + (1 - s) v. Substituting gives x' = x + (s' - s) v: on a rectified flow DDIM *is* the Euler
    step. The name is kept because users know it; results equal `euler` up to rounding.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = _hi(model(x, s))
        x0, eps = _hi(x) - s * v, _hi(x) + (1 - s) * v
        _report(callback, i, x, sigmas, x0)
        x = _post(post, i, ((1 - s_next) * x0 + s_next * eps).to(x.dtype))
    return x


def sample_heun(model, x, sigmas, callback=None, noise=None, eta=0.0, post=None):
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn): second order, two model calls per
    step except the last, which falls back to Euler because v at sigma=0 is not needed."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = model(x, s)
        _report(callback, i, x, sigmas, x - s * v)
        x_euler = _hi(x) + (s_next - s) * v
        if s_next == 0:
            x = _post(post, i, x_euler.to(x.dtype))
            continue
        v2 = model(x_euler.to(x.dtype), s_next)
        x = _post(post, i, (_hi(x) + (s_next - s) * (_hi(v) + _hi(v2)) / 2).to(x.dtype))
    return x


def sample_dpmpp_2m(model, x, sigmas, callback=None, noise=None, eta=0.0, post=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in its flow-matching form: second-order multistep.

    Data prediction x0 = x - s v with alpha = 1 - s and lambda = log(alpha / s). One step is
    x' = (s'/s) x + alpha' (1 - e^-h) D, h = lambda' - lambda, where D = x0 for the first step and
    D = (1 + 1/2r) x0 - (1/2r) x0_prev (r = h_prev / h) after it. e^-h is computed as a ratio of alpha/s so
    the first step from s = 1 (alpha = 0, lambda = -inf) is exact instead of NaN.
    """
    import math

    old_x0, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = _hi(model(x, sigmas[i]))
        x0 = _hi(x) - s * v
        _report(callback, i, x, sigmas, x0)
        if s_next == 0:
            x = _post(post, i, x0.to(x.dtype))
            continue
        a, a_next = 1 - s, 1 - s_next
        exp_neg_h = (a * s_next) / (s * a_next)  # e^-(lambda' - lambda)
        h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
        d = x0
        if old_x0 is not None and math.isfinite(h_prev) and h > 0:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = _post(post, i, ((s_next / s) * _hi(x) + a_next * (1 - exp_neg_h) * d).to(x.dtype))
        old_x0, h_prev = x0, h
    return x


def sample_euler_ancestral(model, x, sigmas, callback=None, noise=None, eta=1.0, post=None):
    """Euler ancestral for rectified flow: step to a lower sigma_down with Euler, then add fresh noise back
    up to sigma_{i+1}, keeping the marginal of the flow. eta=0 is plain Euler; eta=1 re-noises fully.

    With sigma_down = s' (1 + (s'/s - 1) eta) and alpha = 1 - sigma, the state at sigma_down is rescaled by
    alpha'/alpha_down and gets noise of std sqrt(s'^2 - (s_down alpha' / alpha_down)^2), so that
    x = alpha' x0 + s' eps in distribution (the RF form of k-diffusion's ancestral step, as in ComfyUI's
    sample_euler_ancestral_RF).
    """
    if eta > 0 and noise is None:
        raise ValueError("euler_ancestral with eta > 0 needs a noise source")
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = model(x, s)
        _report(callback, i, x, sigmas, x - s * v)
        if s_next == 0 or eta == 0:
            x = _post(post, i, (_hi(x) + (s_next - s) * v).to(v.dtype))
            continue
        s_down = s_next * (1 + (s_next / s - 1) * eta)
        a_next, a_down = 1 - s_next, 1 - s_down
        x_down = _hi(x) + (s_down - s) * v
        std = (s_next**2 - (s_down * a_next / a_down) ** 2).clamp(min=0).sqrt()
        x = _post(post, i, ((a_next / a_down) * x_down + std * _hi(noise(i, x.shape))).to(x.dtype))
    return x


# The function for each sampler named in spec.samplers (the table of names, orders and notes).
FUNCTIONS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "euler_ancestral": sample_euler_ancestral,
}


def get_sampler(name: str) -> Callable:
    """The sampler function for `name`; an unknown name raises UserError with the valid ones."""
    return FUNCTIONS[sampler_info(name).name]
