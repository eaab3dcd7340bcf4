"""An admin downloads a catalog model from the page or the API (POST /v1/downloads): bytes as they arrive, cancel,
the model ready afterwards, and one line for a gated repo or an offline server. The hub is a stand-in on a
loopback port (tests/fakehub.py) serving a tiny pipeline under the catalog's repo ids; huggingface_hub's own
snapshot_download does the downloading."""

import json

import pytest
from fakehub import fake_hub
from serving import Server

from fluxlab.spec.catalog import CATALOG


@pytest.fixture(scope="module")
def hub(tiny_dirs):
    repos = {CATALOG[m].repo: tiny_dirs["flux2-klein"] for m in ("flux2-klein-4b", "flux2-klein-base-4b")}
    with fake_hub(repos, gated={CATALOG["flux2-klein-9b"].repo}) as (url, pace):
        yield url, pace


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub):
    hf_home = tmp_path_factory.mktemp("server-hf-home")
    s = Server(tmp_path_factory.mktemp("downloads"), env={
        "HF_ENDPOINT": hub[0], "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home)}).start()
    yield s
    s.stop()


def events(api, job: dict) -> list[tuple[str, dict]]:
    """A job's Server-Sent Events until `done`."""
    got, name = [], None
    with api.stream("GET", job["urls"]["stream"]) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                got.append((name, json.loads(line[6:])))
                if name == "done":
                    break
    return got


def test_an_admin_downloads_a_model_and_it_is_ready(server, hub):
    hub[1]["delay_s"] = 0.001  # slow enough for several progress events
    with server.client() as api:
        before = {m["name"]: m for m in api.get("/v1/models").json()["models"]}["flux2-klein-4b"]
        assert before["cached_gb"] is None
        job = api.post("/v1/downloads", json={"model": "flux2-klein-4b"}).json()
        seen = events(api, job)
        done = api.get(job["urls"]["get"]).json()
        assert done["status"] == "succeeded", done
        assert done["output"] == {"model": "flux2-klein-4b", "repo": CATALOG["flux2-klein-4b"].repo}
        progress = [d for name, d in seen if name == "progress"]
        assert progress and progress[-1]["done_bytes"] == progress[-1]["total_bytes"] > 0
        assert [p["done_bytes"] for p in progress] == sorted(p["done_bytes"] for p in progress)
        after = {m["name"]: m for m in api.get("/v1/models").json()["models"]}["flux2-klein-4b"]
        assert after["cached_gb"] is not None and after["cached_gb"] >= 0
        # what was downloaded runs under the catalog's name
        made = api.post("/v1/predictions", json={"model": "flux2-klein-4b", "input": {
            "prompt": "a red circle", "width": 64, "height": 64, "steps": 1, "seed": 3}},
            headers={"Prefer": "wait=120"}).json()
        assert made["status"] == "succeeded", made
    hub[1]["delay_s"] = 0.0


def test_a_download_is_canceled_and_refusals_are_one_line(server, hub):
    hub[1]["delay_s"] = 0.05  # ~80 KB/s: still running when canceled
    try:
        with server.client() as api:
            job = api.post("/v1/downloads", json={"model": "flux2-klein-base-4b"}).json()
            with api.stream("GET", job["urls"]["stream"]) as r:
                for line in r.iter_lines():
                    if line == "event: progress":
                        break
            assert api.post(job["urls"]["cancel"]).status_code == 200
            assert server.wait(api, job["id"], kind="download", timeout=60)["status"] == "canceled"
            gated = api.post("/v1/downloads", json={"model": "flux2-klein-9b"}, headers={"Prefer": "wait=60"}).json()
            assert gated["status"] == "failed"
            assert "gated" in gated["error"] and "accept its license" in gated["error"] and "\n" not in gated["error"]
            for model, words in (("demo", "comes with fluxlab"), ("flux9", "unknown model")):
                r = api.post("/v1/downloads", json={"model": model})
                assert r.status_code == 422 and words in r.json()["detail"]
        user = server.add_token("someone")
        with server.client(user) as api:
            r = api.post("/v1/downloads", json={"model": "flux2-klein-4b"})
            assert r.status_code == 403 and "admin" in r.json()["detail"]
    finally:
        hub[1]["delay_s"] = 0.0
