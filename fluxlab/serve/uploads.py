"""Uploads: streamed to disk within their kind's limit, checked as fluxlab will use them (an image's header and
structure, a zip's members, a LoRA's safetensors header) and kept under a new id. Anything refused leaves nothing
behind. Images are not decoded here (the worker decodes what it uses), and at most two are verified at once,
so many concurrent large uploads cannot exhaust the API process's memory."""

import hashlib
import json
import os
import shutil
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

from ..errors import UserError
from .http import ApiError
from .settings import Settings
from .store import Store, new_id

DECODING = threading.BoundedSemaphore(2)


def sniff(head: bytes) -> str | None:
    """What an upload is, from its first bytes."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "lora"
    return None


def check_lora_header(path: Path) -> None:
    """A LoRA upload, checked from its safetensors header alone (no tensors loaded in the API process)."""
    import struct

    from ..runtime.loras import detect_format

    with open(path, "rb") as f:
        try:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise UserError(f"the upload is not a valid safetensors file ({e})") from None
    keys = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    if not keys:
        raise UserError("the LoRA upload holds no tensors")
    detect_format([k for k in keys if k.split(".", 1)[0] not in ("text_encoder", "text_encoder_2")] or keys)


def check_zip(target: Path, name: str) -> None:
    from ..train.data import check_archive

    try:
        with zipfile.ZipFile(target) as zf:
            check_archive(Path(name), zf)
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise UserError(f"{name} is not a readable zip file ({e})") from None
    if bad is not None:
        raise UserError(f"{name} is damaged (member {bad!r} fails its CRC)")


def save_upload(store: Store, settings: Settings, upload, who: str, metadata: dict | None = None) -> dict:
    """Stream an upload (anything with `.filename` and a binary `.file`) to disk within its kind's limit, check it,
    keep it under its id."""
    from ..files import safe_name

    name = Path(upload.filename or "upload").name
    try:
        name = safe_name(name, "file name")
    except UserError:
        name = "upload" + "".join(c for c in Path(name).suffix[:8] if c.isalnum() or c == ".")
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=settings.data))
    try:
        target = tmp / name
        digest, size, kind, head = hashlib.sha256(), 0, None, b""
        with open(target, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                if kind is None:
                    head = chunk[:16]
                    kind = sniff(head)
                    if kind is None:
                        raise ApiError(422, f"{name}: not a PNG, JPEG or WebP image, a zip, or a LoRA .safetensors")
                size += len(chunk)
                limit = {"image": settings.max_image_bytes, "zip": settings.max_zip_bytes,
                         "lora": settings.max_lora_bytes}[kind]
                if size > limit:
                    raise ApiError(413, f"{name} is over the {limit // 2**20} MB limit for a {kind}")
                digest.update(chunk)
                out.write(chunk)
        if kind is None:
            raise ApiError(422, f"{name} is empty")
        suffix = {"zip": (".zip",), "image": (".png", ".jpg", ".jpeg", ".webp")}.get(kind)
        if suffix and not name.lower().endswith(suffix):  # what is used by its name (a dataset) needs the right one
            ext = ".zip" if kind == "zip" else ".png" if head[:4] == b"\x89PNG" else ".webp" if head[:4] == b"RIFF" \
                else ".jpg"
            name = Path(name).stem + ext
            target = target.rename(tmp / name)
        if kind == "image":
            from ..spec.images import inspect

            with DECODING:  # header and structure only: the pixels are decoded by the worker that uses them
                inspect(target, f"upload {name}", check_shape=False, decode=False)
        elif kind == "zip":
            check_zip(target, name)
        else:
            if not name.endswith(".safetensors"):
                name = Path(name).stem + ".safetensors"
                target = target.rename(tmp / name)
            check_lora_header(target)
        file_id_dir = settings.data / "files" / new_id()
        file_id_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(file_id_dir)
        return store.add_file(who, name, size, digest.hexdigest(), kind, str(file_id_dir / name), metadata)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep(data: Path) -> int:
    """Remove the half-written uploads a killed server left (their folders start with '.upload-')."""
    count = 0
    for p in Path(data).glob(".upload-*"):
        shutil.rmtree(p, ignore_errors=True)
        count += 1
    return count


def gather_images(files: list[dict], folder: Path) -> Path:
    """A training folder of uploaded images (linked, not copied, where the file system allows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        target = folder / f"{i:04d}-{Path(f['path']).name}"
        try:
            os.link(f["path"], target)
        except OSError:
            shutil.copyfile(f["path"], target)
    return folder
