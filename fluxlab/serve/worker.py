"""The worker process: it owns the model pool and runs one job at a time through the service layer.

Started by the server (serve.broker) with the spawn method, so torch lives only here and the API process stays
light and responsive. It reads commands (run a job, cancel a job, stop) and answers with small events (status,
progress, preview JPEGs, outputs, done). Models stay loaded between jobs (the pool); a job's LoRAs are switched
on the loaded base. It dies with the server (PR_SET_PDEATHSIG), so a killed server never leaves a worker behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import signal
import threading
import time
import traceback
from pathlib import Path

PROGRESS_EVERY_S = 0.25  # at most ~4 progress events a second
PREVIEW_EVERY_S = 1.0  # a preview JPEG at most every second (previews must never slow a generation down)
PREVIEW_SIDE = 256
BEAT_S = 2.0  # a heartbeat this often, busy or idle: the broker replaces a worker it has not heard from in a while

log = logging.getLogger("fluxlab.worker")


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def jpeg(image, side: int = PREVIEW_SIDE) -> bytes:
    im = image.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class JobOutput:
    """Where a prediction's images go: <data>/outputs/<job id>/<index>-<seed>.png, written atomically."""

    reproducible = False

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def check(self, seeds: list[int]) -> list[Path]:
        from ..files import check_writable

        check_writable(self.folder, "output folder")
        return [self.folder / f"{i:03d}-{seed}.png" for i, seed in enumerate(seeds)]


class Worker:
    def __init__(self, commands, events, settings: dict):
        from ..service.generate import new_pool

        self.commands, self.events, self.settings = commands, events, settings
        self.pool = new_pool(max_models=settings.get("max_models"))
        self.jobs: queue.Queue = queue.Queue()
        self.current: str | None = None
        self.lease: str | None = None
        self.token = None
        self.device_name: str | None = None  # its device setting as resolved here (vitals)

    def send(self, job_id: str, event: str, **data) -> None:
        """An event of the running job, tagged with its lease (the broker drops events of a lease it took back)."""
        if event == "done":
            data["loaded"] = [m.ref.name for m in self.pool.loaded()]
        self.events.put({"id": job_id, "type": event, "lease": self.lease, **data})

    def vitals(self) -> dict:
        import socket

        rss = None
        with contextlib.suppress(OSError, ValueError), open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if self.device_name is None:  # what its device setting ("auto") resolved to on this node, once
            from ..errors import UserError
            from ..runtime.devices import resolve_devices

            setting = self.settings.get("runtime", {}).get("device", "auto")
            try:
                self.device_name = ",".join(str(d) for d in resolve_devices(setting))
            except UserError:  # a bad device is reported through the jobs; the setting is shown as it is
                self.device_name = setting
        return {"pid": os.getpid(), "node": socket.gethostname(), "rss_bytes": rss, "device": self.device_name}

    def beat(self) -> None:
        while True:
            time.sleep(BEAT_S)
            self.events.put({"id": None, "type": "beat", **self.vitals()})

    def listen(self) -> None:
        while True:
            try:
                cmd = self.commands.get()
            except (EOFError, OSError):
                os._exit(0)
            if cmd["op"] == "run":
                self.jobs.put(cmd["job"])
            elif cmd["op"] == "cancel":
                if cmd["id"] == self.current and self.token is not None:
                    self.token.cancel("canceled")
            elif cmd["op"] == "stop":
                self.jobs.put(None)
                return

    def loop(self) -> None:
        threading.Thread(target=self.listen, daemon=True).start()
        threading.Thread(target=self.beat, daemon=True).start()
        self.events.put({"id": None, "type": "ready", **self.vitals()})
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.run(job)

    def run(self, job: dict) -> None:
        from ..errors import UserError
        from ..service.events import Cancelled, CancelToken

        job_id = job["id"]
        self.current, self.lease, self.token = job_id, job.get("lease"), CancelToken()
        t0 = time.perf_counter()
        try:
            run = {"training": self.train, "batch": self.batch, "grid": self.grid,
                   "caption": self.caption, "upsample": self.upsample,
                   "download": self.download}.get(job["kind"], self.predict)
            metrics = run(job)
            metrics["total_time"] = round(time.perf_counter() - t0, 4)
            self.send(job_id, "done", status="succeeded", error=None, metrics=metrics)
        except Cancelled:
            self.send(job_id, "done", status="canceled", error=None, metrics={})
        except UserError as e:
            self.send(job_id, "done", status="failed", error=str(e), metrics={})
        except Exception as e:  # a bug or a device fault: the job fails, the worker lives on
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            self.send(job_id, "done", status="failed", error=f"internal error: {type(e).__name__}: {e}",
                      metrics={})
        finally:
            self.current, self.lease, self.token = None, None, None

    # -- predictions ----------------------------------------------------------------------------------
    def predict(self, job: dict) -> dict:
        from ..service import events as ev
        from ..service.generate import generate
        from ..spec.request import GenerateRequest, ModelRef, Runtime

        plan = job["plan"]
        request = GenerateRequest.model_validate(plan["request"])
        ref = ModelRef.model_validate(plan["model"])
        runtime = Runtime.model_validate({**self.settings.get("runtime", {}), "preview_every": 1})
        job_id = job["id"]
        state = {"progress": 0.0, "preview": 0.0, "started": None, "load": 0.0, "summary": {}}

        def events(e) -> None:
            now = time.perf_counter()
            if isinstance(e, ev.Loading):
                self.send(job_id, "loading", model=e.model)
            elif isinstance(e, ev.Started):
                state["started"], state["load"] = now, e.load_seconds
                self.send(job_id, "processing", load_time=e.load_seconds)
            elif isinstance(e, ev.Step):
                last = e.i == e.n
                if last or now - state["progress"] >= PROGRESS_EVERY_S:
                    state["progress"] = now
                    self.send(job_id, "progress", step=e.i, total=e.n, eta_s=e.eta_s, image=e.done_images,
                              images=e.total_images)
            elif isinstance(e, ev.Preview):
                if e.i == e.n or now - state["preview"] >= PREVIEW_EVERY_S:
                    state["preview"] = now
                    self.send(job_id, "preview", step=e.i, jpeg=jpeg(e.images[0]))
            elif isinstance(e, ev.Image):
                self.send(job_id, "output", kind="image", idx=e.index, path=str(e.path), seed=e.result.seed)
            elif isinstance(e, ev.Finished):
                state["summary"] = e.summary

        for _ in generate(request, ref, runtime, events=events, cancel=self.token, pool=self.pool,
                          out=JobOutput(Path(plan["out"]))):
            pass
        # load_time: all loading this job caused (components load on first use, so also during the run).
        metrics = {f"{k}_time": v for k, v in state["summary"].get("phases_s", {}).items()}
        metrics["predict_time"] = round(time.perf_counter() - state["started"], 4) if state["started"] else None
        return metrics

    def upsample(self, job: dict) -> dict:
        """A prediction's prompts rewritten on the pooled model (service.generate.rewritten), as one JSON output."""
        import json

        from ..files import atomic_write
        from ..service.generate import prepare, rewritten
        from ..spec.request import GenerateRequest, ModelRef, Runtime

        plan, job_id = job["plan"], job["id"]
        request = GenerateRequest.model_validate(plan["request"])
        runtime = Runtime.model_validate(self.settings.get("runtime", {}))
        prep = prepare(request, ModelRef.model_validate(plan["model"]), runtime)
        self.send(job_id, "loading", model=prep.source.label)
        t0 = time.perf_counter()
        model = self.pool.get(prep.ref, runtime, lambda text: None, source=prep.source)
        self.send(job_id, "processing", load_time=round(time.perf_counter() - t0, 4))
        started = time.perf_counter()
        with model.notifying(lambda text: None):
            done = rewritten(model, prep.job)
        listing = Path(plan["out"]) / "prompts.json"
        text = json.dumps({"prompts": list(done.prompts), "upsampled_from": list(done.upsampled_from)}, indent=1)
        atomic_write(listing, lambda tmp: tmp.write_text(text + "\n"))
        self.send(job_id, "output", kind="prompts", idx=0, path=str(listing), seed=None)
        return {"predict_time": round(time.perf_counter() - started, 4)}

    # -- grids ----------------------------------------------------------------------------------------
    def grid(self, job: dict) -> dict:
        """A grid through service.grid on the pooled model: each cell is an output as it finishes, then the sheet
        and the CSV."""
        from ..service import events as ev
        from ..service.grid import grid, parse_axis
        from ..spec.request import ModelRef, Runtime

        plan, job_id = job["plan"], job["id"]
        x, y = parse_axis(plan["x"]), parse_axis(plan["y"]) if plan["y"] else None
        started = time.perf_counter()
        self.send(job_id, "processing", load_time=0.0)
        total = plan["cells"]
        done = []

        def on_cell(cell) -> None:
            idx = cell.row * len(x.values) + cell.col
            done.append(idx)
            self.send(job_id, "output", kind="cell", idx=idx, path=str(cell.path), seed=None)
            self.send(job_id, "progress", done=len(done), total=total)

        def events(e) -> None:
            if self.token is not None and isinstance(e, ev.Step):
                self.token.check()

        result = grid(plan["prompt"], x, y, plan["base"], ModelRef.model_validate(plan["model"]),
                      Runtime.model_validate(self.settings.get("runtime", {})), Path(plan["out"]), pool=self.pool,
                      events=events, cancel=self.token, on_cell=on_cell)
        self.send(job_id, "output", kind="sheet", idx=0, path=str(result.sheet), seed=None)
        self.send(job_id, "output", kind="csv", idx=0, path=str(result.csv), seed=None)
        return {"predict_time": round(time.perf_counter() - started, 4), "cells": total}

    # -- batches --------------------------------------------------------------------------------------
    def batch(self, job: dict) -> dict:
        """A batch through the same code as `fluxlab batch` (the local engine, in this worker)."""
        from .. import batch
        from ..batch.plan import BatchPlan

        plan = BatchPlan.from_json(job["plan"]["batch"])
        job_id, out = job["id"], Path(job["plan"]["out"])
        state = {"progress": 0.0, "started": time.perf_counter()}
        self.send(job_id, "processing", load_time=0.0)

        def row(r: dict, report) -> None:
            if r["status"] == "done" and not r.get("skipped"):
                self.send(job_id, "output", kind="image", idx=r["index"], path=str(out / r["file"]), seed=r["seed"])
            now = time.perf_counter()
            finished = report.done_before + report.made + report.failed + report.skipped
            if finished == report.total or now - state["progress"] >= PROGRESS_EVERY_S:
                state["progress"] = now
                self.send(job_id, "progress", done=report.done_before + report.made + report.skipped,
                          failed=report.failed, total=report.total)

        self.pool.release()  # the batch runner holds its own pooled model
        report = batch.run(plan, out, engine="local", on_row=row, cancel=self.token)
        return {"predict_time": round(time.perf_counter() - state["started"], 4), "images": report.made,
                "failed": report.failed, "images_per_s": round(report.images_per_s, 3)}

    # -- trainings ------------------------------------------------------------------------------------
    # -- captions -------------------------------------------------------------------------------------
    def caption(self, job: dict) -> dict:
        """Captions for an uploaded set through service.caption: written beside copies of its images in the job's
        folder, listed in captions.json (the job's output) and zipped with the images."""
        import json
        import shutil

        from ..service.caption import Captioned, caption

        plan, job_id = job["plan"], job["id"]
        out, started = Path(plan["out"]), time.perf_counter()
        self.send(job_id, "processing", load_time=0.0)

        def events(e) -> None:
            if isinstance(e, Captioned):
                self.send(job_id, "progress", done=e.i, total=e.n, image=e.image, caption=e.caption, eta_s=e.eta_s)

        self.pool.release()  # a captioner needs the memory; the next prediction loads its model again
        source = Path(plan["source"])
        if source.suffix.lower() == ".zip":
            result = caption(source, plan["captioner"], out=out / "set", events=events, cancel=self.token,
                             **plan["options"])
        else:
            shutil.copytree(source, out / "set", dirs_exist_ok=True)
            result = caption(out / "set", plan["captioner"], events=events, cancel=self.token, **plan["options"])
        rows = sorted(({"image": r.image, "caption": r.caption, "status": r.status, **image_size(out / "set" / r.image)}
                       for r in result.rows), key=lambda r: r["image"])
        listing = out / "captions.json"
        listing.write_text(json.dumps(rows, indent=1) + "\n")
        archive = shutil.make_archive(str(out / "captioned"), "zip", out / "set")
        for i, r in enumerate(rows):  # each image, in the listing's order (the page shows them beside the captions)
            self.send(job_id, "output", kind="dataset", idx=i, path=str(out / "set" / r["image"]), seed=None)
        self.send(job_id, "output", kind="captions", idx=0, path=str(listing), seed=None)
        self.send(job_id, "output", kind="zip", idx=0, path=archive, seed=None)
        return {"predict_time": round(time.perf_counter() - started, 4), "images": result.total}

    def download(self, job: dict) -> dict:
        """A catalog model's weights into this node's hub cache, with progress in bytes; a cancel stops it at the
        next chunk (the hub library resumes a partial file on the next try)."""
        from ..runtime.loading import download, locate
        from ..service.events import Cancelled

        plan, job_id, started = job["plan"], job["id"], time.perf_counter()
        state = {"sent": 0.0, "done": 0}
        self.send(job_id, "processing", load_time=0.0)

        def progress(done: int, total: int) -> None:
            if self.token.cancelled:
                raise Cancelled("canceled")
            state["done"] = done
            now = time.perf_counter()
            if now - state["sent"] >= PROGRESS_EVERY_S or (total and done >= total):
                state["sent"] = now
                rate = done / max(now - started, 1e-6)
                self.send(job_id, "progress", done_bytes=done, total_bytes=total,
                          eta_s=round((total - done) / rate, 1) if total and rate > 0 else None)

        download(locate(plan["model"]), progress=progress)
        return {"predict_time": round(time.perf_counter() - started, 4), "bytes": state["done"]}

    def train(self, job: dict) -> dict:
        from ..service import events as ev
        from ..service.train import train
        from ..spec.trainconfig import parse

        plan = job["plan"]
        config = parse(plan["config"], "training config")
        job_id = job["id"]
        state = {"progress": 0.0, "started": time.perf_counter(), "samples": 0}
        self.send(job_id, "processing", load_time=0.0)

        def events(e) -> None:
            now = time.perf_counter()
            if isinstance(e, ev.TrainStep):
                if e.step == e.steps or now - state["progress"] >= PROGRESS_EVERY_S:
                    state["progress"] = now
                    self.send(job_id, "progress", step=e.step, total=e.steps, eta_s=e.eta_s, loss=e.loss)
            elif isinstance(e, ev.Samples):
                for path in e.paths:
                    self.send(job_id, "output", kind="sample", idx=state["samples"], path=str(path), seed=None,
                              step=e.step)
                    state["samples"] += 1
            elif isinstance(e, ev.Saved):
                self.send(job_id, "checkpoint", step=e.step, path=str(e.path))

        # The pool's models are released first: a training run needs the memory, and loads its own.
        self.pool.release()
        result = train(config, events=events, cancel=self.token, device=self.settings.get("runtime", {}).get("device"),
                       resume=bool(job.get("resume")))
        if result.lora is None:
            from ..service.events import Cancelled

            raise Cancelled("canceled")
        import hashlib

        digest = hashlib.sha256(Path(result.lora).read_bytes()).hexdigest()
        self.send(job_id, "lora", path=str(result.lora), sha256=digest)
        return {"predict_time": round(time.perf_counter() - state["started"], 4)}


def main(commands, events, settings: dict) -> None:
    """The worker process's entry point (multiprocessing spawn target)."""
    from ..runtime.threads import child_env

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops the worker
    # Before torch loads: N workers on one machine share its cores (each its part, not every core each).
    os.environ.update(child_env(settings.get("share", 1)))
    log_to(settings)
    Worker(commands, events, settings).loop()


def log_to(settings: dict) -> None:
    name = f"worker-{settings['slot']}.log" if settings.get("slot") not in (None, "w0") else "worker.log"
    logging.basicConfig(filename=str(Path(settings["data"]) / name), level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")


def image_size(path: Path) -> dict:
    """An image's width and height (read from its header), for the dataset view's warnings; {} if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return {"width": im.width, "height": im.height}
    except (OSError, UnidentifiedImageError):
        return {}
