"""The shared queue (GET /v1/queue, admin-only pause and resume), the caller's webhook secret, and health."""

from typing import Annotated

from fastapi import APIRouter, Header, Request

from ... import __version__
from ..deps import Admin, Owner, Srv, Who, base, bearer_owner
from ..jobs import render
from ..schemas import ERRORS

queue = APIRouter(prefix="/v1/queue", tags=["queue"], responses=ERRORS)
webhooks = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERRORS)
health = APIRouter(tags=["health"])


@queue.get("", responses={200: {"content": {"text/event-stream": {}}}})
async def get_queue(who: Who, srv: Srv, request: Request):
    """The running jobs (one per busy worker: `workers`) and the pending ones in order; other owners' jobs without
    their details (an admin sees them all). `running` is the first running job, as with one worker. Asked with
    `Accept: text/event-stream` (an EventSource), it is a stream instead: a `queue` event with this object each
    time the queue changes (a job queued, started, ended; a worker added, loading, paused)."""
    from starlette.concurrency import run_in_threadpool

    if "text/event-stream" in request.headers.get("accept", ""):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(queue_events(who, srv, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    return await run_in_threadpool(snapshot, who, srv, request)


async def queue_events(who, srv, request: Request, every_s: float = 0.5, ping_s: float = 15.0):
    """`queue` events: the snapshot whenever it differs from the last one sent (a worker's memory, which moves on
    every heartbeat, is not a change on its own), a comment every `ping_s` seconds otherwise."""
    import asyncio
    import json
    import time

    from starlette.concurrency import run_in_threadpool

    from ..jobs import sse

    last, quiet, seq = None, time.monotonic(), 0
    while not srv.closing.is_set() and not await request.is_disconnected():
        now = await run_in_threadpool(snapshot, who, srv, request)
        key = json.dumps({**now, "workers": [{k: v for k, v in w.items() if k != "rss_bytes"}
                                             for w in now["workers"]]}, sort_keys=True, default=str)
        if key != last:
            seq += 1
            yield sse("queue", now, seq)
            last, quiet = key, time.monotonic()
        elif time.monotonic() - quiet > ping_s:
            yield ": ping\n\n"
            quiet = time.monotonic()
        await asyncio.sleep(every_s)


def snapshot(who, srv, request: Request) -> dict:
    store, broker = srv.store, srv.broker

    def shown(job: dict | None) -> dict | None:
        if job is None:
            return None
        if job["owner"] == who.name or who.admin:
            return {**render(srv, job, base(request)), "owner": job["owner"], "mine": job["owner"] == who.name}
        return {"kind": job["kind"], "mine": False}

    pending = []
    for i, job in enumerate(store.pending(), start=1):
        row = shown(job)
        pending.append(row if "id" in row else {"queue_position": i, **row})
    workers = []
    for w in broker.worker_info():
        job = shown(store.job(w["running"])) if w["running"] else None
        workers.append({"name": w["name"], "device": w["device"], "ready": w["ready"], "job": job,
                        **({"loaded": w["loaded"], "node": w["node"], "rss_bytes": w["rss_bytes"]} if who.admin
                           else {})})
    running = next((w["job"] for w in workers if w["job"] is not None), None)
    return {"paused": broker.paused, "running": running, "workers": workers, "pending": pending}


@queue.post("/pause")
def pause(_: Admin, srv: Srv) -> dict:
    """Start no new job (the running one finishes). Admin tokens only."""
    srv.broker.pause(True)
    return {"paused": True}


@queue.post("/resume")
def resume(_: Admin, srv: Srv) -> dict:
    """Admin tokens only."""
    srv.broker.pause(False)
    return {"paused": False}


@webhooks.get("/default/secret")
def webhook_secret(who: Owner, srv: Srv) -> dict:
    """The secret this token's webhooks are signed with (Standard Webhooks: whsec_...)."""
    return {"key": srv.store.secret(who)}


@webhooks.post("/default/secret/rotate")
def rotate_webhook_secret(who: Owner, srv: Srv) -> dict:
    """A new signing secret for this token's webhooks; deliveries from now on are signed with it."""
    return {"key": srv.store.rotate_secret(who)}


@health.get("/v1/health")
async def get_health(srv: Srv, request: Request, authorization: Annotated[str | None, Header()] = None) -> dict:
    """Needs no token: whether the server is up and a worker ready. With an admin token, each worker (engine,
    device, node, process, memory, models loaded, the job it runs), the queue, and how long replacing a dead worker
    took. Run on the event loop, not the thread pool: under a burst of submissions it
    answers without waiting its turn behind them (a WAL read never blocks)."""
    ready = {"status": "ok", "ready": srv.broker.ready}
    name = bearer_owner(srv, authorization)
    if name is None or srv.store.role(name) != "admin":
        return ready
    workers = srv.broker.worker_info()
    return {**ready, "version": __version__, "worker": workers[0] if workers else None, "workers": workers,
            "replacements_s": srv.broker.replacements[-20:], "pending": srv.store.pending_count(),
            "paused": srv.broker.paused, "webhooks": {"delivered": srv.broker.webhooks.delivered,
                                                     "refused": srv.broker.webhooks.refused}}
