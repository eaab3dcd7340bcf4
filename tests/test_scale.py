"""`fluxlab serve` with several workers: worker processes on this machine (`--workers 2`) and Ray actors on a local
Ray cluster (`--engine ray`, files through Ray). Jobs spread over the workers and stay where their model is loaded,
pixels are the CLI's, streams and webhooks are as with one worker, a dead or silent worker is replaced and its
prediction queued again once (a training fails as worker_crashed), and a late event of a lost lease changes
nothing. The scheduler, the broker's leases and the file shipping are also tested on their own, without
processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run
from PIL import Image
from serving import Server, demo_zip, free_port, receiver
from test_serve import png, sse, upload

from fluxlab.serve.schedule import WorkerView, assign

SMALL = {"width": 128, "height": 128, "steps": 2}


# -- the scheduler (a pure function) --------------------------------------------------------------------------------
def job(i, model="a", kind="prediction"):
    return {"id": f"j{i}", "kind": kind, "plan": {"model": {"name": model}}}


def test_a_job_prefers_the_idle_worker_that_has_its_model():
    picks, held = assign([job(1, "b")], [WorkerView("w0", True, frozenset({"a"})),
                                         WorkerView("w1", True, frozenset({"b"}))], {}, 5)
    assert picks == [("j1", "w1")] and held == []


def test_a_job_waits_for_its_busy_worker_and_later_jobs_pass_it_meanwhile():
    workers = [WorkerView("w0", False, frozenset({"a"})), WorkerView("w1", True, frozenset({"b"}))]
    picks, held = assign([job(1, "a"), job(2, "b")], workers, {}, 5)
    assert picks == [("j2", "w1")] and held == ["j1"]
    # past the bound, the head loads its model on the idle worker, in queue order
    picks, held = assign([job(1, "a"), job(2, "b")], workers, {"j1": 6.0}, 5)
    assert picks == [("j1", "w1")] and held == []
    # two jobs of one model and two idle workers: the second waits for the first's worker instead of reloading
    workers = [WorkerView("w0", True, frozenset({"a"})), WorkerView("w1", True, frozenset({"b"}))]
    assert assign([job(1, "a"), job(2, "a")], workers, {}, 5) == ([("j1", "w0")], ["j2"])
    # every job of a busy worker's model waits (within the bound), and a job behind with its model on the idle
    # worker takes it
    workers = [WorkerView("w0", False, frozenset({"a"})), WorkerView("w1", True, frozenset({"b"}))]
    assert assign([job(1, "a"), job(2, "a"), job(3, "b")], workers, {}, 5) == ([("j3", "w1")], ["j1", "j2"])


def test_a_cold_job_takes_the_worker_the_rest_of_the_queue_needs_least():
    workers = [WorkerView("w0", True, frozenset({"a"})), WorkerView("w1", True, frozenset({"b"}))]
    picks, _ = assign([job(1, "c"), job(2, "a")], workers, {}, 5)
    assert picks == [("j1", "w1"), ("j2", "w0")]
    trainings = assign([job(1, None, "training"), job(2, "b")], workers, {}, 5)[0]
    assert trainings == [("j1", "w0"), ("j2", "w1")]  # a training releases the pool: it goes where b is not


def test_without_affinity_the_first_idle_worker_takes_the_head():
    workers = [WorkerView("w0", True, frozenset({"a"})), WorkerView("w1", True, frozenset({"b"}))]
    assert assign([job(1, "b"), job(2, "a")], workers, {}, 5, affinity=False)[0] == [("j1", "w0"), ("j2", "w1")]
    assert assign([job(1, "b")], [WorkerView("w0", False), WorkerView("w1", False)], {}, 5) == ([], [])


# -- leases, without workers ----------------------------------------------------------------------------------------
def test_a_late_event_of_a_lost_lease_changes_nothing_and_a_second_loss_fails(tmp_path):
    from fluxlab.serve.broker import Broker, Slot
    from fluxlab.serve.settings import Settings
    from fluxlab.serve.store import Store

    store = Store(tmp_path)
    store.add_job("j1", "prediction", "alice", "demo", {}, {"model": {"name": "demo"}}, None, None)
    broker = Broker(store, Settings(data=tmp_path), render=lambda job: {"id": job["id"]})

    class Gone:  # the slot's worker, already dead: the broker replaces it by starting another
        def kill(self):
            pass

    started = []
    broker._spawn = lambda slot: started.append(slot.name)
    slot = broker.slots["w0"] = Slot("w0", {}, handle=Gone(), gen=1)
    first = store.take("j1", "w0")
    assert first and store.take("j1", "w1") is None  # never held twice
    slot.running, slot.lease = "j1", first
    broker._lost(slot, "the worker process died")
    again = store.job("j1")
    assert again["status"] == "starting" and again["dispatched_at"] is None and again["attempts"] == 1
    second = store.take("j1", "w1")
    # the dead worker's "done" arrives late, with its old lease: dropped
    broker._handle("w0", 1, {"id": "j1", "type": "done", "lease": first, "status": "succeeded", "metrics": {}})
    assert store.job("j1")["status"] == "starting" and store.job("j1")["lease"] == second
    slot.running, slot.lease = "j1", second
    broker._lost(slot, "the worker process died")
    final = store.job("j1")
    assert final["status"] == "failed" and final["error"].startswith("worker_crashed: the worker process died")
    assert final["attempts"] == 2 and started == ["w0", "w0"]


def test_a_model_shows_as_loading_while_its_worker_reads_it(tmp_path):
    from fluxlab.serve.broker import Broker, Slot
    from fluxlab.serve.settings import Settings
    from fluxlab.serve.store import Store

    store = Store(tmp_path)
    store.add_job("j1", "prediction", "alice", "demo", {}, {"model": {"name": "demo"}}, None, None)
    broker = Broker(store, Settings(data=tmp_path), render=lambda job: {"id": job["id"]})
    slot = broker.slots["w0"] = Slot("w0", {}, gen=1)
    lease = store.take("j1", "w0")
    slot.running, slot.lease = "j1", lease
    assert broker.loading == set()
    broker._handle("w0", 1, {"id": "j1", "type": "loading", "lease": lease, "model": "demo"})
    assert broker.loading == {"demo"}
    broker._handle("w0", 1, {"id": "j1", "type": "processing", "lease": lease, "load_time": 0.1})
    assert broker.loading == set()


def test_files_travel_with_a_job_and_back_with_its_events(tmp_path):
    from fluxlab.serve.ship import pack, receive, send_back, unpack

    api, node = tmp_path / "api", tmp_path / "node"
    (api / "uploads").mkdir(parents=True)
    (api / "uploads" / "init.png").write_bytes(b"png")
    run_dir = api / "trainings" / "t1"
    run_dir.mkdir(parents=True)
    (run_dir / "state.safetensors").write_bytes(b"state")
    (api / "trainings" / "t0").mkdir()
    (api / "trainings" / "t0" / "other.safetensors").write_bytes(b"not this run's")
    (api / "loras").mkdir()
    (api / "loras" / "style.safetensors").write_bytes(b"lora")
    plan = {"init": str(api / "uploads" / "init.png"), "out": str(api / "outputs" / "j1"),
            "batch": json.dumps({"model": {"loras": [{"path": str(api / "loras" / "style.safetensors")}]}}),
            "config": {"config": {"name": "t1", "process": [{"training_folder": str(api / "trainings")}]}}}
    packed = pack({"id": "j1", "plan": plan}, api)
    assert set(packed["files"]) == {"uploads/init.png", "trainings/t1/state.safetensors", "loras/style.safetensors"}
    node.mkdir()
    there = unpack(packed, str(api), str(node))
    assert there["plan"]["init"] == str(node / "uploads" / "init.png") and "files" not in there
    lora = json.loads(there["plan"]["batch"])["model"]["loras"][0]["path"]  # a batch's plan is JSON in a string
    assert lora == str(node / "loras" / "style.safetensors") and Path(lora).read_bytes() == b"lora"
    assert (node / "uploads" / "init.png").read_bytes() == b"png"
    (node / "outputs" / "j1").mkdir(parents=True)
    (node / "outputs" / "j1" / "000-1.png").write_bytes(b"image")
    event = send_back({"type": "output", "path": str(node / "outputs" / "j1" / "000-1.png")}, str(node), str(api))
    assert event["path"] == str(api / "outputs" / "j1" / "000-1.png")
    receive(event, api)
    assert (api / "outputs" / "j1" / "000-1.png").read_bytes() == b"image"
    receive({"files": {"../escape.txt": b"x"}}, api)  # never outside the data folder
    assert not (tmp_path / "escape.txt").exists()


# -- real servers ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray cluster started as a team would start one (`ray start --head`, token authentication on, as
    Ray's docs advise), stopped at the end. Yields its address and what a client needs in its environment."""
    import secrets

    ray = Path(sys.executable).with_name("ray")
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **auth}
    subprocess.run([str(ray), "start", "--head", "--port", str(port), "--num-cpus", "4", "--include-dashboard",
                    "false", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"], check=True,
                   env=env, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}", auth
    subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)


ENGINES = {"local": ("--workers", "2"), "ray": ("--engine", "ray", "--workers", "2", "--cpus-per-worker", "1")}


@pytest.fixture(scope="module", params=list(ENGINES))
def fleet(request, tmp_path_factory, tiny_dirs):
    args = [*ENGINES[request.param], "--max-models", "1", "--affinity-wait", "60", "--heartbeat", "8",
            "--webhook-allow", "127.0.0.1"]
    env = {}
    if request.param == "ray":
        address, env = request.getfixturevalue("ray_head")
        args += ["--ray-address", address]
    s = Server(tmp_path_factory.mktemp(f"fleet-{request.param}"), args=tuple(args), env=env,
               models={"tiny": tiny_dirs["flux2-klein"], "tiny1": tiny_dirs["flux1-schnell"]}).start(timeout=240)
    s.engine = request.param
    with s.client() as api:
        deadline = time.time() + 240
        while not all(w["ready"] for w in workers(api)) and time.time() < deadline:
            time.sleep(0.2)
        assert [w["name"] for w in workers(api) if w["ready"]] == ["w0", "w1"]
        s.api = api
        yield s
    s.stop()


def workers(api) -> list[dict]:
    return api.get("/v1/health").json()["workers"]


def rows(server) -> dict:
    db = sqlite3.connect(server.data / "fluxlab.db")
    db.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in db.execute("SELECT id, model, worker, attempts, status FROM jobs")}
    finally:
        db.close()


def submit(api, model, **fields) -> str:
    r = api.post("/v1/predictions", json={"model": model, "input": {"prompt": "a cat", **SMALL, **fields}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_jobs_spread_over_the_workers_and_stay_with_their_models(fleet):
    warm = [submit(fleet.api, m, seed=0) for m in ("tiny", "tiny1")]  # both idle and empty: one model each
    assert [fleet.wait(fleet.api, i)["status"] for i in warm] == ["succeeded"] * 2
    # the whole queue at once (paused while it is made): the broker sees it as a busy server would
    assert fleet.api.post("/v1/queue/pause").status_code == 200
    ids = [submit(fleet.api, ("tiny", "tiny1")[i % 2], seed=i) for i in range(8)]
    assert fleet.api.post("/v1/queue/resume").status_code == 200
    done = [fleet.wait(fleet.api, i) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 8, done
    held = rows(fleet)
    by_model = {m: {held[i]["worker"] for i in ids if held[i]["model"] == m} for m in ("tiny", "tiny1")}
    # each model on one worker, the two on different ones: after the first load, no job reloaded a model
    assert by_model["tiny"] | by_model["tiny1"] == {"w0", "w1"}
    assert len(by_model["tiny"]) == 1 and len(by_model["tiny1"]) == 1, by_model
    loaded = {w["name"]: w["loaded"] for w in workers(fleet.api)}
    assert sorted(map(tuple, loaded.values())) == [("tiny",), ("tiny1",)]  # by name, never a server folder


def test_a_prediction_on_any_worker_has_the_clis_pixels(fleet, tiny_dirs, tmp_path, capsys):
    job_id = submit(fleet.api, "tiny", seed=11, prompt="a red cube")
    served = png(fleet.api, fleet.wait(fleet.api, job_id)["output"][0])
    code, _, err = run(capsys, "generate", "a red cube", "-m", tiny_dirs["flux2-klein"], "--seed", 11, "--steps", 2,
                       "--width", 128, "--height", 128, "--threads", 1, "-o", tmp_path / "cli.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(served), np.asarray(Image.open(tmp_path / "cli.png")))


def test_streams_and_webhooks_are_as_with_one_worker(fleet):
    from fluxlab.serve.webhooks import verify

    with receiver() as (url, got):
        # steps of ~0.5 s (a large image on the tiny model): slower than the ~4 progress events a second allowed
        r = fleet.api.post("/v1/predictions", json={"model": "tiny", "input": {"prompt": "a cat", "steps": 4,
                                                                              "width": 1536, "height": 1536},
                                                    "webhook": url,
                                                    "webhook_events_filter": ["start", "output", "completed"]})
        job_id = r.json()["id"]
        events = sse(fleet.api, f"/v1/predictions/{job_id}/stream")
        deadline = time.time() + 20
        while not any(json.loads(b)["status"] == "succeeded" for _, b in got) and time.time() < deadline:
            time.sleep(0.05)
    assert [e[1]["step"] for e in events if e[0] == "progress"] == [1, 2, 3, 4]
    assert any(e[0] == "output" for e in events) and events[-1][0] == "done"
    assert events[-1][1]["status"] == "succeeded"
    secret = fleet.api.get("/v1/webhooks/default/secret").json()["key"]
    statuses = [json.loads(b)["status"] for _, b in got]
    assert statuses[0] == "processing" and statuses[-1] == "succeeded" and all(verify(secret, h, b) for h, b in got)
    assert json.loads(got[-1][1])["output"] and fleet.api.get(json.loads(got[-1][1])["output"][0]).status_code == 200


def running_on(api, job_id, kinds="predictions", timeout=120) -> dict:
    """The worker running the job once it is processing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        w = next((w for w in workers(api) if w["running"] == job_id and w["pid"]), None)
        if w is not None and api.get(f"/v1/{kinds}/{job_id}").json()["status"] == "processing":
            return w
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_cancel_reaches_the_job_on_whichever_worker_runs_it(fleet):
    slow = submit(fleet.api, "tiny1", width=1024, height=1024, steps=200, seed=5)
    running_on(fleet.api, slow)
    asked = time.time()
    assert fleet.api.post(f"/v1/predictions/{slow}/cancel").status_code == 200
    done = fleet.wait(fleet.api, slow)
    assert done["status"] == "canceled" and time.time() - asked < 20  # at its next step, not after 200
    assert rows(fleet)[slow]["attempts"] == 1


def test_a_killed_worker_is_replaced_and_its_prediction_runs_again(fleet):
    slow = submit(fleet.api, "tiny", width=1024, height=1024, steps=30, seed=2)
    w = running_on(fleet.api, slow)
    os.kill(w["pid"], signal.SIGKILL)
    done = fleet.wait(fleet.api, slow)
    assert done["status"] == "succeeded" and len(done["output"]) == 1
    png(fleet.api, done["output"][0]).load()
    assert rows(fleet)[slow]["attempts"] == 2
    after = {x["name"]: x for x in workers(fleet.api)}
    assert after[w["name"]]["restarts"] == 1 and after[w["name"]]["pid"] != w["pid"]
    # the replacement takes jobs: every worker is ready and the next ones succeed
    deadline = time.time() + 120
    while not all(x["ready"] for x in workers(fleet.api)) and time.time() < deadline:
        time.sleep(0.2)
    nxt = [submit(fleet.api, m, seed=20 + i) for i, m in enumerate(("tiny", "tiny1", "tiny", "tiny1"))]
    assert [fleet.wait(fleet.api, i)["status"] for i in nxt] == ["succeeded"] * 4
    db = sqlite3.connect(fleet.data / "fluxlab.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM outputs WHERE job_id = ?", (slow,)).fetchone()[0] == 1
    db.close()


@pytest.mark.parametrize("fleet", ["local"], indirect=True)  # Ray's workers beat through the same code
def test_a_silent_worker_is_replaced_after_the_heartbeat_bound(fleet):
    slow = submit(fleet.api, "tiny1", width=1024, height=1024, steps=30, seed=4)
    w = running_on(fleet.api, slow)
    os.kill(w["pid"], signal.SIGSTOP)  # hung: alive, but says nothing
    try:
        done = fleet.wait(fleet.api, slow, timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w["pid"], signal.SIGCONT)
    assert done["status"] == "succeeded" and rows(fleet)[slow]["attempts"] == 2


def test_a_training_through_the_workers_resumes_and_a_dead_workers_training_fails(fleet, tmp_path):
    api = fleet.api
    f = upload(api, demo_zip(tmp_path / "rings.zip"))
    r = api.post("/v1/trainings", json={"model": "demo", "input": {"input_images": f["id"], "trigger_word": "zxq",
                                                                   "steps": 30}})
    job_id = r.json()["id"]
    sse(api, f"/v1/trainings/{job_id}/stream",
        stop_after=lambda evs: any(e[0] == "progress" and e[1]["step"] >= 3 for e in evs))
    api.post(f"/v1/trainings/{job_id}/cancel")
    assert fleet.wait(api, job_id, "training")["status"] == "canceled"
    # the checkpoint is on the API node (with Ray, it came back through Ray), so any worker resumes from it
    assert (fleet.data / "trainings" / job_id / "state" / "state.safetensors").is_file()
    assert api.post(f"/v1/trainings/{job_id}/resume").status_code == 200
    done = fleet.wait(api, job_id, "training")
    assert done["status"] == "succeeded", done
    steps = [int(x.split(",")[0]) for x in (fleet.data / "trainings" / job_id / "loss.csv").read_text()
             .splitlines()[1:]]
    assert steps == list(range(1, 31))
    assert api.get(done["output"]["weights"]).status_code == 200
    # a training is not repeated on another worker: its worker's death fails it
    r = api.post("/v1/trainings", json={"model": "demo", "input": {"input_images": f["id"], "trigger_word": "zxq",
                                                                   "steps": 400}})
    assert r.status_code == 201, r.text
    doomed = r.json()["id"]
    os.kill(running_on(api, doomed, "trainings")["pid"], signal.SIGKILL)
    failed = fleet.wait(api, doomed, "training")
    assert failed["status"] == "failed" and failed["error"].startswith("worker_crashed"), failed


def test_a_batch_and_a_grid_run_on_the_workers(fleet):
    api = fleet.api
    r = api.post("/v1/batches", json={"model": "tiny", "prompts": ["a cat", "a dog"], "seeds": "0-1",
                                      "input": {"steps": 2, "width": 128, "height": 128}})
    assert r.status_code == 201, r.text
    batch = fleet.wait(api, r.json()["id"], "batch")
    assert batch["status"] == "succeeded" and len(batch["output"]) == 4
    assert all(api.get(u).status_code == 200 for u in batch["output"])  # with Ray, each came back through Ray
    g = api.post("/v1/grids", json={"model": "tiny1", "prompt": "a cat", "x": "steps=1,2",
                                    "input": {"width": 128, "height": 128}})
    assert g.status_code == 201, g.text
    deadline = time.time() + 120
    while api.get(f"/v1/grids/{g.json()['id']}").json()["status"] not in ("succeeded", "failed") \
            and time.time() < deadline:
        time.sleep(0.1)
    grid = api.get(f"/v1/grids/{g.json()['id']}").json()
    assert grid["status"] == "succeeded", grid


def test_the_queue_page_shows_each_worker(fleet):
    with httpx.Client(base_url=fleet.url) as browser:
        assert browser.post("/login", data={"token": fleet.token}, headers={"Origin": fleet.url}).status_code == 303
        page = browser.get("/queue")
    assert page.status_code == 200 and page.text.count('data-testid="worker"') == 2
    assert ">w0<" in page.text and ">w1<" in page.text and str(fleet.data) not in page.text
    queue = fleet.api.get("/v1/queue").json()
    assert [w["name"] for w in queue["workers"]] == ["w0", "w1"]
    deadline = time.time() + 10  # a worker's device as it resolved there (after its first heartbeat), not "auto"
    while "auto" in {w["device"] for w in fleet.api.get("/v1/queue").json()["workers"]} and time.time() < deadline:
        time.sleep(0.2)
    assert {w["device"] for w in fleet.api.get("/v1/queue").json()["workers"]} == {"cpu"}


def test_workers_are_added_while_jobs_wait_and_stopped_when_idle(tmp_path):
    s = Server(tmp_path / "data", args=("--min-workers", "1", "--max-workers", "2", "--worker-idle", "3")).start()
    try:
        with s.client() as api:
            assert len(workers(api)) == 1
            ids = [submit(api, "demo", width=256, height=256, steps=12, seed=i) for i in range(6)]
            seen, deadline = 1, time.time() + 120
            while seen < 2 and time.time() < deadline:
                seen = max(seen, sum(w["ready"] for w in workers(api)))
                time.sleep(0.1)
            assert seen == 2
            assert [s.wait(api, i)["status"] for i in ids] == ["succeeded"] * 6
            assert {r["worker"] for r in rows(s).values()} == {"w0", "w1"}
            deadline = time.time() + 60
            while len(workers(api)) > 1 and time.time() < deadline:
                time.sleep(0.2)
            assert len(workers(api)) == 1
            assert s.wait(api, submit(api, "demo", seed=9))["status"] == "succeeded"
    finally:
        s.stop()


@pytest.mark.parametrize("args, words", [
    (("--devices", "cuda:7"), "cuda"),
    (("--devices", "cpu,,cpu"), "an empty entry"),
    (("--devices", "cpu+"), "an empty entry"),
    (("--devices", "cuda:0+cuda:0"), "names cuda:0 twice"),
    (("--ray-address", "127.0.0.1:1"), "--ray-address is for --engine ray"),
    (("--workers", "3", "--max-workers", "2"), "--max-workers 2 is below the 3 workers"),
    (("--engine", "spark"), "--engine 'spark'"),
    (("--engine", "ray", "--devices", "cuda:0"), "--devices is for the local engine"),
    (("--engine", "ray", "--ray-address", "127.0.0.1:1"), "--ray-address 127.0.0.1:1: nothing answers there"),
])
def test_worker_options_that_mean_nothing_are_one_line(tmp_path, capsys, args, words):
    code, _, err = run(capsys, "serve", "--data", tmp_path / "d", "--port", free_port(), *args)
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
