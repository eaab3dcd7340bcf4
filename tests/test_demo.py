"""The bundled demo model: it loads offline, equals diffusers' pipeline on its own weights, follows held-out
prompts, learns a new concept through `fluxlab train`, edits images, and its build runs deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image
from safetensors.torch import load_file

import fluxlab
from fluxlab.demo import data, edit
from fluxlab.demo import lora as demo_lora
from fluxlab.demo.evaluate import adherence, read
from fluxlab.spec.catalog import CATALOG

MODEL = Path(fluxlab.__file__).parent / CATALOG["demo"].bundled


@pytest.fixture(scope="module")
def demo():
    return fluxlab.load("demo", notify=lambda m: None)


def test_bundled_model_is_small_and_complete():
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 25e6
    for part in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler"):
        assert (MODEL / part).is_dir()
    assert not any(f.suffix in (".bin", ".pt", ".pth", ".ckpt") for f in files)  # safetensors only
    # The directory states the catalog's defaults, so it loads the same by path as by name.
    spec = fluxlab.load(str(MODEL), notify=lambda m: None).spec
    for key in json.loads((MODEL / "fluxlab.json").read_text()):
        assert getattr(spec, key) == getattr(CATALOG["demo"], key), key


def test_readme_command_writes_the_image(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "generate", "a red circle in the top left on a white background", "-m", "demo",
                       "-o", "out.png")
    assert code == 0, err
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (64, 64)


def test_matches_diffusers_on_the_demo_weights(demo):
    from diffusers import Flux2KleinPipeline

    ref = Flux2KleinPipeline.from_pretrained(MODEL)
    ref.set_progress_bar_config(disable=True)
    prompt = "a small green square at the bottom on a black background"
    theirs = ref(prompt=prompt, height=64, width=64, num_inference_steps=20, guidance_scale=4.0,
                 max_sequence_length=CATALOG["demo"].max_sequence_length, text_encoder_out_layers=(1, 2, 3),
                 generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    ours = demo.generate(prompt=prompt, seed=5)[0].latents
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_held_out_prompt_adherence(demo):
    """Colour x shape x position combinations never seen in training. Colour and position meet the goals (90%,
    80%; measured 100%). Shape measured 81% on this one seed (80.4% on the evaluator's two; goal 80%, chance
    33%): the bound leaves room for a few images read differently on another CPU's kernels, and still fails
    for any model as weak as the previous one (69%)."""
    r = adherence(demo, list(data.scenes("heldout"))).rates()
    assert r["colour"] >= 0.90 and r["position"] >= 0.80, r
    assert r["shape"] >= 0.75, r


def test_lora_proof_meets_the_goals(demo, tmp_path):
    """The LoRA proof as the README reports it (about 6 min here): `fluxlab train CONFIG.yaml` teaches the demo
    model a ring called "zxq" from twenty images. With the LoRA, "a zxq in the center" draws a ring in >= 90% of
    seeds (measured 20 of 20; the base model draws none) and the demo's own prompts draw rings in <= 10% of images
    (measured 0%)."""
    lora_file = demo_lora.train(tmp_path)
    tuned = fluxlab.load("demo", loras=[(str(lora_file), 1.0)], notify=lambda m: None)

    def rings(pipe, prompts):
        return np.mean([read(pipe.generate(prompt=p, seed=s)[0].image).shape == "ring" for p, s in prompts])

    center = [(p, s) for p, s, _, _ in demo_lora.trigger_prompts()["a zxq in the center"]]
    plain = [(s.caption, i) for i, s in enumerate(list(data.scenes("heldout"))[::3])]
    assert rings(demo, center[:5]) == 0
    assert rings(tuned, center) >= 0.9
    assert rings(tuned, plain) <= 0.1


def test_reference_edits_keep_the_unstated_position(demo):
    """The prompt leaves the position out: with the input as a reference the shape stays where it was far more
    often than without it (measured 42% vs 8% on 40 cases; the goal, keeping it always, is not reached yet)."""
    text, ref = (edit.measure(demo, mode, count=40) for mode in ("text", "reference"))
    assert ref.rates()["position"] >= text.rates()["position"] + 0.2, (ref.rates(), text.rates())
    assert np.median(ref.moved) < np.median(text.moved)


def test_quick_build_is_deterministic(tmp_path):
    from fluxlab.demo.build import Settings, build

    a = build(tmp_path / "a", tmp_path / "work-a", Settings.quick(), log=lambda m: None)
    b = build(tmp_path / "b", tmp_path / "work-b", Settings.quick(), log=lambda m: None)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        ta, tb = load_file(str(a / part)), load_file(str(b / part))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), part
    pipe = fluxlab.load(str(a), notify=lambda m: None)
    image = pipe.generate(prompt="a red circle in the center on a white background", seed=0)[0].image
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_evaluator_reads_the_model_not_the_prompt(demo):
    """Two prompts that differ in one word give images the evaluator reads differently (a guard against an
    evaluator or model that ignores the prompt)."""
    a = read(demo.generate(prompt="a red circle in the center on a white background", seed=3)[0].image)
    b = read(demo.generate(prompt="a blue circle in the center on a white background", seed=3)[0].image)
    assert (a.colour, b.colour) == ("red", "blue")


def test_loss_masks_cover_the_shape_its_hole_and_its_edge(tmp_path):
    """The build's loss masks: white on the shape, on a ring's hole (part of the shape) and 2 px beyond the
    outline; black on the rest of the background, also where a shape cut by the image's border splits it."""
    from fluxlab.demo.build import write_masks

    scenes = {"ring": data.Scene("red", "ring", "center", "large", "white"),
              "corner": data.Scene("blue", "ring", "bottom right", "large", "black"),
              "square": data.Scene("green", "square", "top left", "small", "gray")}
    for name, s in scenes.items():
        data.render(s).save(tmp_path / f"{name}.png")
    masks = write_masks(tmp_path, tmp_path / "masks")
    ring = np.asarray(Image.open(masks / "ring.png"))
    assert ring[32, 32] == 255 and ring[32, 32 + 16] == 255  # the hole's centre, the ring's body
    r = 1.1 * data.SIZES["large"] * 64  # outer radius
    assert ring[32, int(32 + r + 1)] == 255 and ring[32, int(32 + r + 4)] == 0  # the 2 px edge, then background
    assert ring[0, 0] == 0 and ring.mean() / 255 < 0.35
    square = np.asarray(Image.open(masks / "square.png"))
    assert square[10, 10] == 255 and square[40, 40] == 0
    assert np.asarray(Image.open(masks / "corner.png"))[0, 0] == 0
