"""LoRA files: every format round-trips to the same model; kohya names as sd-scripts writes them; stacking."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run
from safetensors.torch import save_file

import fluxlab
from fluxlab.errors import UserError
from fluxlab.runtime import loras as L

KW = dict(prompt="a red circle in the top left", width=96, height=64, seed=3, steps=2)


def random_lora(transformer, rank=2, seed=0, select=None):
    """A diffusers-named LoRA on every Linear of the transformer (or those `select` keeps)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and (select is None or select(name)):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return state


def latents(path, dirs, kind, loras=(), fuse=False):
    pipe = fluxlab.load(str(dirs[kind]), device="cpu", dtype="fp32", notify=lambda m: None, loras=list(loras),
                        fuse_lora=fuse)
    return pipe.generate(**KW)[0].latents


@pytest.mark.parametrize("kind,family", [("flux2-klein", "flux2"), ("flux1-dev", "flux1")])
def test_every_format_round_trips(tiny_dirs, tiny_pipes, tmp_path, kind, family):
    state = random_lora(tiny_pipes[kind].components.transformer)
    src = tmp_path / "src.safetensors"
    save_file(state, src)
    original = L.read(src)
    assert (original.format, original.family) == ("diffusers", family)
    base = latents(None, tiny_dirs, kind)
    want = latents(None, tiny_dirs, kind, [str(src)])
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    for fmt in L.WRITE_FORMATS:
        out = L.write(original, fmt, tmp_path / f"{fmt}.safetensors")
        back = L.read(out)
        expected = {"diffusers": "diffusers", "kohya": "kohya", "comfyui": "ai-toolkit",
                    "ai-toolkit": "diffusers" if family == "flux1" else "ai-toolkit"}[fmt]
        assert back.format == expected and back.family == family
        got = latents(None, tiny_dirs, kind, [str(out)])
        assert (got - want).abs().max().item() <= 1e-5, fmt


def test_kohya_flux1_names_as_sd_scripts_writes_them(tiny_dirs, tiny_pipes, tmp_path):
    """Kohya keys written by hand (lora_unet_<BFL module>), against their diffusers-format twin."""
    t = tiny_pipes["flux1-dev"].components.transformer
    hidden = t.config.num_attention_heads * t.config.attention_head_dim
    g = torch.Generator().manual_seed(1)
    r = 2
    a_qkv, b_qkv = torch.randn(r, hidden, generator=g), torch.randn(3 * hidden, r, generator=g)
    a_mlp = torch.randn(r, hidden, generator=g)
    b_mlp = torch.randn(t.transformer_blocks[0].ff.net[0].proj.out_features, r, generator=g)
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(r)),
        "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": a_mlp,
        "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": b_mlp,
        "lora_unet_double_blocks_0_img_mlp_0.alpha": torch.tensor(float(r)),
    }
    q, k, v = b_qkv.chunk(3)
    twin = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a_qkv,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": q,
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a_qkv,
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": k,
        "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": a_qkv,
        "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": v,
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": a_mlp,
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": b_mlp,
    }
    save_file(kohya, tmp_path / "kohya.safetensors")
    save_file({k: v.clone().contiguous() for k, v in twin.items()}, tmp_path / "twin.safetensors")
    read = L.read(tmp_path / "kohya.safetensors")
    assert (read.format, read.family) == ("kohya", "flux1")
    assert set(read.modules) == {m.removeprefix("transformer.").rsplit(".lora_", 1)[0] for m in twin}
    a = latents(None, tiny_dirs, "flux1-dev", [str(tmp_path / "kohya.safetensors")])
    b = latents(None, tiny_dirs, "flux1-dev", [str(tmp_path / "twin.safetensors")])
    assert (a - b).abs().max().item() <= 1e-5


def test_stacking_equals_summed_deltas_and_fusing_changes_nothing(tiny_dirs, tiny_pipes, tmp_path):
    t = tiny_pipes["flux2-klein"].components.transformer
    one, two = random_lora(t, 2, seed=1), random_lora(t, 3, seed=2)
    save_file(one, tmp_path / "one.safetensors")
    save_file(two, tmp_path / "two.safetensors")
    summed = {}  # one LoRA whose update is 0.7 * one + 0.5 * two: ranks side by side
    for key in one:
        if ".lora_A." in key:
            summed[key] = torch.cat([one[key], two[key]])
        else:
            summed[key] = torch.cat([0.7 * one[key], 0.5 * two[key]], dim=1)
    save_file(summed, tmp_path / "summed.safetensors")
    stacked = latents(None, tiny_dirs, "flux2-klein", [f"{tmp_path / 'one.safetensors'}:0.7",
                                                      f"{tmp_path / 'two.safetensors'}:0.5"])
    single = latents(None, tiny_dirs, "flux2-klein", [str(tmp_path / "summed.safetensors")])
    fused = latents(None, tiny_dirs, "flux2-klein", [f"{tmp_path / 'one.safetensors'}:0.7",
                                                    f"{tmp_path / 'two.safetensors'}:0.5"], fuse=True)
    assert (stacked - single).abs().max().item() <= 1e-5
    assert (fused - stacked).abs().max().item() <= 1e-5


def test_lora_cli_info_convert_generate_and_errors(tiny_dirs, tiny_pipes, tmp_path, capsys):
    save_file(random_lora(tiny_pipes["flux2-klein"].components.transformer), tmp_path / "k.safetensors")
    code, out, err = run(capsys, "lora", "info", tmp_path / "k.safetensors", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["format"], info["family"], info["rank"]) == ("diffusers", "flux2", 2)
    code, _, err = run(capsys, "lora", "convert", tmp_path / "k.safetensors", tmp_path / "k-kohya.safetensors",
                       "--to", "kohya")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a cat", "-m", tiny_dirs["flux2-klein"], "-W", 64, "-H", 64,
                       "--seed", 1, "--device", "cpu", "--lora", f"{tmp_path / 'k-kohya.safetensors'}:0.8",
                       "-o", tmp_path / "l.png")
    assert code == 0, err
    from PIL import Image

    meta = json.loads(Image.open(tmp_path / "l.png").text["fluxlab"])
    lora = meta["model"]["loras"][0]
    assert lora["scale"] == 0.8 and lora["path"].endswith("k-kohya.safetensors") and len(lora["sha256"]) == 64
    save_file(random_lora(tiny_pipes["flux1-dev"].components.transformer), tmp_path / "f1.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    save_file({"some.weight": torch.zeros(2)}, tmp_path / "notlora.safetensors")
    for lora_arg, message in [(tmp_path / "f1.safetensors", "is a flux1 LoRA"),
                              (tmp_path / "junk.safetensors", "is not a valid safetensors file"),
                              (tmp_path / "notlora.safetensors", "not a LoRA fluxlab recognises"),
                              (tmp_path / "nope.safetensors", "does not exist")]:
        code, _, err = run(capsys, "generate", "a cat", "-m", tiny_dirs["flux2-klein"], "--device", "cpu",
                           "--lora", lora_arg, "-o", tmp_path / "x.png")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match="unknown LoRA format 'onnx'"):
        L.to_format(L.read(tmp_path / "k.safetensors"), "onnx")
