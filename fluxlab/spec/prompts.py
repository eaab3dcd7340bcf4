"""Prompt files: one prompt per line, as every front end reads them (generate --prompt-file, batch)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"prompt file {path} is a folder, not a text file")
    if not p.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read prompt file {path} ({e.strerror or e})") from None
    if b"\0" in data:
        raise UserError(f"prompt file {path} contains NUL bytes; is it a text file (UTF-8)?")
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (blank lines and # comments are skipped)")
    return prompts
