"""What a newcomer meets in the first hour: defaults that follow the model, tables that do not cut names, LoRAs
that keep their rank, short training runs that stay small, and notices that say what was changed."""

from __future__ import annotations

import json

from conftest import run
from PIL import Image
from safetensors.torch import save_file
from test_lora import random_lora

from fluxlab.runtime import loras as L


def test_bench_defaults_follow_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(tmp_path))
    code, out, err = run(capsys, "bench", "-m", "demo", "--steps", 2)
    assert code == 0, err
    assert "64x64" in out and "128x128" in out


def test_models_table_keeps_names_and_shows_repos(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, text, _ = run(capsys, "models")
    assert code == 0
    from fluxlab.spec.catalog import CATALOG

    for name, spec in CATALOG.items():
        assert name in text, name
        if spec.repo:
            assert spec.repo in text, spec.repo


def test_a_fused_lora_keeps_its_trained_rank_through_conversions(tiny_pipes, tmp_path):
    state = random_lora(tiny_pipes["flux2-klein"].components.transformer, rank=4)
    save_file(state, tmp_path / "d.safetensors")
    lora = L.read(tmp_path / "d.safetensors")
    toolkit = L.write(lora, "ai-toolkit", tmp_path / "toolkit.safetensors")  # fuses q, k, v: A of 12 rows
    back = L.read(toolkit)
    assert back.rank == 4 and L.info(back)["rank"] == 4
    kohya = L.write(back, "kohya", tmp_path / "kohya.safetensors")
    assert L.read(kohya).rank == 4
    # Not inflated by re-fusing fused parts (it was 1.5x); kohya's longer names and alpha scalars cost ~3%.
    assert kohya.stat().st_size <= 1.1 * toolkit.stat().st_size
    for key, value in back.state.items():  # the same update, exactly: rows dropped carried zeros only
        assert value.shape[0 if ".lora_A." in key else 1] == 4


def test_a_short_one_line_run_keeps_only_its_result(tiny_dirs, tmp_path, capsys, monkeypatch):
    from test_train import circles

    monkeypatch.chdir(tmp_path)
    circles(tmp_path / "imgs", 2)
    code, _, err = run(capsys, "train", "--images", tmp_path / "imgs", "--trigger", "zxq", "--steps", 20, "-m",
                       tiny_dirs["flux2-klein"], "--resolution", 64, "--device", "cpu")
    assert code == 0, err
    run_dir = tmp_path / "outputs" / "training" / "lora"  # beside generation's outputs/
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["lora.safetensors"]
    assert "adamw8bit" not in err and "bitsandbytes" not in err
    assert not (tmp_path / "output").exists()


def test_long_prompts_say_what_is_dropped(tmp_path, capsys):
    prompt = "a red circle in the top left on a white background " * 4  # the demo reads 24 tokens
    code, _, err = run(capsys, "generate", prompt, "-m", "demo", "--steps", 2, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "the prompt is" in err and "tokens; demo reads 24: the last" in err and "are dropped" in err
    record = json.loads(Image.open(tmp_path / "x.png").text["fluxlab"])
    assert record["request"]["prompt"] == prompt.strip() or record["request"]["prompt"] == prompt


def test_img2img_says_how_many_steps_run_and_size_notices_only_when_they_matter(tmp_path, capsys):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "init.png")
    code, out, err = run(capsys, "generate", "a red circle in the center on a white background", "-m", "demo",
                         "--init", tmp_path / "init.png", "--strength", 0.6, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "runs the last 12 of 20 steps" in err and "12 of 20 steps)" in out
    assert "follows the init image" not in err  # 64x64 is the demo's own size: nothing changed


def test_animated_images_use_their_first_frame_and_say_so(tmp_path, capsys):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    code, _, err = run(capsys, "generate", "a red circle", "-m", "demo", "--steps", 2, "--image",
                       tmp_path / "anim.webp", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "is animated (2 frames); using the first frame" in err


def test_printed_timings_are_the_ones_the_image_records(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red circle", "-m", "demo", "--steps", 2, "--report",
                       tmp_path / "r.json", "-o", tmp_path / "x.png")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    timings = json.loads(Image.open(tmp_path / "x.png").text["fluxlab-timings"])
    for phase in ("load", "encode", "denoise", "decode"):
        assert report["phases_s"][phase] == timings[phase], phase
