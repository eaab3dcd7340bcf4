"""Captioning: the demo captioner measured on held-out demo images, `fluxlab caption` on folders and zips, training
with --caption, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import run
from PIL import Image
from test_bad_input import png_bomb

from fluxlab.demo import data
from fluxlab.demo.lora import captions, ring_scenes


def rings(folder: Path, count: int = 6, seed: int = 0, with_captions: bool = False) -> list[data.Scene]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = ring_scenes(count, seed)
    for i, s in enumerate(scenes):
        data.render(s, seed=i).save(folder / f"ring_{i}.png")
        if with_captions:
            (folder / f"ring_{i}.txt").write_text("\n".join(captions(s)) + "\n")
    return scenes


def test_the_demo_captioner_names_colour_shape_and_place_of_held_out_images():
    """>= 95% of captions right on colour, shape and place (the issue's bar), over every held-out scene and as many
    rings; the whole caption (size and background too) is measured beside it."""
    from fluxlab.caption.models import DemoCaptioner

    cap = DemoCaptioner()
    scenes = list(data.scenes("heldout")) + ring_scenes(60, 7)
    right = whole = 0
    for i, s in enumerate(scenes):
        image = data.render(s, seed=1000 + i)
        got = cap.read(image)
        right += got is not None and (got.colour, got.shape, got.position) == (s.colour, s.shape, s.position)
        whole += cap.caption([image])[0] == s.caption
    assert len(scenes) > 140
    assert right / len(scenes) >= 0.95, right / len(scenes)
    assert whole / len(scenes) >= 0.90, whole / len(scenes)


def test_caption_a_folder_keeps_what_exists_and_the_trigger_once(tmp_path, capsys):
    scenes = rings(tmp_path / "set")
    (tmp_path / "set" / "ring_0.txt").write_text("mine, by hand\n")
    code, _, err = run(capsys, "caption", tmp_path / "set", "-m", "demo", "--trigger", "zxq", "--dry-run")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "set").glob("*.txt")) == ["ring_0.txt"] and "would write 5" in err
    code, _, err = run(capsys, "caption", tmp_path / "set", "-m", "demo", "--trigger", "zxq")
    assert code == 0, err
    assert (tmp_path / "set" / "ring_0.txt").read_text() == "mine, by hand\n"
    for i, s in enumerate(scenes[1:], start=1):
        assert (tmp_path / "set" / f"ring_{i}.txt").read_text() == s.caption.replace("ring", "zxq") + "\n"
    code, _, err = run(capsys, "caption", tmp_path / "set", "-m", "demo", "--trigger", "zxq", "--overwrite",
                       "--detail", "detailed", "--prefix", "photo: ")
    assert code == 0, err
    lines = (tmp_path / "set" / "ring_1.txt").read_text().splitlines()
    assert lines == ["photo: " + c for c in captions(scenes[1])]  # the demo's training lines, zxq in once


def test_caption_a_zip_into_a_new_folder_and_a_new_zip(tmp_path, capsys):
    rings(tmp_path / "src")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "src").iterdir()):
            z.write(f, f.name)
    before = archive.read_bytes()
    code, _, err = run(capsys, "caption", archive, "-m", "demo")
    assert code == 0, err
    folder = tmp_path / "set-captioned"
    assert len(list(folder.glob("*.txt"))) == len(list(folder.glob("*.png"))) == 6
    code, _, err = run(capsys, "caption", archive, "-m", "demo", "--out", tmp_path / "out.zip")
    assert code == 0, err
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        assert sorted(n for n in z.namelist() if n.endswith(".txt")) == [f"ring_{i}.txt" for i in range(6)]
    assert archive.read_bytes() == before
    code, _, err = run(capsys, "caption", archive, "-m", "demo")  # the folder exists now
    assert code == 2 and "set-captioned exists" in err


def test_train_captions_the_images_that_have_none(tmp_path, capsys):
    rings(tmp_path / "set")
    code, _, err = run(capsys, "train", "--images", tmp_path / "set", "--trigger", "zxq", "-m", "demo", "--steps", 2,
                       "--caption", "demo", "--out", tmp_path / "runs", "--name", "r")
    assert code == 0, err
    used = tmp_path / "runs" / "r" / "captions" / "dataset-0"
    assert len(list(used.glob("*.txt"))) == 6 and not list((tmp_path / "set").glob("*.txt"))
    assert "zxq" in (used / "ring_0.txt").read_text() and "captioned 6 image(s)" in err


def remote_code_folder(p: Path) -> Path:
    p.mkdir()
    (p / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoModel": "x.Y"}}))
    return p


def other_model_folder(p: Path) -> Path:
    p.mkdir()
    (p / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return p


def not_an_image(p: Path) -> Path:
    p.mkdir()
    (p / "photo.png").write_text("this is text")
    return p


def bomb_folder(p: Path) -> Path:
    p.mkdir()
    png_bomb(p / "huge.png", 20_000, 20_000)
    return p


def unsafe_zip(p: Path) -> Path:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("../escape.png", b"x")
    return p


def zip_bomb(p: Path) -> Path:
    """A member that expands 1000x: 20 MB of zeros in about 20 KB."""
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ring.png", b"\0" * 20_000_000)
    return p


def captioned_image(p: Path) -> Path:
    rings(p, count=1, with_captions=True)
    return p / "ring_0.png"


BAD = [  # (what, builder of the source, extra args, words in the one line)
    ("not an image", not_an_image, (), "photo.png"),
    ("over the pixel cap", bomb_folder, (), "huge.png"),
    ("an empty folder", lambda p: p.mkdir() or p, (), "has no images"),
    ("a zip that escapes", lambda p: unsafe_zip(p.with_suffix(".zip")), (), "unsafe member path"),
    ("a zip bomb", lambda p: zip_bomb(p.with_suffix(".zip")), (), "zip bomb"),
    ("an image model", lambda p: rings(p) and p, ("-m", "flux2-klein-4b"), "not a captioner"),
    ("remote code", lambda p: rings(p / "set") and p / "set", ("-m", "{remote}"), "remote code"),
    ("another kind of model", lambda p: rings(p / "set") and p / "set", ("-m", "{other}"), "not a captioner"),
    ("an unknown captioner", lambda p: rings(p) and p, ("-m", "blip-9000"), "unknown captioner"),
    ("a bad detail", lambda p: rings(p) and p, ("--detail", "poem"), "--detail"),
    ("an existing caption", captioned_image, (), "--overwrite"),
    ("a missing folder", lambda p: p / "nowhere", (), "no such"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    _, build, extra, words = case
    source = build(tmp_path / "src")
    subs = {"{remote}": str(remote_code_folder(tmp_path / "remote")), "{other}": str(other_model_folder(
        tmp_path / "other"))} if any("{" in a for a in extra) else {}
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    args = [subs.get(a, a) for a in extra]
    code, _, err = run(capsys, "caption", source, *(["-m", "demo"] if "-m" not in args else []), *args)
    assert code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_an_unwritable_folder_is_refused_before_anything_runs(tmp_path, capsys):
    """On a read-only mount (root can write anywhere else)."""
    rings(tmp_path / "src")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "src"), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        code, _, err = run(capsys, "caption", mnt, "-m", "demo")
        assert code == 2 and "not writable" in err, err
        assert not list(mnt.glob("*.txt"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert os.access(tmp_path / "src", os.W_OK)


def test_images_open_as_the_trainer_opens_them(tmp_path):
    """A caption is written next to a JPEG and a WebP too (the trainer's image extensions)."""
    from fluxlab.service.caption import caption

    folder = tmp_path / "mixed"
    folder.mkdir()
    s = ring_scenes(2, 3)
    data.render(s[0]).convert("RGB").save(folder / "a.jpg", quality=95)
    data.render(s[1]).save(folder / "b.webp", lossless=True)
    result = caption(folder, "demo")
    assert result.written == 2 and (folder / "a.txt").exists() and (folder / "b.txt").exists()
    assert Image.open(folder / "b.webp").size == (64, 64)


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory):
    from fluxlab.tiny import build_tiny_florence2

    return build_tiny_florence2(tmp_path_factory.mktemp("florence") / "tiny-florence2")


def test_a_florence2_folder_captions_in_batches_as_transformers_does(tiny_florence, tmp_path, capsys):
    """A tiny random Florence-2 (built from its config, offline): `fluxlab caption -m FOLDER` loads it with
    transformers' own classes, prompts <CAPTION>, captions six images in batches of four, and writes for each what
    the model generates for that image alone; the trigger goes first, once."""
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    rings(tmp_path / "set", count=6)
    code, _, err = run(capsys, "caption", tmp_path / "set", "-m", tiny_florence, "--trigger", "zxq")
    assert code == 0, err
    processor = AutoProcessor.from_pretrained(tiny_florence)
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence, dtype=torch.float32).eval()
    for i in range(6):
        image = Image.open(tmp_path / "set" / f"ring_{i}.png").convert("RGB")
        inputs = processor(text=["<CAPTION>"], images=[image], return_tensors="pt")
        ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=64,
                             num_beams=3, do_sample=False)
        text = processor.post_process_generation(processor.batch_decode(ids, skip_special_tokens=False)[0],
                                                 task="<CAPTION>", image_size=image.size)["<CAPTION>"].strip()
        assert (tmp_path / "set" / f"ring_{i}.txt").read_text() == f"zxq, {text}\n"
    code, _, err = run(capsys, "caption", tmp_path / "set", "-m", tiny_florence, "--detail", "detailed",
                       "--overwrite", "--dry-run")
    assert code == 0 and "would write 6" in err, err


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from serving import Server

    s = Server(tmp_path_factory.mktemp("serve-captions")).start()
    with s.client() as c:
        yield s, c
    s.stop()


def upload_zip(client, folder: Path, path: Path) -> dict:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
    with open(path, "rb") as f:
        r = client.post("/v1/files", files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return r.json()


def test_the_server_captions_an_upload_as_the_cli_does(api, tmp_path, capsys):
    _, client = api
    rings(tmp_path / "set")
    f = upload_zip(client, tmp_path / "set", tmp_path / "set.zip")
    r = client.post("/v1/captions", json={"model": "demo", "input": {"images": f["id"], "trigger_word": "zxq"}},
                    headers={"Prefer": "wait=60"})
    assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    served = {c["image"]: c["caption"] for c in r.json()["output"]["captions"]}
    code, _, err = run(capsys, "caption", tmp_path / "set", "-m", "demo", "--trigger", "zxq")
    assert code == 0, err
    assert served == {p.with_suffix(".png").name: p.read_text().strip() for p in (tmp_path / "set").glob("*.txt")}
    with zipfile.ZipFile(__import__("io").BytesIO(client.get(r.json()["output"]["zip"]).content)) as z:
        assert len([n for n in z.namelist() if n.endswith(".txt")]) == 6
    for model, words in (("flux2-klein-4b", "unknown captioner"), ("/etc", "unknown captioner")):
        r = client.post("/v1/captions", json={"model": model, "input": {"images": f["id"]}})
        assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_the_servers_trainer_autocaptions(api, tmp_path):
    """Replicate's trainer input autocaption: the images without captions are captioned (by the demo captioner for
    the demo) before training, and the captions used are kept in the run folder."""
    server, client = api
    rings(tmp_path / "set")
    f = upload_zip(client, tmp_path / "set", tmp_path / "set.zip")
    me = client.get("/v1/account").json()["username"]
    assert client.post("/v1/models", json={"owner": me, "name": "auto"}).status_code == 201
    trainer = client.get("/v1/models/fluxlab/lora-trainer").json()["latest_version"]["id"]
    r = client.post(f"/v1/models/fluxlab/lora-trainer/versions/{trainer}/trainings", json={
        "destination": f"{me}/auto", "input": {"input_images": f["id"], "trigger_word": "zxq", "steps": 2,
                                               "autocaption": True, "base_model": "fluxlab/demo"}})
    assert r.status_code == 201, r.text
    job = server.wait(client, r.json()["id"], "training")
    assert job["status"] == "succeeded", job
    assert "captioned by demo" in job["logs"]
    used = server.data / "trainings" / job["id"] / "captions" / "dataset-0"
    assert sorted(p.read_text() for p in used.glob("*.txt")) == sorted(
        s.caption.replace("ring", "zxq") + "\n" for s in ring_scenes(6, 0))


def test_a_qwen2_5_vl_folder_follows_its_instruction_per_image(tmp_path, capsys):
    """A tiny random Qwen2.5-VL (built from its config): loaded with transformers' own classes, prompted through its
    chat template with one image-pad token per merged patch (a wrong count is an error in generate), one caption
    per image, the same for the same pixels and another for other pixels."""
    from fluxlab.tiny import build_tiny_qwen2_5_vl

    folder = build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen")
    images = tmp_path / "set"
    images.mkdir()
    Image.new("RGB", (64, 64), (220, 40, 40)).save(images / "a.png")
    Image.new("RGB", (64, 64), (220, 40, 40)).save(images / "b.png")
    Image.new("RGB", (96, 64), (20, 20, 20)).save(images / "c.png")
    code, _, err = run(capsys, "caption", images, "-m", folder)
    assert code == 0, err
    a, b, c = ((images / f"{n}.txt").read_text() for n in "abc")
    assert a == b and a != c and a.strip()
    code, _, err = run(capsys, "caption", images, "-m", folder, "--detail", "detailed", "--overwrite")
    assert code == 0, err


def test_the_trigger_goes_in_once():
    from fluxlab.caption.models import Captioner, DemoCaptioner

    assert Captioner().with_trigger("a cat on a sofa", "zxq") == "zxq, a cat on a sofa"
    assert Captioner().with_trigger("zxq, a cat on a sofa", "zxq") == "zxq, a cat on a sofa"
    assert Captioner().with_trigger("a zxqy cat", "zxq") == "zxq, a zxqy cat"  # a word, not a substring
    assert DemoCaptioner().with_trigger("a red ring on the left", "zxq") == "a red zxq on the left"
    assert DemoCaptioner().with_trigger("a red circle on the left", "zxq") == "zxq, a red circle on the left"
