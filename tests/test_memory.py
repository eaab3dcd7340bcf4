"""The memory planner, with numbers: klein 4B at 1024x1024 in bf16 on devices from 4 GB to 80 GB."""

from __future__ import annotations

import pytest

from fluxlab.errors import UserError
from fluxlab.runtime.memory import GB, ModelSizes, activation_bytes, make_plan, next_smaller, parse_size

# klein 4B in bf16: transformer 3.88 B params, lean Qwen3-4B encoder (27 of 36 layers, no LM head), VAE 84 M.
KLEIN_4B = ModelSizes(transformer=int(7.75 * GB), text_encoder=int(5.6 * GB), vae=int(0.17 * GB),
                      transformer_blocks=25, text_encoder_blocks=27, hidden=3072)


def plan(budget_gb, batch=1, mode="auto", size=1024):
    return make_plan(KLEIN_4B, size, size, batch, int(budget_gb * GB), mode=mode)


# 16 GB: 13.5 GB of weights fit next to a tiled decode. 8 GB: the 7.75 GB transformer plus 0.63 GB of
# activations leaves no room, so its blocks stream.
@pytest.mark.parametrize("budget,placement", [(80, "resident"), (24, "resident"), (16, "resident"), (12, "phase"),
                                              (9, "phase"), (8, "stream"), (6, "stream"), (4, "stream")])
def test_placement_by_budget(budget, placement):
    p = plan(budget)
    assert p.placement == placement, p.line()
    assert p.fits and p.peak <= budget * GB


def test_seed_001_strategy_fits_12_gb_with_room():
    p = plan(12)
    assert p.placement == "phase" and 7.75 * GB < p.peak < 11.5 * GB


def test_batch_shrinks_before_streaming():
    assert plan(80, batch=8).batch_size == 8
    p = plan(10, batch=8)
    assert p.placement == "phase" and 1 < p.batch_size < 8 and p.fits


def test_streaming_group_size_grows_with_budget():
    small, larger = plan(4), plan(6)
    assert small.placement == larger.placement == "stream"
    assert small.blocks_per_group < larger.blocks_per_group


def test_vae_tiling_only_when_needed():
    assert not plan(80, size=1024).vae_tiling
    assert plan(16).vae_tiling and not plan(24).vae_tiling
    assert plan(80, size=2560).vae_tiling  # over 2048x2048 pixels
    assert plan(4).vae_tiling  # a whole-image decode would not fit next to the streamed blocks


def test_modes():
    assert plan(80, mode="balanced").placement == "phase"
    low = plan(80, mode="low", batch=4)
    assert (low.placement, low.batch_size, low.vae_tiling) == ("stream", 1, True)
    speed = plan(8, mode="speed", batch=4)
    assert speed.placement == "resident" and speed.batch_size == 4 and not speed.fits
    with pytest.raises(UserError, match="unknown memory mode 'fast'"):
        plan(8, mode="fast")


def test_nothing_fits_is_reported():
    p = plan(0.6)
    assert not p.fits and p.placement == "stream" and p.blocks_per_group == 1
    assert "does NOT fit" in p.line()


def test_activation_estimate_scales_with_tokens_and_batch():
    one = activation_bytes(1024, 1024, 1, 3072, 512, 2)
    assert activation_bytes(1024, 1024, 2, 3072, 512, 2) == 2 * one
    assert activation_bytes(512, 512, 1, 3072, 512, 2) < one / 2


def test_out_of_memory_ladder():
    p = plan(80, batch=4)
    rungs = []
    while p is not None:
        rungs.append((p.placement, p.batch_size, p.vae_tiling, p.blocks_per_group))
        p = next_smaller(p)
    assert rungs[:5] == [("resident", 4, False, None), ("resident", 4, True, None), ("resident", 2, True, None),
                         ("resident", 1, True, None), ("phase", 1, True, None)]
    assert rungs[-1] == ("stream", 1, True, 1)


def test_parse_size():
    assert parse_size("6GB") == 6 * GB and parse_size("6 GiB") == 6 * GB and parse_size("512MB") == GB // 2
    with pytest.raises(UserError, match="--budget 'lots' is not a size"):
        parse_size("lots")
