"""Schedules equal the reference formulas and diffusers' scheduler, number for number."""

from __future__ import annotations

import numpy as np
import pytest

from fluxlab.core.schedule import flow_sigmas, flux1_mu, flux2_mu, linear_sigmas
from fluxlab.tiny import SCHNELL_SCHEDULER, SHIFTED_SCHEDULER


def test_klein_1024_four_steps_matches_the_worked_example():
    mu = flux2_mu((1024 // 16) ** 2, 4)
    assert mu == pytest.approx(2.2912, abs=1e-4)
    sig = flow_sigmas(4, mu, SHIFTED_SCHEDULER)
    np.testing.assert_allclose(sig, [1.0, 0.9674, 0.9081, 0.7672, 0.0], atol=1e-4)


def test_klein_512_and_50_step_mu():
    assert flux2_mu(32 * 32, 4) == pytest.approx(2.0307, abs=1e-4)
    assert flux2_mu(64 * 64, 50) == pytest.approx(2.0234, abs=1e-4)
    # Above 4300 tokens mu depends on the token count only.
    assert flux2_mu(5000, 4) == flux2_mu(5000, 50) == pytest.approx(0.00016927 * 5000 + 0.45666666)


def test_flux1_dev_mu_line():
    assert flux1_mu(4096) == pytest.approx(1.15)
    assert flux1_mu(256) == pytest.approx(0.5)
    assert flux1_mu(1024) == pytest.approx(0.63, abs=1e-3)  # 512x512


def test_schnell_is_linear():
    sig = flow_sigmas(4, flux1_mu(4096), SCHNELL_SCHEDULER)
    np.testing.assert_allclose(sig, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    np.testing.assert_array_equal(sig, linear_sigmas(4))


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("tokens", [24, 1024, 4096, 6000])
@pytest.mark.parametrize("config", [SHIFTED_SCHEDULER, SCHNELL_SCHEDULER,
                                    {**SHIFTED_SCHEDULER, "shift_terminal": 0.02},
                                    {**SHIFTED_SCHEDULER, "time_shift_type": "linear"}])
def test_bit_identical_to_diffusers_scheduler(steps, tokens, config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = flux2_mu(tokens, steps)
    if steps == 1 and config.get("shift_terminal"):
        # diffusers divides by zero here and returns NaN; ours keeps the one-step schedule [1, 0].
        np.testing.assert_array_equal(flow_sigmas(steps, mu, config), [1.0, 0.0])
        return
    s = FlowMatchEulerDiscreteScheduler(**config)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    np.testing.assert_array_equal(flow_sigmas(steps, mu, config), s.sigmas.numpy())


def test_unsupported_scheduler_option_is_named():
    from fluxlab.errors import UserError

    with pytest.raises(UserError, match="use_karras_sigmas"):
        flow_sigmas(4, 1.0, {**SHIFTED_SCHEDULER, "use_karras_sigmas": True})
