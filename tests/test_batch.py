"""`fluxlab batch` on every engine: the same files, bit for bit; retried workers; a killed driver resumed; refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run
from PIL import Image

from fluxlab import batch

PROMPTS = ["a red circle in the center on a white background", "a blue square at the top on a black background",
           "a green triangle in the bottom left on a gray background", "a small yellow circle on a white background",
           "a purple square in the top right on a white background", "a large orange triangle in the center"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("# six prompts\n" + "\n".join(PROMPTS) + "\n")
    return p


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module: 4 logical CPUs on this 2-core machine, so two half-CPU actors always
    leave room for the dataset's own tasks."""
    import ray  # a test extra (setup.sh --test installs it)

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def plan(prompts, **kw):
    return batch.make_plan(prompts, "demo", seeds="0-3", steps=4, **kw)


def images(folder: Path) -> dict:
    """file name -> (pixels, record) of every image in a batch folder."""
    out = {}
    for f in sorted(folder.glob("*.png")):
        with Image.open(f) as im:
            out[f.name] = (np.asarray(im).copy(), json.loads(im.text["fluxlab"]))
    return out


@pytest.fixture(scope="module")
def local_run(prompts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    report = batch.run(plan(prompts), folder, engine="local")
    assert (report.made, report.failed, report.done_before) == (24, 0, 0)
    return folder


def same(a: Path, b: Path) -> None:
    x, y = images(a), images(b)
    assert sorted(x) == sorted(y) and len(x) == 24
    for name in x:
        assert np.array_equal(x[name][0], y[name][0]), name
        assert x[name][1] == y[name][1], name


def test_ray_gives_the_files_local_gives(prompts, local_run, ray_cluster, tmp_path):
    report = batch.run(plan(prompts), tmp_path, engine="ray", workers=2)
    assert report.engine == "ray" and report.made == 24 and report.failed == 0
    same(local_run, tmp_path)
    assert len(list((tmp_path / ".workers").iterdir())) == 2  # two actors, each loading the model once
    assert batch.verify(tmp_path) == []


def test_accelerate_gives_the_files_local_gives(prompts, local_run, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fluxlab", "batch", str(prompts),
                        "-m", "demo", "--seeds", "0-3", "--steps", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "engine accelerate" in r.stdout
    same(local_run, tmp_path)


def test_a_killed_worker_is_retried(prompts, local_run, ray_cluster, tmp_path):
    """One actor is killed (SIGKILL) mid-run; Ray restarts it and re-runs its batch: one file per item, equal to
    the local run."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=batch.run(plan(prompts), tmp_path, engine="ray",
                                                                            workers=2)))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("*.png"))) < 3:
        time.sleep(0.05)
    pids = [int(p.name.rsplit("-", 1)[1]) for p in (tmp_path / ".workers").iterdir()]
    os.kill(pids[0], signal.SIGKILL)
    worker.join(timeout=300)
    report = result["report"]
    assert report.failed == 0 and report.made + report.skipped == 24
    assert len(list((tmp_path / ".workers").iterdir())) >= 3  # the killed actor was started again
    assert not list(tmp_path.glob(".*.tmp"))
    same(local_run, tmp_path)


def test_a_killed_driver_resumes_with_only_what_is_missing(prompts, local_run, tmp_path, capsys):
    args = ["batch", str(prompts), "-m", "demo", "--seeds", "0-3", "--steps", "4", "--out", str(tmp_path),
            "--engine", "local"]
    proc = subprocess.Popen([sys.executable, "-m", "fluxlab", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("*.png"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    existing = len(list(tmp_path.glob("*.png")))
    assert 5 <= existing < 24
    report = batch.run(plan(prompts), tmp_path, engine="local")
    assert report.done_before == existing and report.made == 24 - existing  # only the unfinished ones
    code, out, err = run(capsys, "batch", "verify", tmp_path)
    assert code == 0 and "all 24 images present" in out, out + err
    same(local_run, tmp_path)
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in manifest) == list(range(24))


def test_other_settings_are_refused_and_a_bad_line_fails_alone(tmp_path, capsys):
    lines = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "steps": 0}, {"prompt": PROMPTS[2], "width": 100},
             {"prompt": PROMPTS[3], "steps": 2}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "out"
    code, text, err = run(capsys, "batch", jsonl, "-m", "demo", "--seeds", "1,2", "--steps", 3, "--out", out)
    assert code == 0, err
    s = batch.status(out)
    assert (s["total"], s["done"], s["failed"], s["pending"]) == (9, 4, 5, 0)
    reasons = {f["file"]: f["error"] for f in s["failures"]}
    assert any("steps 0 is out of range" in r for r in reasons.values())
    assert any("width 100 is not a multiple of 16" in r for r in reasons.values())
    assert any("is not JSON" in r for r in reasons.values())
    code, text, _ = run(capsys, "batch", "status", out)
    assert code == 0 and "4 done, 0 pending, 5 failed" in text
    code, _, err = run(capsys, "batch", jsonl, "-m", "demo", "--seeds", "1,2", "--steps", 4, "--out", out)
    assert code == 2 and "base.steps: 3 there, 4 now" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "batch", jsonl, "-m", "demo", "--seeds", "1,3", "--steps", 3, "--out", out)
    assert code == 2 and "the prompts or their seeds differ" in err
    code, _, err = run(capsys, "batch", jsonl, "-m", "demo", "--seeds", "x", "--out", out)
    assert code == 2 and "--seeds 'x'" in err


def test_a_batch_image_is_the_cli_image(prompts, local_run, tmp_path, capsys):
    code, _, err = run(capsys, "generate", PROMPTS[1], "-m", "demo", "--seed", 2, "--steps", 4, "--threads", 1,
                       "-o", tmp_path / "one.png")
    assert code == 0, err
    a, b = Image.open(tmp_path / "one.png"), Image.open(local_run / "000006-2.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert json.loads(a.text["fluxlab"]) == json.loads(b.text["fluxlab"])
