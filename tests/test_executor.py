"""Memory plans applied to real (tiny) models: same output under every plan, OOM recovery, quantization."""

from __future__ import annotations

import pytest
import torch

import fluxlab
from fluxlab.errors import UserError
from fluxlab.runtime.memory import GB, Plan

KW = dict(prompt="a red circle in the top left", width=96, height=64, seed=3, steps=3)
PLANS = [
    Plan("resident", 1, False, None, 0, GB, True),
    Plan("phase", 1, False, None, 0, GB, True),
    Plan("stream", 1, True, 1, 0, GB, True),
    Plan("stream", 2, True, 3, 0, GB, True),
]


@pytest.mark.parametrize("kind", ["flux2-klein", "flux1-dev"])
def test_every_plan_gives_the_resident_output(tiny_dirs, kind):
    """On the CPU the hooks move weights between host and host, but they run: the same code paths that
    phase-offload and stream blocks on a GPU must leave the numbers unchanged."""
    pipe = fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="fp32", notify=lambda m: None)
    reference = torch.cat([r.latents for r in pipe.generate(**KW, num_images=2)])
    for plan in PLANS:
        pipe.set_plan(plan)
        out = torch.cat([r.latents for r in pipe.generate(**KW, num_images=2)])
        assert (out - reference).abs().max().item() <= 1e-5, plan.line()
    assert pipe.components.vae.use_tiling  # the last plan turned VAE tiling on


def test_simulated_out_of_memory_steps_down(tiny_dirs, monkeypatch):
    notes = []
    pipe = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32", notify=notes.append,
                        budget="80GB")
    single = [pipe.generate(**{**KW, "seed": s})[0].latents for s in (3, 4, 5, 6)]
    real = pipe.family.velocity

    def velocity(x, *a, **k):  # a device that cannot hold more than one image at a time
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, *a, **k)

    monkeypatch.setattr(pipe.family, "velocity", velocity)
    notes.clear()
    results = pipe.generate(**KW, num_images=4, batch_size=4)
    assert [r.seed for r in results] == [3, 4, 5, 6]
    for r, s in zip(results, single, strict=True):
        assert (r.latents - s).abs().max().item() <= 1e-5
    said = " | ".join(notes)
    assert "out of memory with all models resident, VAE tiling off, batch 4" in said
    assert "retrying with all models resident, VAE tiling on, batch 4" in said
    assert "batch 1" in said and pipe.plan.batch_size == 1


def test_out_of_memory_with_nothing_left_to_try(tiny_dirs, monkeypatch):
    pipe = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32", notify=lambda m: None,
                        budget="80GB")

    def velocity(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(pipe.family, "velocity", velocity)
    with pytest.raises(UserError, match=r"out of memory even with the smallest plan tried \(block streaming "
                                        r"\(1 blocks at a time\), VAE tiling on, batch 1"):
        pipe.generate(**KW)


@pytest.mark.parametrize("kind", ["flux2-klein", "flux1-dev"])
def test_int8_stays_close_to_bf16(tiny_dirs, kind):
    """int8 weight-only quantization (torchao) on the CPU: measured ~0.5% relative L2 error against bf16 on
    these models, about bf16's own distance from fp32; the bound here is 2%."""
    a = fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="bf16").generate(**KW)[0].latents.float()
    q = fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="bf16", quantize="int8", notify=lambda m: None)
    b = q.generate(**KW)[0].latents.float()
    assert 0 < ((b - a).norm() / a.norm()).item() < 0.02
    assert q.generate(**KW)[0].metadata["model"]["quantize"] == "int8"
    from fluxlab.runtime.executor import model_sizes

    full = model_sizes(fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="bf16").components).transformer
    assert model_sizes(q.components).transformer < 0.75 * full  # int8 weights (plus scales, unquantized norms)


def test_quantization_modes_the_device_lacks(tiny_dirs):
    with pytest.raises(UserError, match="--quantize fp8 is not supported on cpu; this device supports: int8"):
        fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", quantize="fp8")


@pytest.mark.parametrize("kind", ["flux2-klein", "flux1-dev"])
def test_a_model_split_over_the_cpu_listed_twice_gives_the_one_device_latents(tiny_dirs, kind):
    """`--device cpu,cpu` with a budget no single entry can hold the transformer in: the planner cuts its blocks
    over the two entries and accelerate's hooks hand the activations over at the cut, exactly as between two
    GPUs. Same latents as one device, to the bit; the plan is recorded in the image's metadata."""
    from fluxlab.runtime.executor import model_sizes
    from fluxlab.runtime.memory import activation_bytes

    one = fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="fp32", notify=lambda m: None)
    reference = torch.cat([r.latents for r in one.generate(**KW, num_images=2)])
    sizes = model_sizes(one.components)
    act = activation_bytes(KW["width"], KW["height"], 1, sizes.hidden, one.model.spec.max_sequence_length, 4)
    # Room for three quarters of the transformer and its activations per entry (the reserve is 1/8 of a small
    # budget): it must be cut in two.
    budget = f"{int((0.75 * sizes.transformer + act) * 8 / 7) // 1024}KB"
    said = []
    two = fluxlab.load(str(tiny_dirs[kind]), device="cpu,cpu", dtype="fp32", budget=budget, notify=said.append)
    results = list(two.generate_iter(**KW, num_images=2, batch_size=1))  # as the one CPU runs them
    out = torch.cat([r.latents for r in results])
    plan = two.model.plan
    assert plan.handovers == 1 and plan.fits, said
    assert torch.equal(out, reference)
    assert any("transformer blocks 0-" in m and "on cpu, blocks" in m for m in said), said
    recorded = results[0].metadata["resolved"]["memory_plan"]
    assert recorded["placement"] == "split" and len(recorded["transformer"]) == 2
    assert results[0].metadata["runtime"]["device"] == "cpu,cpu"


def test_a_split_that_cannot_fit_falls_back_to_one_device(tiny_dirs):
    said = []
    pipe = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu,cpu", dtype="fp32", budget="64KB",
                        notify=said.append)
    pipe.generate(**KW)
    assert any("cannot hold the model even split" in m and "planning on cpu alone" in m for m in said), said
    assert pipe.model.plan.placement == "stream"
