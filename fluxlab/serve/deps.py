"""The dependencies every router shares: the server's parts, who is calling (and their role), the caller's own
jobs, files and LoRAs, and the model names a request may use. A route declares what it needs
(`who: Owner`, `_: Admin`, `job: Annotated[dict, Depends(own_job("prediction"))]`) and gets it checked before it
runs, so a missing object is a 404 before any response starts (a stream included)."""

import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi import Path as PathParam

from .http import ApiError, Throttle, check_origin
from .settings import Settings
from .store import Store

SESSION_COOKIE = "fluxlab_session"


@dataclass
class Server:
    """What a request may reach: the store, the broker (the worker's queue), the settings, the login throttle."""

    store: Store
    broker: object
    settings: Settings
    throttle: Throttle
    # Set when the server begins to stop: event streams end by themselves then, instead of being cancelled
    closing: threading.Event = field(default_factory=threading.Event)


def server(request: Request) -> Server:
    return request.app.state.server


Srv = Annotated[Server, Depends(server)]


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def bearer_owner(srv: Server, authorization: str | None) -> str | None:
    """The owner of an `Authorization: Bearer <token>` header's active token, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    return srv.store.owner_of(token.strip()) if scheme.lower() == "bearer" and token.strip() else None


def caller(request: Request, srv: Srv, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The token's owner: from `Authorization: Bearer`, or from the page's session cookie, in which case a request
    that changes anything must come from this server's own pages (its Origin). A wrong credential counts against
    the client's address (429 past the throttle)."""
    token = (authorization or "").partition(" ")[2].strip()
    presented = bool(token) or (authorization is None and bool(request.cookies.get(SESSION_COOKIE)))
    name = bearer_owner(srv, authorization)
    if name is None and authorization is None and request.cookies.get(SESSION_COOKIE):
        name = srv.store.session_owner(request.cookies[SESSION_COOKIE])
        if name is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
            check_origin(request)
    if name is None:
        wait = srv.throttle.failed(request.client.host if request.client else "?") if presented else 0
        if wait:
            raise ApiError(429, f"too many failed logins from this address; wait {wait:.0f} s",
                           {"Retry-After": str(max(1, round(wait)))})
        raise ApiError(401, "missing or invalid token: send Authorization: Bearer <token> (create one with "
                            "`fluxlab token create NAME`)", {"WWW-Authenticate": "Bearer"})
    return Caller(name, srv.store.role(name) or "user")


Who = Annotated[Caller, Depends(caller)]


def owner(who: Who) -> str:
    return who.name


Owner = Annotated[str, Depends(owner)]


def admin(who: Who) -> Caller:
    if not who.admin:
        raise ApiError(403, f"the token {who.name!r} is not an admin token; this needs one (fluxlab token create "
                            f"NAME --admin)")
    return who


Admin = Annotated[Caller, Depends(admin)]
KINDS = {"prediction": "predictions", "training": "trainings", "batch": "batches", "grid": "grids",
         "caption": "captions", "upsample": "upsamples", "download": "downloads"}


def own_job(kind: str):
    """A dependency that reads the path's `{kind}_id` and gives the caller's job of that kind, or 404."""
    param = f"{kind}_id"

    def dependency(srv: Srv, who: Owner, **path) -> dict:
        job = srv.store.job(path[param])
        if job is None or job["owner"] != who or job["kind"] != kind:
            raise ApiError(404, f"no {kind} {path[param]!r}")
        return job

    dependency.__signature__ = inspect.Signature([
        inspect.Parameter("srv", inspect.Parameter.KEYWORD_ONLY, annotation=Srv),
        inspect.Parameter("who", inspect.Parameter.KEYWORD_ONLY, annotation=Owner),
        inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[str, PathParam(max_length=64)])])
    dependency.__name__ = f"own_{kind}"
    return dependency


def base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def own_file(srv: Server, file_id, who: str, kinds: tuple, field: str) -> dict:
    f = srv.store.file(file_id, who) if isinstance(file_id, str) else None
    if f is None or f["kind"] not in kinds:
        raise ApiError(422, f"{field}: no uploaded {' or '.join(kinds)} {file_id!r} (upload it to /v1/files and "
                            f"pass its id)")
    return f


def named_loras(srv: Server, items: list, who: str) -> list:
    """input.lora entries ({name, scale}) as LoraRefs to the owner's trained or uploaded LoRA files."""
    from ..spec.request import LoraRef
    from ..spec.typed import validate

    loras = []
    for i, lo in enumerate(items):
        row = srv.store.lora(lo["name"], who) or srv.store.file(lo["name"], who)
        if row is None or row.get("kind", "lora") != "lora":
            raise ApiError(422, f"input.lora[{i}].name: no LoRA, training or uploaded LoRA file named "
                                f"{lo['name']!r}")
        loras.append(validate(LoraRef, {"path": row["path"], "scale": lo.get("scale", 1.0),
                                        "sha256": row["sha256"]}, f"input.lora[{i}]"))
    return loras


def model_name(srv: Server, name: str) -> str:
    from ..spec.catalog import CATALOG

    if name in srv.settings.models:
        return str(Path(srv.settings.models[name]).resolve())
    if name in CATALOG:
        return name
    valid = ", ".join([*CATALOG, *srv.settings.models])
    raise ApiError(422, f"model: unknown model {name!r}; valid: {valid}")


def check_limits(srv: Server, who: str) -> None:
    if srv.store.pending_count(who) >= srv.settings.max_pending_per_token:
        raise ApiError(429, f"this token has {srv.settings.max_pending_per_token} pending jobs, the most allowed; "
                            f"wait for some to finish", {"Retry-After": "5"})
    if srv.store.pending_count() >= srv.settings.max_pending:
        raise ApiError(429, f"the queue holds {srv.settings.max_pending} pending jobs, the most allowed",
                       {"Retry-After": "5"})
