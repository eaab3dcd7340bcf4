"""Bad input, case by case, the way a hostile-but-realistic user supplies it: every case must end with exit status 2,
exactly one line on stderr that names the bad value, no traceback, and nothing left behind in (or outside) the
output location. Output locations that cannot be written fail before any weights load."""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import run
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file


def png_bomb(path: Path, w: int, h: int) -> Path:
    """A valid PNG header claiming w x h pixels with (almost) no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def png_with_text(path: Path, text: str | None) -> Path:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("fluxlab", text)
    Image.new("RGB", (64, 64), "white").save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dirs, tiny_pipes):
    """Every bad (and a few good) input file, built once."""
    from test_lora import random_lora

    d = tmp_path_factory.mktemp("bad-inputs")
    good = d / "good.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(good)
    Image.new("RGB", (80, 80), (40, 200, 40)).save(d / "ref.png")
    (d / "corrupt.png").write_bytes(good.read_bytes()[:120])
    (d / "text.png").write_text("not an image")
    Image.new("RGB", (32, 32)).save(d / "tiny.png")
    Image.new("RGB", (1600, 80)).save(d / "wide.png")
    Image.new("RGB", (96, 64)).save(d / "pic.gif")
    png_bomb(d / "bomb.png", 20000, 20000)
    (d / "folder").mkdir()
    (d / "folder.png").mkdir()
    frames = [Image.new("RGB", (96, 64), c) for c in ("red", "blue")]
    frames[0].save(d / "anim.webp", save_all=True, append_images=frames[1:])
    t = tiny_pipes["flux2-klein"].components.transformer
    save_file(random_lora(t), d / "lora.safetensors")
    save_file(random_lora(tiny_pipes["flux1-dev"].components.transformer), d / "flux1.safetensors")
    bad = random_lora(t)
    bad[next(k for k in bad if ".lora_A." in k)][0, 0] = float("nan")
    save_file(bad, d / "nan.safetensors")
    (d / "junk.safetensors").write_bytes(b"junk")
    save_file({"some.weight": torch.zeros(2)}, d / "notlora.safetensors")
    save_file({}, d / "empty.safetensors")
    save_file({"text_encoder.layers.0.q.lora_A.weight": torch.zeros(2, 4)}, d / "te-only.safetensors")
    wide = {k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in random_lora(t).items()}
    save_file(wide, d / "wrong-size.safetensors")
    (d / "lora.bin").write_bytes(b"\x80\x04pickle")
    # Models that must be refused.
    (d / "not-flux").mkdir()
    (d / "not-flux" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    import shutil

    remote = shutil.copytree(tiny_dirs["flux2-klein"], d / "remote-code")
    cfg = json.loads((remote / "tokenizer" / "tokenizer_config.json").read_text())
    (remote / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**cfg, "auto_map": {
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    corrupt = shutil.copytree(tiny_dirs["flux2-klein"], d / "corrupt-model")
    w = next((corrupt / "transformer").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    badjson = shutil.copytree(tiny_dirs["flux2-klein"], d / "bad-fluxlab-json")
    (badjson / "fluxlab.json").write_text('{"stepz": 3}')
    (d / "file-model").write_text("x")
    # Prompt files.
    (d / "nul.txt").write_bytes(b"a red\0circle\n")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.txt").write_text("# nothing\n\n")
    # PNG metadata, tampered and foreign.
    png_with_text(d / "meta-list.png", "[1, 2, 3]")
    png_with_text(d / "meta-missing.png", json.dumps({"fluxlab": "0.1.0", "prompt": "x"}))
    png_with_text(d / "meta-type.png", json.dumps({"fluxlab": "0.1.0", "prompt": "x", "model": "demo",
                                                   "seed": "abc"}))
    png_with_text(d / "meta-notjson.png", "{not json")
    png_with_text(d / "meta-none.png", None)
    png_with_text(d / "meta-newbad.png", json.dumps({"fluxlab": "0.2", "request": {"prompt": "x", "steps": "3"},
                                                     "model": {"name": "demo"}}))
    png_bomb(d / "meta-bomb.png", 20000, 20000)
    whole = png_with_text(d / "meta-whole.png", json.dumps({"fluxlab": "0.2", "request": {"prompt": "x"},
                                                            "model": {"name": "demo"}}))
    (d / "meta-truncated.png").write_bytes(whole.read_bytes()[:-30])  # the text chunk comes after the pixels
    png_with_text(d / "meta-oldschedule.png", json.dumps({"fluxlab": "0.1.0", "prompt": "x", "model": "demo",
                                                          "seed": 1, "schedule": {"name": 5}}))
    (d / "binary.jsonl").write_bytes(bytes(range(1, 256)) * 4)
    (d / "prompts.txt").write_text("a red circle\n")
    for name, plan in (("plan-int", 5), ("prompts-int", {"prompts": 5}), ("seeds-text", {"seeds": "abc"})):
        folder = d / "batches" / name
        folder.mkdir(parents=True)
        good = {"model": {"name": "demo"}, "runtime": {}, "base": {}, "prompts": [{"prompt": "x"}], "seeds": [0, 1]}
        (folder / "job.json").write_text(json.dumps({"plan": plan if isinstance(plan, int) else {**good, **plan}}))
    (d / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\0" * 20)
    return d


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if not p.is_dir()} | \
        {str(p.relative_to(root)) + "/": 0 for p in root.rglob("*") if p.is_dir()}


def check(capsys, roots, args: list, message: str) -> str:
    """Run the CLI; exit 2, one line naming `message`, and every folder in `roots` exactly as it was."""
    roots = roots if isinstance(roots, list) else [roots]
    before = [snapshot(r) for r in roots]
    code, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, (args, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: "), err
    assert message in lines[0], (message, lines[0])
    assert [snapshot(r) for r in roots] == before, "files were left behind"
    return lines[0]


def gen(tiny, *extra, out="out/x.png"):
    return ["generate", "a red circle", "-m", tiny, "-W", 64, "-H", 64, "--device", "cpu", *extra, "-o", out]


# (case id, arguments given the inputs folder and the tiny klein folder, what the one line must contain)
GENERATE = [
    ("width-multiple", lambda d, k: gen(k, "-W", 1000), "width 1000 is not a multiple of 16"),
    ("width-small", lambda d, k: gen(k, "-W", 16), "width 16 is outside this model's range"),
    ("height-huge", lambda d, k: gen(k, "-H", 4096), "height 4096 is outside"),
    ("width-negative", lambda d, k: gen(k, "-W", -64), "width -64"),
    ("steps-zero", lambda d, k: gen(k, "--steps", 0), "steps 0 is out of range"),
    ("steps-huge", lambda d, k: gen(k, "--steps", 10**6), "steps 1000000 is out of range"),
    ("steps-text", lambda d, k: gen(k, "--steps", "many"), "'many'"),
    ("seed-negative", lambda d, k: gen(k, "--seed", -1), "seed -1 is out of range"),
    ("seed-2^32", lambda d, k: gen(k, "--seed", 2**32), "seed 4294967296 is out of range"),
    ("seed-overflow", lambda d, k: gen(k, "--seed", 2**32 - 1, "-n", 2), "pass 4294967295"),
    ("guidance-nan", lambda d, k: gen(k, "--guidance", "nan"), "guidance nan is invalid"),
    ("guidance-inf", lambda d, k: gen(k, "--guidance", "inf"), "guidance inf is invalid"),
    ("guidance-negative", lambda d, k: gen(k, "--guidance", -1), "guidance -1.0 is invalid"),
    ("guidance-huge", lambda d, k: gen(k, "--guidance", 1e9), "guidance 1000000000.0 is invalid"),
    ("aspect-unknown", lambda d, k: ["generate", "x", "-m", k, "--aspect", "5:4", "-o", "out/x.png"],
     "unknown aspect '5:4'"),
    ("aspect-and-width", lambda d, k: gen(k, "--aspect", "1:1"), "--aspect 1:1 conflicts with an explicit"),
    ("n-zero", lambda d, k: gen(k, "-n", 0), "num_images 0 is out of range"),
    ("n-huge", lambda d, k: gen(k, "-n", 5000), "num_images 5000 is out of range"),
    ("seeds-text", lambda d, k: gen(k, "--seeds", "1,b"), "--seeds '1,b' is not a comma-separated list"),
    ("seeds-and-seed", lambda d, k: gen(k, "--seeds", "1,2", "--seed", 3), "either --seed or --seeds"),
    ("seeds-negative", lambda d, k: gen(k, "--seeds", "1,-5"), "seed -5 is out of range"),
    ("seeds-count", lambda d, k: gen(k, "--seeds", "1,2", "-n", 3), "--num-images 3 does not match"),
    ("eta-range", lambda d, k: gen(k, "--sampler", "euler_ancestral", "--eta", 2), "eta 2.0 is out of range"),
    ("sampler", lambda d, k: gen(k, "--sampler", "dpm"), "unknown sampler 'dpm'"),
    ("schedule", lambda d, k: gen(k, "--schedule", "karras"), "unknown schedule 'karras'"),
    ("schedule-shift", lambda d, k: gen(k, "--schedule", "shift:x"), "schedule 'shift:x'"),
    ("schedule-shift-negative", lambda d, k: gen(k, "--schedule", "shift:-2"), "schedule 'shift:-2'"),
    ("schedule-shift-inf", lambda d, k: gen(k, "--schedule", "shift:inf"), "schedule 'shift:inf'"),
    ("cache-unknown", lambda d, k: gen(k, "--cache", "teacache"), "unknown cache 'teacache'"),
    ("cache-threshold", lambda d, k: gen(k, "--cache", "fbc:2"), "cache 'fbc:2': the threshold"),
    ("cache-interval", lambda d, k: gen(k, "--cache", "taylorseer:1"), "cache 'taylorseer:1': the interval"),
    ("preset", lambda d, k: gen(k, "--preset", "fast"), "unknown preset 'fast'"),
    ("template", lambda d, k: gen(k, "--template", "anime"), "unknown template 'anime'"),
    ("dtype", lambda d, k: gen(k, "--dtype", "fp8"), "unknown dtype 'fp8'"),
    ("device", lambda d, k: gen(k, "--device", "tpu"), "unknown device 'tpu'"),
    ("device-cuda", lambda d, k: gen(k, "--device", "cuda"), "device 'cuda'"),
    ("memory", lambda d, k: gen(k, "--memory", "tiny"), "unknown memory mode 'tiny'"),
    ("budget-text", lambda d, k: gen(k, "--budget", "lots"), "--budget 'lots' is not a size"),
    ("budget-zero", lambda d, k: gen(k, "--budget", "0GB"), "--budget 0GB must be more than 0"),
    ("devices-twice", lambda d, k: gen(k, "--devices", "cuda:0,cuda"), "names cuda:0 twice; list each GPU once"),
    ("devices-unknown", lambda d, k: gen(k, "--devices", "cpu,tpu"), "unknown device 'tpu'"),
    ("devices-absent", lambda d, k: gen(k, "--devices", "cpu,cuda:1"), "device 'cuda:1' asked for"),
    ("devices-budget", lambda d, k: gen("demo", "--devices", "cpu,cpu", "--budget", "1MB"),
     "--budget 1MB on each of cpu, cpu cannot hold demo even split or streamed"),
    ("quantize", lambda d, k: gen(k, "--quantize", "int4"), "unknown quantization 'int4'"),
    ("batch-size", lambda d, k: gen(k, "--batch-size", 0), "batch_size"),
    ("threads", lambda d, k: gen(k, "--threads", 0), "threads"),
    ("preview-every", lambda d, k: gen(k, "--preview-every", -1), "--preview-every -1"),
    ("empty-prompt", lambda d, k: ["generate", "", "-m", k, "-o", "out/x.png"], "the prompt is empty"),
    ("blank-prompt", lambda d, k: ["generate", "   ", "-m", k, "-o", "out/x.png"], "the prompt is empty"),
    ("control-char", lambda d, k: ["generate", "a \x01 cat", "-m", k, "-o", "out/x.png"], "control character"),
    ("huge-prompt", lambda d, k: ["generate", "a" * 20000, "-m", k, "-o", "out/x.png"], "20000 characters"),
    ("no-prompt", lambda d, k: ["generate", "-m", k, "-o", "out/x.png"], "no prompt given"),
    ("prompt-and-file", lambda d, k: gen(k, "--prompt-file", d / "empty.txt"), "either a prompt or --prompt-file"),
    ("prompt-file-missing", lambda d, k: ["generate", "--prompt-file", d / "none.txt", "-m", k], "does not exist"),
    ("prompt-file-folder", lambda d, k: ["generate", "--prompt-file", d / "folder", "-m", k], "is a folder"),
    ("prompt-file-nul", lambda d, k: ["generate", "--prompt-file", d / "nul.txt", "-m", k], "NUL bytes"),
    ("prompt-file-latin1", lambda d, k: ["generate", "--prompt-file", d / "latin1.txt", "-m", k], "not UTF-8"),
    ("prompt-file-empty", lambda d, k: ["generate", "--prompt-file", d / "empty.txt", "-m", k], "has no prompts"),
    ("unknown-flag", lambda d, k: gen(k, "--stpes", 3), "--stpes"),
]

MODELS = [
    ("model-name", lambda d, k: gen("flux2-klein-4"), "unknown model 'flux2-klein-4' (did you mean"),
    ("model-missing-dir", lambda d, k: gen(str(d / "nowhere")), "does not exist"),
    ("model-file", lambda d, k: gen(str(d / "file-model")), "is a file, not a pipeline directory"),
    ("model-no-index", lambda d, k: gen(str(d / "folder")), "no model_index.json"),
    ("model-not-flux", lambda d, k: gen(str(d / "not-flux")), "not a supported FLUX pipeline"),
    ("model-corrupt", lambda d, k: gen(str(d / "corrupt-model")), "is not a valid safetensors file"),
    ("model-remote-code", lambda d, k: gen(str(d / "remote-code")), "never runs code from a model folder"),
    ("model-fluxlab-json", lambda d, k: gen(str(d / "bad-fluxlab-json")), "unknown keys stepz"),
    ("model-hub-offline", lambda d, k: gen("flux1-dev"), "hf download black-forest-labs/FLUX.1-dev"),
    ("revision-local", lambda d, k: gen(k, "--revision", "main"), "only applies to hub models"),
    ("transformer-missing", lambda d, k: gen(k, "--transformer", d / "none.safetensors"), "does not exist"),
    ("transformer-pickle", lambda d, k: gen(k, "--transformer", d / "lora.bin"), "never loads pickle"),
]

IMAGES = [
    ("image-corrupt", lambda d, k: gen(k, "--image", d / "corrupt.png"), "corrupt.png"),
    ("image-text", lambda d, k: gen(k, "--image", d / "text.png"), "is not an image fluxlab can read"),
    ("image-tiny", lambda d, k: gen(k, "--image", d / "tiny.png"), "is 32x32; both sides must be at least 64"),
    ("image-wide", lambda d, k: gen(k, "--image", d / "wide.png"), "aspect ratio of 20.0:1"),
    ("image-bomb", lambda d, k: gen(k, "--image", d / "bomb.png"), "over the 64 MP limit"),
    ("image-gif", lambda d, k: gen(k, "--image", d / "pic.gif"), "is GIF; use PNG, JPEG or WebP"),
    ("image-missing", lambda d, k: gen(k, "--image", d / "none.png"), "reference image"),
    ("image-folder", lambda d, k: gen(k, "--image", d / "folder"), "is a folder, not an image file"),
    ("image-too-many", lambda d, k: gen(k, *["--image", d / "good.png"] * 5), "5 reference images given"),
    ("init-folder", lambda d, k: gen(k, "--init", d / "folder"), "init image"),
    ("init-bomb", lambda d, k: gen(k, "--init", d / "bomb.png"), "over the 64 MP limit"),
    ("mask-folder", lambda d, k: gen(k, "--init", d / "good.png", "--mask", d / "folder"), "is a folder"),
    ("mask-no-init", lambda d, k: gen(k, "--mask", d / "good.png"), "--mask needs --init"),
    ("strength-no-init", lambda d, k: gen(k, "--strength", 0.5), "--strength needs --init"),
    ("strength-range", lambda d, k: gen(k, "--init", d / "good.png", "--strength", 1.5), "strength 1.5 is out"),
    ("strength-zero", lambda d, k: gen(k, "--init", d / "good.png", "--strength", 0), "strength 0 is out"),
    ("strength-steps", lambda d, k: gen(k, "--init", d / "good.png", "--strength", 1e-20, "--steps", 4),
     "leaves no step to run"),
]

LORAS = [
    ("lora-missing", lambda d, k: gen(k, "--lora", d / "none.safetensors"), "does not exist"),
    ("lora-pickle", lambda d, k: gen(k, "--lora", d / "lora.bin"), "never loads pickle"),
    ("lora-junk", lambda d, k: gen(k, "--lora", d / "junk.safetensors"), "is not a valid safetensors file"),
    ("lora-not-lora", lambda d, k: gen(k, "--lora", d / "notlora.safetensors"), "not a LoRA fluxlab recognises"),
    ("lora-empty", lambda d, k: gen(k, "--lora", d / "empty.safetensors"), "holds no tensors"),
    ("lora-nan-values", lambda d, k: gen(k, "--lora", d / "nan.safetensors"), "non-finite values"),
    ("lora-family", lambda d, k: gen(k, "--lora", d / "flux1.safetensors"), "is a flux1 LoRA"),
    ("lora-te-only", lambda d, k: gen(k, "--lora", d / "te-only.safetensors"), "only a text-encoder LoRA"),
    ("lora-folder", lambda d, k: gen(k, "--lora", d / "folder"), "is a folder"),
    ("lora-size", lambda d, k: gen(k, "--lora", d / "wrong-size.safetensors"), "inputs in this LoRA, but"),
    ("lora-scale-text", lambda d, k: gen(k, "--lora", f"{d / 'lora.safetensors'}:abc"), "the scale 'abc' is not"),
    ("lora-scale-nan", lambda d, k: gen(k, "--lora", f"{d / 'lora.safetensors'}:nan"), "LoRA scale nan is invalid"),
    ("lora-scale-inf", lambda d, k: gen(k, "--lora", f"{d / 'lora.safetensors'}:inf"), "LoRA scale inf is invalid"),
    ("lora-scale-huge", lambda d, k: gen(k, "--lora", f"{d / 'lora.safetensors'}:1e30"), "LoRA scale 1e+30"),
    ("lora-info-missing", lambda d, k: ["lora", "info", d / "none.safetensors"], "does not exist"),
    ("lora-convert-format", lambda d, k: ["lora", "convert", d / "lora.safetensors", "out/x.safetensors", "--to",
                                          "onnx"], "unknown LoRA format 'onnx'"),
    ("lora-convert-suffix", lambda d, k: ["lora", "convert", d / "lora.safetensors", "out/x.pt", "--to", "kohya"],
     "ending in .safetensors"),
    ("lora-convert-proc", lambda d, k: ["lora", "convert", d / "lora.safetensors", "/proc/x.safetensors", "--to",
                                        "kohya"], "/proc"),
]

OUTPUTS = [
    ("out-proc", lambda d, k: gen(k, out="/proc/x.png"), "/proc"),
    ("out-proc-folder", lambda d, k: gen(k, out="/proc/fluxlab-out/"), "/proc/fluxlab-out"),
    ("out-file-as-folder", lambda d, k: gen(k, out=str(d / "good.png" / "x.png")), "is a file, not a folder"),
    ("out-jpeg", lambda d, k: gen(k, out="out/x.jpg"), "fluxlab writes PNG files"),
    ("out-webp", lambda d, k: gen(k, out="out/x.webp"), "fluxlab writes PNG files"),
    ("out-existing-folder-png", lambda d, k: gen(k, out=str(d / "folder.png")), "is an existing folder"),
    ("report-proc", lambda d, k: gen(k, "--report", "/proc/r.json"), "/proc"),
    ("previews-proc", lambda d, k: gen(k, "--previews", "/proc/previews"), "/proc/previews"),
    ("previews-file", lambda d, k: gen(k, "--previews", d / "good.png"), "is a file"),
    ("grid-out-proc", lambda d, k: ["grid", "a cat", "--x", "steps=1,2", "-m", k, "-W", 64, "-H", 64, "--device",
                                    "cpu", "-o", "/proc/grid"], "/proc/grid"),
]

METADATA = [
    (f"{cmd}-{name}", (lambda c, n: lambda d, k: (["show", d / f"{n}.png"] if c == "show" else
                                                 ["show", "--json", d / f"{n}.png"] if c == "show-json" else
                                                 ["generate", "--from", d / f"{n}.png", "-o", "out/x.png"]))(cmd, name),
     message)
    for cmd in ("show", "show-json", "from")
    for name, message in [("meta-truncated", "is damaged"), ("meta-oldschedule", "schedule"),
                          ("meta-list", "not an object"), ("meta-missing", "without 'model'"),
                          ("meta-type", "seed"), ("meta-notjson", "not JSON"), ("meta-none", "no fluxlab metadata"),
                          ("meta-newbad", "request.steps"), ("meta-bomb", "over the 64 MP limit"),
                          ("text", "is not an image"), ("none", "does not exist")]
]

def batch(prompts, *extra, out="out/b"):
    return ["batch", prompts, "-m", "demo", "--seeds", "0-1", "--out", out, *extra]


BATCHES = [
    ("batch-seeds-many", lambda d, k: batch(d / "prompts.txt", "--seeds", "0-1000000000"),
     "more than 1,000,000 seeds"),
    ("batch-seeds-ranges", lambda d, k: batch(d / "prompts.txt", "--seeds", "0-999999,0-999999"),
     "more than 1,000,000 seeds"),
    ("batch-low-lora", lambda d, k: batch(d / "prompts.txt", "--memory", "low", "--device", "cpu", "--lora",
                                          d / "lora.safetensors"), "does not combine with --lora"),
    ("batch-gguf-truncated", lambda d, k: batch(d / "prompts.txt", "--transformer", d / "truncated.gguf"),
     "truncated.gguf"),
    ("batch-binary-prompts", lambda d, k: batch(d / "binary.jsonl"), "not UTF-8 text"),
    ("batch-status-plan-int", lambda d, k: ["batch", "status", d / "batches" / "plan-int"], "expected a JSON object"),
    ("batch-verify-prompts-int", lambda d, k: ["batch", "verify", d / "batches" / "prompts-int"], "prompts"),
    ("batch-status-seeds-text", lambda d, k: ["batch", "status", d / "batches" / "seeds-text"], "seeds"),
    ("lora-scale-markup", lambda d, k: gen(k, "--lora", "x:abc:"), "x:abc:"),
    ("threads-env", lambda d, k: ["env", "OMP_NUM_THREADS=abc", *gen(k)], "OMP_NUM_THREADS='abc'"),
]

PRESETS = [
    ("preset-steps-zero", lambda d, k: ["preset", "save", "z", "--steps", 0], "steps 0 is out of range"),
    ("preset-width", lambda d, k: ["preset", "save", "z", "-W", 100], "width 100 must be a multiple of 16"),
    ("preset-sampler", lambda d, k: ["preset", "save", "z", "--sampler", "dpm"], "unknown sampler 'dpm'"),
    ("preset-eta", lambda d, k: ["preset", "save", "z", "--eta", 3], "eta 3.0 is out of range"),
    ("preset-empty", lambda d, k: ["preset", "save", "z"], "would be empty"),
    ("preset-name-dots", lambda d, k: ["preset", "save", "../x", "--steps", 3], "'../x' is not a valid name"),
    ("preset-name-slash", lambda d, k: ["preset", "save", "a/b", "--steps", 3], "'a/b' is not a valid name"),
    ("preset-delete", lambda d, k: ["preset", "delete", "nothere"], "no user preset 'nothere'"),
    ("template-no-placeholder", lambda d, k: ["template", "save", "t", "a cat"], "needs a {prompt} placeholder"),
    ("template-name", lambda d, k: ["template", "save", "/abs", "x {prompt}"], "'/abs' is not a valid name"),
]


@pytest.fixture
def world(tmp_path, monkeypatch, inputs):
    """A working folder with the inputs inside (so the snapshot covers them), a fresh config folder, and
    weights loading made to fail loudly: every case here must be refused before any weights load."""
    import fluxlab.runtime.model as model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(tmp_path / "config"))

    def no_load(*a, **k):
        raise AssertionError("weights loading was reached")

    monkeypatch.setattr(model, "load", no_load)
    return tmp_path


AFTER_LOAD = {"lora-size"}  # found once the transformer's layers exist, still before any output
CASES = GENERATE + MODELS + IMAGES + LORAS + OUTPUTS + METADATA + PRESETS + BATCHES


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, inputs, tiny_dirs, capsys, monkeypatch):
    name, args, message = case
    if name in AFTER_LOAD:
        monkeypatch.undo()
        monkeypatch.chdir(world)
        monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(world / "config"))
    argv = args(inputs, str(tiny_dirs["flux2-klein"]))
    if argv[0] == "env":  # a bad environment variable for this case alone
        monkeypatch.setenv(*argv[1].split("=", 1))
        argv = argv[2:]
    check(capsys, [world, inputs], argv, message)


def test_the_table_covers_every_class():
    assert len(CASES) + len(TRAIN_CASES) + len(PRESET_FILES) >= 100


# -- training configs, datasets and zips -----------------------------------------------------------------------
def zip_of(path: Path, members: dict, symlink: str | None = None, method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
    return path


def png_bytes(w=64, h=64) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def zips(tmp_path_factory):
    d = tmp_path_factory.mktemp("zips")
    zip_of(d / "escape.zip", {"../escape.png": png_bytes()})
    zip_of(d / "absolute.zip", {"/tmp/abs.png": png_bytes()})
    zip_of(d / "link.zip", {"a.png": png_bytes()}, symlink="link.png")
    zip_of(d / "bomb.zip", {f"zeros{i:03d}.bin": b"\0" * 2**20 for i in range(200)})
    zip_of(d / "nested.zip", {"inner.zip": zip_of(d / "inner.zip", {"a.png": png_bytes()}).read_bytes()})
    zip_of(d / "big.zip", {"big.png": png_bomb(d / "big.png", 12000, 10000).read_bytes()})
    crc = zip_of(d / "crc.zip", {"a.png": png_bytes(), "b.txt": b"hello there, a caption" * 10},
                 method=zipfile.ZIP_STORED)
    data = bytearray(crc.read_bytes())
    i = data.index(b"hello there")
    data[i:i + 5] = b"HELLO"
    (d / "crc.zip").write_bytes(bytes(data))
    zip_of(d / "stored-crc.zip", {})
    (d / "notzip.zip").write_text("not a zip")
    return d


def yaml_config(folder: Path, tiny: str, **changes) -> Path:
    import yaml

    ds = folder / "ds"
    ds.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "red").save(ds / "a.png")
    cfg = {"job": "extension", "config": {"name": "run", "process": [{
        "type": "sd_trainer", "training_folder": str(folder / "runs"), "device": "cpu",
        "datasets": [{"folder_path": str(ds), "resolution": [64]}], "train": {"steps": 2},
        "model": {"name_or_path": tiny}}]}}
    p = cfg["config"]["process"][0]
    for key, value in changes.items():
        if key == "name":
            cfg["config"]["name"] = value
        elif key == "dataset":
            p["datasets"][0]["folder_path"] = value
        else:
            section, field = key.split("__")
            p.setdefault(section, {})[field] = value
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TRAIN_CASES = [
    ("yaml-broken", lambda d, z, k: ["train", _write(d / "b.yaml", "job: extension\nconfig: [x\n")],
     "is not valid YAML at line"),
    ("yaml-list", lambda d, z, k: ["train", _write(d / "l.yaml", "- a\n- b\n")], "should hold a YAML mapping"),
    ("yaml-missing", lambda d, z, k: ["train", d / "none.yaml"], "does not exist"),
    ("yaml-folder", lambda d, z, k: ["train", d], "is a folder"),
    ("yaml-binary", lambda d, z, k: ["train", _write(d / "bin.yaml", b"\xff\xfe\x00bad")], "not UTF-8"),
    ("name-dots", lambda d, z, k: ["train", yaml_config(d, k, name="../../escape")], "'../../escape'"),
    ("name-absolute", lambda d, z, k: ["train", yaml_config(d, k, name="/tmp/x")], "'/tmp/x'"),
    ("name-separator", lambda d, z, k: ["train", yaml_config(d, k, name="a/b")], "'a/b' is not a valid name"),
    ("name-empty", lambda d, z, k: ["train", yaml_config(d, k, name="")], "'' is not a valid name"),
    ("lr-negative", lambda d, z, k: ["train", yaml_config(d, k, train__lr=-1)], "train.lr"),
    ("steps-zero", lambda d, z, k: ["train", yaml_config(d, k, train__steps=0)], "train.steps"),
    ("rank-zero", lambda d, z, k: ["train", yaml_config(d, k, network__linear=0)], "network.linear"),
    ("unknown-key", lambda d, z, k: ["train", yaml_config(d, k, train__learning_rate=1)], "'learning_rate'"),
    ("optimizer", lambda d, z, k: ["train", yaml_config(d, k, train__optimizer="sgd")], "train.optimizer"),
    ("dataset-missing", lambda d, z, k: ["train", yaml_config(d, k, dataset=str(d / "none"))], "does not exist"),
    ("zip-escape", lambda d, z, k: _one_line(z / "escape.zip", k), "unsafe member path '../escape.png'"),
    ("zip-absolute", lambda d, z, k: _one_line(z / "absolute.zip", k), "unsafe member path '/tmp/abs.png'"),
    ("zip-link", lambda d, z, k: _one_line(z / "link.zip", k), "symbolic link 'link.png'"),
    ("zip-bomb", lambda d, z, k: _one_line(z / "bomb.zip", k), "a zip bomb?"),
    ("zip-nested", lambda d, z, k: _one_line(z / "nested.zip", k), "has no readable images"),
    ("zip-crc", lambda d, z, k: _one_line(z / "crc.zip", k), "is damaged"),
    ("zip-pixels", lambda d, z, k: _one_line(z / "big.zip", k), "over the 64 MP limit"),
    ("zip-empty", lambda d, z, k: _one_line(z / "stored-crc.zip", k), "has no readable images"),
    ("zip-not-zip", lambda d, z, k: _one_line(z / "notzip.zip", k), "is not a readable zip file"),
    ("no-trigger", lambda d, z, k: ["train", "--images", z / "nested.zip"], "needs --trigger"),
    ("resume-missing", lambda d, z, k: ["train", "--resume", d / "none"], "no such run folder"),
    ("threads-zero", lambda d, z, k: ["train", "--threads", 0, *_one_line(z / "crc.zip", k)[1:]], "--threads"),
]


def _write(path: Path, content) -> Path:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _one_line(archive: Path, tiny: str) -> list:
    return ["train", "--images", archive, "--trigger", "zxq", "--steps", 2, "-m", tiny, "--out", "runs",
            "--resolution", 64, "--device", "cpu"]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_input(case, tmp_path, zips, tiny_dirs, capsys, monkeypatch):
    _name, args, message = case
    monkeypatch.chdir(tmp_path)
    argv = args(tmp_path, zips, str(tiny_dirs["flux2-klein"]))
    check(capsys, tmp_path, argv, message)
    assert not (tmp_path.parent / "escape").exists() and not Path("/tmp/abs.png").exists()


def test_truncated_training_state_on_resume(tiny_dirs, tmp_path, capsys):
    from test_train import small_config

    cfg = small_config(tmp_path, tiny_dirs["flux2-klein"], steps=4, save_every=2)
    assert run(capsys, "train", cfg)[0] == 0
    run_dir = tmp_path / "output" / "flux_character_lora"
    state = run_dir / "state" / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    check(capsys, tmp_path, ["train", "--resume", run_dir], "is damaged or belongs to another run")


PRESET_FILES = [
    ("presets-not-json", "presets.json", "{not json", ["preset", "list"], "is not valid JSON"),
    ("presets-list", "presets.json", "[1, 2]", ["preset", "list"], "should hold a JSON object"),
    ("presets-seed", "presets.json", '{"p": {"seed": 3}}', ["preset", "list"], "cannot set seed"),
    ("presets-type", "presets.json", '{"p": {"steps": "many"}}', ["preset", "list"], "steps"),
    ("presets-used", "presets.json", '{"p": {"seed": 3}}', ["generate", "x", "--preset", "p", "-m", "demo"],
     "cannot set seed"),
    ("templates-not-json", "templates.json", "{oops", ["template", "list"], "is not valid JSON"),
    ("templates-no-placeholder", "templates.json", '{"t": "no placeholder"}', ["template", "list"],
     "{prompt} placeholder"),
]


@pytest.mark.parametrize("case", PRESET_FILES, ids=[c[0] for c in PRESET_FILES])
def test_hand_edited_settings_files(case, tmp_path, capsys, monkeypatch):
    _name, file, content, argv, message = case
    config = tmp_path / "config"
    config.mkdir()
    (config / file).write_text(content)
    monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(config))
    monkeypatch.chdir(tmp_path)
    line = check(capsys, tmp_path, argv, message)
    assert str(config / file) in line


def test_python_api_is_as_strict_as_the_cli():
    from fluxlab.errors import UserError
    from fluxlab.spec.request import make_request

    for fields, message in [({"prompt": "x", "steps": "3"}, "steps"), ({"prompt": "x", "seed": True}, "seed"),
                            ({"prompt": b"bytes"}, "prompt"), ({"prompt": "x", "width": 64.0}, "width"),
                            ({"prompt": "x", "images": "a.png"}, "images")]:
        with pytest.raises(UserError, match=message):
            make_request(**fields)


def test_output_files_get_the_usual_mode(tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a cat", "-m", tiny_dirs["flux2-klein"], "-W", 64, "-H", 64, "--steps",
                       1, "--device", "cpu", "-o", tmp_path / "m.png")
    assert code == 0, err
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o666 & ~mask


def test_full_disk_names_the_last_complete_image(tiny_dirs, tmp_path, capsys, monkeypatch):
    """The disk fills after the first image: one line, naming the image that is complete, and no temp file."""
    import errno

    from fluxlab import files

    real = files.os.replace
    calls = []

    def full(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    code, _, err = run(capsys, "generate", "a cat", "-m", tiny_dirs["flux2-klein"], "-W", 64, "-H", 64, "-n", 3,
                       "--seed", 1, "--device", "cpu", "-o", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the disk is full" in err and "the last complete image is" in err and "00001-1.png" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001-1.png"]


@pytest.fixture
def busy_machine(monkeypatch):
    """A machine whose other CPUs are busy: real neighbours computing on all CPUs but one, and the thread decision
    forgotten, so the next command decides (and reports) a busy machine. What the thread policy reads of them
    (/proc/loadavg's runnable count) is fixed at what they are, since a sample can miss a neighbour that the
    scheduler just preempted: this test is about when the note is said, not about sampling the load."""
    import subprocess
    import sys
    import time

    from fluxlab.runtime import threads

    monkeypatch.delenv("FLUXLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(threads, "_told", None)  # said once per process: this "process" has not said it yet
    monkeypatch.setattr(threads, "_kept", None)
    cpus = threads.usable_cpus()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(1, cpus - 1))]
    monkeypatch.setattr(threads, "others_running", lambda *a, **k: len(spinners))
    time.sleep(0.5)  # let them reach the run queue
    try:
        yield cpus
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        monkeypatch.undo()
        threads.apply_threads()  # back to this machine's own decision for the tests that follow


def test_a_busy_machine_adds_nothing_to_a_refusal(busy_machine, tmp_path, zips, tiny_dirs, inputs, capsys,
                                                  monkeypatch):
    """The busy-machine note is said once, after the work succeeded: refusals found while reading a zip or loading
    a model stay one line, and a run that goes ahead says it (after its output), once per process."""
    monkeypatch.chdir(tmp_path)
    k = str(tiny_dirs["flux2-klein"])
    check(capsys, tmp_path, _one_line(zips / "crc.zip", k), "is damaged")
    check(capsys, tmp_path, gen(str(inputs / "corrupt-model")), "is not a valid safetensors file")
    code, _, err = run(capsys, *gen(k, "--steps", 1))
    assert code == 0, err
    if busy_machine > 1:  # one CPU is never shared: there is nothing to say
        assert err.count("busy machine") == 1, err
        code, _, err = run(capsys, *gen(k, "--steps", 1, out="out/y.png"))
        assert code == 0 and "busy machine" not in err, err


def test_batch_without_ray_writes_nothing(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    (tmp_path / "p.txt").write_text("a red circle\n")
    check(capsys, tmp_path, ["batch", tmp_path / "p.txt", "-m", "demo", "--engine", "ray", "--out", tmp_path / "b"],
          "pip install 'fluxlab[ray]'")


def test_an_animated_mask_is_said(inputs, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red circle", "-m", "demo", "--steps", 2, "--init", inputs / "good.png",
                       "--mask", inputs / "anim.webp", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "mask anim.webp is animated (2 frames); using the first frame" in err


def test_a_full_disk_while_quantizing_is_one_line(tmp_path, capsys):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        check(capsys, mnt, ["quantize", "demo", "--to", "q8_0", "-o", mnt / "demo.gguf"], "the disk is full")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
