"""The memory planner, with numbers: klein 4B at 1024x1024 in bf16 on devices from 4 GB to 80 GB."""

from __future__ import annotations

from itertools import combinations

import pytest

from fluxlab.errors import UserError
from fluxlab.runtime import memory
from fluxlab.runtime.memory import GB, HOST, ModelSizes, activation_bytes, make_plan, next_smaller, parse_size
from fluxlab.spec.catalog import CATALOG

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


# -- one model over several devices (split_plan) ------------------------------------------------------------
BUDGETS = {"2 x 24 GB": (("cuda:0", 24), ("cuda:1", 24)), "2 x 48 GB": (("cuda:0", 48), ("cuda:1", 48)),
           "4 x 16 GB": tuple((f"cuda:{i}", 16) for i in range(4)),
           "80 GB + CPU": (("cuda:0", 80), ("cpu", 128))}


def catalog_sizes(spec) -> ModelSizes:
    return memory.catalog_sizes(spec.sizes_gb)


def place(sizes, budgets, size=1024):
    devices = tuple(d for d, _ in budgets)
    return memory.split_plan(sizes, devices, tuple(int(b * GB) for _, b in budgets), size, size, 1,
                      text_tokens=512, dtype_bytes=2)


@pytest.mark.parametrize("budgets", BUDGETS)
@pytest.mark.parametrize("name", sorted(CATALOG))
def test_split_plans_for_every_catalog_model(name, budgets):
    """Nothing over budget, every block placed once and in order, the fewest hand-overs, the same plan twice."""
    sizes = catalog_sizes(CATALOG[name])
    p = place(sizes, BUDGETS[budgets])
    assert p == place(sizes, BUDGETS[budgets])
    assert [a for _, a, _ in p.transformer] == [0] + [b for _, _, b in p.transformer[:-1]]
    assert p.transformer[-1][2] == sizes.transformer_blocks
    assert len({d for d, _, _ in p.transformer}) == len(p.transformer)  # one run per device
    per_block = sizes.transformer // sizes.transformer_blocks
    act = activation_bytes(1024, 1024, 1, sizes.hidden, 512, 2)

    def whole_blocks(few):
        return sum((p.budgets[i] - GB // 2 - act) // per_block for i in few)

    if p.fits:
        assert all(peak <= budget - GB // 2 for peak, budget in zip(p.peaks, p.budgets, strict=True)), p.line()
        # No smaller set of devices has the room for the transformer's blocks.
        for k in range(1, len(p.transformer)):
            for few in combinations(range(len(p.devices)), k):
                assert whole_blocks(few) < sizes.transformer_blocks, (few, p.line())
    else:  # only when all the devices together cannot hold the transformer
        assert whole_blocks(range(len(p.devices))) <= sizes.transformer_blocks, p.line()


def test_split_plans_that_matter():
    by_name = {n: catalog_sizes(s) for n, s in CATALOG.items()}
    # FLUX.2 [dev] (64 GB of transformer) over two 48 GB cards: one hand-over; its 48 GB encoder has no room left
    # on either card, so it runs from host memory.
    p = place(by_name["flux2-dev"], BUDGETS["2 x 48 GB"])
    assert p.fits and p.handovers == 1 and p.text_encoder == HOST, p.line()
    assert not place(by_name["flux2-dev"], BUDGETS["2 x 24 GB"]).fits  # 48 GB of cards cannot hold 64 GB
    # On one 80 GB card it stays whole; the encoder goes to the CPU listed beside it.
    p = place(by_name["flux2-dev"], BUDGETS["80 GB + CPU"])
    assert p.transformer == ((0, 0, 56),) and p.text_encoder == 1 and p.fits, p.line()
    # FLUX.1 [dev] (23.8 GB) plus activations is just over a 24 GB card: split in two, the encoders beside it.
    p = place(by_name["flux1-dev"], BUDGETS["2 x 24 GB"])
    assert p.fits and p.handovers == 1 and p.text_encoder != HOST and p.vae != HOST, p.line()
    # klein 4B fits one 24 GB card with its encoder: no hand-over at all.
    p = place(by_name["flux2-klein-4b"], BUDGETS["2 x 24 GB"])
    assert p.transformer == ((0, 0, 25),) and p.text_encoder == 0 and p.fits
    assert "transformer blocks 0-24 on cuda:0; text encoder on cuda:0" in p.line()
