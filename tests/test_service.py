"""The service layer every front end shares: one resolve, records that reproduce, the model pool with per-job LoRAs,
events and cancel."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run
from PIL import Image
from safetensors.torch import save_file
from test_lora import random_lora

import fluxlab
from fluxlab.runtime.monitor import current_rss
from fluxlab.runtime.pool import ModelPool
from fluxlab.service import events as ev
from fluxlab.service.generate import generate, run_all
from fluxlab.service.outputs import FileOutput
from fluxlab.spec.request import ModelRef, Runtime, make_request

KW = dict(prompt="a red circle in the top left", width=96, height=64, steps=2)


def record(path):
    with Image.open(path) as im:
        return json.loads(im.text["fluxlab"])


def test_random_seeds_are_drawn_once_and_agree_everywhere(tiny_dirs, tmp_path, capsys, monkeypatch):
    """Without --seed, the file names, the records, the printed lines and `fluxlab show` name the same seeds; the
    request is resolved once and each input image is read once."""
    from fluxlab.service import generate as service_generate
    from fluxlab.spec import images

    resolves, reads = [], []
    real_resolve, real_read = service_generate.resolve, images.read_input
    monkeypatch.setattr(service_generate, "resolve", lambda *a, **k: resolves.append(1) or real_resolve(*a, **k))
    monkeypatch.setattr(images, "read_input", lambda p: reads.append(str(p)) or real_read(p))
    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(init)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (80, 80), (30, 200, 30)).save(ref)
    out = tmp_path / "dir"
    code, printed, err = run(capsys, "generate", "a red circle", "-m", tiny_dirs["flux2-klein"], "-n", 4, "-o",
                             f"{out}/", "--init", init, "--image", ref, "--device", "cpu", "--dtype", "fp32")
    assert code == 0, err
    assert len(resolves) == 1
    assert sorted(reads) == sorted([str(init), str(ref)])  # each input read from disk once
    files = sorted(out.glob("*.png"))
    named = [int(re.match(r"\d{5}-(\d+)\.png", f.name).group(1)) for f in files]
    recorded = [record(f)["request"]["seed"] for f in files]
    said = [int(s) for s in re.findall(r"\(seed (\d+),", printed)]
    shown = []
    for f in files:
        code, text, _ = run(capsys, "show", f, "--json")
        shown.append(json.loads(text)["request"]["seed"])
    assert len(files) == 4 and named == recorded == said == shown
    assert named == list(range(named[0], named[0] + 4))


def test_from_reproduces_an_image_made_with_two_loras(tiny_dirs, tiny_pipes, tmp_path, capsys):
    t = tiny_pipes["flux2-klein"].components.transformer
    save_file(random_lora(t, 2, seed=11), tmp_path / "a.safetensors")
    save_file(random_lora(t, 3, seed=12), tmp_path / "b.safetensors")
    code, _, err = run(capsys, "generate", "a red circle", "-m", tiny_dirs["flux2-klein"], "-W", 96, "-H", 64,
                       "--seed", 4, "--lora", f"{tmp_path / 'a.safetensors'}:0.7", "--lora",
                       f"{tmp_path / 'b.safetensors'}:0.3", "--reproducible", "--device", "cpu", "--dtype", "fp32",
                       "-o", tmp_path / "orig.png")
    assert code == 0, err
    loras = record(tmp_path / "orig.png")["model"]["loras"]
    assert [lo["scale"] for lo in loras] == [0.7, 0.3]
    code, _, err = run(capsys, "generate", "--from", tmp_path / "orig.png", "--reproducible", "-o",
                       tmp_path / "again.png")
    assert code == 0, err
    assert (tmp_path / "orig.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    plain = run_all(make_request(prompt="a red circle", width=96, height=64, seed=4),
                    ModelRef(name=str(tiny_dirs["flux2-klein"]), dtype="fp32"), Runtime(device="cpu"))[0]
    again = Image.open(tmp_path / "again.png")
    assert (torch.tensor(list(again.getdata())) - torch.tensor(list(plain.image.getdata()))).abs().max() > 0


def test_cli_python_api_and_service_write_the_same_bytes(tiny_dirs, tmp_path, capsys):
    tiny = str(tiny_dirs["flux2-klein-base"])
    fields = dict(prompt="a blue square", width=64, height=96, steps=3, seed=21, guidance=3.0, negative="blurry")
    code, _, err = run(capsys, "generate", "a blue square", "-m", tiny, "-W", 64, "-H", 96, "--steps", 3, "--seed",
                       21, "--guidance", 3, "--negative", "blurry", "--dtype", "fp32", "--device", "cpu",
                       "--reproducible", "-o", tmp_path / "cli.png")
    assert code == 0, err
    pipe = fluxlab.load(tiny, device="cpu", dtype="fp32", notify=lambda m: None)
    pipe.save(pipe.generate(**fields)[0], tmp_path / "api.png", reproducible=True)
    list(generate(make_request(**fields), ModelRef(name=tiny, dtype="fp32"), Runtime(device="cpu"),
                  out=FileOutput(str(tmp_path / "service.png"), reproducible=True)))
    cli = (tmp_path / "cli.png").read_bytes()
    assert cli == (tmp_path / "api.png").read_bytes() == (tmp_path / "service.png").read_bytes()


def test_pool_switches_loras_without_reloading_and_matches_a_fresh_load(tiny_dirs, tiny_pipes, tmp_path):
    tiny = str(tiny_dirs["flux2-klein"])
    t = tiny_pipes["flux2-klein"].components.transformer
    save_file(random_lora(t, 2, seed=1), tmp_path / "one.safetensors")
    save_file(random_lora(t, 4, seed=2), tmp_path / "two.safetensors")
    pool = ModelPool()
    rt = Runtime(device="cpu")
    started = []

    def job(*loras):
        ref = ModelRef(name=tiny, dtype="fp32", loras=[{"path": str(tmp_path / p), "scale": s} for p, s in loras])
        return run_all(make_request(**KW, seed=8), ref, rt, pool=pool,
                       events=lambda e: started.append(e) if isinstance(e, ev.Started) else None)[0].latents

    a = job(("one.safetensors", 0.8))
    b = job(("two.safetensors", 0.5), ("one.safetensors", 0.2))
    c = job()
    a_again = job(("one.safetensors", 0.8))
    assert pool.loads == 1  # the base loaded once for four jobs with different LoRAs
    # loaded once: the later jobs' load time is a small part of the first's (a ratio, which load does not change)
    assert started[0].load_seconds > 0 and all(s.load_seconds < started[0].load_seconds / 5 for s in started[1:])
    for latents, loras in ((a, [f"{tmp_path / 'one.safetensors'}:0.8"]),
                           (b, [f"{tmp_path / 'two.safetensors'}:0.5", f"{tmp_path / 'one.safetensors'}:0.2"]),
                           (c, [])):
        fresh = fluxlab.load(tiny, device="cpu", dtype="fp32", loras=loras, notify=lambda m: None)
        assert (fresh.generate(**KW, seed=8)[0].latents - latents).abs().max().item() <= 1e-6
    assert torch.equal(a, a_again)
    pool.release()


def test_lora_scale_is_a_grid_axis(tiny_dirs, tiny_pipes, tmp_path, capsys):
    save_file(random_lora(tiny_pipes["flux2-klein"].components.transformer, 2, seed=3), tmp_path / "l.safetensors")
    d = tmp_path / "grid"
    code, _, err = run(capsys, "grid", "a red circle", "--x", "lora_scale=0,0.5,1", "-m", tiny_dirs["flux2-klein"],
                       "--lora", tmp_path / "l.safetensors", "-W", 64, "-H", 64, "--steps", 2, "--device", "cpu",
                       "--dtype", "fp32", "-o", d, "-q")
    assert code == 0, err
    scales = [record(d / f"cell-r0-c{c}.png")["model"]["loras"][0]["scale"] for c in range(3)]
    assert scales == [0.0, 0.5, 1.0]
    pixels = [list(Image.open(d / f"cell-r0-c{c}.png").getdata()) for c in range(3)]
    assert pixels[0] != pixels[1] != pixels[2]
    plain = run_all(make_request(prompt="a red circle", width=64, height=64, steps=2, seed=0),
                    ModelRef(name=str(tiny_dirs["flux2-klein"]), dtype="fp32"), Runtime(device="cpu"))[0]
    assert pixels[0] == list(plain.image.getdata())  # scale 0 is the plain model


def test_memory_stays_flat_over_twenty_model_switches(tiny_dirs):
    """The pool holds one model and switches between the demo model and a tiny random one 20 times: releasing
    really frees memory."""
    pool = ModelPool(max_models=1)
    rt = Runtime(device="cpu")
    refs = [ModelRef(name="demo"), ModelRef(name=str(tiny_dirs["flux1-schnell"]), dtype="fp32")]
    request = make_request(prompt="a red circle in the center on a white background", width=64, height=64, steps=2,
                           seed=1)
    for ref in refs * 2:  # warm-up: libraries, allocator pools, caches
        run_all(request, ref, rt, pool=pool)
    before = current_rss()
    for i in range(20):
        run_all(request, refs[i % 2], rt, pool=pool)
    growth = (current_rss() - before) / 2**20
    assert pool.loads == 24
    assert growth < 50, f"RSS grew {growth:.0f} MB over 20 switches"
    pool.release()


def test_cancel_at_step_three_stops_within_a_step_and_writes_nothing(tiny_dirs, tmp_path):
    token = ev.CancelToken()
    steps = []

    def events(e):
        if isinstance(e, ev.Step):
            steps.append(e.i)
            if e.i == 3:
                token.cancel()

    out = tmp_path / "out"
    with pytest.raises(ev.Cancelled):
        list(generate(make_request(**{**KW, "steps": 20}, seed=2), ModelRef(name=str(tiny_dirs["flux2-klein"])),
                      Runtime(device="cpu"), events=events, cancel=token, out=FileOutput(str(out))))
    assert steps == [1, 2, 3]
    assert not out.exists() or not any(out.iterdir())


def test_cancelled_training_keeps_its_checkpoint_and_resumes_to_the_same_lora(tiny_dirs, tmp_path):
    from safetensors import safe_open
    from test_train import small_config

    from fluxlab.service.train import train
    from fluxlab.spec.trainconfig import load_yaml

    def config(folder):
        return load_yaml(small_config(folder, tiny_dirs["flux2-klein"], steps=12, save_every=5))

    whole = train(config(tmp_path / "a"))
    token = ev.CancelToken()
    saved = []

    def events(e):
        if isinstance(e, ev.TrainStep) and e.step == 7:
            token.cancel()
        if isinstance(e, ev.Saved):
            saved.append(e.step)

    stopped = train(config(tmp_path / "b"), events=events, cancel=token)
    assert stopped.stopped_at == 7 and stopped.lora is None and saved == [5, 7]
    assert (stopped.run_dir / "flux_character_lora_000007.safetensors").is_file()
    resumed = train(config(tmp_path / "b"), resume=True)
    assert resumed.lora.is_file()

    def tensors(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    a, b = tensors(whole.lora), tensors(resumed.lora)
    assert a.keys() == b.keys() and max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_images_written_before_the_typed_records_still_show_and_regenerate(tiny_dirs, tmp_path, capsys):
    """The flat layout fluxlab wrote before (prompt, seed, width... at the top level)."""
    from PIL.PngImagePlugin import PngInfo

    tiny = str(tiny_dirs["flux2-klein"])
    new = run_all(make_request(prompt="a green triangle", width=64, height=64, steps=2, seed=33),
                  ModelRef(name=tiny, dtype="fp32"), Runtime(device="cpu"))[0]
    old = {"fluxlab": "0.1.0", "model": tiny, "family": "flux2", "transformer_file": None,
           "prompt": "a green triangle", "negative": None, "seed": 33, "width": 64, "height": 64, "steps": 2,
           "guidance": 1.0, "guidance_mode": "none", "sampler": "euler", "schedule": {"name": "default", "mu": 1.9},
           "dtype": "fp32", "device": "cpu"}
    info = PngInfo()
    info.add_text("fluxlab", json.dumps(old))
    new.image.save(tmp_path / "old.png", pnginfo=info)
    code, text, err = run(capsys, "show", tmp_path / "old.png")
    assert code == 0 and "a green triangle" in text and "33" in text, err
    code, _, err = run(capsys, "generate", "--from", tmp_path / "old.png", "-o", tmp_path / "again.png")
    assert code == 0, err
    assert list(Image.open(tmp_path / "again.png").getdata()) == list(new.image.getdata())
