"""Files, safely: written atomically with the usual permissions, only where a user meant, nothing left behind;
and read with one-line answers when they are not what they should be.

Every file fluxlab writes (images, checkpoints, LoRAs, caches, settings) goes through `atomic_write`: the bytes
go to a hidden temp file beside the target, which is renamed over it only when complete, so a reader, a crash
or Ctrl-C never sees half a file. Every layer uses this module, so it imports nothing of fluxlab but errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

from .errors import UserError

TMP_SUFFIX = ".tmp"


def _umask_mode() -> int:
    """The mode a plain `open(..., "w")` would give a new file (mkstemp makes them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result into place, so no reader ever sees half a file.

    The temp file is removed on every way out (an error, Ctrl-C, a full disk); a kill -9 can still leave one,
    which `remove_stale_temps` cleans up when the folder is next used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or _full(path.parent)):
            # numpy's tofile reports a short write without an errno ("N requested and M written"): the free
            # space, read now, tells a full disk from another failure
            raise UserError(f"the disk is full: {path} was not written") from None
        raise


def remove_stale_temps(folder: Path, recursive: bool = False) -> int:
    """Delete temp files that an interrupted atomic_write left in `folder` (hidden, ending in .tmp)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}")
    n = 0
    for f in found:
        with contextlib.suppress(OSError):
            f.unlink()
            n += 1
    return n


def check_writable(folder: Path, what: str = "output folder") -> None:
    """Fail now, in one line, if files cannot be created in `folder` (creating it, as a write would).

    Creating and removing a temp file is the only honest test: permissions, read-only mounts, immutable
    folders, /proc and full disks all answer it.
    """
    folder = Path(folder)
    created = []  # folders made for the probe, removed after it: nothing is left if the run fails later
    probe = folder
    while not probe.exists() and not probe.is_symlink():
        created.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {folder} cannot be created: {probe} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fluxlab-probe.", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{what} {folder} is not writable ({reason})") from None
    finally:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()


def check_file_target(path: Path, what: str = "output file") -> None:
    """A file we are about to write: not an existing folder, and its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is an existing folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} exists and is not writable")
    check_writable(path.parent if str(path.parent) else Path("."), f"folder of {what} {path}")


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


def safe_name(name: str, what: str) -> str:
    """A name that becomes one path component (a run name, a preset, an upload): no separators, no '..',
    nothing hidden, at most 128 characters of letters, digits, '.', '_', '-' and spaces."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", "..") or name.endswith((" ", ".")):
        raise UserError(f"{what} {name!r} is not a valid name; use letters, digits, '.', '_', '-' and spaces "
                        f"(1-128 characters, starting with a letter or digit), no '/' or '..'")
    return name


def inside(root: Path, relative: str | Path, what: str) -> Path:
    """root / relative, refused unless the result stays inside root (after resolving '..' and links)."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise UserError(f"{what} {str(relative)!r} would leave {root}; refusing it")
    return target


def read_json(path: Path):
    """A JSON file, or one line naming it and what is wrong."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def check_safetensors(files) -> None:
    """Read each file's header; a truncated or corrupt file is named before any loading starts. (The numpy view:
    reading a header needs no torch.)"""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                st.keys()
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{f} is not a valid safetensors file ({reason})") from None
