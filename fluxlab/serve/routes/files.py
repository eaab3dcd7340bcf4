"""Uploads (/v1/files) and what jobs made (/v1/outputs): only ever the caller's own, never by a server path."""

import io
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from ..deps import Owner, Srv, base, caller
from ..http import ApiError, iso, public
from ..schemas import ERRORS, FileInfo
from ..uploads import save_upload

files = APIRouter(prefix="/v1/files", tags=["files"], responses=ERRORS)
outputs = APIRouter(prefix="/v1/outputs", tags=["outputs"], responses=ERRORS)


CONTENT_TYPES = {"image": "image/png", "zip": "application/zip", "lora": "application/octet-stream"}


def file_info(f: dict, base: str) -> dict:
    """fluxlab's fields and Replicate's (content_type, size, checksums, urls.get: what its clients read)."""
    suffix = Path(f["name"]).suffix.lower()
    content_type = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(suffix) \
        if f["kind"] == "image" else None
    return {"id": f["id"], "name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"], "kind": f["kind"],
            "created_at": iso(f["created_at"]), "content_type": content_type or CONTENT_TYPES[f["kind"]],
            "size": f["bytes"], "etag": f["sha256"][:32], "checksums": {"sha256": f["sha256"]},
            "metadata": f.get("metadata") or {}, "expires_at": None, "urls": {"get": f"{base}/v1/files/{f['id']}"}}


@files.post("", status_code=201, response_model=FileInfo)
def upload(who: Owner, srv: Srv, request: Request,
           file: Annotated[UploadFile | None, File(description="An image (PNG, JPEG, WebP), a zip or a LoRA")] = None,
           content: Annotated[UploadFile | None, File(description="The same, under Replicate's field name")] = None,
           metadata: Annotated[UploadFile | str | None, Form(description="A JSON object kept with it (a field or "
                                                                         "a part, as Replicate's clients send it)")]
           = None):
    """Upload an input: an image (references, init, mask), a zip of training images, or a LoRA .safetensors."""
    if (file is None) == (content is None):
        raise ApiError(422, "give the upload as one multipart field, `file` (or `content`)")
    meta = {}
    if not isinstance(metadata, str | None):
        metadata = metadata.file.read(10_001).decode("utf-8", "replace")
    if metadata:
        try:
            meta = json.loads(metadata) if len(metadata) <= 10_000 else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise ApiError(422, "metadata: give a JSON object")
    return file_info(save_upload(srv.store, srv.settings, file or content, who, meta), base(request))


@files.get("", response_model=dict)
def list_files(who: Owner, srv: Srv, request: Request) -> dict:
    """This token's uploads, newest first."""
    return {"results": [file_info(f, base(request)) for f in srv.store.files(who)], "next": None, "previous": None}


@files.get("/{file_id}", response_model=FileInfo)
def get_file(file_id: str, who: Owner, srv: Srv, request: Request):
    f = srv.store.file(file_id, who)
    if f is None:
        raise ApiError(404, f"no file {file_id!r}")
    return file_info(f, base(request))


@files.get("/{file_id}/content", response_class=Response, responses={200: {"content": {
    "image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/zip": {}, "application/octet-stream": {}}}})
def get_file_content(file_id: str, who: Owner, srv: Srv,
                     thumb: Annotated[int | None, Query(ge=16, le=1024)] = None):
    """An upload's own bytes, for its owner (`?thumb=128`: an image as a JPEG thumbnail): what the page shows for
    the init, mask and reference images it keeps."""
    f = srv.store.file(file_id, who)
    if f is None or not Path(f["path"]).is_file():
        raise ApiError(404, f"no file {file_id!r}")
    if thumb and f["kind"] == "image":
        return Response(thumbnail(f["path"], thumb), media_type="image/jpeg")
    return FileResponse(f["path"], media_type=file_info(f, "")["content_type"], filename=f["name"])


def thumbnail(path: str, side: int) -> bytes:
    """An image shrunk to fit side x side, as a JPEG."""
    from PIL import Image

    with Image.open(path) as im:
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@outputs.get("")
def list_outputs(who: Owner, srv: Srv, request: Request, before: Annotated[float | None, Query(ge=0, le=1e12)] = None,
                 limit: Annotated[int, Query(ge=1, le=200)] = 48,
                 q: Annotated[str | None, Query(max_length=200, description="Words the prompt contains.")] = None,
                 model: Annotated[str | None, Query(max_length=512, description="One model's images.")] = None,
                 lora: Annotated[str | None, Query(max_length=200, description=(
                     "Images made with one of your LoRAs (its name, training id or uploaded file id)."))] = None
                 ) -> dict:
    """This token's images, newest first (a gallery), each with its prompt and model; `q` searches the prompts,
    `model` keeps one model's, `lora` those made with a LoRA; `next` pages back in time."""
    from urllib.parse import urlencode

    sha = None
    if lora:
        row = srv.store.lora(lora, who) or srv.store.file(lora, who)
        if row is None or row.get("kind", "lora") != "lora":
            names = [r["name"] for r in srv.store.loras(who)]
            raise ApiError(422, f"lora: you have no LoRA {lora!r}; yours: {', '.join(names) or 'none'}")
        sha = row["sha256"]
    rows = srv.store.recent_outputs(who, before, limit + 1, q, model, sha)
    more = rows[limit:] != []
    rows = rows[:limit]
    b = base(request)
    items = [{"id": o["id"], "url": f"{b}/v1/outputs/{o['id']}", "thumb": f"{b}/v1/outputs/{o['id']}?thumb=256",
              "job": o["job_id"], "seed": o["seed"], "created_at": iso(o["created_at"]), "model": o["model"],
              "prompt": public(o["prompt"] or "", srv.settings)} for o in rows]
    extra = urlencode({k: v for k, v in (("q", q), ("model", model), ("lora", lora)) if v})
    return {"results": items, "next": f"{b}/v1/outputs?before={rows[-1]['created_at']}&limit={limit}"
            + (f"&{extra}" if extra else "") if more else None}


class Selection(BaseModel):
    ids: list[str] = Field(min_length=1, max_length=200, description="Output ids: your images.")


@outputs.post("/zip", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
def zip_outputs(body: Selection, who: Owner, srv: Srv) -> Response:
    """Several of your images in one zip (each as its PNG, with its record), in the order given."""
    import zipfile

    found = [(i, srv.store.output(i, who)) for i in dict.fromkeys(body.ids)]
    missing = [i for i, o in found if o is None or o["kind"] not in ("image", "cell") or not Path(o["path"]).is_file()]
    if missing:
        raise ApiError(404, f"no image {missing[0]!r}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
        for i, o in found:
            z.writestr(f"{i}.png", public_png(Path(o["path"]).read_bytes(), srv.settings))
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="images.zip"'})


@outputs.get("/{output_id}/record")
def output_record(output_id: str, who: Owner, srv: Srv) -> dict:
    """The settings an image was made with (its PNG's record; files by name, never by the server's path), and in
    `files` the ids of the caller's uploads that were its init, mask and reference images."""
    from ...service.outputs import read_record

    o = srv.store.output(output_id, who)
    if o is None or o["kind"] not in ("image", "cell") or not Path(o["path"]).is_file():
        raise ApiError(404, f"no image {output_id!r}")
    record = read_record(o["path"]).model_dump(mode="json", exclude_none=True)
    request = record.get("request", {})

    def upload(ref):  # the caller's own upload with these bytes, if it still has one: what "reuse" sends again
        f = srv.store.file_with(who, ref.get("sha256") or "", "image") if isinstance(ref, dict) else None
        return f["id"] if f else None

    files = {"init": upload(request.get("init")), "mask": upload(request.get("mask")),
             "images": [i for i in (upload(r) for r in request.get("images") or []) if i]}
    return {**json.loads(public(json.dumps(record), srv.settings)), "files": files}


@outputs.delete("/{output_id}")
def delete_output(output_id: str, who: Owner, srv: Srv) -> dict:
    """Delete an image (the file and its entry)."""
    o = srv.store.delete_output(output_id, who)
    if o is None:
        raise ApiError(404, f"no output {output_id!r}")
    Path(o["path"]).unlink(missing_ok=True)
    return {"deleted": output_id}


@outputs.get("/{output_id}", response_class=Response, responses={200: {"content": {
    "image/png": {}, "image/webp": {}, "image/jpeg": {}, "application/octet-stream": {}, "text/csv": {},
    "application/zip": {}, "application/json": {}}}})
def get_output(output_id: str, srv: Srv, request: Request,
               thumb: Annotated[int | None, Query(ge=16, le=1024)] = None,
               expires: Annotated[int | None, Query(ge=0, le=2**40)] = None,
               sig: Annotated[str | None, Query(max_length=64)] = None,
               authorization: Annotated[str | None, Header()] = None):
    """An output: the image in the format its request asked (PNG with fluxlab's record by default; `?thumb=256`:
    a JPEG thumbnail), a LoRA file or a CSV. Readable with the owner's token, or through the signed URL a job
    gives (`expires` and `sig`)."""
    from ..signing import valid

    who = None if valid(srv.store, output_id, expires, sig) else caller(request, srv, authorization).name
    o = srv.store.output(output_id, who)
    if o is None or not Path(o["path"]).is_file():
        raise ApiError(404, f"no output {output_id!r}")
    if o["kind"] == "lora":
        return FileResponse(o["path"], media_type="application/octet-stream", filename=Path(o["path"]).name)
    if o["kind"] == "csv":
        return FileResponse(o["path"], media_type="text/csv", filename="grid.csv")
    if o["kind"] in ("zip", "captions"):
        return FileResponse(o["path"], media_type="application/zip" if o["kind"] == "zip" else "application/json",
                            filename=Path(o["path"]).name)
    if thumb:
        return Response(thumbnail(o["path"], thumb), media_type="image/jpeg")
    data = public_png(Path(o["path"]).read_bytes(), srv.settings)
    job = srv.store.job(o["job_id"]) if o["kind"] == "image" else None
    fmt = (job["plan"].get("output") or {}) if job else {}
    if fmt.get("format") in ("webp", "jpg"):
        return Response(encode(data, fmt["format"], fmt["quality"]),
                        media_type="image/webp" if fmt["format"] == "webp" else "image/jpeg")
    return Response(data, media_type="image/png")


def encode(png: bytes, fmt: str, quality: int) -> bytes:
    """A PNG output as WebP or JPEG at `quality`, its fluxlab record (already free of server paths) in the EXIF
    ImageDescription, as ASCII JSON."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        record = im.text.get("fluxlab") if hasattr(im, "text") else None
        exif = Image.Exif()
        if record:
            exif[0x010E] = json.dumps({"fluxlab": json.loads(record)}, ensure_ascii=True)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="WEBP" if fmt == "webp" else "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


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
