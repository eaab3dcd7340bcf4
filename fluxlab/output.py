"""Writing images with their metadata, atomically, and reading the metadata back.

Metadata goes into two PNG text chunks: `fluxlab` (canonical JSON, everything needed to regenerate the
image) and `parameters` (the A1111-style text that other tools, e.g. image browsers and ComfyUI, display).
Run-dependent timings go into a third chunk, `fluxlab-timings`, unless the caller asks for reproducible
files: then the same request gives byte-identical PNGs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .errors import UserError

META_KEY = "fluxlab"
TIMINGS_KEY = "fluxlab-timings"


def a1111_parameters(meta: dict) -> str:
    lines = [meta.get("prompt", "")]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    fields = [
        ("Steps", meta.get("steps")),
        ("Sampler", meta.get("sampler", "euler").capitalize()),
        ("CFG scale", meta.get("guidance")),
        ("Seed", meta.get("seed")),
        ("Size", f"{meta.get('width')}x{meta.get('height')}"),
        ("Model", meta.get("model")),
        ("Version", f"fluxlab {meta.get('fluxlab')}"),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result into place, so no reader ever sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image, path: Path, meta: dict, timings: dict | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(META_KEY, json.dumps(meta, sort_keys=True, separators=(",", ":")))
    info.add_text("parameters", a1111_parameters(meta))
    if timings is not None:
        info.add_text(TIMINGS_KEY, json.dumps(timings, sort_keys=True))
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return Path(path)


def read_metadata(path: str | Path) -> dict:
    """The fluxlab metadata of a PNG (with its timings under 'timings' when recorded)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(p) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable image ({e})") from None
    if META_KEY not in text:
        raise UserError(f"{path} has no fluxlab metadata (was it made by fluxlab?)")
    try:
        meta = json.loads(text[META_KEY])
        if TIMINGS_KEY in text:
            meta["timings"] = json.loads(text[TIMINGS_KEY])
    except ValueError:
        raise UserError(f"{path} has corrupt fluxlab metadata") from None
    return meta


_NUMBERED = re.compile(r"^(\d{5})-")


def output_paths(out: str | None, count: int, seeds) -> list[Path]:
    """Where `count` images go. A .png path names the file (suffixed -1, -2... for several images); anything
    else is a directory whose files are numbered after the highest number already there, so they sort in
    generation order."""
    if out is not None and out.lower().endswith(".png"):
        p = Path(out)
        if count == 1:
            return [p]
        return [p.with_name(f"{p.stem}-{i + 1}{p.suffix}") for i in range(count)]
    d = Path(out or "outputs")
    if d.exists() and not d.is_dir():
        raise UserError(f"--out {out} is an existing file that is not a .png; give a directory or a .png path")
    start = 1
    if d.is_dir():
        nums = [int(m.group(1)) for f in d.iterdir() if (m := _NUMBERED.match(f.name))]
        start = max(nums, default=0) + 1
    return [d / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
