"""The API process's side of the queue: it starts and watches the worker, hands it jobs one at a time (priority,
then arrival), turns the worker's events into stored state, Server-Sent Events and webhooks, and cancels by id.

One thread owns the worker's channels (dispatch, events, liveness), so the order of what happens to a job is the
order it is recorded. Request handlers only read the store, add jobs, and ask for cancels; they never wait on the
worker, so the API answers while a job runs. A worker that dies fails its job ("worker_crashed") and is started
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .store import TERMINAL, Store
from .webhooks import Webhooks

log = logging.getLogger("fluxlab.serve")
REPLAY = 1024  # events kept per job for reconnecting streams (as cog keeps)


@dataclass
class Channel:
    """A job's recent events and who is listening."""

    events: deque = field(default_factory=lambda: deque(maxlen=REPLAY))
    seq: int = 0
    listeners: set = field(default_factory=set)  # (loop, asyncio.Queue)
    waiters: list = field(default_factory=list)  # (loop, asyncio.Event)


class Broker:
    def __init__(self, store: Store, settings, render):
        self.store, self.settings, self.render = store, settings.worker(), render  # render(job) -> the API object
        self.ctx = multiprocessing.get_context("spawn")
        self.process = None
        self.commands = self.events = None
        self.ready = False
        self.running: str | None = None
        self.channels: dict[str, Channel] = {}
        self.progress: dict[str, dict] = {}
        self.loaded: set[str] = set()  # models the worker holds (as it last said)
        self.previews: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = False
        self.restarts = 0
        self.webhooks = Webhooks(store.secret, settings.webhook_policy, settings.webhook_retries,
                                 settings.webhook_backoff_s, resolve=settings.resolve)
        self.thread = threading.Thread(target=self._loop, name="fluxlab-broker", daemon=True)

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> None:
        for job_id in self.store.interrupt_running():
            self._emit(job_id, "status", {"status": "failed", "error": "interrupted"})
        self._spawn()
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        with contextlib.suppress(Exception):
            self.commands.put({"op": "stop"})
        if self.process is not None:
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
        self.webhooks.close()

    def _spawn(self) -> None:
        from . import worker

        self.commands, self.events = self.ctx.Queue(), self.ctx.Queue()
        self.ready = False
        self.process = self.ctx.Process(target=worker.main, args=(self.commands, self.events, self.settings),
                                        name="fluxlab-worker", daemon=True)
        self.process.start()

    @property
    def paused(self) -> bool:
        return self.store.setting("paused", "0") == "1"

    def pause(self, on: bool) -> None:
        self.store.set_setting("paused", "1" if on else "0")
        self.wake.set()

    def worker_info(self) -> dict:
        pid = self.process.pid if self.process is not None else None
        rss = None
        if pid:
            with contextlib.suppress(OSError, ValueError):
                import os

                with open(f"/proc/{pid}/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"pid": pid, "alive": bool(self.process and self.process.is_alive()), "ready": self.ready,
                "rss_bytes": rss, "restarts": self.restarts, "running": self.running}

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            except (EOFError, OSError):
                event = None
            try:
                if event is not None:
                    self._handle(event)
                if self.process is not None and not self.process.is_alive() and not self.stopping:
                    self._crashed()
                if self.ready and self.running is None and not self.paused:
                    self._dispatch()
            except Exception:  # never let one bad event stop the queue
                log.exception("broker")

    def _dispatch(self) -> None:
        for job in self.store.pending():
            with self.lock:
                current = self.store.job(job["id"])
                if current is None or current["status"] != "starting" or current["dispatched_at"] is not None:
                    continue
                self.store.update(job["id"], dispatched_at=time.time())
                self.running = job["id"]
            self.commands.put({"op": "run", "job": {"id": job["id"], "kind": job["kind"], "plan": job["plan"],
                                                    "resume": job["resume"]}})
            return

    def _crashed(self) -> None:
        code = self.process.exitcode
        job_id, self.running = self.running, None
        if job_id is not None:
            self._finish(job_id, "failed", f"worker_crashed: the worker process died (exit code {code}); the job "
                                           f"was not completed", {})
        self.restarts += 1
        log.warning("worker died (exit code %s); starting a new one", code)
        self._spawn()

    def _handle(self, e: dict) -> None:
        kind, job_id = e["type"], e.get("id")
        if kind == "ready":
            self.ready = True
            return
        job = self.store.job(job_id) if job_id else None
        if job is None:
            return
        if kind == "loading":
            self._emit(job_id, "status", {"status": "starting", "loading": e["model"]})
        elif kind == "processing":
            metrics = {**job["metrics"], "load_time": e.get("load_time", 0.0)}
            self.store.update(job_id, status="processing", started_at=time.time(), metrics=metrics)
            self._emit(job_id, "status", {"status": "processing"})
            self.webhooks.send(job, "start", self.render(self.store.job(job_id)))
        elif kind == "progress":
            data = {k: v for k, v in e.items() if k not in ("id", "type")}
            self.progress[job_id] = data
            self._emit(job_id, "progress", data)
        elif kind == "preview":
            self.previews[job_id] = e["jpeg"]
            self._emit(job_id, "preview", {"step": e["step"], "url": f"/v1/predictions/{job_id}/preview?step="
                                                                       f"{e['step']}"})
        elif kind == "output":
            out = self.store.add_output(job_id, job["owner"], e["idx"], e["kind"], e["path"], e.get("seed"))
            self._emit(job_id, "output", {"kind": e["kind"], "url": f"/v1/outputs/{out['id']}", "index": e["idx"],
                                          **({"step": e["step"]} if "step" in e else {})})
            self.webhooks.send(job, "output", self.render(self.store.job(job_id)))
        elif kind == "checkpoint":
            self._emit(job_id, "checkpoint", {"step": e["step"]})
        elif kind == "lora":
            name = job["plan"].get("lora_name") or job_id
            self.store.add_lora(name, job["owner"], job_id, e["path"], e["sha256"], job["plan"].get("trigger_word"))
            self.store.add_output(job_id, job["owner"], 0, "lora", e["path"], None)
        elif kind == "done":
            self.loaded = set(e.get("loaded", self.loaded))
            self.running = None if self.running == job_id else self.running
            self._finish(job_id, e["status"], e.get("error"), {**job["metrics"], **e.get("metrics", {})})

    def _finish(self, job_id: str, status: str, error: str | None, metrics: dict) -> None:
        if self.store.finish(job_id, status, error, metrics):
            job = self.store.job(job_id)
            self._emit(job_id, "status", {"status": status, **({"error": error} if error else {})})
            self._emit(job_id, "done", {"status": status, "error": error})
            self.webhooks.send(job, "completed", self.render(job))
        self.progress.pop(job_id, None)

    # -- requests from the API ----------------------------------------------------------------------
    def submitted(self) -> None:
        self.wake.set()

    def cancel(self, job_id: str) -> None:
        """Cancel one job by id: a pending one without touching the running one, the running one at its next step
        (a training after saving a checkpoint)."""
        with self.lock:
            job = self.store.job(job_id)
            if job is None or job["status"] in TERMINAL:
                return
            if job["dispatched_at"] is None:
                self._finish(job_id, "canceled", None, job["metrics"])
                return
        with contextlib.suppress(Exception):
            self.commands.put({"op": "cancel", "id": job_id})

    # -- events to listeners ----------------------------------------------------------------------
    def channel(self, job_id: str) -> Channel:
        with self.lock:
            ch = self.channels.get(job_id)
            if ch is None:
                ch = self.channels[job_id] = Channel()
                while len(self.channels) > 500:  # forget the oldest jobs' replay buffers
                    self.channels.pop(next(iter(self.channels)))
            return ch

    def _emit(self, job_id: str, kind: str, data: dict) -> None:
        with self.lock:
            ch = self.channel(job_id)
            ch.seq += 1
            event = (ch.seq, kind, data)
            ch.events.append(event)
            listeners = list(ch.listeners)
            waiters = list(ch.waiters) if kind == "done" else []
            if kind == "done":
                ch.waiters.clear()
        for loop, q in listeners:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(q.put_nowait, event)
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def listen(self, job_id: str, after: int) -> tuple[asyncio.Queue, list]:
        """A queue of the job's new events and the buffered ones after event id `after`."""
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self.lock:
            ch = self.channel(job_id)
            backlog = [e for e in ch.events if e[0] > after]
            ch.listeners.add((loop, q))
        return q, backlog

    def unlisten(self, job_id: str, q) -> None:
        with self.lock:
            ch = self.channels.get(job_id)
            if ch is not None:
                ch.listeners = {x for x in ch.listeners if x[1] is not q}

    async def wait(self, job_id: str, timeout: float) -> None:
        ev = asyncio.Event()
        with self.lock:
            job = self.store.job(job_id)
            if job is None or job["status"] in TERMINAL:
                return
            self.channel(job_id).waiters.append((asyncio.get_running_loop(), ev))
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout)
