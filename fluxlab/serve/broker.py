"""The API process's side of the queue: it starts and watches the workers, hands each idle one a job (priority,
then arrival, preferring a worker that has the job's model loaded: serve.schedule), turns the workers' events into
stored state, Server-Sent Events and webhooks, and cancels by id.

One thread owns every worker's events (dispatch, events, liveness), so the order of what happens to a job is the
order it is recorded. Request handlers only read the store, add jobs, and ask for cancels; they never wait on a
worker, so the API answers while jobs run.

A dispatched job holds a lease in the store (worker, lease id, heartbeat). Every event a worker sends for a job
carries its lease, and events of a lease the broker took back are dropped, so a job never counts as running on two
workers. A worker that dies, or is silent past the heartbeat bound, is replaced; its job is queued again once when
it is safe to repeat (predictions and grids: same seed, same pixels) and otherwise fails as "worker_crashed".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .schedule import WorkerView, assign, model_of
from .store import TERMINAL, Store
from .webhooks import Webhooks

log = logging.getLogger("fluxlab.serve")
REPLAY = 1024  # events kept per job for reconnecting streams (as cog keeps)
REPEATABLE = ("prediction", "grid")  # kinds queued again (once) when their worker dies
ATTEMPTS = 2


@dataclass
class Channel:
    """A job's recent events and who is listening."""

    events: deque = field(default_factory=lambda: deque(maxlen=REPLAY))
    seq: int = 0
    listeners: set = field(default_factory=set)  # (loop, asyncio.Queue)
    waiters: list = field(default_factory=list)  # (loop, asyncio.Event)
    phase: int = 1  # a resumed training is a new phase of the same job
    phase_from: int = 0  # streams replay events after this seq only (the current phase's)


@dataclass
class Slot:
    """A place for one worker: the worker now in it (a handle of serve.workers) and what it is doing."""

    name: str
    settings: dict
    handle: object = None
    gen: int = 0
    ready: bool = False
    running: str | None = None
    lease: str | None = None
    model: str | None = None  # the model of the job it runs (loaded by now, or soon)
    loaded: frozenset = frozenset()
    loading: str | None = None  # the model it is loading now, as the worker names it
    restarts: int = 0
    seen: float = 0.0  # when the worker last said anything
    idle_since: float = 0.0
    vitals: dict = field(default_factory=dict)  # pid, node, rss_bytes, resolved device (from its last beat)
    replaced_at: float | None = None  # when the worker in it died (until its replacement is ready)


class Broker:
    def __init__(self, store: Store, settings, render):
        self.store, self.render = store, render  # render(job) -> the API object
        self.base, self.config, self.data = settings.worker(), settings.workers, settings.data
        self.inbox: queue.Queue = queue.Queue()
        self.slots: dict[str, Slot] = {}
        self.named = 0
        self.held_since: dict[str, float] = {}  # jobs waiting for a worker that has their model
        self.canceling: set[str] = set()
        self.channels: dict[str, Channel] = {}
        self.progress: dict[str, dict] = {}
        self.previews: dict[str, bytes] = {}
        self.replacements: list[float] = []  # seconds from a worker's death to its replacement being ready
        self.lock = threading.RLock()
        self.stopping = False
        self.scaled_at = 0.0
        self.webhooks = Webhooks(store.secret, settings.webhook_policy, settings.webhook_retries,
                                 settings.webhook_backoff_s, resolve=settings.resolve)
        self.thread = threading.Thread(target=self._loop, name="fluxlab-broker", daemon=True)

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> None:
        for job_id in self.store.interrupt_running():
            self._emit(job_id, "status", {"status": "failed", "error": "interrupted"})
        if self.config.engine == "ray":
            from .workers import connect_ray

            connect_ray(self.config.ray_address)
        for _ in range(self.config.count):
            self._add()
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake()
        # Every worker is told first, so they stop side by side; each handle's stop() then waits for its own.
        for slot in list(self.slots.values()):
            with contextlib.suppress(Exception):
                slot.handle.send({"op": "stop"})
        for slot in list(self.slots.values()):
            with contextlib.suppress(Exception):
                slot.handle.stop()
        self.webhooks.close()

    def _add(self) -> Slot:
        """A new slot and its worker. Local workers take the listed devices in turn and share the cores."""
        from ..runtime.threads import usable_cpus

        name = f"w{self.named}"
        devices = self.config.devices
        runtime = dict(self.base.get("runtime", {}))
        if self.config.engine == "ray":
            runtime["device"] = "cuda" if self.config.gpus_per_worker else "cpu"  # Ray gives the actor its GPUs
        elif devices:
            runtime["device"] = devices[self.named % len(devices)].replace("+", ",")  # cuda:0+cuda:1: one model split
        share = 1 if devices and not devices[0].startswith("cpu") else min(self.config.most, usable_cpus())
        settings = {**self.base, "runtime": runtime, "slot": name, "share": share if self.config.engine == "local"
                    else 1, "api_root": str(self.data), "shared_data": self.config.shared_data,
                    "cpus_per_worker": self.config.cpus_per_worker, "gpus_per_worker": self.config.gpus_per_worker}
        self.named += 1
        slot = self.slots[name] = Slot(name, settings, idle_since=time.time())
        self._spawn(slot)
        return slot

    def _spawn(self, slot: Slot) -> None:
        from .workers import HANDLES

        slot.gen += 1
        slot.ready, slot.running, slot.lease, slot.model, slot.loaded = False, None, None, None, frozenset()
        slot.loading = None
        slot.handle = HANDLES[self.config.engine](slot.name, slot.settings, self.inbox, slot.gen)
        slot.handle.start()

    @property
    def ready(self) -> bool:
        return any(s.ready for s in list(self.slots.values()))

    @property
    def loaded(self) -> set[str]:
        return {m for s in list(self.slots.values()) for m in s.loaded}

    @property
    def loading(self) -> set[str]:
        """The models workers are loading now."""
        return {s.loading for s in list(self.slots.values()) if s.loading}

    @property
    def running(self) -> list[str]:
        """The jobs running now, one per busy worker, in the workers' order."""
        return [s.running for s in list(self.slots.values()) if s.running is not None]

    @property
    def paused(self) -> bool:
        return self.store.setting("paused", "0") == "1"

    def pause(self, on: bool) -> None:
        self.store.set_setting("paused", "1" if on else "0")
        self.wake()

    def worker_info(self) -> list[dict]:
        """Each worker as the API shows it: models by the names clients use (a server folder by its --model name)."""
        names = {path: name for name, path in self.base.get("models", {}).items()}
        rows = []
        for s in list(self.slots.values()):
            rows.append({"name": s.name, "engine": self.config.engine,
                         "device": s.vitals.get("device") or s.settings["runtime"].get("device"),
                         "pid": s.vitals.get("pid"), "node": s.vitals.get("node"),
                         "alive": bool(s.handle and s.handle.alive()), "ready": s.ready,
                         "rss_bytes": s.vitals.get("rss_bytes"), "restarts": s.restarts, "running": s.running,
                         "loaded": sorted(names.get(m, m) for m in s.loaded)})
        return rows

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            try:
                name, gen, event = self.inbox.get(timeout=0.05)
            except queue.Empty:
                event = None
            try:
                if event is not None:
                    self._handle(name, gen, event)
                self._watch()
                if not self.paused:
                    self._dispatch()
            except Exception:  # never let one bad event stop the queue
                log.exception("broker")

    def _dispatch(self) -> None:
        views = [WorkerView(s.name, s.ready and s.running is None, s.loaded | ({s.model} if s.model else set()))
                 for s in self.slots.values()]
        if not any(v.idle for v in views):
            return
        pending = self.store.pending()
        if not pending:
            return
        now = time.time()
        waited = {job_id: now - t for job_id, t in self.held_since.items()}
        picks, held = assign(pending, views, waited, self.config.affinity_wait_s, self.config.affinity)
        self.held_since = {job_id: self.held_since.get(job_id, now) for job_id in held}
        jobs = {j["id"]: j for j in pending}
        for job_id, name in picks:
            slot, job = self.slots[name], jobs[job_id]
            with self.lock:
                lease = self.store.take(job_id, name)
                if lease is None:
                    continue
                slot.running, slot.lease, slot.model = job_id, lease, model_of(job)
            command = {"id": job_id, "kind": job["kind"], "plan": job["plan"], "resume": job["resume"],
                       "lease": lease}
            if self.config.engine == "ray" and not self.config.shared_data:
                from .ship import pack

                command = pack(command, self.data)
            slot.handle.send({"op": "run", "job": command})

    def _watch(self) -> None:
        """Replace dead or silent workers; add workers while jobs wait, stop extra ones that idle (autoscaling)."""
        now = time.time()
        for slot in list(self.slots.values()):
            if self.stopping:
                return
            if not slot.handle.alive():
                self._lost(slot, slot.handle.death())
            elif slot.ready and now - slot.seen > self.config.heartbeat_s:  # hung: _lost kills it
                self._lost(slot, f"the worker sent no heartbeat for {self.config.heartbeat_s:g} s")
        if self.config.most > self.config.count and now - self.scaled_at > 1.0:
            self.scaled_at = now
            pending = self.store.pending_count()
            waiting = pending - sum(1 for s in self.slots.values() if s.running is None)
            if waiting > 0 and len(self.slots) < self.config.most and all(s.ready for s in self.slots.values()):
                log.info("%d jobs wait: adding a worker", waiting)
                self._add()
            elif len(self.slots) > self.config.count and pending == 0:  # never while jobs wait (for affinity too)
                for slot in list(self.slots.values()):
                    if (slot.ready and slot.running is None and now - slot.idle_since > self.config.idle_s
                            and len(self.slots) > self.config.count):
                        log.info("worker %s idle for %.0f s: stopping it", slot.name, now - slot.idle_since)
                        del self.slots[slot.name]
                        slot.handle.kill()

    def _lost(self, slot: Slot, reason: str) -> None:
        job_id, lease = slot.running, slot.lease
        if job_id is not None:
            job = self.store.job(job_id)
            if job is not None and job["status"] not in TERMINAL:
                if job_id in self.canceling:
                    self._finish(job_id, "canceled", None, job["metrics"])
                elif job["kind"] in REPEATABLE and job["attempts"] < ATTEMPTS and self.store.requeue(job_id, lease):
                    self.progress.pop(job_id, None)
                    self._emit(job_id, "status", {"status": "starting", "requeued": f"{reason}; queued again"})
                    log.warning("job %s queued again: %s", job_id, reason)
                else:
                    self._finish(job_id, "failed", f"worker_crashed: {reason}; the job was not completed",
                                 job["metrics"])
        slot.restarts += 1
        slot.replaced_at = time.time()
        log.warning("worker %s: %s; starting a new one", slot.name, reason)
        slot.handle.kill()
        self._spawn(slot)

    def _handle(self, name: str, gen: int, e: dict) -> None:
        slot = self.slots.get(name)
        if slot is None or gen != slot.gen:
            return  # a worker that was replaced or stopped
        now = time.time()
        slot.seen = now
        kind, job_id = e["type"], e.get("id")
        if kind in ("ready", "beat"):
            slot.vitals = {k: e.get(k) for k in ("pid", "node", "rss_bytes", "device")}
            if kind == "ready":
                slot.ready, slot.idle_since = True, now
                if slot.replaced_at is not None:
                    self.replacements.append(round(now - slot.replaced_at, 3))
                    slot.replaced_at = None
            elif slot.running is not None:
                self.store.beat(slot.running, slot.lease)
            return
        job = self.store.job(job_id) if job_id else None
        if job is None or job["lease"] is None or job["lease"] != e.get("lease"):
            return  # a late event of a lease that was taken back
        if "files" in e:
            from .ship import receive

            receive(e, self.data)
        slot.loading = e["model"] if kind == "loading" else None  # any later event of the job: loaded (or over)
        if kind == "loading":
            self._emit(job_id, "status", {"status": "starting", "loading": e["model"]})
        elif kind == "processing":
            metrics = {**job["metrics"], "load_time": e.get("load_time", 0.0)}
            self.store.update(job_id, status="processing", started_at=time.time(), metrics=metrics)
            self._emit(job_id, "status", {"status": "processing"})
            self.webhooks.send(job, "start", self.render(self.store.job(job_id)))
        elif kind == "progress":
            data = {k: v for k, v in e.items() if k not in ("id", "type", "lease")}
            self.progress[job_id] = data
            self._emit(job_id, "progress", data)
        elif kind == "preview":
            self.previews[job_id] = e["jpeg"]
            self._emit(job_id, "preview", {"step": e["step"], "url": f"/v1/predictions/{job_id}/preview?step="
                                                                       f"{e['step']}"})
        elif kind == "output":
            out = self.store.add_output(job_id, job["owner"], e["idx"], e["kind"], e["path"], e.get("seed"))
            self._emit(job_id, "output", {"kind": e["kind"], "url": f"/v1/outputs/{out['id']}", "index": e["idx"],
                                          **({"step": e["step"]} if "step" in e else {}),
                                          **({"seed": e["seed"]} if e.get("seed") is not None else {})})
            self.webhooks.send(job, "output", self.render(self.store.job(job_id)))
        elif kind == "checkpoint":
            self._emit(job_id, "checkpoint", {"step": e["step"]})
        elif kind == "lora":
            name = job["plan"].get("lora_name") or job_id
            self.store.add_lora(name, job["owner"], job_id, e["path"], e["sha256"], job["plan"].get("trigger_word"))
            self.store.add_output(job_id, job["owner"], 0, "lora", e["path"], None)
        elif kind == "done":
            slot.loaded = frozenset(e.get("loaded", slot.loaded))
            if slot.running == job_id:
                slot.running, slot.lease, slot.model, slot.idle_since = None, None, None, now
            self.canceling.discard(job_id)
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
        self.wake()

    def wake(self) -> None:
        """Run the loop now (dispatch a new job at once) rather than at its next 50 ms poll."""
        self.inbox.put((None, 0, None))

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
            self.canceling.add(job_id)
            holder = next((s for s in self.slots.values() if s.running == job_id), None)
        if holder is not None:
            holder.handle.send({"op": "cancel", "id": job_id})

    def resumed(self, job_id: str) -> None:
        """A stopped training queued again: a new phase of the same job. Its stream starts here (a new connection
        no longer replays the last phase's `done`)."""
        with self.lock:
            ch = self.channel(job_id)
            ch.phase += 1
            ch.phase_from = ch.seq
        self._emit(job_id, "status", {"status": "starting", "phase": ch.phase, "resumed": True})

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
            backlog = [e for e in ch.events if e[0] > max(after, ch.phase_from)]
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
