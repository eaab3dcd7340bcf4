"""The samplers by name, as data: what a request may ask for and how each behaves.

The functions themselves are in `core.sampling` (which registers one per name here); this table is what
validation, help texts and docs read, without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError, did_you_mean


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    order: int
    stochastic: bool
    about: str


SAMPLERS: dict[str, SamplerInfo] = {s.name: s for s in [
    SamplerInfo("euler", 1, False, "the reference FLUX sampler; 1 model call per step"),
    SamplerInfo("heun", 2, False, "2nd order; 2 model calls per step (last step: 1)"),
    SamplerInfo("dpmpp_2m", 2, False, "DPM-Solver++(2M), 2nd order multistep; 1 call per step"),
    SamplerInfo("ddim", 1, False, "deterministic DDIM; on a rectified flow it equals euler"),
    SamplerInfo("euler_ancestral", 1, True, "stochastic; --eta sets the re-noising (1)"),
]}


def sampler_info(name: str) -> SamplerInfo:
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UserError(
            f"unknown sampler {name!r}{did_you_mean(str(name), SAMPLERS)}; valid: {', '.join(SAMPLERS)}"
        ) from None
