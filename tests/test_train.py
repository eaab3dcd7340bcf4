"""LoRA training: seed 004's YAML as written, learning, exact resume after kill -9, two processes, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run
from PIL import Image, ImageDraw
from safetensors import safe_open

from fluxlab.service.generate import run_all
from fluxlab.spec.request import make_request
from fluxlab.spec.trainconfig import parse
from fluxlab.train.loop import Trainer, noise_levels


def circles(folder: Path, n: int, caption: str | None = "[trigger], a red circle on white") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse([12 + i % 3, 12, 50, 50], fill=(220, 30, 30))
        im.save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption)
    return folder


def seed_004_config(tmp_path, model, steps=6, save_every=3, **train):
    """Seed 004's section-8 recipe, key for key, with local paths and a tiny model."""
    d1 = circles(tmp_path / "dataset" / "40_maya_char", 3)
    d2 = circles(tmp_path / "dataset" / "20_maya_char_realbody", 2)
    return {
        "job": "extension",
        "config": {"name": "flux_character_lora", "process": [{
            "type": "sd_trainer", "training_folder": str(tmp_path / "output"), "device": "cpu",
            "trigger_word": "maya_char",
            "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
            "save": {"dtype": "float16", "save_every": save_every, "max_step_saves_to_keep": 2},
            "datasets": [
                {"folder_path": str(d), "caption_ext": "txt", "caption_dropout_rate": 0.05, "shuffle_tokens": False,
                 "cache_latents_to_disk": True, "resolution": [64, 64]} for d in (d1, d2)],
            "train": {"batch_size": 1, "steps": steps, "gradient_accumulation_steps": 2, "train_unet": True,
                      "train_text_encoder": False, "gradient_checkpointing": True, "noise_scheduler": "flowmatch",
                      "optimizer": "adamw8bit", "lr": 0.0001, "ema_config": {"use_ema": True, "ema_decay": 0.999},
                      "dtype": "bf16", **train},
            "model": {"name_or_path": str(model), "quantize": True, "quantize_dtype": "int8"},
            "sample": {"sampler": "flowmatch", "sample_every": save_every, "width": 64, "height": 64,
                       "prompts": ["maya_char, portrait, smiling, high quality", "[trigger], full body"],
                       "neg": "low quality, blurry, artifacts", "guidance_scale": 3.5, "sample_steps": 2},
        }]},
    }


def test_seed_004_yaml_trains(tiny_dirs, tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(seed_004_config(tmp_path, tiny_dirs["flux2-klein-base"])))
    code, out, err = run(capsys, "train", cfg)
    assert code == 0, err
    run_dir = tmp_path / "output" / "flux_character_lora"
    names = sorted(p.name for p in run_dir.glob("*.safetensors"))
    assert names == ["flux_character_lora.safetensors", "flux_character_lora_000003.safetensors"]
    with safe_open(str(run_dir / "flux_character_lora_000003.safetensors"), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert meta["fluxlab.step"] == "3" and meta["fluxlab.trigger_word"] == "maya_char"
    assert json.loads(meta["fluxlab.config"])["config"]["name"] == "flux_character_lora"
    assert dtypes == {torch.float16}
    assert len(list(csv.DictReader((run_dir / "loss.csv").open()))) == 6
    assert (run_dir / "loss.png").is_file() and (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step000003-0.png", "step000003-1.png", "step000006-0.png", "step000006-1.png"]
    assert list((tmp_path / "output" / "latent_cache").glob("*.safetensors"))  # cached on disk
    # The trained LoRA loads back and is read as ai-toolkit FLUX.2.
    code, out, _ = run(capsys, "lora", "info", run_dir / "flux_character_lora.safetensors", "--json")
    assert json.loads(out)["format"] == "ai-toolkit" and json.loads(out)["family"] == "flux2"


def test_training_lowers_loss_and_moves_generations(tiny_dirs, tmp_path):
    """300 steps on one concept: the loss drops and the trigger prompt's result moves toward the training
    latents (compared in latent space: the tiny VAE is random, its pixels mean nothing)."""
    circles(tmp_path / "ds", 6)
    cfg = seed_004_config(tmp_path, tiny_dirs["flux2-klein"], steps=300, save_every=300)
    p = cfg["config"]["process"][0]
    p["datasets"] = [{"folder_path": str(tmp_path / "ds"), "resolution": [64], "caption_dropout_rate": 0.0}]
    p.update(trigger_word="zxq", sample=None)
    p["network"].update(linear=8, linear_alpha=8)
    p["model"].update(quantize=False)
    p["train"].update(lr=1e-2, gradient_accumulation_steps=1, dtype="fp32", ema_config={"use_ema": False})
    t = Trainer(parse(cfg), notify=lambda m: None)
    t.setup()
    target = t.pipe.family.unpack(t.latents[t.keys[0]], 64, 64)

    def distance():
        t.pipe.components.transformer.eval()
        with torch.no_grad():
            req = make_request(prompt="zxq, a red circle on white", width=64, height=64, seed=1, steps=4)
            z = run_all(req, loaded=t.model)[0].latents
        t.pipe.components.transformer.train()
        return (z - target).abs().mean().item()

    before = distance()
    t.train()
    after = distance()
    losses = [float(r["loss"]) for r in csv.DictReader((t.run_dir / "loss.csv").open())]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)  # measured: 0.99 -> 0.25
    assert after < 0.5 * before, (before, after)  # measured: 0.84 -> 0.24


def small_config(tmp_path, model, steps, save_every):
    circles(tmp_path / "ds", 4)
    cfg = seed_004_config(tmp_path, model, steps=steps, save_every=save_every)
    p = cfg["config"]["process"][0]
    p["datasets"] = [{"folder_path": str(tmp_path / "ds"), "resolution": [64], "shuffle_tokens": True}]
    p.update(sample=None)
    p["model"].update(quantize=False)
    p["train"].update(lr=1e-3, dtype="fp32")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_lora(run_dir):
    with safe_open(str(run_dir / "flux_character_lora.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_dirs, tmp_path, capsys):
    a_cfg = small_config(tmp_path / "a", tiny_dirs["flux2-klein"], steps=40, save_every=5)
    assert run(capsys, "train", a_cfg)[0] == 0
    b_cfg = small_config(tmp_path / "b", tiny_dirs["flux2-klein"], steps=40, save_every=5)
    b_dir = tmp_path / "b" / "output" / "flux_character_lora"
    proc = subprocess.Popen([sys.executable, "-m", "fluxlab", "train", str(b_cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (b_dir / "flux_character_lora_000010.safetensors").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b_dir / "flux_character_lora.safetensors").exists()  # it really died mid-run
    code, _, err = run(capsys, "train", "--resume", b_dir)
    assert code == 0, err
    a, b = final_lora(tmp_path / "a" / "output" / "flux_character_lora"), final_lora(b_dir)
    assert set(a) == set(b)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    steps = [int(r["step"]) for r in csv.DictReader((b_dir / "loss.csv").open())]
    assert steps == list(range(1, 41))  # no step repeated or skipped


def test_two_processes_with_accelerate(tiny_dirs, tmp_path):
    cfg = small_config(tmp_path, tiny_dirs["flux2-klein"], steps=4, save_every=4)
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the processes train on CPU.
    r = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fluxlab", "train", str(cfg)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    with safe_open(str(tmp_path / "output" / "flux_character_lora" / "flux_character_lora.safetensors"), "pt") as f:
        assert f.metadata()["fluxlab.world_size"] == "2"


def test_one_line_training(tiny_dirs, tmp_path, capsys):
    circles(tmp_path / "imgs", 3, caption=None)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for f in (tmp_path / "imgs").iterdir():
            z.write(f, f.name)
    code, _, err = run(capsys, "train", "--images", tmp_path / "imgs.zip", "--trigger", "zxq star", "--steps", 2,
                       "-m", tiny_dirs["flux2-klein"], "--name", "star", "--out", tmp_path / "runs",
                       "--resolution", 64, "--device", "cpu")
    assert code == 0, err
    assert "have no .txt caption; using the trigger word" in err
    assert "skipping 1 unreadable image(s)" in err and "broken.png" in err
    with safe_open(str(tmp_path / "runs" / "star" / "star.safetensors"), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["fluxlab.config"])["config"]["process"][0]
    assert (cfg["network"]["linear"], cfg["network"]["linear_alpha"], cfg["train"]["lr"]) == (32, 32, 1e-4)


def _bad(tmp_path, tiny_dirs, mutate):
    cfg = seed_004_config(tmp_path, tiny_dirs["flux2-klein"])
    mutate(cfg["config"]["process"][0])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p["train"].update(learning_rate=1e-4), "unknown key 'learning_rate' in config.process[0].train "
                                                     "(did you mean 'lr'?)"),
    (lambda p: p["train"].update(lr="fast"), "config.process[0].train.lr: input should be a valid number"),
    (lambda p: p["datasets"][0].update(folder_path="/no/such/folder"), "dataset folder /no/such/folder does not"),
    (lambda p: p["network"].update(linar=4), "unknown key 'linar' in config.process[0].network (did you mean"),
], ids=["unknown-key", "lr-fast", "missing-folder", "typo"])
def test_bad_configs(tiny_dirs, tmp_path, capsys, mutate, message):
    code, _, err = run(capsys, "train", _bad(tmp_path, tiny_dirs, mutate))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bad_datasets(tiny_dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("../escape.png", b"x")
    (tmp_path / "broken.yaml").write_text("job: extension\nconfig: [unclosed\n")
    for args, message in [
        (["--images", tmp_path / "empty", "--trigger", "x"], "has no readable images"),
        (["--images", tmp_path / "evil.zip", "--trigger", "x"], "unsafe member path '../escape.png'"),
        (["--images", tmp_path / "empty"], "needs --trigger"),
        ([tmp_path / "broken.yaml"], "is not valid YAML"),
        ([tmp_path / "missing.yaml"], "does not exist"),
    ]:
        code, _, err = run(capsys, "train", *args, "-m", tiny_dirs["flux2-klein"], "--out", tmp_path / "runs")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "escape.png").exists()


def test_text_encoder_lora_trains_and_loads(tiny_dirs, tmp_path, capsys):
    import fluxlab
    from fluxlab.runtime import loras as L

    path = small_config(tmp_path, tiny_dirs["flux2-klein"], steps=4, save_every=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["config"]["process"][0]["train"].update(train_text_encoder=True, lr=1e-2, ema_config={"use_ema": False})
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "train", path)
    assert code == 0, err
    trained = tmp_path / "output" / "flux_character_lora" / "flux_character_lora.safetensors"
    lo = L.read(trained)
    assert lo.te_state and lo.state
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in lo.te_state.items())  # it learned something
    with_lora = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32", loras=[str(trained)])
    without = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32")
    prompt = ["maya_char, a red circle on white"]
    a = with_lora.family.encode(prompt, with_lora.device).embeds
    b = without.family.encode(prompt, without.device).embeds
    assert (a - b).abs().max() > 1e-4  # the encoder's LoRA is applied at inference too
    for fmt in L.WRITE_FORMATS:  # and survives conversion
        out = L.write(lo, fmt, tmp_path / f"{fmt}.safetensors")
        assert set(L.read(out).te_state) == set(lo.te_state)


def test_learning_rate_schedule(tmp_path):
    cfg = seed_004_config(tmp_path, "demo", steps=110, lr_scheduler="cosine", lr_warmup_steps=10)
    t = Trainer(parse(cfg))
    assert [t.lr_at(s) for s in (0, 4, 9)] == pytest.approx([1e-5, 5e-5, 1e-4])
    assert t.lr_at(60) == pytest.approx(5e-5)  # half way through the cosine
    assert t.lr_at(109) == pytest.approx(1e-4 * 0.5 * (1 + np.cos(np.pi * 99 / 100)))
    cfg["config"]["process"][0]["train"]["lr_scheduler"] = "constant"
    assert Trainer(parse(cfg)).lr_at(100) == pytest.approx(1e-4)


def test_content_or_style_biases_the_noise_levels(tmp_path):
    import torch

    def levels(**train):
        cfg = seed_004_config(tmp_path, "demo", **train)
        return noise_levels(parse(cfg).process.train, 4000, 16, torch.Generator().manual_seed(0))

    balanced, shifted = levels(), levels(timestep_type="shift")
    content, style = levels(content_or_style="content"), levels(content_or_style="style")
    assert abs(balanced.mean() - 0.5) < 0.02 and shifted.mean() > 0.65  # timestep_type still applies
    # t = 1 is pure noise. Content: t = 1 - u**3, so P(t > 0.8) = P(u**3 < 0.2) = 0.2**(1/3) = 0.58; style mirrors it.
    assert (content > 0.8).float().mean() == pytest.approx(0.2 ** (1 / 3), abs=0.03)
    assert (style < 0.2).float().mean() == pytest.approx(0.2 ** (1 / 3), abs=0.03)
    assert content.min() >= 0 and content.max() <= 1 and style.min() >= 0
    assert (balanced > 0.8).float().mean() < 0.1


@pytest.mark.parametrize("kind", ["control", "mask"])
def test_control_and_mask_folders_need_an_image_per_image(tiny_dirs, tmp_path, capsys, kind):
    cfg = seed_004_config(tmp_path, tiny_dirs["flux2-klein"])
    (tmp_path / f"{kind}s").mkdir()
    cfg["config"]["process"][0]["datasets"][0][f"{kind}_path"] = str(tmp_path / f"{kind}s")
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "train", path)
    assert code == 2 and f"no {kind} image for img0.png in" in err and len(err.strip().splitlines()) == 1, err


def test_mask_path_weights_the_loss_per_token(tiny_dirs, tmp_path):
    """ai-toolkit's mask_path: white trains fully, black at mask_min_value; an all-white mask is no mask."""
    def trainer(mask: str | None):
        cfg = seed_004_config(tmp_path / (mask or "none"), tiny_dirs["flux2-klein"], dtype="fp32")
        proc = cfg["config"]["process"][0]
        proc["model"] = {"name_or_path": str(tiny_dirs["flux2-klein"])}
        proc["datasets"] = proc["datasets"][:1]
        proc["datasets"][0]["caption_dropout_rate"] = 0.0
        if mask:
            folder = tmp_path / f"{mask}-masks"
            folder.mkdir()
            for i in range(3):
                im = Image.new("L", (64, 64), 255)
                if mask == "left":
                    ImageDraw.Draw(im).rectangle([32, 0, 63, 63], fill=0)
                im.save(folder / f"img{i}.png")
            proc["datasets"][0].update(mask_path=str(folder), mask_min_value=0.25)
        t = Trainer(parse(cfg))
        t.setup()
        return t

    plain, white, left = trainer(None), trainer("white"), trainer("left")
    w = left.weights[0].reshape(left.pipe.family.latent_grid(64, 64))
    assert torch.allclose(w[:, : w.shape[1] // 2], torch.tensor(1.0))
    assert torch.allclose(w[:, w.shape[1] // 2:], torch.tensor(0.25))

    def loss(t):
        with torch.no_grad():
            return t.loss(0, torch.Generator().manual_seed(3)).item()

    assert loss(white) == pytest.approx(loss(plain), rel=1e-6)
    assert abs(loss(left) - loss(plain)) > 1e-4 * loss(plain)


@pytest.mark.parametrize("per_line", [False, True])
def test_caption_per_line(tiny_dirs, tmp_path, per_line):
    """caption_per_line: each line of a caption file is one caption, drawn at random; off, the file is one caption."""
    cfg = seed_004_config(tmp_path, tiny_dirs["flux2-klein"], dtype="fp32")
    proc = cfg["config"]["process"][0]
    proc["model"] = {"name_or_path": str(tiny_dirs["flux2-klein"])}
    proc["datasets"] = [{"folder_path": str(circles(tmp_path / "ds", 1, "[trigger], a red circle\n\n[trigger]\n")),
                         "caption_dropout_rate": 0.0, "caption_per_line": per_line, "resolution": [64]}]
    t = Trainer(parse(cfg))
    t.setup()
    gen = torch.Generator().manual_seed(0)
    seen = {t.caption(0, gen) for _ in range(40)}
    lines = {"maya_char, a red circle", "maya_char"}
    assert seen == (lines if per_line else {"maya_char, a red circle\n\nmaya_char"})
    assert all(t.model.is_cached(c) for c in seen)  # encoded up front, before the text encoder was released


def test_network_kwargs_pick_the_layers(tiny_dirs, tmp_path, capsys):
    """ai-toolkit's layer targeting: substrings of module names, only_if_contains then ignore_if_contains."""
    cfg = seed_004_config(tmp_path, tiny_dirs["flux2-klein"], dtype="fp32")
    proc = cfg["config"]["process"][0]
    proc["model"] = {"name_or_path": str(tiny_dirs["flux2-klein"])}
    proc["network"]["network_kwargs"] = {"only_if_contains": ["single_transformer_blocks", "x_embedder"],
                                         "ignore_if_contains": ["to_out"]}
    t = Trainer(parse(cfg))
    t.setup()
    adapted = {n for n, m in t.pipe.components.transformer.named_modules() if hasattr(m, "lora_A")}
    assert adapted and adapted == {n for n in adapted if ("single_transformer_blocks" in n or n == "x_embedder")
                                   and "to_out" not in n}
    assert "x_embedder" in adapted and "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in adapted
    assert {n.split(".lora_")[0] for n in t.params} == adapted  # only those train

    proc["network"]["network_kwargs"] = {"only_if_contains": ["no_such_layer"]}
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "train", path)
    assert code == 2 and "selects no layer" in err and "'no_such_layer'" in err, err
    assert err.strip().splitlines()[-1].startswith("error: network.network_kwargs") and "Traceback" not in err


def test_num_repeats_weights_a_dataset(tiny_dirs, tmp_path):
    """num_repeats (per dataset, as in ai-toolkit) multiplies the kohya folder count: a 2_ folder repeated 3 times
    appears 6 times per epoch beside a plain folder's once."""
    cfg = seed_004_config(tmp_path, tiny_dirs["flux2-klein"], dtype="fp32")
    proc = cfg["config"]["process"][0]
    proc["model"] = {"name_or_path": str(tiny_dirs["flux2-klein"])}
    proc["train"]["batch_size"] = 1
    proc["datasets"] = [
        {"folder_path": str(circles(tmp_path / "2_many", 1, "a red circle")), "num_repeats": 3, "resolution": [64]},
        {"folder_path": str(circles(tmp_path / "once", 1, "a red circle")), "resolution": [64]}]
    t = Trainer(parse(cfg))
    t.setup()
    epoch = [i for b in t._batches(0) for i in b]
    assert sorted(epoch) == [0] * 6 + [1]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dirs, tmp_path_factory):
    """The LoRA of a 30-step run that nothing interrupted."""
    from fluxlab.service.train import train
    from fluxlab.spec.trainconfig import load_yaml

    cfg = small_config(tmp_path_factory.mktemp("reference"), tiny_dirs["flux2-klein"], steps=30, save_every=2)
    return final_lora(train(load_yaml(cfg)).run_dir)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_moment_resumes_exactly_and_leaves_no_temp_files(tiny_dirs, tmp_path, capsys, seed,
                                                                             uninterrupted):
    """Killed at a moment drawn from `seed` (loading, training, or in the middle of writing a checkpoint), then
    resumed (or, killed before its first checkpoint, started again): the result equals an uninterrupted run and no
    temp file is left in the run folder."""
    import random

    reference = uninterrupted
    cfg = small_config(tmp_path / "k", tiny_dirs["flux2-klein"], steps=30, save_every=2)
    run_dir = tmp_path / "k" / "output" / "flux_character_lora"
    proc = subprocess.Popen([sys.executable, "-m", "fluxlab", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = time.time()
    while time.time() - started < 60 and not (run_dir / "loss.csv").exists():
        time.sleep(0.01)  # training has begun; now die at a random moment of it
    time.sleep(random.Random(seed).uniform(0.0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumable = (run_dir / "state" / "state.safetensors").is_file()
    code, _, err = run(capsys, "train", *(["--resume", run_dir] if resumable else [cfg]))
    assert code == 0, err
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    got = final_lora(run_dir)
    assert set(got) == set(reference)
    assert max((got[k].float() - reference[k].float()).abs().max().item() for k in got) <= 1e-6
    steps = [int(r["step"]) for r in csv.DictReader((run_dir / "loss.csv").open())]
    assert steps == list(range(1, 31))
