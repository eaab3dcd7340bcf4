"""The command line end to end: outputs, reproducibility, metadata, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run


def gen(tiny, *extra):
    size = [] if {"-W", "-H", "--aspect"} & set(extra) else ["-W", 96, "-H", 64]
    return ["generate", "a blue square in the center", "-m", tiny, *size, "--device", "cpu", "--dtype", "fp32",
            *extra]


def test_same_request_twice_gives_identical_png_bytes(tiny_dirs, tmp_path, capsys):
    tiny = tiny_dirs["flux2-klein"]
    for name in ("a.png", "b.png"):
        code, _, err = run(capsys, *gen(tiny, "--seed", 7, "--reproducible", "-o", tmp_path / name))
        assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_from_reproduces_a_png_byte_for_byte(tiny_dirs, tmp_path, capsys):
    tiny = tiny_dirs["flux1-dev"]
    code, _, err = run(capsys, "generate", "a watercolor landscape", "-m", tiny, "-W", 64, "-H", 96,
                       "--steps", 3, "--guidance", 5.5, "--seed", 99, "--reproducible", "--device", "cpu",
                       "--dtype", "fp32", "-o", tmp_path / "orig.png")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "--from", tmp_path / "orig.png", "--reproducible", "--device", "cpu",
                       "-o", tmp_path / "again.png")
    assert code == 0, err
    assert (tmp_path / "orig.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    # A flag given with --from overrides the recorded value.
    code, _, _ = run(capsys, "generate", "--from", tmp_path / "orig.png", "--seed", 100, "--device", "cpu",
                     "-o", tmp_path / "other.png")
    assert code == 0
    assert json.loads(_meta(tmp_path / "other.png"))["request"]["seed"] == 100


def _meta(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.text["fluxlab"]


def test_metadata_records_settings_and_timings(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, *gen(tiny_dirs["flux2-klein-base"], "--seed", 5, "--steps", 2, "--guidance", 3,
                                    "--negative", "dull", "-o", tmp_path / "m.png"))
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "m.png") as im:
        text = dict(im.text)
    meta = json.loads(text["fluxlab"])
    assert set(meta) == {"fluxlab", "format", "request", "model", "runtime", "resolved"}
    request = meta["request"]
    assert {k: request[k] for k in ("prompt", "negative", "seed", "width", "height", "steps", "guidance")} == {
        "prompt": "a blue square in the center", "negative": "dull", "seed": 5, "width": 96, "height": 64,
        "steps": 2, "guidance": 3.0}
    # Each part is exactly what its typed object writes: reading it back changes nothing.
    from fluxlab.spec.request import GenerateRequest, ModelRef, Runtime

    for key, model in (("request", GenerateRequest), ("model", ModelRef), ("runtime", Runtime)):
        assert model.model_validate(meta[key]).model_dump(mode="json", exclude_none=True) == meta[key], key
    assert meta["model"]["dtype"] == "fp32" and meta["runtime"]["device"] == "cpu"
    assert meta["model"]["name"] == str(Path(tiny_dirs["flux2-klein-base"]).resolve())
    assert meta["resolved"]["schedule"]["mu"] > 0 and meta["fluxlab"]
    timings = json.loads(text["fluxlab-timings"])
    assert {"load", "encode", "denoise", "decode"} <= set(timings)
    assert text["parameters"].startswith("a blue square in the center\nNegative prompt: dull\nSteps: 2")
    code, out, _ = run(capsys, "show", tmp_path / "m.png", "--json")
    assert code == 0 and json.loads(out)["request"]["seed"] == 5


def test_num_images_uses_consecutive_seeds_and_directory_order(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "out"
    code, _, err = run(capsys, *gen(tiny_dirs["flux2-klein"], "--seed", 20, "-n", 3, "-o", d))
    assert code == 0, err
    code, _, err = run(capsys, *gen(tiny_dirs["flux2-klein"], "--seed", 1, "-o", d))
    files = sorted(p.name for p in d.iterdir())
    assert files == ["00001-20.png", "00002-21.png", "00003-22.png", "00004-1.png"]


def test_random_seed_is_printed_and_recorded(tiny_dirs, tmp_path, capsys):
    code, out, _ = run(capsys, *gen(tiny_dirs["flux2-klein"], "-o", tmp_path / "r.png"))
    assert code == 0
    seed = json.loads(_meta(tmp_path / "r.png"))["request"]["seed"]
    assert 0 <= seed <= 2**32 - 1 and f"seed {seed}" in out


def test_distilled_model_says_guidance_is_ignored(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, *gen(tiny_dirs["flux2-klein"], "--guidance", 7, "-o", tmp_path / "g.png"))
    assert code == 0
    assert "guidance 7 is ignored" in err


BAD = [
    (["-W", 1000], "width 1000 is not a multiple of 16; nearest valid values: 992 or 1008"),
    (["-H", 4000], "height 4000 is outside this model's range"),
    (["-W", 32], "width 32 is outside this model's range 64..2048"),
    (["--steps", 0], "steps 0 is out of range"),
    (["--steps", 100000], "steps 100000 is out of range"),
    (["--seed", -1], "seed -1 is out of range; valid: 0..4294967295"),
    (["--seed", 2**32], "seed 4294967296 is out of range"),
    (["--guidance", "nan"], "guidance nan is invalid"),
    (["--guidance", -1], "guidance -1.0 is invalid"),
    (["--aspect", "5:4"], "unknown aspect '5:4'; valid: 1:1, 9:16"),
    (["--steps", "many"], "Invalid value for '--steps'"),
    (["--aspect", "1:1", "-W", 512], "--aspect 1:1 conflicts with an explicit width/height"),
    (["-n", 0], "num_images 0 is out of range"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--device", "tpu"], "device 'tpu'"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(map(str, e)) for e, _ in BAD])
def test_bad_request_values(tiny_dirs, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, *gen(tiny_dirs["flux1-dev"], *extra, "-o", tmp_path / "x.png"))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_bad_models_and_files(tiny_dirs, tmp_path, capsys):
    not_flux = tmp_path / "sd"
    not_flux.mkdir()
    (not_flux / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    corrupt = tmp_path / "corrupt"
    import shutil

    shutil.copytree(tiny_dirs["flux2-klein"], corrupt)
    weights = next((corrupt / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    cases = [
        ("flux2-klein-4", "unknown model 'flux2-klein-4' (did you mean 'flux2-klein-4b'?)"),
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path), "is not a diffusers pipeline directory (no model_index.json)"),
        (str(not_flux), "holds a StableDiffusionPipeline pipeline, not a supported FLUX pipeline"),
        (str(corrupt), "is not a valid safetensors file"),
    ]
    out_dir = tmp_path / "out"
    for model, message in cases:
        code, _, err = run(capsys, "generate", "a cat", "-m", model, "-W", 64, "-H", 64, "--device", "cpu",
                           "-o", out_dir)
        assert code == 2, model
        assert message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_missing_weights_name_the_download_commands(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a cat", "-m", "flux1-dev", "-o", tmp_path / "x.png")
    assert code == 2
    assert "black-forest-labs/FLUX.1-dev" in err and "hf download black-forest-labs/FLUX.1-dev" in err
    assert "hf auth login" in err and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in err
    assert len(err.strip().splitlines()) == 1


def test_gated_repo_answer(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.errors import GatedRepoError

    httpx = sys.modules[errors.Response.__module__.split(".")[0]]  # the HTTP client the hub library uses

    url = "https://huggingface.co/api/models/black-forest-labs/FLUX.2-klein-9B"
    response = httpx.Response(403, request=httpx.Request("GET", url))

    def gated(*a, **k):  # the hub's answer for a gated repo whose license was not accepted
        raise GatedRepoError("403 Client Error: Forbidden", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    code, _, err = run(capsys, "generate", "a cat", "-m", "flux2-klein-9b", "-o", tmp_path / "x.png")
    assert code == 2
    assert "gated (HTTP 403)" in err and "hf auth login" in err
    assert "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B" in err


def test_models_lists_the_catalog(capsys):
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert set(rows) >= {"flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b",
                         "flux2-dev", "flux1-schnell", "flux1-dev"}
    assert rows["flux2-klein-4b"]["cached_gb"] is None


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fluxlab", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "safetensors", "accelerate", "fastapi", "uvicorn")


def test_help_is_fast_because_it_imports_nothing_heavy():
    """What makes --help instant is what it does not import; asserted by module name, not by a time, which a busy
    or slower CPU would make flaky (it takes ~0.5 s on a 2-core AVX2 EPYC, ~0.3 s on an AMX Xeon)."""
    code = ("import sys, contextlib, io\nfrom fluxlab.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):"
            f"\n    main(['--help'])\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
    r = _cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout


NOT_FOR_THE_DEMO = ("fluxlab.serve", "fluxlab.web", "fluxlab.train", "fluxlab.caption", "fluxlab.batch",
                    "fluxlab.runtime.quantize", "fluxlab.runtime.streaming", "fluxlab.runtime.gguf_files",
                    "fluxlab.core.stepcache", "ray", "fastapi", "uvicorn", "starlette", "diffusers.pipelines",
                    "transformers.models.t5", "transformers.models.clip", "transformers.models.mistral3")


def test_a_demo_generation_imports_only_what_it_runs(tmp_path):
    """`fluxlab generate -m demo` imports the FLUX.2 pieces it runs and none of the server, training, captioning,
    batch, quantization or FLUX.1 text-encoder code: asserted from the process's sys.modules, by name. (What
    remains between it and `import torch` is diffusers' own imports, see bench/demo_latency.py.)"""
    code = ("import sys\nfrom fluxlab.cli import main\n"
            f"main(['generate', 'a red circle', '-m', 'demo', '-o', {str(tmp_path / 'c.png')!r}, '--quiet'])\n"
            f"print(sorted(m for m in sys.modules if m.startswith({NOT_FOR_THE_DEMO!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (tmp_path / "c.png").is_file(), r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_console_script_reports_user_error_without_traceback(tmp_path):
    r = _cli("generate", "a cat", "-m", "no-such-model", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown model 'no-such-model'")
    assert "Traceback" not in r.stderr
