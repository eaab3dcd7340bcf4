"""`fluxlab bench` on a tiny model: the table, the profile the planner reads, and --find-max's answers."""

from __future__ import annotations

import json

from conftest import run

import fluxlab
from fluxlab.service.bench import find_max


def test_bench_writes_a_profile(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(tmp_path))
    code, out, err = run(capsys, "bench", "-m", tiny_dirs["flux2-klein"], "--sizes", "64,96", "--steps", 2,
                         "--device", "cpu", "--cache", "fbc:0.2")
    assert code == 0, err
    assert "64x64" in out and "96x96" in out and out.count("fbc:0.2") == 2  # a cached row beside each size
    profile = json.loads((tmp_path / "hardware.json").read_text())
    sizes = [(m["width"], m["steps"]) for m in profile["measurements"]]
    assert sizes == [(64, 2), (96, 2)]
    assert all(m["seconds"]["denoise"] > 0 and m["peak_host_gb"] > 0 for m in profile["measurements"])


def test_bench_times_the_compiled_transformer_beside_the_plain_one(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUXLAB_CONFIG_DIR", str(tmp_path))
    code, out, err = run(capsys, "bench", "-m", tiny_dirs["flux2-klein"], "--sizes", "64", "--steps", 2,
                         "--device", "cpu", "--compile", "--cache", "taylorseer")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "64x64" in line]
    assert len(rows) == 4 and sum("to compile" in r for r in rows) == 2  # plain and cached, then both compiled
    profile = json.loads((tmp_path / "hardware.json").read_text())
    assert len(profile["measurements"]) == 1  # the machine's plain row only


def test_find_max_stops_at_the_budget(tiny_dirs):
    pipe = fluxlab.load(str(tiny_dirs["flux2-klein"]), device="cpu", dtype="fp32")
    assert find_max(pipe, budget=10 * 2**20) == (None, None, [])  # 10 MB: not even the reserve fits
