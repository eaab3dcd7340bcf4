"""Noise schedules for FLUX's rectified flow, as pure functions.

Written here rather than taken from diffusers' scheduler object because a schedule is a list of numbers,
not a stateful object: the samplers need the whole sigma list up front, and tests compare these functions
with the reference formulas directly. The arithmetic (NumPy float32, the same operation order) mirrors
`FlowMatchEulerDiscreteScheduler.set_timesteps`, so the sigmas are bit-identical to the reference.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

# Scheduler-config keys that change the numbers and that we implement; anything else that is switched on
# (karras/exponential/beta sigmas, inverted sigmas) is not used by any FLUX model and is refused by name.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical shift: fitted on (tokens, steps); above 4300 tokens it depends on tokens only."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def flux1_mu(image_seq_len: int, config: dict | None = None) -> float:
    """FLUX.1's shift: linear in image tokens, through (256, 0.5) and (4096, 1.15) by default."""
    c = config or {}
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Move the schedule toward high noise: sigma' = e^mu / (e^mu + (1/sigma - 1)) (or mu for 'linear')."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** 1.0)
    raise UserError(f"unknown time_shift_type {kind!r} in scheduler config; valid: exponential, linear")


def flow_sigmas(num_steps: int, mu: float | None, config: dict) -> np.ndarray:
    """The N+1 sigmas (1 -> 0) a model's scheduler config gives for `num_steps` steps.

    `mu` is the resolution-dependent shift, used when the config has `use_dynamic_shifting`; otherwise the
    static `shift` applies (1.0 for FLUX.1 schnell: the plain linear schedule).
    """
    for key in _UNSUPPORTED:
        if config.get(key):
            raise UserError(f"scheduler config sets {key}, which no FLUX model uses and fluxlab does not support")
    sigmas = np.array(np.linspace(1.0, 1 / num_steps, num_steps)).astype(np.float32)
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("a dynamically shifted schedule needs mu")
        sigmas = time_shift(mu, sigmas, config.get("time_shift_type", "exponential"))
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    terminal = config.get("shift_terminal")
    # A 1-step schedule is just sigma=1: stretching it would divide by zero (diffusers returns NaN there).
    if terminal and num_steps > 1:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


def linear_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted schedule t_i = 1 - i/N (BFL's `shift=False`, FLUX.1 schnell)."""
    return flow_sigmas(num_steps, None, {"use_dynamic_shifting": False, "shift": 1.0})
