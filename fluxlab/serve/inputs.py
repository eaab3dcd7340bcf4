"""Inputs given as files, in every form Replicate's clients send them: an uploaded file's id, that file's URL on
this server (what `files.create(...).urls["get"]` gives), a `data:` URI, or an http(s) URL elsewhere, fetched once
under the outbound policy (internal addresses refused) and kept as the caller's upload. The same bytes given
twice are one upload."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import tempfile
from types import SimpleNamespace
from urllib.parse import unquote_to_bytes, urlsplit

from ..errors import UserError
from .deps import Server, own_file
from .http import ApiError
from .uploads import save_upload

FILE_PATH = re.compile(r"/v1/files/(file_[a-z0-9]{1,64})/?$")
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "application/zip": ".zip",
              "application/x-zip-compressed": ".zip"}


def file_input(srv: Server, value, who: str, kinds: tuple, field: str) -> dict:
    """The caller's file row for an input value (422 naming `field` when it is none of the accepted forms)."""
    if isinstance(value, str) and value.startswith("data:"):
        return _keep(srv, who, kinds, field, *_data_uri(value, field))
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        m = FILE_PATH.search(urlsplit(value).path)
        if m and (f := srv.store.file(m.group(1), who)) is not None:
            return own_file(srv, f["id"], who, kinds, field)
        return _fetch(srv, value, who, kinds, field)
    return own_file(srv, value, who, kinds, field)


def _data_uri(value: str, field: str) -> tuple[bytes, str]:
    header, sep, payload = value[5:].partition(",")
    if not sep:
        raise ApiError(422, f"{field}: a data: URI needs a comma before its data")
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: the data: URI's base64 is not valid") from None
    mime = header.split(";")[0].strip().lower()
    return data, "input" + EXTENSIONS.get(mime, "")


def _keep(srv: Server, who: str, kinds: tuple, field: str, data: bytes, name: str) -> dict:
    return _stored(srv, who, kinds, field, hashlib.sha256(data).hexdigest(), name, io.BytesIO(data))


def _stored(srv: Server, who: str, kinds: tuple, field: str, sha: str, name: str, source) -> dict:
    """The caller's upload with these bytes (sha256), or a new one read from the binary file `source`."""
    f = next((f for k in kinds if (f := srv.store.file_with(who, sha, k)) is not None), None)
    if f is None:
        try:
            f = save_upload(srv.store, srv.settings, SimpleNamespace(filename=name, file=source), who)
        except UserError as e:
            raise ApiError(422, f"{field}: {e}") from None
    return own_file(srv, f["id"], who, kinds, field)


def _fetch(srv: Server, url: str, who: str, kinds: tuple, field: str) -> dict:
    from . import outbound

    limit = max(srv.settings.max_zip_bytes, srv.settings.max_image_bytes, srv.settings.max_lora_bytes)
    with tempfile.TemporaryFile(dir=srv.settings.data) as tmp:
        try:
            name = outbound.download(url, srv.settings.webhook_policy, field, tmp, limit, srv.settings.resolve)
        except UserError as e:
            raise ApiError(422, str(e)) from None
        tmp.seek(0)
        sha = hashlib.file_digest(tmp, "sha256").hexdigest()
        tmp.seek(0)
        return _stored(srv, who, kinds, field, sha, name, tmp)
