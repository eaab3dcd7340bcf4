"""A real `fluxlab serve` for tests: its own process on a free loopback port, its own data folder and token."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data: Path, models: dict | None = None, env: dict | None = None, args: tuple = ()):
        from fluxlab.serve.store import Store

        self.data = Path(data)
        self.token = Store(self.data).create_token(f"tester-{os.getpid()}-{time.time_ns()}")
        self.models = models or {}
        self.env = env or {}
        self.args = list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90) -> Server:
        args = [sys.executable, "-m", "fluxlab", "serve", "--port", str(self.port), "--data", str(self.data)]
        for name, folder in self.models.items():
            args += ["--model", f"{name}={folder}"]
        args += self.args
        # The server's worker shares this machine's cores with the test process: one torch thread.
        env = {**os.environ, "FLUXLAB_THREADS": "1", "PYTHONUNBUFFERED": "1", **self.env}
        self.log = open(self.data / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.data / 'server.log').read_text()[-2000:]}")
            try:
                h = httpx.get(self.url + "/v1/health", timeout=2).json()
                if h["ready"]:
                    return self
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def add_token(self, name: str, admin: bool = False) -> str:
        from fluxlab.serve.store import Store

        return Store(self.data).create_token(name, admin=admin)

    def client(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()

    def wait(self, api: httpx.Client, job_id: str, kind: str = "prediction", timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            path = {"prediction": "predictions", "training": "trainings", "batch": "batches"}[kind]
            job = api.get(f"/v1/{path}/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            time.sleep(0.1)
        raise TimeoutError(job_id)
