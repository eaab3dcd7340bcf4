"""The HTTP API of `fluxlab serve`: Replicate/cog-shaped predictions and trainings under /v1, files, outputs, the
queue, Server-Sent Events and webhooks; FastAPI in one process, the models in one worker process (serve.worker).

Every route but GET /v1/health needs `Authorization: Bearer <token>`; jobs, files and outputs belong to the token
that made them (anyone else gets 404). Requests name inputs by uploaded file id and models by name, never by a
server path. A request is checked by the same service.prepare the CLI uses, so a bad value gets the CLI's words,
as a 422, before anything is stored.
"""


import contextlib
import datetime as dt
import io
import json
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field, create_model

from .. import __version__
from ..errors import UserError
from ..spec.request import FileRef, GenerateRequest
from .settings import Settings
from .store import TERMINAL, LimitReached, Store, new_id

STATUS = Literal["starting", "processing", "succeeded", "failed", "canceled"]
SESSION_COOKIE = "fluxlab_session"
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


class Error(BaseModel):
    detail: str


ERRORS: dict = {code: {"model": Error, "description": text} for code, text in [
    (401, "missing or invalid token"), (403, "a cross-site request"), (404, "no such object for this token"),
    (409, "not possible now"),
    (413, "too large"), (422, "invalid input"), (429, "too many pending jobs")]}


# -- body models (derived from the spec objects: a field added there is accepted here) --------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoraInput(Body):
    name: str = Field(min_length=1, max_length=128, description="A training id, a LoRA name, or an uploaded file id.")
    scale: float = 1.0


def _prediction_input() -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, f in GenerateRequest.model_fields.items():
        annotation = f.annotation
        if annotation == FileRef | None:
            annotation = str | None  # an uploaded file's id
        elif annotation == list[FileRef] | None:
            annotation = list[str] | None
        fields[name] = (annotation, Field(f.default, description=f.description))
    fields["lora"] = (list[LoraInput] | None, Field(None, description="LoRAs to apply, with scales."))
    return create_model("PredictionInput", __base__=Body, **fields)


PredictionInput = _prediction_input()
WebhookEvent = Literal["start", "output", "logs", "completed"]


class PredictionCreate(Body):
    model: str = Field(min_length=1, max_length=512)
    input: PredictionInput
    webhook: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    webhook_events_filter: list[WebhookEvent] | None = None
    priority: int = Field(0, ge=0, le=10)


class TrainingInput(Body):
    input_images: str | list[str] = Field(description="The id of an uploaded zip of images (with .txt captions), "
                                                      "or the ids of uploaded images.")
    trigger_word: str = Field(min_length=1, max_length=200)
    steps: int = Field(1000, ge=1, le=100_000)
    name: str | None = Field(None, description="The LoRA's name (default: the training's id).")
    lora_rank: int | None = Field(None, ge=1, le=256)
    learning_rate: float | None = Field(None, gt=0, le=1)
    resolution: int | None = Field(None, ge=64, le=4096)
    config: str | None = Field(None, max_length=100_000, description="An ai-toolkit YAML (its paths are the server's).")


class TrainingCreate(Body):
    model: str = Field(min_length=1, max_length=512)
    input: TrainingInput
    webhook: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    webhook_events_filter: list[WebhookEvent] | None = None
    priority: int = Field(0, ge=0, le=10)


def _shared_input(name: str, drop: tuple) -> type[BaseModel]:
    """The prediction input without the fields a batch or grid sets itself."""
    fields = {k: (f.annotation, Field(f.default, description=f.description))
              for k, f in PredictionInput.model_fields.items() if k not in drop}
    return create_model(name, __base__=Body, **fields)


BatchInput = _shared_input("BatchInput", ("prompt", "seed", "seeds", "num_images", "images", "init", "mask"))
GridInput = _shared_input("GridInput", ("prompt", "seeds", "num_images", "images", "init", "mask"))


class BatchCreate(Body):
    model: str = Field(min_length=1, max_length=512)
    prompts: list[str] = Field(min_length=1, max_length=1000, description="One prompt per item group.")
    seeds: str | list[int] = Field("0", description="Seeds for every prompt: '0-7', '1,5,9' or a list.")
    input: BatchInput = Field(default_factory=lambda: BatchInput(), description="Settings every image shares.")
    webhook: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    webhook_events_filter: list[WebhookEvent] | None = None
    priority: int = Field(0, ge=0, le=10)


class GridCreate(Body):
    model: str = Field(min_length=1, max_length=512)
    prompt: str = Field(min_length=1, max_length=10_000)
    x: str = Field(min_length=3, max_length=2000, description="Column axis FIELD=V1,V2,... e.g. steps=10,25,50.")
    y: str | None = Field(None, max_length=2000, description="Row axis, e.g. guidance=3,7,12.")
    input: GridInput = Field(default_factory=lambda: GridInput(), description="Settings every cell shares.")
    priority: int = Field(0, ge=0, le=10)
    webhook: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    webhook_events_filter: list[WebhookEvent] | None = None


class Job(BaseModel):
    id: str
    model: str
    input: dict
    status: STATUS
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    output: list[str] | dict | None = None
    error: str | None = None
    metrics: dict = Field(default_factory=dict)
    urls: dict[str, str]
    queue_position: int | None = None
    progress: dict | None = None


class Page(BaseModel):
    next: str | None
    previous: str | None
    results: list[Job]


class FileInfo(BaseModel):
    id: str
    name: str
    bytes: int
    sha256: str
    kind: Literal["image", "zip", "lora"]
    created_at: str


# -- helpers ----------------------------------------------------------------------------------------------------
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


def iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


PATHS = {"prediction": "predictions", "training": "trainings", "batch": "batches", "grid": "grids"}


def _kind_path(kind: str) -> str:
    return PATHS[kind]


def render(store: Store, broker, job: dict, base: str = "") -> dict:
    path = f"{base}/v1/{_kind_path(job['kind'])}/{job['id']}"
    if job["kind"] in ("prediction", "batch"):
        output = [f"{base}/v1/outputs/{o['id']}" for o in store.outputs(job["id"], "image")] or None
    elif job["kind"] == "grid":
        output = {kind: [f"{base}/v1/outputs/{o['id']}" for o in store.outputs(job["id"], kind)]
                  for kind in ("cell", "sheet", "csv")}
    else:
        loras = store.outputs(job["id"], "lora")
        output = {"samples": [f"{base}/v1/outputs/{o['id']}" for o in store.outputs(job["id"], "sample")]}
        if loras:
            output |= {"weights": f"{base}/v1/outputs/{loras[0]['id']}",
                       "lora": job["plan"].get("lora_name") or job["id"]}
    obj = {"id": job["id"], "model": job["model"], "input": job["input"], "status": job["status"],
           "created_at": iso(job["created_at"]), "started_at": iso(job["started_at"]),
           "completed_at": iso(job["completed_at"]), "output": output, "error": job["error"],
           "metrics": job["metrics"], "urls": {"get": path, "cancel": f"{path}/cancel", "stream": f"{path}/stream"}}
    if job["status"] == "starting":
        obj["queue_position"] = store.position(job)
    if broker is not None and job["id"] in broker.progress:
        obj["progress"] = broker.progress[job["id"]]
    return obj


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
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise UserError("the LoRA upload holds no tensors")
    detect_format([k for k in keys if k.split(".", 1)[0] not in ("text_encoder", "text_encoder_2")] or keys)


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> FastAPI:
    import os

    from .broker import Broker

    settings = settings or Settings()
    store = Store(settings.data)
    if os.environ.get("FLUXLAB_TOKEN"):
        store.ensure_token("env", os.environ["FLUXLAB_TOKEN"])
    broker = Broker(store, settings.worker(), lambda job: render(store, None, job))

    @asynccontextmanager
    async def lifespan(app):
        broker.start()
        try:
            yield
        finally:
            broker.stop()

    app = FastAPI(title="fluxlab", version=__version__, lifespan=lifespan,
                  description="Predictions, trainings, files and outputs of a fluxlab server.")
    app.state.store, app.state.broker, app.state.settings = store, broker, settings
    app.add_middleware(BodyLimit, default=settings.max_json_bytes,
                       uploads=max(settings.max_zip_bytes, settings.max_lora_bytes, settings.max_image_bytes))

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        from ..spec.typed import location

        err = e.errors()[0]
        where = location([p for p in err["loc"] if p != "body"]) or "body"
        given = err.get("input")
        text = f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}"
        if err["type"] != "missing" and not isinstance(given, (dict, list)):
            text += f" (got {str(given)[:60]!r})"
        return JSONResponse({"detail": text}, status_code=422)

    def owner(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
        """The token's owner: from `Authorization: Bearer`, or from the page's session cookie, in which case a
        request that changes anything must come from this server's own pages (its Origin)."""
        scheme, _, token = (authorization or "").partition(" ")
        name = store.owner_of(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if name is None and authorization is None and request.cookies.get(SESSION_COOKIE):
            name = store.session_owner(request.cookies[SESSION_COOKIE])
            if name is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
                check_origin(request)
        if name is None:
            raise ApiError(401, "missing or invalid token: send Authorization: Bearer <token> (create one with "
                                "`fluxlab token create NAME`)", {"WWW-Authenticate": "Bearer"})
        return name

    Owner = Annotated[str, Depends(owner)]

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def own_job(job_id: str, who: str, kind: str) -> dict:
        job = store.job(job_id)
        if job is None or job["owner"] != who or job["kind"] != kind:
            raise ApiError(404, f"no {kind} {job_id!r}")
        return job

    def file_path(file_id: str, who: str, kinds: tuple, field: str) -> dict:
        f = store.file(file_id, who) if isinstance(file_id, str) else None
        if f is None or f["kind"] not in kinds:
            raise ApiError(422, f"{field}: no uploaded {' or '.join(kinds)} {file_id!r} (upload it to /v1/files "
                                f"and pass its id)")
        return f

    def named_loras(items: list, who: str) -> list:
        """input.lora entries ({name, scale}) as LoraRefs to the owner's trained or uploaded LoRA files."""
        from ..spec.request import LoraRef
        from ..spec.typed import validate

        loras = []
        for i, lo in enumerate(items):
            row = store.lora(lo["name"], who) or store.file(lo["name"], who)
            if row is None or row.get("kind", "lora") != "lora":
                raise ApiError(422, f"input.lora[{i}].name: no LoRA, training or uploaded LoRA file named "
                                    f"{lo['name']!r}")
            loras.append(validate(LoraRef, {"path": row["path"], "scale": lo.get("scale", 1.0),
                                            "sha256": row["sha256"]}, f"input.lora[{i}]"))
        return loras

    def model_name(name: str) -> str:
        from ..spec.catalog import CATALOG

        if name in settings.models:
            return str(Path(settings.models[name]).resolve())
        if name in CATALOG:
            return name
        valid = ", ".join([*CATALOG, *settings.models])
        raise ApiError(422, f"model: unknown model {name!r}; valid: {valid}")

    def check_limits(who: str) -> None:
        if store.pending_count(who) >= settings.max_pending_per_token:
            raise ApiError(429, f"this token has {settings.max_pending_per_token} pending jobs, the most allowed; "
                                f"wait for some to finish", {"Retry-After": "5"})
        if store.pending_count() >= settings.max_pending:
            raise ApiError(429, f"the queue holds {settings.max_pending} pending jobs, the most allowed",
                           {"Retry-After": "5"})

    # -- predictions ---------------------------------------------------------------------------------------
    def prediction_plan(body: PredictionCreate, who: str, job_id: str) -> dict:
        from ..service.generate import prepare
        from ..spec.request import ModelRef, Runtime
        from ..spec.typed import validate

        fields = body.input.model_dump(exclude_unset=True)
        loras = fields.pop("lora", None) or []
        for key in ("init", "mask"):
            if fields.get(key) is not None:
                f = file_path(fields[key], who, ("image",), f"input.{key}")
                fields[key] = {"path": f["path"], "sha256": f["sha256"]}
        if fields.get("images"):
            fields["images"] = [(lambda f: {"path": f["path"], "sha256": f["sha256"]})(
                file_path(x, who, ("image",), f"input.images[{i}]")) for i, x in enumerate(fields["images"])]
        refs = named_loras(loras, who)
        request = validate(GenerateRequest, fields, "input")
        ref = ModelRef(name=model_name(body.model), loras=tuple(refs))
        prep = prepare(request, ref, Runtime(), check_files=False)
        concrete = request.model_copy(update={"seeds": list(prep.job.seeds), "seed": None, "num_images": None})
        return {"request": concrete.model_dump(mode="json", exclude_none=True),
                "model": ref.model_dump(mode="json", exclude_none=True),
                "out": str(settings.data / "outputs" / job_id), "images": prep.job.count}

    def create(kind: str, body, who: str, job_id: str, plan_of, request: Request) -> Response:
        existing = store.job(job_id)
        if existing is not None:
            if existing["owner"] != who or existing["kind"] != kind:
                raise ApiError(409, f"the id {job_id!r} is taken")
            return JSONResponse(render(store, broker, existing, base(request)), status_code=200)
        check_limits(who)
        plan = plan_of(body, who, job_id)
        given = body.input.model_dump(mode="json", exclude_unset=True)
        for key in ("prompt", "prompts", "seeds", "x", "y"):  # a grid's or batch's own fields, kept with its input
            if key in type(body).model_fields and getattr(body, key) is not None:
                given[key] = getattr(body, key)
        try:
            job = store.add_job(job_id, kind, who, body.model, given,
                                plan, body.webhook, body.webhook_events_filter, body.priority,
                                limits=(settings.max_pending_per_token, settings.max_pending))
        except LimitReached as e:
            raise ApiError(429, str(e), {"Retry-After": "5"}) from None
        if job is None:  # a concurrent PUT with the same id won
            return JSONResponse(render(store, broker, store.job(job_id), base(request)), status_code=200)
        broker.submitted()
        return JSONResponse(render(store, broker, job, base(request)), status_code=201,
                            headers={"Location": f"{base(request)}/v1/{_kind_path(kind)}/{job_id}"})

    async def respond(response: JSONResponse, kind: str, prefer: str | None, request: Request) -> Response:
        """`Prefer: wait=N` holds the answer until the job ends or N seconds pass (at most max_wait_s)."""
        if prefer and response.status_code in (200, 201):
            wait = _prefer_wait(prefer, settings.max_wait_s)
            if wait:
                job_id = json.loads(response.body)["id"]
                await broker.wait(job_id, wait)
                location = {"Location": response.headers["location"]} if "location" in response.headers else {}
                return JSONResponse(render(store, broker, store.job(job_id), base(request)),
                                    status_code=response.status_code, headers=location)
        return response

    def cancel_own(job_id: str, who: str, kind: str, request: Request) -> dict:
        """Cancel the caller's job of `kind` (broker.cancel); the job as it is now."""
        job = own_job(job_id, who, kind)
        broker.cancel(job["id"])
        return render(store, broker, store.job(job["id"]), base(request))

    @app.post("/v1/predictions", status_code=201, response_model=Job, responses=ERRORS, tags=["predictions"])
    async def create_prediction(body: PredictionCreate, who: Owner, request: Request,
                                prefer: Annotated[str | None, Header()] = None):
        """Queue a prediction. `Prefer: wait=N` answers when it ends (or after N seconds)."""
        from starlette.concurrency import run_in_threadpool

        response = await run_in_threadpool(create, "prediction", body, who, new_id(), prediction_plan, request)
        return await respond(response, "prediction", prefer, request)

    @app.put("/v1/predictions/{prediction_id}", status_code=201, response_model=Job, responses=ERRORS,
             tags=["predictions"])
    async def put_prediction(prediction_id: str, body: PredictionCreate, who: Owner, request: Request,
                             prefer: Annotated[str | None, Header()] = None):
        """Create with a chosen id; the same id again returns the existing prediction (idempotent)."""
        import re

        from starlette.concurrency import run_in_threadpool

        if not re.match(ID_PATTERN, prediction_id):
            raise ApiError(422, f"prediction id {prediction_id!r} is not valid: 1-64 lowercase letters, digits, "
                                f"'-' or '_'")
        response = await run_in_threadpool(create, "prediction", body, who, prediction_id, prediction_plan, request)
        return await respond(response, "prediction", prefer, request)

    @app.get("/v1/predictions/{prediction_id}", response_model=Job, responses=ERRORS, tags=["predictions"])
    def get_prediction(prediction_id: str, who: Owner, request: Request):
        return render(store, broker, own_job(prediction_id, who, "prediction"), base(request))

    @app.get("/v1/predictions", response_model=Page, responses=ERRORS, tags=["predictions"])
    def list_predictions(who: Owner, request: Request, cursor: Annotated[str | None, Query(max_length=32)] = None,
                         limit: Annotated[int, Query(ge=1, le=100)] = 100):
        """Newest first, `limit` at a time; `next` is the URL of the following page."""
        return page(store, broker, who, "prediction", cursor, limit, base(request))

    @app.post("/v1/predictions/{prediction_id}/cancel", response_model=Job, responses=ERRORS, tags=["predictions"])
    def cancel_prediction(prediction_id: str, who: Owner, request: Request):
        return cancel_own(prediction_id, who, "prediction", request)

    @app.get("/v1/predictions/{prediction_id}/stream", response_class=EventSourceResponse, responses=ERRORS,
             tags=["predictions"])
    async def stream_prediction(prediction_id: str, who: Owner, request: Request,
                                last_event_id: Annotated[str | None, Header()] = None):
        """Server-Sent Events: status, progress {step, total, eta_s}, preview {step, url}, output, done."""
        own_job(prediction_id, who, "prediction")
        async for event in stream(prediction_id, last_event_id):
            yield event

    @app.get("/v1/predictions/{prediction_id}/preview", responses=ERRORS | {200: {"content": {"image/jpeg": {}}}},
             response_class=Response, tags=["predictions"])
    def preview(prediction_id: str, who: Owner, step: Annotated[int | None, Query(ge=0, le=100_000)] = None):
        """The latest step preview (a small JPEG of the clean estimate)."""
        own_job(prediction_id, who, "prediction")
        data = broker.previews.get(prediction_id)
        if data is None:
            raise ApiError(404, f"no preview for {prediction_id!r} yet")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    # -- trainings -------------------------------------------------------------------------------------------
    def training_plan(body: TrainingCreate, who: str, job_id: str) -> dict:
        from ..files import safe_name

        inp = body.input
        several = isinstance(inp.input_images, list)
        ids = inp.input_images if several else [inp.input_images]
        if not 1 <= len(ids) <= 1000:
            raise ApiError(422, f"input.input_images: give 1 to 1000 file ids, not {len(ids)}")
        files = [file_path(x, who, ("zip", "image"), f"input.input_images[{i}]" if several else "input.input_images")
                 for i, x in enumerate(ids)]
        if len(files) == 1 and files[0]["kind"] == "zip":
            archive = files[0]
        elif any(f["kind"] == "zip" for f in files):
            raise ApiError(422, "input.input_images: give one zip, or images, not both")
        else:
            archive = {"path": str(gather_images(files, settings.data / "training-inputs" / job_id))}
        model = model_name(body.model)
        name = safe_name(inp.name, "input.name") if inp.name else job_id
        if inp.name and store.lora(name, who) is not None:
            raise ApiError(422, f"input.name: a LoRA named {name!r} exists already")
        folder = settings.data / "trainings"
        config = _training_config(inp, archive["path"], model, job_id, folder,
                                  settings.runtime.get("device", "cpu"))
        return {"config": config.model_dump(mode="json"), "trigger_word": inp.trigger_word, "lora_name": name}

    @app.post("/v1/trainings", status_code=201, response_model=Job, responses=ERRORS, tags=["trainings"])
    async def create_training(body: TrainingCreate, who: Owner, request: Request,
                              prefer: Annotated[str | None, Header()] = None):
        """Queue a LoRA training on an uploaded zip; its output is the LoRA, usable by predictions by name."""
        from starlette.concurrency import run_in_threadpool

        response = await run_in_threadpool(create, "training", body, who, new_id(), training_plan, request)
        return await respond(response, "training", prefer, request)

    @app.get("/v1/trainings/{training_id}", response_model=Job, responses=ERRORS, tags=["trainings"])
    def get_training(training_id: str, who: Owner, request: Request):
        return render(store, broker, own_job(training_id, who, "training"), base(request))

    @app.get("/v1/trainings", response_model=Page, responses=ERRORS, tags=["trainings"])
    def list_trainings(who: Owner, request: Request, cursor: Annotated[str | None, Query(max_length=32)] = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 100):
        return page(store, broker, who, "training", cursor, limit, base(request))

    @app.post("/v1/trainings/{training_id}/cancel", response_model=Job, responses=ERRORS, tags=["trainings"])
    def cancel_training(training_id: str, who: Owner, request: Request):
        """Stop a training after its current step, saving a checkpoint first (resume continues from it)."""
        return cancel_own(training_id, who, "training", request)

    @app.post("/v1/trainings/{training_id}/resume", response_model=Job, responses=ERRORS, tags=["trainings"])
    def resume_training(training_id: str, who: Owner, request: Request):
        """Queue a stopped, canceled or interrupted training again, from its last checkpoint."""
        job = own_job(training_id, who, "training")
        state = settings.data / "trainings" / job["id"] / "state" / "state.safetensors"
        if job["status"] not in ("failed", "canceled") or not state.is_file():
            raise ApiError(409, f"training {training_id!r} is {job['status']} and has "
                                f"{'a' if state.is_file() else 'no'} checkpoint; only a stopped training with a "
                                f"checkpoint can be resumed")
        check_limits(who)
        store.update(job["id"], status="starting", dispatched_at=None, completed_at=None, error=None, resume=1)
        broker.submitted()
        return render(store, broker, store.job(job["id"]), base(request))

    @app.get("/v1/trainings/{training_id}/loss", responses=ERRORS, tags=["trainings"])
    def training_loss(training_id: str, who: Owner) -> dict:
        """The loss of every step so far (what a loss chart draws)."""
        import csv

        job = own_job(training_id, who, "training")
        f = settings.data / "trainings" / job["id"] / "loss.csv"
        rows = []
        if f.is_file():
            with open(f, newline="") as fh:
                for r in csv.DictReader(fh):
                    with contextlib.suppress(KeyError, ValueError):
                        rows.append({"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"])})
        return {"steps": rows}

    @app.get("/v1/trainings/{training_id}/stream", response_class=EventSourceResponse, responses=ERRORS,
             tags=["trainings"])
    async def stream_training(training_id: str, who: Owner, last_event_id: Annotated[str | None, Header()] = None):
        """Server-Sent Events: status, progress {step, total, loss, eta_s}, output (samples), checkpoint, done."""
        own_job(training_id, who, "training")
        async for event in stream(training_id, last_event_id):
            yield event

    async def stream(job_id: str, last_event_id: str | None):
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
        q, backlog = broker.listen(job_id, after)
        try:
            job = store.job(job_id)
            if not backlog and after == 0:  # a first connection sees where the job stands
                yield ServerSentEvent(data={"status": job["status"]}, event="status", id="0")
            if job["status"] in TERMINAL and not any(e[1] == "done" for e in backlog):
                ch = broker.channel(job_id)
                if not any(e[1] == "done" for e in ch.events):  # finished before this server started
                    for i, o in enumerate(store.outputs(job_id)):
                        yield ServerSentEvent(data={"kind": o["kind"], "url": f"/v1/outputs/{o['id']}"},
                                              event="output", id=str(after + i + 1))
                    yield ServerSentEvent(data={"status": job["status"], "error": job["error"]}, event="done",
                                          id=str(after + 10_000))
                    return
            for seq, kind, data in backlog:
                yield ServerSentEvent(data=data, event=kind, id=str(seq))
                if kind == "done":
                    return
            while True:
                seq, kind, data = await q.get()
                yield ServerSentEvent(data=data, event=kind, id=str(seq))
                if kind == "done":
                    return
        finally:
            broker.unlisten(job_id, q)

    # -- batches ---------------------------------------------------------------------------------------------
    def batch_plan(body: BatchCreate, who: str, job_id: str) -> dict:
        from ..batch import check
        from ..batch.plan import BatchPlan, parse_seeds
        from ..spec.request import ModelRef, Runtime
        from ..spec.typed import validate

        fields = body.input.model_dump(exclude_unset=True)
        loras = named_loras(fields.pop("lora", None) or [], who)
        seeds = parse_seeds(body.seeds) if isinstance(body.seeds, str) else body.seeds
        if not seeds or len(seeds) * len(body.prompts) > 10_000:
            raise ApiError(422, f"seeds: {len(seeds)} seeds x {len(body.prompts)} prompts; a batch makes 1 to 10000 "
                                f"images")
        validate(GenerateRequest, {"prompt": "x", **fields}, "input")
        plan = BatchPlan(ModelRef(name=model_name(body.model), loras=tuple(loras)),
                         Runtime(**{**settings.runtime, "threads": settings.runtime.get("threads")}), fields,
                         [{"prompt": p} for p in body.prompts], list(seeds), "api")
        check(plan)
        return {"batch": plan.to_json(), "out": str(settings.data / "batches" / job_id),
                "images": len(plan.items())}

    @app.post("/v1/batches", status_code=201, response_model=Job, responses=ERRORS, tags=["batches"])
    async def create_batch(body: BatchCreate, who: Owner, request: Request,
                           prefer: Annotated[str | None, Header()] = None):
        """Queue a batch (prompts x seeds) run by the same code as `fluxlab batch`; progress counts images."""
        from starlette.concurrency import run_in_threadpool

        response = await run_in_threadpool(create, "batch", body, who, new_id(), batch_plan, request)
        return await respond(response, "batch", prefer, request)

    @app.get("/v1/batches/{batch_id}", response_model=Job, responses=ERRORS, tags=["batches"])
    def get_batch(batch_id: str, who: Owner, request: Request):
        return render(store, broker, own_job(batch_id, who, "batch"), base(request))

    @app.post("/v1/batches/{batch_id}/cancel", response_model=Job, responses=ERRORS, tags=["batches"])
    def cancel_batch(batch_id: str, who: Owner, request: Request):
        return cancel_own(batch_id, who, "batch", request)

    @app.get("/v1/batches/{batch_id}/stream", response_class=EventSourceResponse, responses=ERRORS,
             tags=["batches"])
    async def stream_batch(batch_id: str, who: Owner, last_event_id: Annotated[str | None, Header()] = None):
        """Server-Sent Events: status, progress {done, failed, total}, output (each image), done."""
        own_job(batch_id, who, "batch")
        async for event in stream(batch_id, last_event_id):
            yield event

    # -- grids -----------------------------------------------------------------------------------------------
    def grid_plan(body: GridCreate, who: str, job_id: str) -> dict:
        from ..service.grid import check_axes, parse_axis, plan_cells, prepare_cells
        from ..spec.request import ModelRef, Runtime

        fields = body.input.model_dump(exclude_unset=True)
        loras = named_loras(fields.pop("lora", None) or [], who)
        x, y = parse_axis(body.x), parse_axis(body.y) if body.y else None
        ref = ModelRef(name=model_name(body.model), loras=tuple(loras))
        check_axes(x, y, ref)
        fields.setdefault("seed", 0)
        cells = plan_cells({"prompt": body.prompt, **fields}, x, y)
        if len(cells) > 100:
            raise ApiError(422, f"the grid has {len(cells)} cells; at most 100 through the server")
        prepare_cells(cells, ref, Runtime(), check_files=False)  # every cell checked now, as the CLI checks them
        return {"prompt": body.prompt, "x": body.x, "y": body.y, "base": fields,
                "model": ref.model_dump(mode="json", exclude_none=True), "out": str(settings.data / "grids" / job_id),
                "cells": len(cells)}

    @app.post("/v1/grids", status_code=201, response_model=Job, responses=ERRORS, tags=["grids"])
    async def create_grid(body: GridCreate, who: Owner, request: Request,
                          prefer: Annotated[str | None, Header()] = None):
        """A parameter grid (seed 000's exercise): every cell's image as it finishes, then the labelled contact
        sheet and its CSV, all made by the same code as `fluxlab grid`."""
        from starlette.concurrency import run_in_threadpool

        response = await run_in_threadpool(create, "grid", body, who, new_id(), grid_plan, request)
        return await respond(response, "grid", prefer, request)

    @app.get("/v1/grids/{grid_id}", response_model=Job, responses=ERRORS, tags=["grids"])
    def get_grid(grid_id: str, who: Owner, request: Request):
        return render(store, broker, own_job(grid_id, who, "grid"), base(request))

    @app.post("/v1/grids/{grid_id}/cancel", response_model=Job, responses=ERRORS, tags=["grids"])
    def cancel_grid(grid_id: str, who: Owner, request: Request):
        return cancel_own(grid_id, who, "grid", request)

    @app.get("/v1/grids/{grid_id}/stream", response_class=EventSourceResponse, responses=ERRORS, tags=["grids"])
    async def stream_grid(grid_id: str, who: Owner, last_event_id: Annotated[str | None, Header()] = None):
        """Server-Sent Events: progress {done, total}, output (each cell, then the sheet and the CSV), done."""
        own_job(grid_id, who, "grid")
        async for event in stream(grid_id, last_event_id):
            yield event

    # -- files and outputs ---------------------------------------------------------------------------------
    @app.post("/v1/files", status_code=201, response_model=FileInfo, responses=ERRORS, tags=["files"])
    def upload(file: Annotated[UploadFile, File(description="An image (PNG, JPEG, WebP), a zip or a LoRA")],
               who: Owner):
        """Upload an input: an image (references, init, mask), a zip of training images, or a LoRA .safetensors."""
        return file_info(save_upload(store, settings, file, who))

    @app.get("/v1/files/{file_id}", response_model=FileInfo, responses=ERRORS, tags=["files"])
    def get_file(file_id: str, who: Owner):
        f = store.file(file_id, who)
        if f is None:
            raise ApiError(404, f"no file {file_id!r}")
        return file_info(f)

    @app.get("/v1/outputs", responses=ERRORS, tags=["outputs"])
    def list_outputs(who: Owner, request: Request, before: Annotated[float | None, Query(ge=0)] = None,
                     limit: Annotated[int, Query(ge=1, le=200)] = 48) -> dict:
        """This token's images, newest first (a gallery); `next` pages back in time."""
        rows = store.recent_outputs(who, before, limit + 1)
        more = rows[limit:] != []
        rows = rows[:limit]
        b = base(request)
        items = [{"id": o["id"], "url": f"{b}/v1/outputs/{o['id']}", "thumb": f"{b}/v1/outputs/{o['id']}?thumb=256",
                  "job": o["job_id"], "seed": o["seed"], "created_at": iso(o["created_at"])} for o in rows]
        return {"results": items, "next": f"{b}/v1/outputs?before={rows[-1]['created_at']}&limit={limit}"
                if more else None}

    @app.get("/v1/outputs/{output_id}/record", responses=ERRORS, tags=["outputs"])
    def output_record(output_id: str, who: Owner) -> dict:
        """The settings an image was made with (its PNG's record)."""
        from ..service.outputs import read_record

        o = store.output(output_id, who)
        if o is None or o["kind"] not in ("image", "cell") or not Path(o["path"]).is_file():
            raise ApiError(404, f"no image {output_id!r}")
        return read_record(o["path"]).model_dump(mode="json", exclude_none=True)

    @app.delete("/v1/outputs/{output_id}", responses=ERRORS, tags=["outputs"])
    def delete_output(output_id: str, who: Owner) -> dict:
        """Delete an image (the file and its entry)."""
        o = store.delete_output(output_id, who)
        if o is None:
            raise ApiError(404, f"no output {output_id!r}")
        Path(o["path"]).unlink(missing_ok=True)
        return {"deleted": output_id}

    @app.get("/v1/outputs/{output_id}", response_class=Response, responses=ERRORS | {200: {"content": {
        "image/png": {}, "image/jpeg": {}, "application/octet-stream": {}, "text/csv": {}}}}, tags=["outputs"])
    def get_output(output_id: str, who: Owner, thumb: Annotated[int | None, Query(ge=16, le=1024)] = None):
        """An output: a PNG with fluxlab's metadata (`?thumb=256`: a JPEG thumbnail), or a LoRA file."""
        o = store.output(output_id, who)
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
        return FileResponse(o["path"], media_type="image/png")

    # -- models, queue, health ------------------------------------------------------------------------------
    @app.get("/v1/models", responses=ERRORS, tags=["models"])
    def models(who: Owner) -> dict:
        """The catalog, the server's own models, which are loaded, and this token's LoRAs."""
        from ..service.info import models as catalog

        rows = [{**r, "loaded": r["name"] in broker.loaded} for r in catalog()]
        rows += [{"name": n, "bundled": False, "loaded": str(Path(p).resolve()) in broker.loaded}
                 for n, p in settings.models.items()]
        loras = [{"name": r["name"], "training": r["job_id"], "trigger_word": r["trigger"], "sha256": r["sha256"]}
                 for r in store.loras(who)]
        return {"models": rows, "loras": loras}

    @app.get("/v1/queue", responses=ERRORS, tags=["queue"])
    def get_queue(who: Owner, request: Request) -> dict:
        """The running job and the pending ones in order (other tokens' jobs without their details)."""
        running = store.job(broker.running) if broker.running else None
        pending = []
        for i, job in enumerate(store.pending(), start=1):
            mine = job["owner"] == who
            pending.append(render(store, broker, job, base(request)) if mine else
                           {"queue_position": i, "kind": job["kind"], "mine": False})
        own_running = running is not None and running["owner"] == who
        return {"paused": broker.paused,
                "running": render(store, broker, running, base(request)) if own_running else
                ({"kind": running["kind"], "mine": False} if running else None),
                "pending": pending}

    @app.post("/v1/queue/pause", responses=ERRORS, tags=["queue"])
    def pause(who: Owner) -> dict:
        """Start no new job (the running one finishes)."""
        broker.pause(True)
        return {"paused": True}

    @app.post("/v1/queue/resume", responses=ERRORS, tags=["queue"])
    def resume(who: Owner) -> dict:
        broker.pause(False)
        return {"paused": False}

    @app.get("/v1/webhooks/default/secret", responses=ERRORS, tags=["webhooks"])
    def webhook_secret(who: Owner) -> dict:
        """The secret webhooks are signed with (Standard Webhooks: whsec_...)."""
        return {"key": store.secret()}

    @app.get("/v1/health", tags=["health"])
    async def health() -> dict:
        """Needs no token. The worker's state and the queue's length. Run on the event loop, not the thread pool:
        under a burst of submissions it answers without waiting its turn behind them (a WAL read never blocks)."""
        return {"status": "ok", "version": __version__, "worker": broker.worker_info(),
                "pending": store.pending_count(), "paused": broker.paused}

    return app


def page(store: Store, broker, who: str, kind: str, cursor: str | None, limit: int, base: str) -> dict:
    before = None
    if cursor:
        if not cursor.isdigit():
            raise ApiError(422, f"cursor {cursor!r} is not one this server gave")
        before = int(cursor)
    jobs = store.jobs(who, kind, before, limit + 1)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    path = f"{base}/v1/{_kind_path(kind)}"
    return {"results": [render(store, broker, j, base) for j in jobs],
            "next": f"{path}?cursor={jobs[-1]['seq']}&limit={limit}" if more else None,
            "previous": None}


def gather_images(files: list[dict], folder: Path) -> Path:
    """A training folder of uploaded images (linked, not copied, where the file system allows)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        target = folder / f"{i:04d}-{Path(f['path']).name}"
        try:
            os.link(f["path"], target)
        except OSError:
            shutil.copyfile(f["path"], target)
    return folder


def file_info(f: dict) -> dict:
    return {"id": f["id"], "name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"], "kind": f["kind"],
            "created_at": iso(f["created_at"])}


def _prefer_wait(prefer: str, most: float) -> float:
    for part in prefer.split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "wait":
            try:
                return max(0.0, min(float(value), most)) if value else most
            except ValueError:
                return 0.0
    return 0.0


def save_upload(store: Store, settings: Settings, upload, who: str) -> dict:
    """Stream an upload to disk within its kind's limit, check it as fluxlab will use it, keep it under its id.
    Anything refused leaves nothing behind."""
    import hashlib

    from ..files import safe_name

    name = Path(upload.filename or "upload").name
    try:
        name = safe_name(name, "file name")
    except UserError:
        name = "upload" + "".join(c for c in Path(name).suffix[:8] if c.isalnum() or c == ".")
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=settings.data))
    try:
        target = tmp / name
        digest, size, kind = hashlib.sha256(), 0, None
        with open(target, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                if kind is None:
                    kind = sniff(chunk[:16])
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
        if kind == "image":
            from ..spec.images import inspect

            inspect(target, f"upload {name}", check_shape=False)
        elif kind == "zip":
            import zipfile

            from ..train.data import check_archive

            try:
                with zipfile.ZipFile(target) as zf:
                    check_archive(Path(name), zf)
                    bad = zf.testzip()
            except zipfile.BadZipFile as e:
                raise UserError(f"{name} is not a readable zip file ({e})") from None
            if bad is not None:
                raise UserError(f"{name} is damaged (member {bad!r} fails its CRC)")
        else:
            if not name.endswith(".safetensors"):
                name = Path(name).stem + ".safetensors"
                target = target.rename(tmp / name)
            check_lora_header(target)
        file_id_dir = settings.data / "files" / new_id()
        file_id_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(file_id_dir)
        return store.add_file(who, name, size, digest.hexdigest(), kind, str(file_id_dir / name))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _training_config(inp: TrainingInput, archive: str, model: str, job_id: str, folder: Path, device: str):
    """The training config: the one-line recipe, or the client's ai-toolkit YAML with every path replaced by the
    server's (the upload, the run folder)."""
    import yaml

    from ..spec.trainconfig import one_line, parse

    if inp.config is None:
        job = one_line(archive, inp.trigger_word, inp.steps, model, job_id, str(folder), inp.resolution,
                       device="cuda" if device.startswith("cuda") else "cpu")
        data = job.model_dump(mode="json")
    else:
        try:
            data = yaml.safe_load(inp.config)
        except yaml.YAMLError as e:
            raise UserError(f"input.config is not valid YAML: {getattr(e, 'problem', e)}") from None
        job = parse(data, "input.config")  # its own errors first, then ours
        data = job.model_dump(mode="json")
        process = data["config"]["process"][0]
        for i, d in enumerate(process["datasets"]):
            if d.get("control_path") or d.get("mask_path"):
                raise UserError(f"input.config: datasets[{i}] names control_path or mask_path; the server trains on "
                                f"the uploaded images only")
            d["folder_path"] = archive
        process["trigger_word"] = inp.trigger_word
        process["train"]["steps"] = inp.steps
        process["model"] = {**process["model"], "name_or_path": model}
        process.pop("sample", None)  # its size and prompts are the client's; samples below follow the model
    data["config"]["name"] = job_id
    process = data["config"]["process"][0]
    process["training_folder"] = str(folder)
    process["device"] = device if device != "auto" else process.get("device", "auto")
    if not process.get("sample"):  # a sample at every quarter, of the trigger word alone, at the model's own size
        from ..runtime.loading import locate

        spec = locate(model).spec
        w, h = spec.default_size if spec else (1024, 1024)
        process["sample"] = {"sample_every": max(1, inp.steps // 4), "prompts": ["[trigger]"], "width": w,
                             "height": h, "sample_steps": spec.steps if spec else 20, "seed": 42}
    if inp.lora_rank:
        process["network"].update(linear=inp.lora_rank, linear_alpha=inp.lora_rank)
    if inp.learning_rate:
        process["train"]["lr"] = inp.learning_rate
    return parse(data, "training")


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
