"""Samplers for the flow ODE dx/dsigma = v(x, sigma), as pure functions with one signature.

    sample_NAME(model, x, sigmas, callback=None) -> x

`model(x, sigma)` returns the velocity; everything model-specific (text embeddings, ids, guidance) is bound
in that closure by the caller. `sigmas` is a float32 tensor running from 1 to 0. Written here because a
sampler over a velocity closure is a dozen lines, and it keeps the loop ours (the diffusers schedulers are
stateful objects tied to their pipelines).
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import UserError, did_you_mean


def sample_euler(model, x, sigmas, callback: Callable | None = None):
    """Euler steps x <- x + (sigma_{i+1} - sigma_i) * v: the reference FLUX sampler.

    The update is computed in float32 and cast back, as diffusers' FlowMatchEulerDiscreteScheduler does.
    """
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i])
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
        if callback is not None:
            callback(i, x)
    return x


SAMPLERS: dict[str, Callable] = {"euler": sample_euler}


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(
            f"unknown sampler {name!r}{did_you_mean(name, SAMPLERS)}; valid: {', '.join(SAMPLERS)}"
        ) from None
