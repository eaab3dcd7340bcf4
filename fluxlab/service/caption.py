"""service.caption: a caption beside every image of a training set that has none, for every front end (the CLI,
the trainer's auto_caption, the server's trainer).

A folder is captioned in place (IMAGE.txt beside IMAGE.png; an existing caption is kept unless `overwrite`); a zip
is never changed: it is captioned into a new folder, or a new zip when `out` ends in .zip. Every image is opened
and checked before anything is written, each caption is written atomically, and a dry run writes nothing. Events:
Loading, then one Captioned per image; a CancelToken stops between batches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .events import Loading, emit


@dataclass
class Captioned:
    """One image captioned (or kept): i of n."""

    i: int
    n: int
    image: str
    caption: str
    status: str  # written | kept | dry-run
    eta_s: float | None = None


@dataclass
class CaptionResult:
    folder: Path  # where the images and captions are
    captioner: str
    total: int
    rows: list[Captioned] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(r.status == "written" for r in self.rows)

    @property
    def kept(self) -> int:
        return sum(r.status == "kept" for r in self.rows)


def images_in(folder: Path) -> list[Path]:
    from ..train.data import IMAGE_EXTS

    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def caption(source: str | Path, captioner: str = "demo", *, trigger: str | None = None, detail: str = "short",
            prefix: str = "", suffix: str = "", overwrite: bool = False, dry_run: bool = False,
            out: str | Path | None = None, caption_ext: str = "txt", batch: int = 4, device: str = "cpu",
            events=None, cancel=None) -> CaptionResult:
    from ..caption.models import DETAILS, resolve
    from ..train.data import IMAGE_EXTS

    src = Path(source).expanduser()
    if detail not in DETAILS:
        raise UserError(f"--detail {detail!r}: valid: {', '.join(DETAILS)}")
    resolve(captioner)  # a captioner that is none is refused before anything else
    if not src.exists():
        raise UserError(f"{source}: no such folder, zip or image")
    single = src.is_file() and src.suffix.lower() in IMAGE_EXTS
    if src.is_file() and not single and src.suffix.lower() != ".zip":
        raise UserError(f"{source} is not a folder, a .zip or an image ({', '.join(sorted(IMAGE_EXTS))})")
    with tempfile.TemporaryDirectory(prefix="fluxlab-caption-") as scratch:
        if src.suffix.lower() == ".zip":
            target = _zip_target(src, out)
            folder = _extract(src, Path(scratch) / "set")
        else:
            if out is not None:
                raise UserError("--out is for a zip (a folder or image is captioned in place)")
            target, folder = None, src.parent if single else src
        files = [src] if single else images_in(folder)
        if not files:
            raise UserError(f"{source} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        _check_images(files, folder)
        ext = "." + caption_ext.lstrip(".")
        todo = [f for f in files if overwrite or not f.with_suffix(ext).exists()]
        if single and not todo:
            raise UserError(f"{src.with_suffix(ext)} exists; --overwrite replaces it")
        if todo and not dry_run and target is None and not os.access(folder, os.W_OK):
            raise UserError(f"{folder} is not writable; copy the images somewhere writable (or caption a zip of them "
                            f"into --out)")
        result = CaptionResult(target or folder, captioner, len(files))
        result.rows += [Captioned(i, len(files), _rel(f, folder), f.with_suffix(ext).read_text(
            encoding="utf-8", errors="replace").strip(), "kept")
            for i, f in enumerate((f for f in files if f not in todo), start=1)]
        if todo:
            _run(todo, folder, captioner, result, trigger, detail, prefix, suffix, ext, dry_run, batch, device,
                 events, cancel)
        if target is not None and not dry_run:
            _publish(folder, target)
    return result


def _rel(f: Path, folder: Path) -> str:
    return str(f.relative_to(folder)) if f.is_relative_to(folder) else f.name


def _run(todo, folder, captioner, result, trigger, detail, prefix, suffix, ext, dry_run, batch, device, events,
         cancel) -> None:
    from ..caption.models import load
    from ..files import atomic_write
    from ..spec.images import open_image

    emit(events, Loading(captioner))
    cap = load(captioner, device)
    try:
        start, done = time.perf_counter(), 0
        for k in range(0, len(todo), batch):
            if cancel is not None:
                cancel.check()
            chunk = todo[k:k + batch]
            opened = [open_image(f, "image") for f in chunk]
            try:
                texts = cap.caption(opened, detail)
            finally:
                for im in opened:
                    im.close()
            for f, text in zip(chunk, texts, strict=True):
                if trigger:
                    text = cap.with_trigger(text, trigger)
                text = "\n".join(f"{prefix}{line}{suffix}" for line in text.splitlines() if line.strip())
                if not dry_run:
                    atomic_write(f.with_suffix(ext), lambda tmp, t=text: Path(tmp).write_text(t + "\n"))
                done += 1
                eta = (time.perf_counter() - start) / done * (len(todo) - done)
                row = Captioned(len(result.rows) + 1, result.total, _rel(f, folder), text,
                                "dry-run" if dry_run else "written", eta)
                result.rows.append(row)
                emit(events, row)
    finally:
        cap.close()


def _check_images(files: list[Path], folder: Path) -> None:
    from ..spec.images import open_image

    for f in files:
        try:
            with open_image(f, f"image {_rel(f, folder)}") as im:
                im.verify()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"image {_rel(f, folder)} cannot be read ({type(e).__name__}); remove it or replace "
                            f"it") from None


def _zip_target(src: Path, out) -> Path:
    target = Path(out).expanduser() if out else src.with_name(src.stem + "-captioned")
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise UserError(f"{target} exists; a zip is captioned into a new folder or zip: choose another --out")
    if not os.access(target.parent if target.parent.exists() else Path.cwd(), os.W_OK):
        raise UserError(f"{target.parent} is not writable; choose another --out")
    return target


def _extract(archive: Path, dest: Path) -> Path:
    from ..train.data import safe_extract

    return safe_extract(archive, dest)


def _publish(folder: Path, target: Path) -> None:
    """The captioned set into place at once: a folder renamed in (copied where it crosses file systems), or a zip
    written to a temp file and renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".zip":
        import zipfile

        from ..files import atomic_write

        def write(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        z.write(f, f.relative_to(folder))

        atomic_write(target, write)
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.copytree(folder, staging, dirs_exist_ok=True)
    if target.exists():
        target.rmdir()  # checked empty above
    staging.rename(target)


def caption_dataset(source: str | Path, folder: Path, captioner: str, trigger: str | None, caption_ext: str = "txt",
                    detail: str = "short", device: str = "cpu", notify=print) -> Path:
    """A training dataset with a caption for every image, made once in `folder` (a run's captions/dataset-N): its
    images linked (or copied), their captions copied, the missing ones written by `captioner`. The source is
    left as it is; a second call (a resumed run) finds the folder and uses the same captions."""
    import os

    from ..train.data import safe_extract

    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dataset-", dir=folder.parent) as scratch:
        src = Path(source).expanduser()
        if src.is_file():
            src = safe_extract(src, Path(scratch) / "extracted")
        staging = Path(scratch) / "staging"
        ext = "." + caption_ext.lstrip(".")
        for f in images_in(src):
            target = staging / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
            if f.with_suffix(ext).is_file():
                shutil.copyfile(f.with_suffix(ext), target.with_suffix(ext))
        if not staging.is_dir():
            raise UserError(f"dataset {source} has no images to caption")
        result = caption(staging, captioner, trigger=trigger, caption_ext=caption_ext, detail=detail, device=device)
        notify(f"captioned {result.written} image(s) of {source} with {captioner} (kept {result.kept}); the "
               f"captions are in {folder}")
        staging.rename(folder)
    return folder
