"""Samplers: convergence order on an exact flow, the reference path, and every sampler x schedule end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxlab.core.sampling import FUNCTIONS, get_sampler
from fluxlab.errors import UserError
from fluxlab.spec.samplers import SAMPLERS

# Data ~ N(M, S^2) per coordinate, noise ~ N(0, 1), x_sigma = (1 - sigma) x0 + sigma eps. The marginal velocity
# E[eps - x0 | x_sigma] is linear in x, and the ODE maps x1 to M + S * x1 exactly: a known answer to converge to.
M, S = 2.0, 0.5


def exact_velocity(x, sigma):
    s = float(sigma)
    a = 1 - s
    var = a * a * S * S + s * s
    return s / var * (x - a * M) - (M + a * S * S / var * (x - a * M))


def global_error(name, n):
    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    sigmas = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    out = FUNCTIONS[name](exact_velocity, x1.clone(), sigmas, eta=0.0)
    return (out - (M + S * x1)).abs().max().item()


def measured_order(name, ns=(256, 512, 1024, 2048)):
    errs = [global_error(name, n) for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.mark.parametrize("name,low,high", [("euler", 0.9, 1.1), ("ddim", 0.9, 1.1), ("heun", 1.9, 2.1),
                                           ("dpmpp_2m", 1.75, 2.1)])
def test_convergence_order(name, low, high):
    order = measured_order(name)
    assert low <= order <= high, f"{name}: measured order {order:.2f}"


def test_ddim_is_euler_on_a_rectified_flow():
    for n in (4, 16):
        assert global_error("ddim", n) == pytest.approx(global_error("euler", n), rel=1e-9)


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown sampler 'eulr' \\(did you mean 'euler'\\?\\); valid: euler, heun"):
        get_sampler("eulr")


KW = dict(prompt="a red circle", width=96, height=64, seed=3)


def test_euler_default_schedule_is_the_reference_path(tiny_pipes):
    for kind in ("flux2-klein", "flux1-dev"):
        pipe = tiny_pipes[kind]
        ref = pipe.generate(**KW)[0].latents
        same = pipe.generate(**KW, sampler="euler", schedule="default")[0].latents
        assert torch.equal(ref, same)


@pytest.mark.parametrize("kind", ["flux2-klein-base", "flux1-dev"])
@pytest.mark.parametrize("schedule", ["default", "linear", "shift:3"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_and_schedule_runs(tiny_pipes, kind, sampler, schedule):
    res = tiny_pipes[kind].generate(**KW, steps=3, sampler=sampler, schedule=schedule)[0]
    assert torch.isfinite(res.latents).all()
    assert res.metadata["request"]["sampler"] == sampler and res.metadata["resolved"]["schedule"]["name"] == schedule


def test_schedules_differ_and_ancestral_eta_zero_is_euler(tiny_pipes):
    pipe = tiny_pipes["flux2-klein"]
    a = pipe.generate(**KW, schedule="default")[0].latents
    b = pipe.generate(**KW, schedule="linear")[0].latents
    assert (a - b).abs().max() > 1e-4
    e = pipe.generate(**KW, sampler="euler")[0].latents
    anc0 = pipe.generate(**KW, sampler="euler_ancestral", eta=0.0)[0].latents
    anc1 = pipe.generate(**KW, sampler="euler_ancestral", eta=1.0)[0].latents
    assert (e - anc0).abs().max() <= 1e-6
    assert (e - anc1).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize("kind", ["flux2-klein", "flux1-schnell"])
def test_batched_equals_unbatched(tiny_pipes, kind, sampler):
    pipe = tiny_pipes[kind]
    batch = pipe.generate(**{**KW, "seed": None}, seeds=[5, 9, 2], sampler=sampler, batch_size=3)
    for r in batch:
        single = pipe.generate(**{**KW, "seed": r.seed}, sampler=sampler, batch_size=1)[0]
        assert (r.latents - single.latents).abs().max().item() <= 1e-5


def test_step_events_see_every_step_and_the_last_estimate_is_the_result(tiny_pipes):
    from fluxlab.service.events import Step

    pipe = tiny_pipes["flux2-klein"]
    seen = []
    res = pipe.generate(**KW, steps=4, events=lambda e: seen.append(e) if isinstance(e, Step) else None)[0]
    assert [s.i for s in seen] == [1, 2, 3, 4] and seen[0].n == 4
    # Euler's last step lands on sigma=0, so the final clean estimate is the output itself.
    z = pipe.family.unpack(seen[-1].denoised, 96, 64)
    assert (z - res.latents).abs().max() <= 1e-5


def test_every_named_sampler_has_a_function():
    assert FUNCTIONS.keys() == SAMPLERS.keys()
