"""Where images go and what they carry: output naming, PNG writing with metadata, and reading it back.

One module for every front end (CLI, Python API, grid, server, batch runner). Metadata goes into PNG text
chunks: `fluxlab` (the image record: request, model, runtime and what was resolved, as spec.record types),
`parameters` (the A1111-style text that image browsers and ComfyUI show) and, unless the run asks for
reproducible files, `fluxlab-timings` (so the same request can give byte-identical PNGs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write, check_file_target, check_writable
from ..spec.record import ImageRecord, parse_record

META_KEY = "fluxlab"
TIMINGS_KEY = "fluxlab-timings"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic")


def a1111_parameters(record: ImageRecord) -> str:
    r = record.request
    lines = [r.prompt if isinstance(r.prompt, str) else " | ".join(r.prompt)]
    if r.negative:
        lines.append(f"Negative prompt: {r.negative}")
    fields = [
        ("Steps", r.steps),
        ("Sampler", (r.sampler or "euler").capitalize()),
        ("CFG scale", r.guidance),
        ("Seed", r.seed),
        ("Size", f"{r.width}x{r.height}"),
        ("Model", record.model.name),
        ("Version", f"fluxlab {record.fluxlab}"),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image, path: Path, meta: dict, timings: dict | None = None) -> Path:
    """Write `image` atomically with `meta` (an image record's JSON, or any small dict for auxiliary images)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(META_KEY, json.dumps(meta, sort_keys=True, separators=(",", ":")))
    if "request" in meta:
        info.add_text("parameters", a1111_parameters(ImageRecord.model_validate(meta)))
    if timings is not None:
        info.add_text(TIMINGS_KEY, json.dumps(timings, sort_keys=True))
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return Path(path)


def read_text_chunks(path: str | Path) -> dict:
    """An image's text chunks, opened with the same pixel cap as every input image."""
    from ..spec.images import open_image

    im = open_image(path, "image")
    try:  # PNG text after the pixels is reached by reading through them: a truncated file fails here
        return dict(getattr(im, "text", {}) or {})
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UserError(f"{path} is damaged ({e}); its settings cannot be read") from None
    finally:
        im.close()


def read_record(path: str | Path) -> ImageRecord:
    """The typed record of a fluxlab PNG (with its timings when recorded), or one line saying what is wrong."""
    text = read_text_chunks(path)
    if META_KEY not in text:
        raise UserError(f"{path} has no fluxlab metadata (was it made by fluxlab?)")
    try:
        meta = json.loads(text[META_KEY])
        timings = json.loads(text[TIMINGS_KEY]) if TIMINGS_KEY in text else None
    except ValueError:
        raise UserError(f"{path} has corrupt fluxlab metadata (not JSON)") from None
    record = parse_record(meta, str(path))
    if isinstance(timings, dict):
        record = record.model_copy(update={"timings": timings})
    return record


_NUMBERED = re.compile(r"^(\d{5})-")


class FileOutput:
    """The CLI's naming: a .png path names the file (suffixed -1, -2... for several images); anything else is a
    folder whose files are numbered after the highest number already there, so they sort in generation order."""

    def __init__(self, out: str | None, reproducible: bool = False):
        self.out = out
        self.reproducible = reproducible
        suffix = Path(out).suffix.lower() if out else ""
        if suffix in IMAGE_SUFFIXES:
            raise UserError(f"--out {out}: fluxlab writes PNG files (the settings travel in PNG text chunks); "
                            f"use a .png name or a folder")

    def paths(self, seeds: list[int]) -> list[Path]:
        out, count = self.out, len(seeds)
        if out is not None and out.lower().endswith(".png"):
            p = Path(out)
            if count == 1:
                return [p]
            return [p.with_name(f"{p.stem}-{i + 1}{p.suffix}") for i in range(count)]
        d = Path(out or "outputs")
        if d.exists() and not d.is_dir():
            raise UserError(f"--out {out} is an existing file that is not a .png; give a folder or a .png path")
        start = 1
        if d.is_dir():
            nums = [int(m.group(1)) for f in d.iterdir() if (m := _NUMBERED.match(f.name))]
            start = max(nums, default=0) + 1
        return [d / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]

    def check(self, seeds: list[int]) -> list[Path]:
        """The paths, after checking (before any weights load) that they can be written."""
        paths = self.paths(seeds)
        if self.out is not None and self.out.lower().endswith(".png"):
            for p in paths:
                check_file_target(p, "--out")
        else:
            check_writable(paths[0].parent, "--out folder")
        return paths


def output_paths(out: str | None, count: int, seeds) -> list[Path]:
    return FileOutput(out).paths(list(seeds)[:count])


class Writer:
    """Writes a job's images to their paths in order; a failure names the last image that was written whole."""

    def __init__(self, paths: list[Path], reproducible: bool):
        self.paths, self.reproducible, self.done = list(paths), reproducible, []

    def write(self, result, index: int) -> Path:
        path = self.paths[index]
        try:
            save_png(result.image, path, result.metadata, None if self.reproducible else result.timings)
        except (UserError, OSError) as e:
            last = f"the last complete image is {self.done[-1]}" if self.done else "no image was written"
            reason = str(e) if isinstance(e, UserError) else (e.strerror or str(e))
            raise UserError(f"writing {path} failed ({reason}); {last}") from None
        self.done.append(path)
        return path
