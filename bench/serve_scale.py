"""`fluxlab serve` with several workers, measured side by side in one run on this machine:

1. throughput: 40 mixed demo predictions (sizes 128-256 px, 4-12 steps) queued at once, on 1 worker and on 2
   (the CPU's cores split between them by the thread policy);
2. reloads: 40 predictions alternating between two models on 2 workers that keep one model each
   (`--max-models 1`), with affinity (the default) and with `--no-affinity`; a reload is a job that spent time
   loading its model;
   (each queue is made while the queue is paused, then resumed, so the broker sees it whole as on a busy server)
3. replacement: a worker killed (SIGKILL) while idle; seconds until its replacement is ready, and until that
   replacement has finished a job (its first job loads the model).

Each case is its own `fluxlab serve` on a free loopback port with a fresh data folder. Prints a Markdown table
and the CPU's flags.

    .venv/bin/python bench/serve_scale.py [--jobs 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, data: Path, *args: str):
        from fluxlab.serve.store import Store

        self.token = Store(data).create_token("bench", admin=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fluxlab", "serve", "--port", str(self.port), "--data", str(data), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("FLUXLAB_THREADS", "OMP_NUM_THREADS")}
        self.log = open(data / "server.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                workers = self.api.get("/v1/health").json().get("workers") or []
                if workers and all(w["ready"] for w in workers):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def submit(self, model: str, **fields) -> str:
        r = self.api.post("/v1/predictions", json={"model": model, "input": fields})
        r.raise_for_status()
        return r.json()["id"]

    def queue(self, jobs: list[tuple[str, dict]]) -> tuple[list[str], float]:
        """Queue every job while the queue is paused, then resume: the broker sees the whole queue at once, as on a
        busy server. The ids, and when the queue was resumed."""
        self.api.post("/v1/queue/pause").raise_for_status()
        ids = [self.submit(model, **fields) for model, fields in jobs]
        self.api.post("/v1/queue/resume").raise_for_status()
        return ids, time.perf_counter()

    def wait(self, ids: list[str]) -> list[dict]:
        done = {}
        while len(done) < len(ids):
            for i in ids:
                if i not in done:
                    job = self.api.get(f"/v1/predictions/{i}").json()
                    if job["status"] in ("succeeded", "failed", "canceled"):
                        done[i] = job
            time.sleep(0.1)
        return [done[i] for i in ids]

    def close(self) -> None:
        self.api.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def mixed(i: int) -> dict:
    side = (128, 192, 256)[i % 3]
    return {"prompt": f"a {('red', 'blue', 'green', 'yellow')[i % 4]} circle in the center on a white background",
            "width": side, "height": side, "steps": (4, 8, 12)[i % 3], "seed": i}


def throughput(workers: int, jobs: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        s = Serve(Path(d), "--workers", str(workers))
        try:
            s.wait([s.submit("demo", **mixed(0))])  # warm: each worker's first job loads the model
            if workers > 1:
                s.wait([s.submit("demo", **mixed(1)) for _ in range(workers * 2)])
            ids, t0 = s.queue([("demo", mixed(i)) for i in range(jobs)])
            done = s.wait(ids)
            wall = time.perf_counter() - t0
            assert all(j["status"] == "succeeded" for j in done)
            return wall
        finally:
            s.close()


def reloads(models: dict, affinity: bool, jobs: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as d:
        args = ["--workers", "2", "--max-models", "1", *(a for n, p in models.items() for a in ("--model", f"{n}={p}"))]
        s = Serve(Path(d), *args, *([] if affinity else ["--no-affinity"]))
        try:
            names = list(models)
            s.wait([s.submit(n, prompt="a cat", width=128, height=128, steps=4, seed=0) for n in names])  # warm
            ids, t0 = s.queue([(names[i % 2], {"prompt": "a cat", "width": 128, "height": 128, "steps": 4, "seed": i})
                               for i in range(jobs)])
            done = s.wait(ids)
            wall = time.perf_counter() - t0
            return sum(1 for j in done if (j["metrics"].get("load_time") or 0) > 0), wall
        finally:
            s.close()


def replacement() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        s = Serve(Path(d), "--workers", "2")
        try:
            s.wait([s.submit("demo", **mixed(0)), s.submit("demo", **mixed(1))])
            victim = s.api.get("/v1/health").json()["workers"][1]
            t0 = time.perf_counter()
            os.kill(victim["pid"], signal.SIGKILL)
            while True:
                w = s.api.get("/v1/health").json()["workers"][1]
                if w["ready"] and w["pid"] != victim["pid"]:
                    ready = time.perf_counter() - t0
                    break
                time.sleep(0.02)
            # both workers busy: the replacement takes one of these
            ids = [s.submit("demo", **mixed(2)), s.submit("demo", **mixed(3))]
            s.wait(ids)
            return ready, time.perf_counter() - t0
        finally:
            s.close()


def cpu_flags() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()
    flags = set(line.split(":", 1)[1].split())
    return " ".join(f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")
                    if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    from fluxlab.runtime.threads import usable_cpus
    from fluxlab.tiny import build_tiny

    print(f"CPU: {platform.machine()}, {usable_cpus()} usable cores, flags: {cpu_flags()}")
    one, two = throughput(1, args.jobs), throughput(2, args.jobs)
    with tempfile.TemporaryDirectory() as d:
        models = {"klein": str(build_tiny("flux2-klein", Path(d) / "klein")),
                  "schnell": str(build_tiny("flux1-schnell", Path(d) / "schnell"))}
        with_aff, without = reloads(models, True, args.jobs), reloads(models, False, args.jobs)
    ready, first_job = replacement()
    print()
    print("| case | result |")
    print("| --- | --- |")
    print(f"| {args.jobs} mixed demo predictions, 1 worker | {one:.1f} s ({args.jobs / one * 60:.1f} images/min) |")
    print(f"| the same, 2 workers | {two:.1f} s ({args.jobs / two * 60:.1f} images/min), **{one / two:.2f}x** |")
    print(f"| {args.jobs} alternating between two models, 2 workers, affinity | {with_aff[0]} reloads, "
          f"{with_aff[1]:.1f} s |")
    print(f"| the same, `--no-affinity` | {without[0]} reloads, {without[1]:.1f} s |")
    print(f"| a killed worker's replacement ready | {ready:.2f} s |")
    print(f"| ... and its first job done (loads the model) | {first_job:.2f} s |")


if __name__ == "__main__":
    main()
