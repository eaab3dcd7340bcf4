"""Generation controls from the command line: batching, presets, templates, grids, previews, reports, Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run
from PIL import Image


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(tmp_path / "config"))


def meta(path):
    """The request an image records (every value explicit)."""
    with Image.open(path) as im:
        return json.loads(im.text["fluxlab"])["request"]


def common(tiny):
    return ["-m", tiny, "--device", "cpu", "--dtype", "fp32"]


def test_prompt_file_and_explicit_seeds(tiny_dirs, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# my prompts\na red circle\n\n   \na blue square\n# done\n")
    d = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--prompt-file", pf, "--seeds", "4,8", "-W", 64, "-H", 64,
                       *common(str(tiny_dirs["flux2-klein"])), "-o", d)
    assert code == 0, err
    got = [(meta(p)["prompt"], meta(p)["seed"]) for p in sorted(d.iterdir())]
    assert got == [("a red circle", 4), ("a red circle", 8), ("a blue square", 4), ("a blue square", 8)]


def test_each_distinct_prompt_is_encoded_once(tiny_dirs):
    import fluxlab

    pipe = fluxlab.load(str(tiny_dirs["flux1-schnell"]), device="cpu", dtype="fp32")
    calls = []
    pipe.components.text_encoder_2.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for seed in (1, 2):
        pipe.generate(prompt="a cat", width=64, height=64, seed=seed, num_images=3)
    pipe.generate(prompt="a dog", width=64, height=64, seed=1)
    assert calls == [1, 1]  # one encoder pass per distinct prompt, across calls


def test_builtin_presets_steps_or_size(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a cat", "--preset", "preview", "--seed", 1,
                       *common(str(tiny_dirs["flux2-klein"])), "-o", tmp_path / "d.png")
    assert code == 0, err
    m = meta(tmp_path / "d.png")
    assert (m["width"], m["height"], m["steps"]) == (512, 512, 4)  # distilled: size changes, steps stay
    code, _, err = run(capsys, "generate", "a cat", "--preset", "quality", "-W", 64, "-H", 64, "--seed", 1,
                       *common(str(tiny_dirs["flux1-dev"])), "-o", tmp_path / "q.png")
    m = meta(tmp_path / "q.png")
    assert code == 0 and (m["steps"], m["width"]) == (50, 64)  # explicit size beats the preset
    code, _, err = run(capsys, "generate", "a cat", "--preset", "preview", "--steps", 5, "-W", 64, "-H", 64,
                       "--seed", 1, *common(str(tiny_dirs["flux1-dev"])), "-o", tmp_path / "p.png")
    assert code == 0 and meta(tmp_path / "p.png")["steps"] == 5


def test_user_presets_save_list_delete(tiny_dirs, tmp_path, capsys):
    code, out, _ = run(capsys, "preset", "save", "mine", "--steps", 7, "--sampler", "heun", "--schedule", "shift:2")
    assert code == 0
    stored = json.loads((tmp_path / "config" / "presets.json").read_text())
    assert stored == {"mine": {"steps": 7, "sampler": "heun", "schedule": "shift:2"}}
    code, out, _ = run(capsys, "preset", "list")
    assert "mine" in out and "preview" in out
    code, _, _ = run(capsys, "generate", "a cat", "--preset", "mine", "-W", 64, "-H", 64, "--seed", 2,
                       *common(str(tiny_dirs["flux1-dev"])), "-o", tmp_path / "u.png")
    m = meta(tmp_path / "u.png")
    assert code == 0 and (m["steps"], m["sampler"], m["schedule"]) == (7, "heun", "shift:2")
    assert run(capsys, "preset", "delete", "mine")[0] == 0
    assert json.loads((tmp_path / "config" / "presets.json").read_text()) == {}


def test_templates_record_the_final_prompt(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a fox", "--template", "oil-painting", "-W", 64, "-H", 64, "--seed", 1,
                       *common(str(tiny_dirs["flux2-klein"])), "-o", tmp_path / "t.png")
    assert code == 0, err
    assert meta(tmp_path / "t.png")["prompt"].startswith("An oil painting of a fox, visible brush strokes")
    assert run(capsys, "template", "save", "sketch", "a charcoal sketch of {prompt}, rough paper")[0] == 0
    code, _, _ = run(capsys, "generate", "a fox", "--template", "sketch", "-W", 64, "-H", 64, "--seed", 1,
                     *common(str(tiny_dirs["flux2-klein"])), "-o", tmp_path / "s.png")
    assert code == 0 and meta(tmp_path / "s.png")["prompt"] == "a charcoal sketch of a fox, rough paper"


def test_grid_three_by_three(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "grid"
    code, _, err = run(capsys, "grid", "a red circle", "--x", "steps=1,2,3", "--y", "guidance=2,4.5,7",
                         "-W", 96, "-H", 64, *common(str(tiny_dirs["flux2-klein-base"])), "-o", d, "-q")
    assert code == 0, err
    cells = sorted(d.glob("cell-*.png"))
    assert len(cells) == 9
    rows = list(csv.DictReader((d / "grid.csv").open()))
    assert len(rows) == 9
    for r in rows:
        m = meta(d / r["file"])
        assert int(r["steps"]) == m["steps"] == [1, 2, 3][int(r["col"])]
        assert float(r["guidance"]) == m["guidance"] == [2, 4.5, 7][int(r["row"])]
        assert float(r["seconds"]) > 0 and float(r["peak_host_rss_mb"]) > 0
    with Image.open(d / "sheet.png") as sheet:
        assert sheet.width > 3 * 256 and sheet.height > 3 * 170


def test_previews_and_report(tiny_dirs, tmp_path, capsys):
    pdir, report = tmp_path / "prev", tmp_path / "report.json"
    code, _, err = run(capsys, "generate", "a red circle", "--steps", 4, "-W", 96, "-H", 64, "--seed", 6,
                       "--previews", pdir, "--preview-every", 2, "--report", report,
                       *common(str(tiny_dirs["flux2-klein"])), "-o", tmp_path / "final.png")
    assert code == 0, err
    names = sorted(p.name for p in pdir.iterdir())
    assert names == ["seed6-step001-fast.png", "seed6-step002-vae.png", "seed6-step003-fast.png",
                     "seed6-step004-vae.png"]
    # The last step's clean estimate decoded by the VAE is the final image (Euler lands on sigma = 0).
    a = np.asarray(Image.open(pdir / "seed6-step004-vae.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "final.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    rep = json.loads(report.read_text())
    assert rep["images"] == 1 and rep["phases_s"]["denoise"] > 0 and rep["peak_host_rss_bytes"] > 0


BAD = [
    (["--sampler", "dpm"], "unknown sampler 'dpm'"),
    (["--schedule", "karras"], "unknown schedule 'karras'; valid: default, linear, shift:S"),
    (["--schedule", "shift:x"], "the shift must be a positive number"),
    (["--preset", "fast"], "unknown preset 'fast'"),
    (["--template", "anime"], "unknown template 'anime'"),
    (["--seeds", "1,b"], "--seeds '1,b' is not a comma-separated list"),
    (["--seed", 1, "--seeds", "2,3"], "either --seed or --seeds"),
    (["--sampler", "euler_ancestral", "--eta", 2], "eta 2.0 is out of range"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(map(str, e)) for e, _ in BAD])
def test_bad_controls(tiny_dirs, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, "generate", "a cat", "-W", 64, "-H", 64, *common(str(tiny_dirs["flux2-klein"])),
                       *extra, "-o", tmp_path / "x.png")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("axis,message", [("steps=a,b", "axis steps: 'a' is not valid"),
                                          ("colour=1,2", "unknown axis field 'colour'"),
                                          ("steps", "is not FIELD=V1,V2"),
                                          ("size=512", "expected WxH sizes")])
def test_bad_grid_axes(tiny_dirs, tmp_path, capsys, axis, message):
    code, _, err = run(capsys, "grid", "a cat", "--x", axis, *common(str(tiny_dirs["flux2-klein"])),
                       "-o", tmp_path / "g")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()


def test_empty_prompt_file(tiny_dirs, tmp_path, capsys):
    pf = tmp_path / "p.txt"
    pf.write_text("# nothing here\n\n")
    code, _, err = run(capsys, "generate", "--prompt-file", pf, *common(str(tiny_dirs["flux2-klein"])))
    assert code == 2 and "has no prompts" in err


def test_ctrl_c_keeps_finished_images_and_exits_130(tiny_dirs, tmp_path):
    out = tmp_path / "many"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["generate", "a red circle", "-m", tiny_dirs["flux2-klein"], "-W", 256, "-H", 256, "--steps", 8,
            "-n", 500, "--seed", 0, "--device", "cpu", "-o", out, "-q"]
    # Started as a shell starts it: Ctrl-C at its default. A process inherits an ignored SIGINT, and Python then
    # never turns it into KeyboardInterrupt; in two full suite runs the child kept writing images after SIGINT,
    # which only an inherited SIG_IGN explains.
    proc = subprocess.Popen([sys.executable, "-m", "fluxlab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and len(list(out.glob("*.png"))) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    files = list(out.iterdir())
    assert 2 <= len(files) < 500
    for f in files:  # every file there is a complete, readable PNG with its metadata; no temp files
        assert f.suffix == ".png" and not f.name.startswith(".")
        with Image.open(f) as im:
            im.load()
            assert "fluxlab" in im.text
