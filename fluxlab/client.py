"""A Python client for `fluxlab serve`, built on httpx.

    from fluxlab import Client
    client = Client("http://127.0.0.1:7860", token="flx_...")     # or $FLUXLAB_TOKEN
    p = client.predict("demo", prompt="a red circle in the center", seed=3)   # waits for the result
    client.download(p["output"][0], "circle.png")
    t = client.train("demo", images="shapes.zip", trigger_word="zxq", steps=200, wait=True)
    client.predict("demo", prompt="a zxq in the center", lora=[{"name": t["id"], "scale": 1.0}])

Local files given as inputs (images, init, mask, LoRA files) are uploaded first. An error answer becomes a
UserError with the server's one-line explanation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

TERMINAL = ("succeeded", "failed", "canceled")
PATHS = {"prediction": "predictions", "training": "trainings", "batch": "batches"}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:7860", token: str | None = None, timeout: float = 60.0):
        import httpx

        token = token or os.environ.get("FLUXLAB_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kw):
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach the fluxlab server at {self.url} ({e})") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise UserError(f"the server answered {r.status_code}: {detail}")
        return r

    def upload(self, path: str | Path) -> str:
        """Upload a file; returns its id."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path} does not exist")
        with open(p, "rb") as f:
            return self._call("POST", "/v1/files", files={"file": (p.name, f)}).json()["id"]

    def _file_id(self, value) -> str:
        if isinstance(value, (str, Path)) and Path(value).is_file():
            return self.upload(value)
        return str(value)

    # -- predictions -------------------------------------------------------------------------------
    def predict(self, model: str = "demo", *, wait: bool | float = True, webhook: str | None = None,
                id: str | None = None, **fields) -> dict:
        """Create a prediction from GenerateRequest fields (plus `lora`: [{"name", "scale"}] or local files)."""
        for key in ("init", "mask"):
            if fields.get(key) is not None:
                fields[key] = self._file_id(fields[key])
        if fields.get("images"):
            fields["images"] = [self._file_id(x) for x in fields["images"]]
        if fields.get("lora"):
            fields["lora"] = [self._lora(x) for x in fields["lora"]]
        body = {"model": model, "input": fields, **({"webhook": webhook} if webhook else {})}
        headers = {"Prefer": f"wait={60 if wait is True else float(wait)}"} if wait else {}
        if id is None:
            job = self._call("POST", "/v1/predictions", json=body, headers=headers).json()
        else:
            job = self._call("PUT", f"/v1/predictions/{id}", json=body, headers=headers).json()
        if wait and job["status"] not in TERMINAL:
            job = self.wait(job["id"], None if wait is True else float(wait))
        return job

    def _lora(self, x) -> dict:
        if isinstance(x, dict):
            return x
        text = str(x)
        path, sep, scale = text.rpartition(":")
        name, value = (path, float(scale)) if sep and _is_number(scale) else (text, 1.0)
        return {"name": self._file_id(name), "scale": value}

    def get(self, job_id: str, kind: str = "prediction") -> dict:
        return self._call("GET", f"/v1/{PATHS[kind]}/{job_id}").json()

    def cancel(self, job_id: str, kind: str = "prediction") -> dict:
        return self._call("POST", f"/v1/{PATHS[kind]}/{job_id}/cancel").json()

    def wait(self, job_id: str, timeout: float | None = None, kind: str = "prediction") -> dict:
        """Poll until the job ends (or `timeout` seconds pass); returns the job object."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id, kind)
            if job["status"] in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(0.2)

    def stream(self, job_id: str, kind: str = "prediction", last_event_id: str | None = None) -> Iterator[tuple]:
        """Server-Sent Events as (event, data, id) until `done`, reconnecting where it left off if cut."""
        import httpx

        last = last_event_id
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream("GET", f"/v1/{PATHS[kind]}/{job_id}/stream", headers=headers,
                                      timeout=httpx.Timeout(60.0, read=None)) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise UserError(f"the server answered {r.status_code}: {r.text}")
                    for event, data, eid in parse_sse(r.iter_lines()):
                        last = eid or last
                        yield event, data, eid
                        if event == "done":
                            return
            except httpx.TransportError:
                time.sleep(0.5)  # reconnect with Last-Event-ID

    def download(self, url: str, path: str | Path) -> Path:
        from .files import atomic_write

        r = self._call("GET", url.removeprefix(self.url))
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(r.content))
        return Path(path)

    # -- trainings ----------------------------------------------------------------------------------
    def train(self, model: str = "demo", *, images: str | Path, trigger_word: str, steps: int = 1000,
              wait: bool | float = False, **fields) -> dict:
        """Train a LoRA on a zip (or a folder, zipped here) of images; its id names the LoRA for predictions."""
        p = Path(images)
        if p.is_dir():
            p = _zip_folder(p)
        body = {"model": model, "input": {"input_images": self.upload(p), "trigger_word": trigger_word,
                                          "steps": steps, **fields}}
        job = self._call("POST", "/v1/trainings", json=body).json()
        if wait:
            job = self.wait(job["id"], None if wait is True else float(wait), kind="training")
        return job


def parse_sse(lines) -> Iterator[tuple]:
    """(event, data as JSON, id) from text/event-stream lines."""
    event, data, eid = "message", [], None
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = text
                yield event, payload, eid
            event, data, eid = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                event = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                eid = value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _zip_folder(folder: Path) -> Path:
    import tempfile
    import zipfile

    target = Path(tempfile.mkdtemp(prefix="fluxlab-upload-")) / f"{folder.name}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder))
    return target
