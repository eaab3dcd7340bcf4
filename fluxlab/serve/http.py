"""What every route shares at the HTTP level: the one error type and its handlers (one line, no server path, no
5xx for a client's mistake), the request body limit, and the failed-login throttle."""

import contextlib
import errno
import json
import re
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import UserError


def iso(t: float | None) -> str | None:
    """A time as the API shows it: ISO 8601 in UTC with a Z."""
    import datetime as dt

    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


DISK_FULL = "the server's disk is full; nothing was kept; try again when space is freed"


def public(text: str, settings) -> str:
    """`text` with every server path replaced by its last part: a client never learns where the server keeps
    things (the data folder, temp folders, the local model folders it offers by name)."""
    if not text:
        return text
    for name, folder in getattr(settings, "models", {}).items():
        text = text.replace(str(folder), name)
    roots = {str(settings.data), str(Path(settings.data).resolve()), tempfile.gettempdir(),
             str(Path(tempfile.gettempdir()).resolve())}
    for root in sorted(roots, key=len, reverse=True):
        text = re.sub(re.escape(root) + r"[^\s'\",;)]*", lambda m: Path(m.group()).name or "(server)", text)
    return text


def install_handlers(app: FastAPI, settings) -> None:
    def answer(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": public(detail, settings)}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return answer(e.status, e.detail, e.headers)

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return answer(422, str(e))

    @app.exception_handler(OSError)
    async def os_error(request, e: OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return answer(507, DISK_FULL)
        raise e

    @app.exception_handler(sqlite3.OperationalError)
    async def db_error(request, e: sqlite3.OperationalError):
        if "full" in str(e):  # SQLITE_FULL: the disk, not the database
            return answer(507, DISK_FULL)
        raise e

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return answer(422, body_error(e.errors()[0]))


def body_error(err: dict) -> str:
    """One of pydantic's errors about a request body as the API's one line: where, what, and what was given."""
    from ..spec.typed import location

    where = location([p for p in err["loc"] if p != "body"]) or "body"
    given = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    text = f"{where}: {msg[0].lower()}{msg[1:]}" if where != "body" or err["type"] != "value_error" else msg
    if err["type"] not in ("missing", "value_error") and not isinstance(given, (dict, list)):
        text += f" (got {str(given)[:60]!r})"
    return text


class Throttle:
    """Failed logins (a wrong token or session) per client address: a burst of `burst`, then one per `every_s`
    seconds; past it, a wrong credential is answered 429 with Retry-After. A valid token is never refused, so one
    misbehaving client behind a shared address does not lock the others out."""

    def __init__(self, burst: int = 60, every_s: float = 1.0):
        self.burst, self.every_s = burst, every_s
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def _level(self, who: str, now: float) -> float:
        level, t = self.buckets.get(who, (0.0, now))
        return max(0.0, level - (now - t) / self.every_s)

    def failed(self, who: str) -> float:
        """Count a failure; the seconds to wait when over the limit, else 0."""
        now = time.monotonic()
        with self.lock:
            level = self._level(who, now) + 1
            self.buckets[who] = (level, now)
            if len(self.buckets) > 10_000:  # forget the quietest
                for k in [k for k, (lv, _) in self.buckets.items() if lv < 1][:5000]:
                    self.buckets.pop(k, None)
        # past the burst: the wait after which the next attempt is let through (the level drops one per every_s
        # and that attempt adds one)
        return 0.0 if level <= self.burst else (level + 1 - self.burst) * self.every_s


class BodyLimit:
    """Refuse request bodies over the limit (413) before they are read whole: JSON 1 MB by default, uploads by
    their kind's limit (checked again as they are saved)."""

    def __init__(self, app, default: int, uploads: int):
        self.app, self.default, self.uploads = app, default, uploads

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.uploads if scope["path"] == "/v1/files" else self.default
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            return await _too_large(send, limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit + 64 * 1024:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            with contextlib.suppress(Exception):
                await _too_large(send, limit)


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"the request body is over the {limit // 2**20} MB limit"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def check_origin(request: Request) -> None:
    """A request riding on the page's session cookie must come from this server's own pages: its Origin (or
    Referer) is this server. Other sites cannot make a browser act on a local server."""
    from urllib.parse import urlsplit

    origin = request.headers.get("origin")
    if not origin and request.headers.get("referer"):
        parts = urlsplit(request.headers["referer"])
        origin = f"{parts.scheme}://{parts.netloc}"
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own:
        raise ApiError(403, f"refused: a request from {origin or 'an unknown origin'} cannot act on this server "
                            f"with its session")
