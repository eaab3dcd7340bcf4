"""`fluxlab serve` shared by several tenants: owners apart, roles, webhooks that never reach internal addresses, no
5xx for a client's mistake, bounded work per request, one server per data folder, private files.

Every request here goes to 127.0.0.0/8. Webhook refusals are tested with addresses that are refused before any
connection, and with a stubbed resolver that answers loopback addresses, so even wrong code sends nothing beyond
this machine."""

from __future__ import annotations

import io
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import run
from PIL import Image
from serving import Server, free_port
from test_serve import PROMPT, demo_zip, snapshot, upload

RECEIVER = "127.0.0.3"  # the one internal address the module's server may send webhooks to


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Two workers: tenancy holds whichever worker runs a job (the server's default of one is tested in test_serve).
    s = Server(tmp_path_factory.mktemp("shared"), args=("--webhook-allow", RECEIVER, "--workers", "2")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tenants(server):
    """The admin (the server's first token) and two users."""
    tokens = {"admin": server.token, "alice": server.add_token("alice"), "bob": server.add_token("bob")}
    clients = {k: server.client(t) for k, t in tokens.items()}
    yield clients
    for c in clients.values():
        c.close()


def wait(api, path: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.get(path).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(path)


def train(api, zip_id: str, name: str, destination: str | None = None) -> dict:
    r = api.post("/v1/trainings", json={"model": "demo", "input": {"input_images": zip_id, "trigger_word": "zxq",
                                                                   "steps": 2, "name": name},
                                        **({"destination": destination} if destination else {})})
    assert r.status_code == 201, r.text
    return wait(api, f"/v1/trainings/{r.json()['id']}")


def owned_rows(server, owner: str) -> dict:
    db = sqlite3.connect(server.data / "fluxlab.db")
    rows = {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t} WHERE owner = ?", (owner,)).fetchall()))
            for t in ("jobs", "files", "outputs", "loras")}
    db.close()
    return rows


# -- tenancy ------------------------------------------------------------------------------------------------------
def test_no_owner_reaches_another(server, tenants, tmp_path):
    """alice's LoRA survives bob training one of the same name; bob (a user) walks every route with alice's ids
    and names and gets 404 (403 where only an admin may go); nothing of alice's changes."""
    alice, bob = tenants["alice"], tenants["bob"]
    zip_a = upload(alice, demo_zip(tmp_path / "a.zip"))
    assert alice.post("/v1/models", json={"owner": "alice", "name": "mine"}).status_code == 201
    trained = train(alice, zip_a["id"], "style-x", "alice/mine")
    assert trained["status"] == "succeeded", trained
    lora_a = {lo["name"]: lo for lo in alice.get("/v1/models").json()["loras"]}["style-x"]
    zip_b = upload(bob, demo_zip(tmp_path / "b.zip"))
    assert train(bob, zip_b["id"], "style-x")["status"] == "succeeded"
    assert {lo["name"]: lo for lo in alice.get("/v1/models").json()["loras"]}["style-x"] == lora_a
    ids = {"prediction_id": alice.post("/v1/predictions", json={"model": "demo", "input": {
               "prompt": PROMPT, "steps": 2, "lora": [{"name": "style-x"}]}}, headers={"Prefer": "wait=60"}).json(),
           "training_id": trained}
    assert ids["prediction_id"]["status"] == "succeeded", ids
    ids["batch_id"] = alice.post("/v1/batches", json={"model": "demo", "prompts": [PROMPT], "seeds": "1",
                                                      "input": {"steps": 1}}).json()
    ids["grid_id"] = alice.post("/v1/grids", json={"model": "demo", "prompt": PROMPT, "x": "steps=1,2"}).json()
    for key in ("batch_id", "grid_id"):
        wait(alice, ids[key]["urls"]["get"])
    ids = {k: v["id"] for k, v in ids.items()}
    ids["file_id"] = zip_a["id"]
    ids["output_id"] = alice.get("/v1/outputs").json()["results"][0]["id"]
    ids |= {"owner": "alice", "name": "mine", "version_id": trained["output"]["version"].partition(":")[2]}
    before = owned_rows(server, "alice")
    schema = httpx.get(server.url + "/openapi.json").json()
    walked = 0
    for path, methods in schema["paths"].items():
        if "{" not in path and not path.startswith("/v1/queue/"):
            continue
        url = path
        for key, value in ids.items():
            url = url.replace("{" + key + "}", value)
        for method in methods:
            body = {"model": "demo", "input": {"prompt": PROMPT}} if method == "put" else None
            if path.endswith("/stream"):
                with bob.stream("GET", url) as r:
                    status = r.status_code
            else:
                status = bob.request(method.upper(), url, json=body).status_code
            expected = 403 if path.startswith("/v1/queue/") else (409 if method == "put" else 404)
            assert status == expected, (method, path, status)
            walked += 1
    # paths without an id in them: alice's images are not bob's to zip or to filter by her LoRA
    assert bob.post("/v1/outputs/zip", json={"ids": [ids["output_id"]]}).status_code == 404
    assert bob.get("/v1/outputs", params={"lora": ids["training_id"]}).status_code == 422
    mine = alice.post("/v1/outputs/zip", json={"ids": [ids["output_id"]]})
    assert mine.status_code == 200 and mine.headers["content-type"] == "application/zip"
    # by name: alice's LoRA and training id are no names for bob's predictions
    for name in ("style-x", ids["training_id"], ids["file_id"]):
        r = bob.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "lora": [{"name": name}]}})
        if name == "style-x":  # bob has his own of that name
            assert r.status_code == 201
            wait(bob, r.json()["urls"]["get"])
        else:
            assert r.status_code == 422, r.text
    r = bob.post("/v1/trainings", json={"model": "demo", "input": {"input_images": zip_a["id"], "trigger_word": "x"}})
    assert r.status_code == 422 and zip_a["id"] in r.json()["detail"]
    assert walked >= 20 and owned_rows(server, "alice") == before
    bobs = {lo["name"]: lo for lo in bob.get("/v1/models").json()["loras"]}
    assert set(bobs) == {"style-x"} and bobs["style-x"]["sha256"] != lora_a["sha256"]


def test_roles(server, tenants):
    alice, admin = tenants["alice"], tenants["admin"]
    r = alice.post("/v1/queue/pause")
    assert r.status_code == 403 and "not an admin token" in r.json()["detail"]
    r = alice.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT}, "priority": 5})
    assert r.status_code == 403 and "priority 5" in r.json()["detail"]
    assert admin.post("/v1/queue/pause").json() == {"paused": True}
    try:
        job = alice.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "steps": 1}}).json()
        seen = admin.get("/v1/queue").json()["pending"]
        assert {"id": job["id"], "owner": "alice", "mine": False}.items() <= seen[0].items()
        assert "id" not in tenants["bob"].get("/v1/queue").json()["pending"][0]
        urgent = admin.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "steps": 1},
                                                     "priority": 5}).json()
        assert [j["id"] for j in admin.get("/v1/queue").json()["pending"]][:2] == [urgent["id"], job["id"]]
    finally:
        admin.post("/v1/queue/resume")
    wait(alice, job["urls"]["get"])
    code, listed, _ = run_cli("token", "list", "--data", server.data)
    assert code == 0 and any(line.split()[:2] == ["alice", "user"] for line in listed.splitlines())


def run_cli(*args):
    """The CLI in a process of its own (its exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "fluxlab", *map(str, args)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "FLUXLAB_THREADS": "1"})
    return p.returncode, p.stdout, p.stderr


# -- webhooks -----------------------------------------------------------------------------------------------------
INTERNAL = ["http://169.254.169.254/latest/meta-data/iam", "http://127.0.0.1:9/hook", "http://localhost/hook",
            "http://[::1]/hook", "http://2130706433/hook", "http://0x7f.1/hook", "http://127.1/hook",
            "http://[::ffff:127.0.0.1]/hook", "http://10.1.2.3/hook", "http://192.168.0.1/hook",
            "http://172.16.0.1/hook", "http://100.64.0.1/hook", "http://0.0.0.0/hook", "http://224.0.0.1/hook",
            "http://[fe80::1]/hook", "http://[fd00::1]/hook", "http://", "http://[::1:7951/hook",
            "http://user:pw@127.0.0.3/hook"]


def numeric_only(host: str, port: int) -> list[str]:
    """A resolver that never asks DNS: address literals in every form getaddrinfo reads (2130706433, 0x7f.1, ...),
    and localhost; any other name does not resolve."""
    if host == "localhost":
        return ["127.0.0.1", "::1"]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [i[4][0] for i in infos]


@pytest.fixture(scope="module")
def refusing_api(tmp_path_factory):
    """The API in this process with its queue never started: a job it wrongly accepted would never run, so no
    webhook could leave even if the check under test were broken."""
    from fastapi.testclient import TestClient

    from fluxlab.serve.app import create_app
    from fluxlab.serve.settings import Settings
    from fluxlab.serve.store import Store

    data = tmp_path_factory.mktemp("refusing")
    token = Store(data).create_token("alice")
    app = create_app(Settings(data=data, resolve=numeric_only))
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})  # no `with`: no lifespan, no worker
    yield client, app.state.server.store
    app.state.server.broker.webhooks.close()


@pytest.mark.parametrize("url", INTERNAL)
def test_webhooks_to_internal_addresses_are_refused_at_create(refusing_api, url):
    client, store = refusing_api
    r = client.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT}, "webhook": url})
    assert r.status_code == 422 and r.json()["detail"].startswith("webhook"), r.text
    assert store.pending_count() == 0


class Receiver:
    """A webhook receiver on a loopback address: records what it gets; `hang` never answers."""

    def __init__(self, host: str = RECEIVER, hang: bool = False):
        got, self.got, self.hang = [], [], hang
        self.got = got
        stop = self.stop_event = threading.Event()

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                if hang:
                    stop.wait(30)
                    return
                body = self.rfile.read(int(self.headers["content-length"]))
                got.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        class Threaded(HTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                threading.Thread(target=self._serve, args=(request, client_address), daemon=True).start()

            def _serve(self, request, client_address):
                try:
                    self.finish_request(request, client_address)
                except OSError:
                    pass
                finally:
                    self.shutdown_request(request)

        self.httpd = Threaded((host, 0), Hook)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop_event.set()
        self.httpd.shutdown()


def test_webhooks_are_signed_with_their_owners_secret(server, tenants):
    from fluxlab.serve.webhooks import verify

    hook = Receiver()
    try:
        alice = tenants["alice"]
        r = alice.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "steps": 1},
                                                "webhook": hook.url, "webhook_events_filter": ["completed"]})
        wait(alice, r.json()["urls"]["get"])
        deadline = time.time() + 10
        while not hook.got and time.time() < deadline:
            time.sleep(0.05)
    finally:
        hook.close()
    secrets = {k: c.get("/v1/webhooks/default/secret").json()["key"] for k, c in tenants.items()}
    assert len(set(secrets.values())) == 3
    headers, body, _ = hook.got[0]
    assert verify(secrets["alice"], headers, body) and not verify(secrets["bob"], headers, body)
    rotated = alice.post("/v1/webhooks/default/secret/rotate").json()["key"]
    assert rotated != secrets["alice"] and alice.get("/v1/webhooks/default/secret").json()["key"] == rotated


def test_a_name_that_resolves_inside_is_refused_when_sending():
    """A host that resolved to a public address when the job was made and to an internal one when it is sent
    (DNS rebinding) gets nothing; the same host allowed by the operator gets the signed message."""
    from fluxlab.serve.outbound import Policy, check
    from fluxlab.serve.webhooks import Message, Webhooks, verify

    hook = Receiver()
    port = hook.httpd.server_address[1]
    answers = {"hooks.example.com": ["93.184.215.14"]}

    def resolve(host, _port):
        return answers[host]

    assert check(f"http://hooks.example.com:{port}/hook", Policy(), resolve=resolve).url.startswith("http://93.")
    answers["hooks.example.com"] = [RECEIVER]  # rebound
    secret = "whsec_" + "A" * 32
    refused = Webhooks(lambda owner: secret, Policy(), retries=1, resolve=resolve)
    allowed = Webhooks(lambda owner: secret, Policy.parse(["hooks.example.com"]), retries=1, resolve=resolve)
    try:
        refused.put(Message("alice", f"http://hooks.example.com:{port}/hook", b"{}", "msg_1"))
        deadline = time.time() + 5
        while refused.refused == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert refused.refused == 1 and hook.got == []
        allowed.put(Message("alice", f"http://hooks.example.com:{port}/hook", b"{}", "msg_2"))
        while not hook.got and time.time() < deadline:
            time.sleep(0.02)
    finally:
        refused.close()
        allowed.close()
        hook.close()
    headers, body, _ = hook.got[0]
    assert headers["host"] == f"hooks.example.com:{port}" and verify(secret, headers, body)


def test_slow_receivers_of_one_owner_do_not_delay_another():
    from fluxlab.serve.outbound import Policy
    from fluxlab.serve.webhooks import Message, Webhooks

    slow, fast = Receiver(hang=True), Receiver()
    hooks = Webhooks(lambda owner: "whsec_" + "A" * 32, Policy.parse([RECEIVER]), retries=4, backoff_s=0.5,
                     read_s=2.0)
    try:
        for i in range(8):
            hooks.put(Message("bob", slow.url, b"{}", f"msg_b{i}"))
        time.sleep(0.2)  # bob's deliveries are hanging
        sent = time.monotonic()
        hooks.put(Message("carol", fast.url, b"{}", "msg_c"))
        deadline = time.time() + 10
        while not fast.got and time.time() < deadline:
            time.sleep(0.02)
    finally:
        hooks.close()
        slow.close()
        fast.close()
    assert fast.got and fast.got[0][2] - sent < 1.0, "carol's webhook waited behind bob's"


# -- no 5xx -------------------------------------------------------------------------------------------------------
def deflate_damaged_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.txt", os.urandom(2000).hex())
    data = bytearray(buf.getvalue())
    start = 30 + len("a.txt")
    data[start + 5:start + 40] = b"\xff" * 35  # the deflate stream, not the headers
    return bytes(data)


def overlapping_zip() -> bytes:
    """500 central-directory entries that all point at one member (each passes the size checks alone)."""
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.png", os.urandom(4_000_000))
    data = buf.getvalue()
    eocd = data.rindex(b"PK\x05\x06")
    cd_offset = struct.unpack("<I", data[eocd + 16:eocd + 20])[0]
    entry = data[cd_offset:eocd]
    entries = b"".join(entry.replace(b"x.png", f"{i:05d}"[:5].encode()) for i in range(500))
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, 500, 500, len(entries), cd_offset)
    return data[:cd_offset] + entries + bytes(end)


STRICT = [
    ("lone surrogate", "POST", "/v1/predictions", '{"model": "demo", "input": {"prompt": "a \\ud800 cat"}}', 422,
     "lone surrogate"),
    ("surrogate in a batch", "POST", "/v1/batches", '{"model": "demo", "prompts": ["\\udcff"]}', 422, "prompts[0]"),
    ("cursor overflow", "GET", "/v1/predictions?cursor=99999999999999999999", None, 422, "cursor"),
    ("cursor superscript", "GET", "/v1/predictions?cursor=%C2%B9", None, 422, "cursor"),
    ("seeds that expand", "POST", "/v1/batches", json.dumps({"model": "demo", "prompts": ["x"], "seeds": ",".join(
        ["0-999999"] * 20)}), 422, "more than 10,000 seeds"),
    ("yaml aliases", "POST", "/v1/trainings", None, 422, "aliases"),
    ("batch_size", "POST", "/v1/trainings", None, 422, "batch_size"),
    ("resolution", "POST", "/v1/trainings", None, 422, "resolution 65536"),
    ("rank", "POST", "/v1/trainings", None, 422, "linear"),
    ("nine sample prompts", "POST", "/v1/trainings", json.dumps({"model": "demo", "input": {
        "input_images": "file_x", "trigger_word": "x", "sample_prompts": ["p"] * 9}}), 422, "sample_prompts"),
    ("a selection of none", "POST", "/v1/outputs/zip", '{"ids": []}', 422, "ids"),
]
YAML = {"yaml aliases": "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b]\n",
        "batch_size": "train: {batch_size: 100000}", "resolution": "datasets: [{folder_path: x, resolution: [65536]}]",
        "rank": "network: {linear: 1024}"}


def recipe(extra: str) -> str:
    """An ai-toolkit YAML with one section replaced."""
    import yaml

    base = {"job": "extension", "config": {"name": "x", "process": [{
        "type": "sd_trainer", "datasets": [{"folder_path": "x"}], "model": {"name_or_path": "demo"}}]}}
    patch = yaml.safe_load(extra)
    base["config"]["process"][0].update(patch)
    return yaml.safe_dump(base)


@pytest.mark.parametrize("case", STRICT, ids=[c[0] for c in STRICT])
def test_bad_requests_are_422_and_store_nothing(server, tenants, tmp_path, case):
    name, method, path, body, status, words = case
    api = tenants["alice"]
    if name in YAML:
        zip_id = upload(api, demo_zip(tmp_path / "t.zip"))["id"]
        config = YAML[name] if name == "yaml aliases" else recipe(YAML[name])
        body = json.dumps({"model": "demo", "input": {"input_images": zip_id, "trigger_word": "x", "config": config}})
    before = snapshot(server)
    r = api.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert snapshot(server) == before


@pytest.mark.parametrize("kind", ["damaged deflate", "overlapping members"])
def test_bad_zips_are_422(server, tenants, kind):
    before = snapshot(server)
    data = deflate_damaged_zip() if kind == "damaged deflate" else overlapping_zip()
    r = tenants["alice"].post("/v1/files", files={"file": ("x.zip", data)})
    assert r.status_code == 422, r.text
    assert ("share their data" if kind == "overlapping members" else "x.zip") in r.json()["detail"]
    assert snapshot(server) == before


def test_the_cli_refuses_what_the_api_refuses(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a \udcff cat", "-m", "demo", "-o", tmp_path / "x.png")
    assert code == 2 and "lone surrogate" in err and not (tmp_path / "x.png").exists()
    (tmp_path / "p.txt").write_text("a cat\n")
    code, _, err = run(capsys, "batch", tmp_path / "p.txt", "-m", "demo", "--seeds", "0-999999,0-999999",
                       "--out", tmp_path / "b")
    assert code == 2 and "more than 1,000,000 seeds" in err and not (tmp_path / "b").exists()
    from fluxlab.errors import UserError
    from fluxlab.spec.request import GenerateRequest
    from fluxlab.spec.typed import validate

    with pytest.raises(UserError, match="lone surrogate"):
        validate(GenerateRequest, {"prompt": "\ud800"}, "request")


def test_uploads_of_large_images_at_once_stay_bounded(server, tenants, tmp_path):
    """12 concurrent uploads of a 64 MP PNG (a few hundred KB each): the API process decodes at most two at once."""
    buf = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 10, 10)).save(buf, format="PNG")
    data = buf.getvalue()
    pid = server.proc.pid

    def peak() -> int:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmHWM"))) * 1024

    before = peak()
    answers = []

    def send():
        with server.client(server.token) as c:
            answers.append(c.post("/v1/files", files={"file": ("big.png", data)}).status_code)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [201] * 12
    grown = (peak() - before) / 2**20
    assert grown < 900, f"the API process grew {grown:.0f} MB"  # 12 at once decoded: over 2 GB


# -- what a client sees -------------------------------------------------------------------------------------------
def test_no_server_path_reaches_a_client(server, tenants, tmp_path):
    api = tenants["alice"]
    secret = str(server.data)
    r = api.post("/v1/files", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50)})
    assert r.status_code == 422 and secret not in r.text and "/tmp" not in r.text
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "init.png")
    init = upload(api, tmp_path / "init.png")["id"]
    job = api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "init": init, "steps": 2,
                                                                       "strength": 0.5}},
                   headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "succeeded", job
    out_id = urlsplit(job["output"][0]).path.rsplit("/", 1)[1]  # the URL is signed: ?expires=...&sig=...
    record = api.get(f"/v1/outputs/{out_id}/record").text
    assert secret not in record and "init.png" in record
    assert json.loads(record)["files"]["init"] == init  # her own upload's id, what "use these settings" sends
    png = api.get(job["output"][0]).content
    assert secret.encode() not in png
    assert Image.open(io.BytesIO(png)).text["fluxlab"]  # still a readable record
    page = httpx.Client(base_url=server.url)
    page.post("/login", data={"token": server.token, "next": "/"}, headers={"origin": server.url})
    assert secret not in page.get(f"/image/{out_id}").text


def test_health_tells_strangers_only_that_it_is_up(server, tenants):
    assert set(httpx.get(server.url + "/v1/health").json()) == {"status", "ready"}
    assert set(tenants["alice"].get("/v1/health").json()) == {"status", "ready"}
    assert tenants["admin"].get("/v1/health").json()["worker"]["pid"]


def test_waiting_as_told_lets_the_next_attempt_through():
    """Retry-After is honest: a client that waits that long is let through (to be told 401), not refused again."""
    from fluxlab.serve.http import Throttle

    t = Throttle(burst=3, every_s=0.05)
    waits = [t.failed("x") for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0
    time.sleep(waits[3] + 0.005)
    assert t.failed("x") == 0.0


def test_wrong_tokens_are_throttled_but_right_ones_pass(server):
    codes = []
    with httpx.Client(base_url=server.url) as c:
        for i in range(100):
            codes.append(c.get("/v1/predictions", headers={"Authorization": f"Bearer flx_wrong{i}"}).status_code)
        ok = c.get("/v1/predictions", headers={"Authorization": f"Bearer {server.token}"}).status_code
    assert codes.count(401) >= 50 and codes.count(429) >= 30 and set(codes) == {401, 429} and ok == 200


def test_docs_host_and_files(server, tenants):
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "script-src 'self'" in docs.headers["content-security-policy"]
    assert "http" not in docs.text.replace(server.url, "") and "cdn" not in docs.text
    assert httpx.get(server.url + "/docs/static/swagger-ui-bundle.js").status_code == 200
    from swagger_ui_bundle import swagger_ui_path

    # FastAPI writes OpenAPI 3.1, which Swagger UI 4 refuses to render ("does not specify a valid version field")
    assert "swagger-ui-5" in str(swagger_ui_path) and httpx.get(server.url + "/openapi.json").json()["openapi"] >= "3.1"
    r = httpx.get(server.url + "/v1/health", headers={"host": "evil.example"})
    assert r.status_code == 400
    assert stat.S_IMODE(server.data.stat().st_mode) == 0o700
    for p in server.data.rglob("*"):
        if p.name == "server.log":  # written by the test, not the server
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, (p, oct(mode))


# -- the data folder ----------------------------------------------------------------------------------------------
def test_ctrl_c_ends_open_event_streams_and_the_server(tmp_path):
    """A page following the queue and a job's stream (a job waiting in a paused queue) do not hold the server up:
    on Ctrl-C the streams end by themselves, the server exits 0 within seconds, and its log has no traceback."""
    import signal
    import threading

    s = Server(tmp_path / "data").start()
    ended: list = []

    def follow(path: str) -> None:
        try:
            with httpx.stream("GET", s.url + path, timeout=60, headers={
                    "Authorization": f"Bearer {s.token}", "Accept": "text/event-stream"}) as r:
                for _ in r.iter_lines():
                    pass
            ended.append(path)
        except httpx.HTTPError as e:
            ended.append(f"{path}: {type(e).__name__}")

    with s.client() as api:
        api.post("/v1/queue/pause")
        job = api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT}}).json()
    threads = [threading.Thread(target=follow, args=(p,), daemon=True)
               for p in ("/v1/queue", f"/v1/predictions/{job['id']}/stream")]
    for t in threads:
        t.start()
    time.sleep(1.5)
    started = time.time()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(timeout=15) == 0 and time.time() - started < 10
    for t in threads:
        t.join(10)
    s.log.close()
    assert sorted(ended) == sorted(["/v1/queue", f"/v1/predictions/{job['id']}/stream"]), ended
    assert "Traceback" not in (tmp_path / "data" / "server.log").read_text()


def test_one_server_per_data_folder(server):
    code, _, err = run_cli("serve", "--data", server.data, "--port", free_port())
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"PID {server.proc.pid}, port {server.port}" in err


def damaged(kind: str, folder: Path) -> Path:
    from fluxlab.serve.store import Store

    folder.mkdir()
    db = folder / "fluxlab.db"
    if kind == "random bytes":
        db.write_bytes(os.urandom(20_000))
    elif kind == "a folder":
        db.mkdir()
    else:
        store = Store(folder)
        for i in range(300):
            store.add_file("someone", f"f{i}.png", 1, "0" * 64, "image", f"/x/{i:0100d}")
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.db.close()
        data = bytearray(db.read_bytes())
        if kind == "half":
            data = data[:len(data) // 2]
        else:  # one 4 KB page in the middle overwritten
            page = len(data) // 4096 // 2
            data[page * 4096:(page + 1) * 4096] = os.urandom(4096)
        db.write_bytes(bytes(data))
    return db


@pytest.mark.parametrize("kind", ["random bytes", "half", "one page", "a folder"])
def test_a_damaged_store_is_one_line(tmp_path, kind, capsys):
    db = damaged(kind, tmp_path / "data")
    for args in (("token", "list"), ("serve", "--port", free_port())):
        code, _, err = run(capsys, *args, "--data", tmp_path / "data")
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(db) in err, err


def test_the_server_cli_checks_before_announcing(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = [("--host", "192.0.2.1"), ("--port", taken.getsockname()[1]), ("--device", "tpu"),
                 ("--webhook-allow", "a b")]
        for args in cases:
            code, out, err = run(capsys, "serve", *args, "--data", tmp_path / "d")
            assert code == 2 and len(err.strip().splitlines()) == 1 and "serving" not in out, (args, err)
            assert not (tmp_path / "d").exists()
    finally:
        taken.close()
    code, _, err = run(capsys, "token", "create", "../x", "--data", tmp_path / "d")
    assert code == 2 and not (tmp_path / "d").exists()
    code, _, err = run(capsys, "token", "revoke", "nope", "--data", tmp_path / "d")
    assert code == 2 and not (tmp_path / "d").exists()


def test_a_half_copied_upload_is_swept_at_start(tmp_path):
    data = tmp_path / "data"
    s = Server(data)
    (data / ".upload-abc").mkdir()
    (data / ".upload-abc" / "big.zip").write_bytes(b"PK" + b"\0" * 1000)
    s.start()
    try:
        assert not (data / ".upload-abc").exists()
    finally:
        s.stop()


def test_a_full_disk_is_507_and_recovers(tmp_path):
    """The data folder on an 8 MB tmpfs, filled up: uploads and new jobs get 507 and one line; after space returns,
    both work again."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    s = None
    try:
        s = Server(mnt / "data")
        s.start()
        with s.client() as api:
            filler = mnt / "filler"
            with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):  # unbuffered: close flushes nothing
                while True:
                    f.write(b"\0" * 65536)
            img = io.BytesIO()
            Image.new("RGB", (64, 64)).save(img, format="PNG")
            answers = [api.post("/v1/files", files={"file": ("a.png", img.getvalue())}),
                       api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT}})]
            for r in answers:
                assert r.status_code == 507 and "disk is full" in r.json()["detail"], r.text
            filler.unlink()
            assert api.post("/v1/files", files={"file": ("a.png", img.getvalue())}).status_code == 201
            r = api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "steps": 1}})
            assert r.status_code == 201, r.text
    finally:
        if s is not None:
            s.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_client_leaving_a_stream_leaves_no_traceback(server, tenants):
    admin = tenants["admin"]
    admin.post("/v1/queue/pause")
    try:
        job = admin.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "steps": 1}}).json()
        for _ in range(3):  # connect, read the first event, go away
            with admin.stream("GET", job["urls"]["stream"]) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                assert next(r.iter_lines()).startswith("id: 0")
        time.sleep(1.0)
    finally:
        admin.post("/v1/queue/resume")
    wait(admin, job["urls"]["get"])
    log = (server.data / "server.log").read_text()
    assert "Traceback" not in log and "BrokenResourceError" not in log, log[-2000:]


def test_a_signed_output_url_opens_that_output_only(server, tenants):
    """A job's output URL carries its own read permission (Replicate's JavaScript client sends no token): it opens
    that output with no token; a changed signature, another output's id under it, or an expiry moved are refused,
    and a signature that is not hex opens nothing (a 401, never a 500)."""
    from urllib.parse import parse_qs

    alice = tenants["alice"]
    job = alice.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "steps": 1,
                                                                         "num_images": 2}},
                     headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "succeeded", job
    first, second = (urlsplit(u) for u in job["output"])
    q = {k: v[0] for k, v in parse_qs(first.query).items()}
    with server.client(token=None) as anonymous:
        r = anonymous.get(first.path, params=q)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        tampered = {**q, "sig": ("0" if q["sig"][0] != "0" else "1") + q["sig"][1:]}
        for path, params in ((first.path, tampered), (second.path, q), (first.path, {**q, "expires": "1"}),
                             (first.path, {**q, "expires": str(int(q["expires"]) + 3600)})):
            assert anonymous.get(path, params=params).status_code == 401, (path, params)
        r = anonymous.get(first.path, params={**q, "sig": "é" * 32})
        assert r.status_code == 401, r.text
        assert anonymous.get(f"{first.path}/record", params=q).status_code == 401  # the record needs the token
