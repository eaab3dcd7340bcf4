"""Shared fixtures: tiny random pipelines built once per test session (no download, a second or so each)."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network or the user's hub cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def run(capsys, *args):
    """Run the fluxlab CLI in-process; returns (exit code, stdout, stderr)."""
    from fluxlab.cli import main

    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="session", autouse=True)
def _isolated_hub_cache(tmp_path_factory):
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """kind -> path of a tiny diffusers-format pipeline (see fluxlab.tiny.KINDS)."""
    from fluxlab.tiny import KINDS, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {k: build_tiny(k, root / k) for k in KINDS}


@pytest.fixture(scope="session")
def tiny_pipes(tiny_dirs):
    """kind -> fluxlab Pipeline on CPU in fp32 (models stay loaded for the session)."""
    import fluxlab

    return {k: fluxlab.load(str(p), device="cpu", dtype="fp32", notify=lambda m: None) for k, p in tiny_dirs.items()}


@pytest.fixture(scope="session", autouse=True)
def _isolated_config(tmp_path_factory):
    """Tests never read or write the user's presets, templates or hardware profile."""
    os.environ.setdefault("FLUXLAB_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
