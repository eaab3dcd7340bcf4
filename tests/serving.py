"""A real `fluxlab serve` for tests: its own process on a free loopback port, its own data folder and token."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def receiver():
    """A webhook receiver on a free loopback port: yields its URL and the (headers, body) pairs it got."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    got: list = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    port = free_port()
    httpd = HTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        httpd.shutdown()


def demo_zip(path: Path) -> Path:
    """Six ring images of the demo's LoRA proof with their captions, zipped (a training set)."""
    import io
    import zipfile

    from fluxlab.demo.data import render
    from fluxlab.demo.lora import captions, ring_scenes

    with zipfile.ZipFile(path, "w") as z:
        for i, scene in enumerate(ring_scenes(6, 0)):
            buf = io.BytesIO()
            render(scene, seed=i).save(buf, format="PNG")
            z.writestr(f"ring_{i}.png", buf.getvalue())
            z.writestr(f"ring_{i}.txt", captions(scene)[0])
    return path


def tls_pair(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl), for a server on https."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class Server:
    def __init__(self, data: Path, models: dict | None = None, env: dict | None = None, args: tuple = (),
                 tls: tuple[Path, Path] | None = None):
        from fluxlab.serve.store import Store

        self.data = Path(data)
        self.token = Store(self.data).create_token(f"tester-{os.getpid()}-{time.time_ns()}")
        self.models = models or {}
        self.env = env or {}
        self.args = list(args)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify = True
        if tls:
            import ssl

            self.args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
            self.verify = ssl.create_default_context(cafile=str(tls[0]))
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
                h = httpx.get(self.url + "/v1/health", timeout=2, verify=self.verify).json()
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
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, verify=self.verify)

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
            path = {"prediction": "predictions", "training": "trainings", "batch": "batches",
                    "download": "downloads"}[kind]
            job = api.get(f"/v1/{path}/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            time.sleep(0.1)
        raise TimeoutError(job_id)
