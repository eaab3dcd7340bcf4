"""Loading: directories, single-file transformers in both key styles, and the encoder-layer rule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fluxlab.errors import UserError
from fluxlab.runtime.keys import transformer_to_bfl
from fluxlab.runtime.loading import derive_spec, locate
from fluxlab.runtime.singlefile import load_transformer_file
from fluxlab.spec.catalog import CATALOG, text_encoder_layers


def test_encoder_layers_rule_reproduces_the_reference_choices():
    assert text_encoder_layers(36) == (9, 18, 27)  # Qwen3-4B and Qwen3-8B (klein)
    assert text_encoder_layers(40) == (10, 20, 30)  # Mistral Small 3.2 (FLUX.2 dev)


def test_directory_specs_follow_their_files(tiny_dirs):
    klein = derive_spec(tiny_dirs["flux2-klein"])
    base = derive_spec(tiny_dirs["flux2-klein-base"])
    schnell = derive_spec(tiny_dirs["flux1-schnell"])
    dev = derive_spec(tiny_dirs["flux1-dev"])
    assert (klein.family, klein.guidance_mode, klein.steps) == ("flux2", "none", 4)
    assert (base.guidance_mode, base.steps, base.guidance) == ("cfg", 50, 4.0)
    assert (schnell.family, schnell.guidance_mode, schnell.max_sequence_length) == ("flux1", "none", 256)
    assert (dev.guidance_mode, dev.guidance, dev.max_sequence_length) == ("embedded", 3.5, 512)


def test_catalog_defaults():
    c = CATALOG
    assert (c["flux2-klein-4b"].steps, c["flux2-klein-4b"].guidance_mode) == (4, "none")
    assert c["flux2-klein-9b"].text_encoder == "Qwen/Qwen3-8B" and c["flux2-klein-4b"].text_encoder == "Qwen/Qwen3-4B"
    assert (c["flux2-klein-base-9b"].steps, c["flux2-klein-base-9b"].guidance) == (50, 4.0)
    assert (c["flux2-dev"].guidance_mode, c["flux2-dev"].guidance) == ("embedded", 4.0)
    assert (c["flux1-schnell"].max_sequence_length, c["flux1-dev"].max_sequence_length) == (256, 512)
    assert c["flux1-dev"].gated and not c["flux1-schnell"].gated
    assert all(m.sizes_gb["transformer"] > 1 for m in c.values() if not m.bundled)
    assert c["demo"].bundled and (c["demo"].family, c["demo"].guidance_mode) == ("flux2", "cfg")


def test_hub_repo_ids_and_paths_are_told_apart(tmp_path):
    assert locate("someone/my-flux").repo == "someone/my-flux"
    assert locate("flux1-dev").spec is CATALOG["flux1-dev"]
    with pytest.raises(UserError, match="does not exist"):
        locate(str(tmp_path / "nothere"))


@pytest.fixture(scope="module")
def klein_sd(tiny_pipes):
    return {k: v.clone() for k, v in tiny_pipes["flux2-klein"].components.transformer.state_dict().items()}


def _perturbed(sd):
    g = torch.Generator().manual_seed(0)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_bfl_names_are_what_diffusers_converts_back(tiny_pipes):
    """Our diffusers -> BFL table, checked against diffusers' own BFL -> diffusers converter (an independent
    source): every tensor comes back under its name with its values. (diffusers' FLUX.1 converter assumes the
    real model's width, 3072, so a tiny FLUX.1 cannot take this trip; FLUX.1 is checked for coverage below.)"""
    from diffusers.loaders import single_file_utils as sfu

    sd = _perturbed(tiny_pipes["flux2-klein"].components.transformer.state_dict())
    back = sfu.convert_flux2_transformer_checkpoint_to_diffusers(transformer_to_bfl(sd, "flux2"))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_every_flux1_tensor_has_a_bfl_name(tiny_pipes):
    sd = tiny_pipes["flux1-dev"].components.transformer.state_dict()
    bfl = transformer_to_bfl(sd, "flux1")  # raises for a tensor without a name
    assert sum(v.numel() for v in bfl.values()) == sum(v.numel() for v in sd.values())
    assert "single_blocks.0.linear1.weight" in bfl and "double_blocks.0.img_attn.norm.query_norm.scale" in bfl


@pytest.mark.parametrize("style", ["diffusers", "bfl", "bfl-comfy-prefix"])
def test_single_file_transformer_in_either_key_style(tiny_dirs, tmp_path, klein_sd, style):
    new = _perturbed(klein_sd)
    sd = new if style == "diffusers" else transformer_to_bfl(new, "flux2")
    if style == "bfl-comfy-prefix":
        sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
    f = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, f)
    model = load_transformer_file(str(f), tiny_dirs["flux2-klein"] / "transformer", torch.float32)
    loaded = model.state_dict()
    assert set(loaded) == set(new)
    for k in new:
        assert torch.equal(loaded[k], new[k]), k


def test_single_file_changes_the_generation(tiny_dirs, tmp_path, klein_sd):
    import fluxlab

    f = tmp_path / "t.safetensors"
    save_file(_perturbed(klein_sd), f)
    kw = dict(prompt="a cat", width=64, height=64, seed=1)
    base = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32")
    swapped = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32", transformer=str(f))
    a, b = base.generate(**kw)[0], swapped.generate(**kw)[0]
    assert (a.latents - b.latents).abs().max() > 1e-3
    assert b.metadata["model"]["transformer"]["path"] == str(f)


def test_single_file_errors(tiny_dirs, tmp_path, tiny_pipes):
    cfg = tiny_dirs["flux2-klein"] / "transformer"
    with pytest.raises(UserError, match="does not exist"):
        load_transformer_file(str(tmp_path / "none.safetensors"), cfg, torch.float32)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="never loads pickle"):
        load_transformer_file(str(ckpt), cfg, torch.float32)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a safetensors file")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_transformer_file(str(bad), cfg, torch.float32)
    flux1 = tmp_path / "flux1.safetensors"
    save_file(tiny_pipes["flux1-dev"].components.transformer.state_dict(), flux1)
    with pytest.raises(UserError, match="does not fit this flux2 transformer"):
        load_transformer_file(str(flux1), cfg, torch.float32)


@pytest.mark.parametrize("kind", ["flux2-klein", "flux2-dev"])
def test_lean_encoder_embeddings_equal_the_full_encoders(tiny_dirs, kind):
    import fluxlab

    lean = fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="fp32")
    full = fluxlab.load(str(tiny_dirs[kind]), device="cpu", dtype="fp32", lean=False)
    prompts = ["a red circle", "a blue square in the center on a black background"]
    a = lean.family.encode(prompts, lean.device)
    b = full.family.encode(prompts, full.device)
    assert torch.equal(a.embeds, b.embeds)
    n_lean = sum(p.numel() for p in lean.components.text_encoder.parameters())
    n_full = sum(p.numel() for p in full.components.text_encoder.parameters())
    assert n_lean < n_full  # layers past 3L/4 and the LM head are never loaded
    assert not hasattr(lean.components.text_encoder, "lm_head")


def test_bundled_model_missing_and_directory_defaults(tiny_dirs, tmp_path, monkeypatch):
    import dataclasses
    import json
    import shutil

    from fluxlab.spec import catalog

    monkeypatch.setitem(catalog.CATALOG, "demo", dataclasses.replace(CATALOG["demo"], bundled="demo/not-here"))
    with pytest.raises(UserError, match=r"missing from this install .* python -m fluxlab\.demo\.build"):
        locate("demo")
    # fluxlab.json in a pipeline directory sets its defaults; unknown keys are named.
    d = shutil.copytree(tiny_dirs["flux2-klein-base"], tmp_path / "m")
    (d / "fluxlab.json").write_text(json.dumps({"steps": 7, "default_size": [64, 64], "max_sequence_length": 32}))
    spec = locate(str(d)).spec
    assert (spec.steps, spec.default_size, spec.max_sequence_length) == (7, (64, 64), 32)
    (d / "fluxlab.json").write_text(json.dumps({"stepz": 7}))
    with pytest.raises(UserError, match="unknown keys stepz; valid: description, steps"):
        locate(str(d))
