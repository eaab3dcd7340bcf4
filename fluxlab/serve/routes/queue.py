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


@queue.get("")
def get_queue(who: Who, srv: Srv, request: Request) -> dict:
    """The running job and the pending ones in order; other owners' jobs without their details (an admin sees
    them all)."""
    store, broker = srv.store, srv.broker
    running = store.job(broker.running) if broker.running else None
    pending = []
    for i, job in enumerate(store.pending(), start=1):
        seen = job["owner"] == who.name or who.admin
        pending.append({**render(srv, job, base(request)), "owner": job["owner"], "mine": job["owner"] == who.name}
                       if seen else {"queue_position": i, "kind": job["kind"], "mine": False})
    shown = running is not None and (running["owner"] == who.name or who.admin)
    return {"paused": broker.paused,
            "running": {**render(srv, running, base(request)), "owner": running["owner"],
                        "mine": running["owner"] == who.name} if shown else
            ({"kind": running["kind"], "mine": False} if running else None),
            "pending": pending}


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
    """Needs no token: whether the server is up and its worker ready. With an admin token, the worker's process,
    memory and job, and the queue. Run on the event loop, not the thread pool: under a burst of submissions it
    answers without waiting its turn behind them (a WAL read never blocks)."""
    ready = {"status": "ok", "ready": srv.broker.ready}
    name = bearer_owner(srv, authorization)
    if name is None or srv.store.role(name) != "admin":
        return ready
    return {**ready, "version": __version__, "worker": srv.broker.worker_info(), "pending": srv.store.pending_count(),
            "paused": srv.broker.paused, "webhooks": {"delivered": srv.broker.webhooks.delivered,
                                                     "refused": srv.broker.webhooks.refused}}
