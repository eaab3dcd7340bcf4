"""Benchmarks run in the project's .venv whatever python started them (`python bench/x.py` works as the README
writes it): a script calls `use()` first and is started again under .venv/bin/python when it is not already."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use() -> None:
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    python = venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"error: {venv} does not exist; run ./scripts/setup.sh first")
    os.execv(python, [str(python), *sys.argv])
