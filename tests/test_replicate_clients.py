"""Replicate's own clients against a real `fluxlab serve` (https on a loopback port, the bundled demo model): the
hosted-API workflow, unchanged but for the base URL. The Python client is `replicate` from PyPI (a test extra),
the JavaScript one `replicate` from npm (tests/node, installed by scripts/setup.sh --test)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import replicate
from conftest import run
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from replicate.pagination import paginate
from serving import Server, demo_zip, tls_pair

PROMPT = "a zxq in the center"
NODE = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return tls_pair(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls):
    # httpx (under Replicate's Python client) trusts the certificates in SSL_CERT_FILE, Node those in
    # NODE_EXTRA_CA_CERTS: how a client trusts a team's own certificate authority.
    mp = pytest.MonkeyPatch()
    mp.setenv("SSL_CERT_FILE", str(tls[0]))
    s = Server(tmp_path_factory.mktemp("replicate"), tls=tls).start()
    yield s
    s.stop()
    mp.undo()


@pytest.fixture(scope="module")
def client(server):
    return replicate.Client(api_token=server.token, base_url=server.url)


@pytest.fixture(scope="module")
def trained(client, server, tmp_path_factory):
    """The workflow's first half: a destination model, and a LoRA trained into it from a zip given as an open
    file (the client uploads it with files.create and sends its URL)."""
    me = client.accounts.current().username
    client.models.create(owner=me, name="rings", visibility="private", hardware="cpu")
    trainer = client.models.get("fluxlab/lora-trainer")
    zipped = demo_zip(tmp_path_factory.mktemp("zip") / "rings.zip")
    with open(zipped, "rb") as f:
        training = client.trainings.create(
            version=f"fluxlab/lora-trainer:{trainer.latest_version.id}", destination=f"{me}/rings",
            input={"input_images": f, "trigger_word": "zxq", "steps": 40, "learning_rate": 0.002,
                   "base_model": "fluxlab/demo", "autocaption": False})
    assert training.destination == f"{me}/rings" and training.status == "starting"
    while training.status not in ("succeeded", "failed", "canceled"):
        time.sleep(0.2)
        training.reload()
    assert training.status == "succeeded", training.error
    return me, training


def cli_image(capsys, tmp_path, lora: Path | None, seed: int, steps: int = 8) -> np.ndarray:
    args = ["generate", PROMPT, "-m", "demo", "--seed", seed, "--steps", steps, "--threads", 1,
            "-o", tmp_path / f"cli-{seed}.png"]
    if lora is not None:
        args += ["--lora", f"{lora}:1.0"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    return np.asarray(Image.open(tmp_path / f"cli-{seed}.png"))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_train_then_run_the_version_as_the_cli_would(client, server, trained, tmp_path, capsys):
    me, training = trained
    version = training.output["version"]
    assert version.startswith(f"{me}/rings:")
    listed = client.models.get(f"{me}/rings").versions.list()
    assert [v.id for v in listed] == [version.partition(":")[2]]
    lora = tmp_path / "rings.safetensors"
    lora.write_bytes(FileOutput(training.output["weights"], client).read())

    inputs = {"prompt": PROMPT, "num_inference_steps": 8, "lora_scale": 1.0, "seed": 3}
    out = client.run(version, input=inputs)
    assert isinstance(out[0], FileOutput)
    served = pixels(out[0].read())
    local = cli_image(capsys, tmp_path, lora, 3)
    assert np.array_equal(served, local)
    (tmp_path / "plain").mkdir()
    assert not np.array_equal(served, cli_image(capsys, tmp_path / "plain", None, 3))  # the LoRA changes the image
    by_model = client.models.predictions.create(model=f"{me}/rings", input=inputs, wait=True)
    by_version = client.predictions.create(version=version.partition(":")[2], input=inputs, wait=True)
    for p in (by_model, by_version):
        assert p.status == "succeeded" and p.version == version.partition(":")[2], p
        assert np.array_equal(pixels(FileOutput(p.output[0], client).read()), local)


def test_another_token_sees_none_of_it(server, trained):
    me, training = trained
    other = replicate.Client(api_token=server.add_token("bob"), base_url=server.url)
    assert other.accounts.current().username == "bob"
    for call in (lambda: other.models.get(f"{me}/rings"), lambda: other.trainings.get(training.id),
                 lambda: other.run(training.output["version"], input={"prompt": PROMPT})):
        with pytest.raises(ReplicateError) as e:
            call()
        assert e.value.status in (404, 422), e.value
    with pytest.raises(ReplicateError) as e:
        other.models.create(owner=me, name="mine", visibility="private", hardware="cpu")
    assert e.value.status == 403


def test_run_a_shared_model_with_replicate_input_names(client, server, tmp_path, capsys):
    out = client.run("fluxlab/demo", input={"prompt": PROMPT, "num_inference_steps": 8, "seed": 4})
    assert np.array_equal(pixels(out[0].read()), cli_image(capsys, tmp_path, None, 4))
    with pytest.raises(ReplicateError) as e:  # 16:9 at the demo's own area (64x64) is 80x48: too small for it
        client.run("fluxlab/demo", input={"prompt": PROMPT, "aspect_ratio": "16:9"})
    assert e.value.status == 422 and "height 48" in str(e.value)
    wide = client.predictions.create(model="fluxlab/demo", input={
        "prompt": PROMPT, "aspect_ratio": "custom", "width": 128, "height": 64, "num_outputs": 2,
        "output_format": "webp", "output_quality": 90, "go_fast": True})
    wide.wait()  # predictions.create(model=...) drops `wait` in client 1.0.7 (it is not passed on to the request)
    assert wide.status == "succeeded" and len(wide.output) == 2, wide
    data = FileOutput(wide.output[0], client).read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    im = Image.open(io.BytesIO(data))
    assert im.size == (128, 64) and "go_fast" in wide.logs
    record = json.loads(im.getexif()[0x010E])["fluxlab"]
    assert record["request"]["width"] == 128 and record["model"]["name"] == "demo"
    assert str(tmp_path) not in json.dumps(record)
    with pytest.raises(ReplicateError) as e:
        client.run("fluxlab/demo", input={"prompt": PROMPT, "num_inference_stepz": 8})
    assert e.value.status == 422 and "num_inference_stepz" in str(e.value)
    with pytest.raises(ReplicateError) as e:
        client.run("fluxlab/demo", input={"prompt": PROMPT, "steps": 8, "num_inference_steps": 8})
    assert e.value.status == 422


def test_img2img_from_an_open_file_and_a_data_uri(client, tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(start)
    with open(start, "rb") as f:
        a = client.run("fluxlab/demo", input={"prompt": PROMPT, "image": f, "prompt_strength": 0.6, "seed": 2,
                                              "num_inference_steps": 8})
    assert any(x.name == "start.png" and x.checksums["sha256"] for x in client.files.list())
    b = client.run("fluxlab/demo", input={"prompt": PROMPT, "image": start, "prompt_strength": 0.6, "seed": 2,
                                          "num_inference_steps": 8}, file_encoding_strategy="base64")
    assert np.array_equal(pixels(a[0].read()), pixels(b[0].read()))


def test_cancel_list_pages_secret_and_async(client, server):
    p = client.predictions.create(model="fluxlab/demo", input={"prompt": PROMPT, "num_inference_steps": 400})
    p.cancel()
    p.wait()
    assert p.status == "canceled"
    seen = [x.id for page in paginate(lambda cursor: client.predictions.list(
        cursor=f"{server.url}/v1/predictions?limit=2" if cursor is ... else cursor)) for x in page]
    assert p.id in seen and len(seen) == len(set(seen)) == len([x.id for x in client.predictions.list()])
    assert client.webhooks.default.secret().key.startswith("whsec_")
    listed = {f"{m.owner}/{m.name}": m for m in client.models.list()}
    assert {"fluxlab/demo", "fluxlab/lora-trainer", "black-forest-labs/flux-schnell"} <= set(listed)
    assert listed["fluxlab/demo"].latest_version.id == client.models.get("fluxlab/demo").latest_version.id

    async def run_async():
        out = await client.async_run("fluxlab/demo", input={"prompt": PROMPT, "num_inference_steps": 4})
        return await out[0].aread()

    assert asyncio.run(run_async())[:8] == b"\x89PNG\r\n\x1a\n"


NODE_SCRIPT = """
const Replicate = require("replicate");
const fs = require("fs");
const [baseUrl, auth, me] = process.argv.slice(2);
const replicate = new Replicate({ auth, baseUrl: baseUrl + "/v1" });
(async () => {
  const demo = await replicate.models.get("fluxlab", "demo");
  const out = await replicate.run("fluxlab/demo", { input: { prompt: "a zxq in the center", num_inference_steps: 8,
                                                           seed: 4 } });
  const bytes = Buffer.from(await (await out[0].blob()).arrayBuffer());
  await replicate.models.create(me, "js-rings", { visibility: "private", hardware: "cpu" });
  const trainer = await replicate.models.get("fluxlab", "lora-trainer");
  // trainings.create sends its input as given (no file upload, unlike run): upload the zip, pass its URL.
  const zip = await replicate.files.create(fs.readFileSync(process.argv[5]));
  let training = await replicate.trainings.create("fluxlab", "lora-trainer", trainer.latest_version.id, {
    destination: me + "/js-rings",
    input: { input_images: zip.urls.get, trigger_word: "zxq", steps: 4, base_model: "fluxlab/demo" },
  });
  while (!["succeeded", "failed", "canceled"].includes(training.status)) {
    await new Promise((r) => setTimeout(r, 200));
    training = await replicate.trainings.get(training.id);
  }
  if (training.status !== "succeeded") throw new Error(JSON.stringify(training));
  const tuned = await replicate.run(training.output.version, { input: { prompt: "a zxq", num_inference_steps: 4 } });
  const tunedBytes = Buffer.from(await (await tuned[0].blob()).arrayBuffer());
  console.log(JSON.stringify({ version: demo.latest_version.id, image: bytes.toString("base64"),
                               training: training.status, tuned: tunedBytes.subarray(0, 8).toString("hex") }));
})().catch((e) => { console.error(String(e)); process.exit(1); });
"""


def test_the_javascript_client(client, server, tls, tmp_path, capsys):
    script = NODE / "workflow.cjs"
    script.write_text(NODE_SCRIPT)
    try:
        zipped = demo_zip(tmp_path / "rings.zip")
        proc = subprocess.run(["node", str(script), server.url, server.token, client.accounts.current().username,
                               str(zipped)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "NODE_EXTRA_CA_CERTS": str(tls[0])})
    finally:
        script.unlink()
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["version"] == client.models.get("fluxlab/demo").latest_version.id
    import base64

    assert np.array_equal(pixels(base64.b64decode(result["image"])), cli_image(capsys, tmp_path, None, 4))
    assert result["training"] == "succeeded" and result["tuned"] == b"\x89PNG\r\n\x1a\n".hex()


def test_a_zip_in_a_data_uri_is_checked_like_an_upload(client, trained, tmp_path):
    me, _ = trained
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("notes.txt", "no images here")
    trainer = client.models.get("fluxlab/lora-trainer").latest_version.id
    for destination, words in ((f"{me}/rings", "holds no images"), ("nobody/none", "not a model of yours")):
        with pytest.raises(ReplicateError) as e, open(bad, "rb") as f:
            client.trainings.create(version=f"fluxlab/lora-trainer:{trainer}", destination=destination,
                                    input={"input_images": f, "trigger_word": "zxq", "base_model": "fluxlab/demo"},
                                    file_encoding_strategy="base64")
        assert e.value.status == 422 and words in str(e.value), e.value


def test_the_readme_workflow_runs_as_written(server, tls, tmp_path):
    """The README's Python block, as a user would run it: the client configured by its environment variables."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"\n## The server\n.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "examples").symlink_to(Path(__file__).parent.parent / "examples")
    env = {**os.environ, "REPLICATE_BASE_URL": server.url, "REPLICATE_API_TOKEN": server.add_token("readme"),
           "SSL_CERT_FILE": str(tls[0])}
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "zxq.png") as im:
        assert im.format == "PNG" and im.size == (64, 64)
