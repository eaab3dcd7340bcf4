"""Every shell block of the README runs as written, in a fresh folder laid out like a clone (its .venv, scripts and
examples linked in), with the demo model: a block that exits non-zero fails the test. Blocks that need real weights,
the hub, or the better part of an hour are marked `<!-- readme-test: skip: why -->` in the README; the test command
itself is what CI runs. The server block's port is replaced by a free one and its background server stopped after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from serving import free_port

ROOT = Path(__file__).resolve().parent.parent
LINKED = (".venv", "scripts", "examples", "bench", "pyproject.toml", "fluxlab")


def blocks() -> list[tuple[int, str, str | None]]:
    """(line, text, why skipped or None) of each ```sh block."""
    text = (ROOT / "README.md").read_text()
    found = []
    for m in re.finditer(r"```sh\n(.*?)```", text, re.S):
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1]
        line = text[:m.start()].count("\n") + 1
        skip = re.match(r"<!-- readme-test: skip: (.*?) -->", before)
        why = skip.group(1) if skip else ("the test command: CI runs it" if "test-command" in before else None)
        found.append((line, m.group(1), why))
    return found


BLOCKS = blocks()


def test_the_readme_marks_what_it_skips():
    """Each skipped block says why, and the ones a newcomer runs first (quick start, server, batches) are run."""
    skipped = [why for _, _, why in BLOCKS if why]
    assert all(len(why) > 10 for why in skipped), skipped
    ran = [text for _, text, why in BLOCKS if why is None]
    assert any("-m demo -o circle.png" in t for t in ran) and any("fluxlab serve" in t for t in ran)
    assert any("fluxlab batch" in t for t in ran)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[2] is None], ids=lambda b: f"README line {b[0]}")
def test_a_readme_block_runs_as_written(block, tmp_path):
    line, text, _ = block
    folder = tmp_path / "clone"
    folder.mkdir()
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    port = str(free_port())
    script = text.replace("7860", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "FLUXLAB_", "RAY_"))}
    env.update(HOME=str(tmp_path / "home"), FLUXLAB_DATA=str(tmp_path / "data"), HF_HUB_OFFLINE="1",
               PATH=":".join(p for p in env["PATH"].split(":") if ".venv" not in p))
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if "ray start" in text:  # whatever happened, no cluster outlives the block
            subprocess.run([str(ROOT / ".venv/bin/ray"), "stop", "--force"], capture_output=True, env=env)
        subprocess.run(["pkill", "-f", f"--port {port}"], capture_output=True)
    assert proc.returncode == 0, f"README line {line}: exit {proc.returncode}\n{output[-3000:]}"
    for name in re.findall(r"-o (\S+\.png)", text):
        assert (folder / name).stat().st_size > 100, name
