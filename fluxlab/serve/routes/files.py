"""Uploads (/v1/files) and what jobs made (/v1/outputs): only ever the caller's own, never by a server path."""

import io
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response

from ..deps import Owner, Srv, base
from ..http import ApiError, public
from ..jobs import iso
from ..schemas import ERRORS, FileInfo
from ..uploads import save_upload

files = APIRouter(prefix="/v1/files", tags=["files"], responses=ERRORS)
outputs = APIRouter(prefix="/v1/outputs", tags=["outputs"], responses=ERRORS)


def file_info(f: dict) -> dict:
    return {"id": f["id"], "name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"], "kind": f["kind"],
            "created_at": iso(f["created_at"])}


@files.post("", status_code=201, response_model=FileInfo)
def upload(file: Annotated[UploadFile, File(description="An image (PNG, JPEG, WebP), a zip or a LoRA")], who: Owner,
           srv: Srv):
    """Upload an input: an image (references, init, mask), a zip of training images, or a LoRA .safetensors."""
    return file_info(save_upload(srv.store, srv.settings, file, who))


@files.get("/{file_id}", response_model=FileInfo)
def get_file(file_id: str, who: Owner, srv: Srv):
    f = srv.store.file(file_id, who)
    if f is None:
        raise ApiError(404, f"no file {file_id!r}")
    return file_info(f)


@outputs.get("")
def list_outputs(who: Owner, srv: Srv, request: Request, before: Annotated[float | None, Query(ge=0, le=1e12)] = None,
                 limit: Annotated[int, Query(ge=1, le=200)] = 48) -> dict:
    """This token's images, newest first (a gallery); `next` pages back in time."""
    rows = srv.store.recent_outputs(who, before, limit + 1)
    more = rows[limit:] != []
    rows = rows[:limit]
    b = base(request)
    items = [{"id": o["id"], "url": f"{b}/v1/outputs/{o['id']}", "thumb": f"{b}/v1/outputs/{o['id']}?thumb=256",
              "job": o["job_id"], "seed": o["seed"], "created_at": iso(o["created_at"])} for o in rows]
    return {"results": items, "next": f"{b}/v1/outputs?before={rows[-1]['created_at']}&limit={limit}"
            if more else None}


@outputs.get("/{output_id}/record")
def output_record(output_id: str, who: Owner, srv: Srv) -> dict:
    """The settings an image was made with (its PNG's record; files by name, never by the server's path)."""
    from ...service.outputs import read_record

    o = srv.store.output(output_id, who)
    if o is None or o["kind"] not in ("image", "cell") or not Path(o["path"]).is_file():
        raise ApiError(404, f"no image {output_id!r}")
    record = read_record(o["path"]).model_dump(mode="json", exclude_none=True)
    return json.loads(public(json.dumps(record), srv.settings))


@outputs.delete("/{output_id}")
def delete_output(output_id: str, who: Owner, srv: Srv) -> dict:
    """Delete an image (the file and its entry)."""
    o = srv.store.delete_output(output_id, who)
    if o is None:
        raise ApiError(404, f"no output {output_id!r}")
    Path(o["path"]).unlink(missing_ok=True)
    return {"deleted": output_id}


@outputs.get("/{output_id}", response_class=Response, responses={200: {"content": {
    "image/png": {}, "image/jpeg": {}, "application/octet-stream": {}, "text/csv": {}}}})
def get_output(output_id: str, who: Owner, srv: Srv, thumb: Annotated[int | None, Query(ge=16, le=1024)] = None):
    """An output: a PNG with fluxlab's metadata (`?thumb=256`: a JPEG thumbnail), or a LoRA file."""
    o = srv.store.output(output_id, who)
    if o is None or not Path(o["path"]).is_file():
        raise ApiError(404, f"no output {output_id!r}")
    if o["kind"] == "lora":
        return FileResponse(o["path"], media_type="application/octet-stream", filename=Path(o["path"]).name)
    if o["kind"] == "csv":
        return FileResponse(o["path"], media_type="text/csv", filename="grid.csv")
    if thumb:
        from PIL import Image

        with Image.open(o["path"]) as im:
            im.thumbnail((thumb, thumb))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")
    return Response(public_png(Path(o["path"]).read_bytes(), srv.settings), media_type="image/png")


def public_png(data: bytes, settings) -> bytes:
    """The PNG with server paths taken out of its text chunks (the record names inputs and local models by path);
    the pixels and every other chunk are the bytes the worker wrote."""
    import struct
    import zlib

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = [data[:8]], 8
    while pos + 12 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos:pos + 12 + n]
        if kind in (b"tEXt", b"iTXt"):
            body = data[pos + 8:pos + 8 + n]
            key, _, rest = body.partition(b"\0")
            if kind == b"tEXt":
                new = key + b"\0" + public(rest.decode("latin-1"), settings).encode("latin-1", "replace")
            elif rest[:1] == b"\0":  # iTXt, uncompressed: flag, method, language\0, translated keyword\0, text
                lang, _, tail = rest[2:].partition(b"\0")
                trans, _, text = tail.partition(b"\0")
                new = key + b"\0" + rest[:2] + lang + b"\0" + trans + b"\0" + \
                    public(text.decode("utf-8", "replace"), settings).encode()
            else:
                new = body
            if new != body:
                chunk = struct.pack(">I", len(new)) + kind + new + struct.pack(">I", zlib.crc32(kind + new))
        out.append(chunk)
        pos += 12 + n
    return b"".join(out)
