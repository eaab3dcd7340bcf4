"""What every job kind shares, written once and mounted per kind: the job object as the API shows it, creating a
job (idempotent by id, within the queue limits, webhooks checked), `Prefer: wait`, and the get, list, cancel and
stream routes of `/v1/{predictions,trainings,batches,grids}`."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import UserError
from . import outbound
from .deps import KINDS, Owner, Server, Srv, Who, base, check_limits, own_job
from .http import ApiError, iso, public
from .schemas import ERRORS, Cursor, Job, Page
from .store import TERMINAL, LimitReached


def render(srv: Server, job: dict, base: str = "") -> dict:
    from .signing import output_url

    store, broker, plan = srv.store, srv.broker, job["plan"]
    path = f"{base}/v1/{KINDS[job['kind']]}/{job['id']}"

    def urls(kind: str) -> list[str]:
        return [output_url(store, base, o["id"]) for o in store.outputs(job["id"], kind)]

    if job["kind"] in ("prediction", "batch"):
        output = urls("image") or None
    elif job["kind"] == "grid":
        output = {kind: urls(kind) for kind in ("cell", "sheet", "csv")}
    elif job["kind"] == "caption":
        listed = store.outputs(job["id"], "captions")
        output = None
        if listed and Path(listed[0]["path"]).is_file():
            rows = json.loads(Path(listed[0]["path"]).read_text())
            for row, url in zip(rows, urls("dataset"), strict=False):
                row["url"] = url
            output = {"captions": rows, "zip": (urls("zip") or [None])[0]}
    elif job["kind"] == "download":
        output = {"model": plan["model"], "repo": plan["repo"]} if job["status"] == "succeeded" else None
    elif job["kind"] == "upsample":
        listed = store.outputs(job["id"], "prompts")
        output = None
        if listed and Path(listed[0]["path"]).is_file():
            output = json.loads(Path(listed[0]["path"]).read_text())
    else:
        loras = store.outputs(job["id"], "lora")
        prompts = sample_prompts(plan)
        output = {"samples": urls("sample"), "sample_prompts": prompts,
                  "sample_labels": sample_labels(prompts, store.outputs(job["id"], "sample"))}
        if loras:
            output |= {"weights": output_url(store, base, loras[0]["id"]), "lora": plan.get("lora_name") or job["id"]}
            if plan.get("destination"):
                lora = store.lora(output["lora"], job["owner"])
                if lora is not None:
                    from .refs import trained_id

                    output["version"] = f"{plan['destination']}:{trained_id(plan['base_version'], lora['sha256'])}"
    obj = {"id": job["id"], "model": job["model"], "version": plan.get("version", ""), "input": job["input"],
           "status": job["status"], "created_at": iso(job["created_at"]), "started_at": iso(job["started_at"]),
           "completed_at": iso(job["completed_at"]), "output": output, "error": public(job["error"], srv.settings),
           "metrics": job["metrics"], "logs": public("\n".join(plan.get("notes", [])), srv.settings),
           "urls": {"get": path, "cancel": f"{path}/cancel", "stream": f"{path}/stream"}}
    if plan.get("destination"):
        obj["destination"] = plan["destination"]
    if job["status"] == "starting":
        obj["queue_position"] = store.position(job)
    if broker is not None and job["id"] in broker.progress:
        obj["progress"] = broker.progress[job["id"]]
    return obj


def sample_prompts(plan: dict) -> list[str]:
    """A training's sample prompts as its samples are drawn: in order, the trigger word in place of [trigger]."""
    process = ((plan.get("config") or {}).get("config") or {}).get("process") or [{}]
    trigger = process[0].get("trigger_word") or ""
    return [p.replace("[trigger]", trigger) for p in (process[0].get("sample") or {}).get("prompts") or []]


def sample_labels(prompts: list[str], samples: list[dict]) -> list[dict]:
    """Each training sample's step and prompt (its file is step<N>-<k>.png, k its prompt's place in the plan)."""
    import re

    labels = []
    for o in samples:
        m = re.match(r"step(\d+)-(\d+)", Path(o["path"]).name)
        step, k = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        labels.append({"step": step, "prompt": prompts[k] if k is not None and k < len(prompts) else ""})
    return labels


def listing(srv: Server, who: str, kind: str, cursor: str | None, limit: int, base: str) -> dict:
    jobs = srv.store.jobs(who, kind, int(cursor) if cursor else None, limit + 1)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    path = f"{base}/v1/{KINDS[kind]}"
    return {"results": [render(srv, j, base) for j in jobs],
            "next": f"{path}?cursor={jobs[-1]['seq']}&limit={limit}" if more else None, "previous": None}


def create(srv: Server, kind: str, body, who, job_id: str, plan_of: Callable, request: Request) -> Response:
    """Check and store a job (the plan is made by `plan_of(srv, body, owner, job_id)`); the same id again gives
    the existing job (200)."""
    store = srv.store
    existing = store.job(job_id)
    if existing is not None:
        if existing["owner"] != who.name or existing["kind"] != kind:
            raise ApiError(409, f"the id {job_id!r} is taken")
        return JSONResponse(render(srv, existing, base(request)), status_code=200)
    if body.priority > 0 and not who.admin:
        raise ApiError(403, f"priority {body.priority}: priorities above 0 need an admin token")
    if body.webhook is not None:
        try:
            outbound.check(body.webhook, srv.settings.webhook_policy, "webhook", srv.settings.resolve)
        except UserError as e:
            raise ApiError(422, str(e)) from None
    check_limits(srv, who.name)
    plan = plan_of(srv, body, who.name, job_id)
    # what the job was given, as its `input` shows it (a download has no input of its own: its model is it)
    given = body.input.model_dump(mode="json", exclude_unset=True) if "input" in type(body).model_fields \
        else {"model": body.model}
    for key in ("prompt", "prompts", "seeds", "x", "y"):  # a grid's or batch's own fields, kept with its input
        if key in type(body).model_fields and getattr(body, key) is not None:
            given[key] = getattr(body, key)
    try:
        job = store.add_job(job_id, kind, who.name, plan.get("ref") or body.model, given, plan, body.webhook,
                            body.webhook_events_filter, body.priority,
                            limits=(srv.settings.max_pending_per_token, srv.settings.max_pending))
    except LimitReached as e:
        raise ApiError(429, str(e), {"Retry-After": "5"}) from None
    if job is None:  # a concurrent PUT with the same id won
        return JSONResponse(render(srv, store.job(job_id), base(request)), status_code=200)
    srv.broker.submitted()
    return JSONResponse(render(srv, job, base(request)), status_code=201,
                        headers={"Location": f"{base(request)}/v1/{KINDS[kind]}/{job_id}"})


async def submit(srv: Server, kind: str, body, who, job_id: str, plan_of: Callable, request: Request,
                 prefer: str | None) -> Response:
    """Create (in the thread pool: planning reads files) and, with `Prefer: wait=N`, hold the answer until the
    job ends or N seconds pass (at most max_wait_s)."""
    from starlette.concurrency import run_in_threadpool

    response = await run_in_threadpool(create, srv, kind, body, who, job_id, plan_of, request)
    wait = prefer_wait(prefer, srv.settings.max_wait_s) if prefer else 0.0
    if wait and response.status_code in (200, 201):
        job_id = json.loads(response.body)["id"]
        await srv.broker.wait(job_id, wait)
        location = {"Location": response.headers["location"]} if "location" in response.headers else {}
        obj = render(srv, srv.store.job(job_id), base(request))
        if obj["status"] not in TERMINAL:
            # Replicate's convention, which its clients rely on: a wait that ran out answers `starting` (poll
            # urls.get). Its Python client takes any other status here for the end and returns no output.
            obj["status"] = "starting"
        return JSONResponse(obj, status_code=response.status_code, headers=location)
    return response


def prefer_wait(prefer: str, most: float) -> float:
    for part in prefer.split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "wait":
            try:
                return max(0.0, min(float(value), most)) if value else most
            except ValueError:
                return 0.0
    return 0.0


def sse(kind: str, data, seq) -> str:
    """One Server-Sent Event on the wire: its id, its name and its data as one line of JSON."""
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def events(srv: Server, job: dict, last_event_id: str | None, ping_s: float = 15.0):
    """A job's Server-Sent Events from `last_event_id` on: the buffered ones, then live ones until `done`, with a
    comment every `ping_s` seconds so proxies keep an idle stream open. Written here rather than with FastAPI's
    SSE helper, whose keep-alive task raises (and logs a traceback) when a client goes away mid-stream; a
    plain streaming response just stops."""
    import asyncio

    job_id, broker, store = job["id"], srv.broker, srv.store
    after = int(last_event_id) if last_event_id and last_event_id.isascii() and last_event_id.isdigit() \
        and len(last_event_id) < 12 else 0
    q, backlog = broker.listen(job_id, after)
    try:
        job = store.job(job_id)
        if not backlog and after == 0:  # a first connection sees where the job stands
            yield sse("status", {"status": job["status"]}, 0)
        if job["status"] in TERMINAL and not any(e[1] == "done" for e in backlog):
            ch = broker.channel(job_id)
            if not any(e[1] == "done" for e in ch.events):  # finished before this server started
                for i, o in enumerate(store.outputs(job_id)):
                    yield sse("output", {"kind": o["kind"], "url": f"/v1/outputs/{o['id']}", "index": o["idx"],
                                         **({"seed": o["seed"]} if o.get("seed") is not None else {})}, after + i + 1)
                yield sse("done", {"status": job["status"], "error": public(job["error"], srv.settings)},
                          after + 10_000)
                return
        for seq, kind, data in backlog:
            yield sse(kind, data, seq)
            if kind == "done":
                return
        quiet = 0.0
        while not srv.closing.is_set():  # a server that stops ends its streams (the client reconnects)
            try:
                seq, kind, data = await asyncio.wait_for(q.get(), 1.0)
            except (TimeoutError, asyncio.TimeoutError):
                quiet += 1.0
                if quiet >= ping_s:
                    yield ": ping\n\n"
                    quiet = 0.0
                continue
            quiet = 0.0
            yield sse(kind, data, seq)
            if kind == "done":
                return
    finally:
        broker.unlisten(job_id, q)


STREAM_DOCS = {
    "prediction": "Server-Sent Events: status, progress {step, total, eta_s}, preview {step, url}, output, done.",
    "training": "Server-Sent Events: status, progress {step, total, loss, eta_s}, output (samples), checkpoint, done.",
    "batch": "Server-Sent Events: status, progress {done, failed, total}, output (each image), done.",
    "grid": "Server-Sent Events: progress {done, total}, output (each cell, then the sheet and the CSV), done.",
    "caption": "Server-Sent Events: progress {done, total, image, caption, eta_s}, output (captions, zip), done.",
    "upsample": "Server-Sent Events: status, output (the rewritten prompts), done.",
    "download": "Server-Sent Events: status, progress {done_bytes, total_bytes, eta_s}, done.",
}
CANCEL_DOCS = {"training": "Stop a training after its current step, saving a checkpoint first (resume continues "
                           "from it)."}


def job_routes(kind: str) -> APIRouter:
    """GET one, GET the list, POST cancel and GET stream for one kind of job, under /v1/{kinds}."""
    router = APIRouter(prefix=f"/v1/{KINDS[kind]}", tags=[KINDS[kind]], responses=ERRORS)
    Own = Annotated[dict, Depends(own_job(kind))]
    one = f"/{{{kind}_id}}"

    @router.get(one, response_model=Job, name=f"get_{kind}")
    def get(job: Own, srv: Srv, request: Request):
        return render(srv, job, base(request))

    @router.get("", response_model=Page, name=f"list_{KINDS[kind]}")
    def list_(who: Owner, srv: Srv, request: Request,
              cursor: Annotated[str | None, Query(pattern=Cursor, description="`next` gives it")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 100):
        """Newest first, `limit` at a time; `next` is the URL of the following page."""
        return listing(srv, who, kind, cursor, limit, base(request))

    @router.post(one + "/cancel", response_model=Job, name=f"cancel_{kind}",
                 description=CANCEL_DOCS.get(kind, f"Cancel the {kind}: a queued one at once, a running one at "
                                                   f"its next step."))
    def cancel(job: Own, srv: Srv, request: Request):
        srv.broker.cancel(job["id"])
        return render(srv, srv.store.job(job["id"]), base(request))

    @router.get(one + "/stream", response_class=Response, name=f"stream_{kind}", description=STREAM_DOCS[kind],
                responses={200: {"description": "the job's events", "content": {"text/event-stream": {
                    "schema": {"type": "string"}}}}})
    async def stream(job: Own, srv: Srv, last_event_id: Annotated[str | None, Header(max_length=20)] = None):
        return StreamingResponse(events(srv, job, last_event_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


__all__ = ["Who", "job_routes", "render", "submit"]
