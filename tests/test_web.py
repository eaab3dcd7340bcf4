"""The page of `fluxlab serve`, in a real headless browser (Debian's chromium driven by selenium), against a real
server with the bundled demo model."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving import Server

PROMPT = "a red circle in the top left on a white background"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dirs):
    s = Server(tmp_path_factory.mktemp("web"), models={"tiny-klein": tiny_dirs["flux2-klein"]}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="fluxlab-chromium-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1100,1300"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def by(driver, testid):
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


@pytest.fixture(scope="module")
def logged_in(server, browser):
    browser.get(server.url + "/")
    assert "/login" in browser.current_url  # every page but the login needs the session cookie
    by(browser, "token-input").send_keys(server.token)
    by(browser, "login-submit").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="prompt"]'))
    cookie = browser.get_cookie("fluxlab_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return browser


def fill(driver, **fields):
    for testid, value in fields.items():
        box = by(driver, testid.replace("_", "-"))
        box.clear()
        box.send_keys(str(value))


def test_generate_watch_it_find_it_and_reuse_it(server, logged_in):
    d = logged_in
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, seed=4242, steps=80)
    Select(by(d, "cache")).select_by_value("fbc:0.05")
    by(d, "submit").click()
    seen = set()
    preview = None
    deadline = time.time() + 60
    while time.time() < deadline:
        bar = by(d, "progress")
        value, top = float(bar.get_attribute("value")), float(bar.get_attribute("max"))
        if top > 1 and value < top:
            seen.add(value)
        img = by(d, "preview")
        if img.is_displayed() and img.get_attribute("src"):
            preview = img.get_attribute("src")
        if d.find_elements(By.CSS_SELECTOR, "#results img"):
            break
        time.sleep(0.02)
    assert len(seen) >= 2, seen  # the bar moved while it ran
    assert preview and "/preview" in preview
    wait(d, lambda d: d.find_element(By.ID, "progress-text").text.startswith("succeeded"))
    assert not by(d, "preview").is_displayed()  # the image took the preview's place
    d.get(server.url + "/gallery")
    first = d.find_elements(By.CSS_SELECTOR, '[data-testid="gallery-item"] a')[0]
    first.click()
    settings = by(d, "detail-settings").text
    assert PROMPT in settings and "4242" in settings
    by(d, "reuse").click()
    assert by(d, "prompt").get_attribute("value") == PROMPT
    assert by(d, "seed").get_attribute("value") == "4242" and by(d, "steps").get_attribute("value") == "80"
    assert Select(by(d, "cache")).first_selected_option.get_attribute("value") == "fbc:0.05"


def test_upsample_shows_an_editable_rewrite_that_the_image_records(server, logged_in):
    d = logged_in
    d.get(server.url + "/")
    fill(d, prompt="a red circle", seed=3, width=64, height=64, steps=2)
    by(d, "upsample").click()  # the demo cannot write: the reason, beside the prompt
    error = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="field-error"][data-field="prompt"]'))
    assert "demo cannot upsample prompts" in error[0].text
    Select(by(d, "model")).select_by_value("tiny-klein")
    by(d, "upsample").click()
    wait(d, lambda d: by(d, "prompt").get_attribute("value") not in ("a red circle", ""))
    rewrite = by(d, "prompt").get_attribute("value")
    assert d.find_element(By.NAME, "upsampled_from").get_attribute("value") == "a red circle"
    by(d, "prompt").send_keys(" zz")  # edited before generating
    by(d, "submit").click()
    wait(d, lambda d: d.find_element(By.ID, "progress-text").text.startswith("succeeded"))
    with server.client() as api:
        job = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    assert job["input"]["prompt"] == rewrite + " zz" and job["input"]["upsampled_from"] == "a red circle"


def test_every_model_with_its_state_presets_from_its_range_and_its_defaults(server, logged_in):
    from fluxlab.spec.catalog import CATALOG

    d = logged_in
    d.get(server.url + "/")
    model = Select(by(d, "model"))
    assert set(CATALOG) | {"tiny-klein"} <= {o.get_attribute("value") for o in model.options}
    assert model.first_selected_option.get_attribute("value") == "demo"  # what runs here, not a missing model

    def presets():
        return [tuple(int(x) for x in o.get_attribute("value").split("x")) for o in Select(by(d, "aspect")).options[1:]]

    demo = CATALOG["demo"]
    assert presets() and all(demo.min_side <= s <= demo.max_side for wh in presets() for s in wh), presets()
    assert by(d, "steps").get_attribute("placeholder") == str(demo.steps)
    assert by(d, "guidance").get_attribute("placeholder") == str(demo.guidance)
    assert by(d, "model-note").text.startswith("ready")
    model.select_by_value("flux2-klein-4b")
    note = by(d, "model-note").text
    assert "not downloaded" in note and f"hf download {CATALOG['flux2-klein-4b'].repo}" in note
    assert (1024, 1024) in presets() and by(d, "steps").get_attribute("placeholder") == "4"
    model.select_by_value("flux1-dev")
    assert "accept the licence on https://huggingface.co/black-forest-labs/FLUX.1-dev" in by(d, "model-note").text
    model.select_by_value("demo")
    Select(by(d, "aspect")).select_by_visible_text("9:16 (64x112)")
    assert (by(d, "width").get_attribute("value"), by(d, "height").get_attribute("value")) == ("64", "112")
    # the Models page: every model with its state; an admin downloads one (this server is offline: one line)
    d.get(server.url + "/models")
    rows = {r.get_attribute("data-model"): r.text
            for r in d.find_elements(By.CSS_SELECTOR, '[data-testid="model-row"]')}
    assert set(CATALOG) | {"tiny-klein"} <= set(rows) and "ready" in rows["demo"] and "gated" in rows["flux1-dev"]
    assert not d.find_elements(By.CSS_SELECTOR, '[data-testid="download-demo"]')  # nothing to fetch for it
    by(d, "download-flux2-klein-4b").click()
    wait(d, lambda d: "/jobs/" in d.current_url)
    error = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "section .error"))[0].text
    assert d.find_element(By.ID, "status").text == "failed"
    assert "hub cannot be reached (offline)" in error and f"hf download {CATALOG['flux2-klein-4b'].repo}" in error


def test_reuse_keeps_the_inputs_and_errors_speak_the_page_words(server, logged_in, tmp_path):
    """"Use these settings" on an img2img image brings back its init image (by upload id) with its strength, and
    Generate makes it again; without the init, the error names the page's fields, not CLI flags."""
    from PIL import Image as PILImage

    d = logged_in
    start = tmp_path / "start.png"
    PILImage.new("RGB", (64, 64), (30, 160, 60)).save(start)
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, seed=77, steps=2, width=64, height=64, strength=0.5)
    by(d, "init").send_keys(str(start))
    by(d, "submit").click()
    wait(d, lambda d: d.find_element(By.ID, "progress-text").text.startswith("succeeded"))
    with server.client() as api:
        first = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    out_id = first["output"][0].split("?")[0].rstrip("/").split("/")[-1]
    d.get(server.url + f"/image/{out_id}")
    assert "/" not in by(d, "detail-settings").text.split("start.png")[0].split()[-1]  # a name, not a path
    by(d, "reuse").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="keep-init"]'))
    assert by(d, "keep-init").is_selected() and by(d, "strength").get_attribute("value") == "0.5"
    by(d, "submit").click()
    wait(d, lambda d: d.find_element(By.ID, "progress-text").text.startswith("succeeded"))
    with server.client() as api:
        again = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    assert again["id"] != first["id"] and again["input"]["init"] == first["input"]["init"]
    assert again["input"]["strength"] == 0.5
    d.get(server.url + f"/?from={out_id}")
    by(d, "init-thumbs").find_element(By.CSS_SELECTOR, '[data-testid="remove"]').click()  # drop the init, keep strength
    assert not by(d, "keep-init").is_selected()
    by(d, "submit").click()
    error = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="field-error"][data-field="strength"]'))
    assert "Init strength needs Init image" in error[0].text and "--" not in error[0].text


def mask_pixels(api, job: dict) -> np.ndarray:
    """The mask a prediction was given, as the server keeps it (its upload's bytes), in 0-255 grey."""
    import io

    r = api.get(f"/v1/files/{job['input']['mask']}/content")
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("L"))


def test_send_a_result_to_inpaint_draw_its_mask_and_pick_references(server, logged_in, tmp_path):
    """Item 2: a result goes to inpainting as the init (a thumbnail); the mask is painted on it with the brush,
    erased, inverted and cleared in the page, and Generate sends exactly the drawn mask; reference images show as
    thumbnails, one is removed, and "Use as reference" keeps a result as the reference."""
    from selenium.webdriver.common.action_chains import ActionChains

    d = logged_in
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, seed=31, steps=2, width=64, height=64)
    by(d, "submit").click()
    wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded"))
    with server.client() as api:
        source = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '#results [data-testid="send-inpaint"]'))[0].click()
    canvas = wait(d, lambda d: by(d, "mask-canvas") if by(d, "mask-editor").is_displayed() else None)
    assert len(by(d, "init-thumbs").find_elements(By.CSS_SELECTOR, ".kept:not([hidden])")) == 1
    assert by(d, "prompt").get_attribute("value") == PROMPT  # the image's settings come with it
    wait(d, lambda d: canvas.get_attribute("width") == "64")
    w, h = canvas.size["width"], canvas.size["height"]

    def stroke(x0, y0, x1, y1):  # in the image's own pixels (the canvas is shown larger)
        ActionChains(d).move_to_element_with_offset(canvas, int((x0 - 32) * w / 64), int((y0 - 32) * h / 64)) \
            .click_and_hold().move_by_offset(int((x1 - x0) * w / 64), int((y1 - y0) * h / 64)).release().perform()

    def generate() -> dict:
        with server.client() as api:
            before = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]["id"]
            by(d, "submit").click()
            wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded") and
                 api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]["id"] != before)
            return api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]

    stroke(6, 32, 58, 32)  # a line across the middle
    by(d, "mask-eraser").click()
    stroke(40, 32, 58, 32)  # rubbed out again on the right
    job = generate()
    assert job["input"]["init"] != source["input"].get("init")  # the result itself, uploaded as the init
    with server.client() as api:
        mask = mask_pixels(api, job)
    assert mask.shape == (64, 64)
    assert mask[32, 16] == 255 and mask[32, 50] == 0 and mask[5, 5] == 0 and mask[60, 60] == 0
    by(d, "mask-invert").click()
    with server.client() as api:
        inverted = mask_pixels(api, generate())
    assert (inverted.astype(int) + mask == 255).all()
    by(d, "mask-clear").click()
    assert "mask" not in generate()["input"]  # nothing painted: no mask is sent
    # reference images: two chosen, one removed before Generate
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(a)
    Image.new("RGB", (64, 64), (30, 30, 200)).save(b)
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, seed=32, steps=2, width=64, height=64)
    by(d, "images").send_keys(f"{a}\n{b}")
    picked = wait(d, lambda d: (lambda ps: ps if len(ps) == 2 else None)(
        d.find_elements(By.CSS_SELECTOR, '[data-testid="picked"]')))
    assert [p.find_element(By.TAG_NAME, "img").get_attribute("alt") for p in picked] == ["a.png", "b.png"]
    picked[0].find_element(By.CSS_SELECTOR, '[data-testid="remove"]').click()
    assert [p.find_element(By.TAG_NAME, "img").get_attribute("alt")
            for p in d.find_elements(By.CSS_SELECTOR, '[data-testid="picked"]')] == ["b.png"]
    job = generate()
    with server.client() as api:
        names = [api.get(f"/v1/files/{i}").json()["name"] for i in job["input"]["images"]]
    assert names == ["b.png"]
    # "Use as reference" from the image page (works without JavaScript too: a plain link)
    out_id = job["output"][0].split("?")[0].rstrip("/").split("/")[-1]
    d.get(server.url + f"/image/{out_id}")
    by(d, "send-reference").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="keep-images"]'))
    assert by(d, "keep-images").is_selected() and not d.find_elements(By.CSS_SELECTOR, '[data-testid="keep-init"]')
    job = generate()
    with server.client() as api:
        assert [api.get(f"/v1/files/{i}").json()["name"] for i in job["input"]["images"]] == [f"{out_id}.png"]


def test_the_result_panel_keeps_this_visits_results_and_shows_the_queue(server, logged_in):
    """Settings left and the result right on a wide screen (stacked on a phone); four images as a grid, each with
    its seed, size, Download and Reuse; the previous result stays in a strip; a waiting job shows its place in the
    queue and that the queue is paused."""
    d = logged_in
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, seed=500, steps=2, width=64, height=64, num_images=4)
    by(d, "submit").click()
    wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded in"))
    figures = d.find_elements(By.CSS_SELECTOR, '#results [data-testid="result"]')
    wait(d, lambda d: all("64x64" in f.text for f in d.find_elements(By.CSS_SELECTOR, "#results figcaption")))
    assert [f.find_element(By.TAG_NAME, "figcaption").text.split(" · ")[:2] for f in figures] == \
        [[f"seed {500 + i}", "64x64"] for i in range(4)]
    assert len({f.location["y"] for f in figures}) < 4  # side by side, not one under the other
    form, live = (d.find_element(By.ID, i).rect for i in ("generate", "live"))
    assert live["x"] >= form["x"] + form["width"] - 1  # two panes
    assert by(d, "who").text.startswith("tester-")  # the user's name, then a plain "Log out"
    assert d.find_element(By.CSS_SELECTOR, ".logout button").text == "Log out"
    fill(d, seed=600, num_images=1)
    with server.client() as api:
        assert api.post("/v1/queue/pause").status_code == 200
        try:
            by(d, "submit").click()
            wait(d, lambda d: "position 1 of 1" in by(d, "progress-text").text and "paused" in
                 by(d, "progress-text").text)
        finally:
            assert api.post("/v1/queue/resume").status_code == 200
    wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded in"))
    assert len(d.find_elements(By.CSS_SELECTOR, '#history [data-testid="result"]')) == 4  # the first four stay
    assert len(d.find_elements(By.CSS_SELECTOR, '#results [data-testid="result"]')) == 1
    d.set_window_size(390, 844)
    try:
        form, live = (d.find_element(By.ID, i).rect for i in ("generate", "live"))
        assert live["y"] >= form["y"] + form["height"] - 1  # one column on a phone
    finally:
        d.set_window_size(1100, 1300)


def test_gallery_search_and_filter_and_a_large_image_with_a_confirmed_delete(server, logged_in):
    d = logged_in
    with server.client() as api:
        for prompt, seed in (("a violet zebra crossing", 71), ("a blue square in the center", 72)):
            job = api.post("/v1/predictions", json={"model": "demo", "input": {
                "prompt": prompt, "seed": seed, "steps": 2}}, headers={"Prefer": "wait=60"}).json()
            assert job["status"] == "succeeded", job
    d.get(server.url + "/gallery")
    items = d.find_elements(By.CSS_SELECTOR, '[data-testid="gallery-item"]')
    assert "a blue square in the center" in items[0].text and "demo" in items[0].text  # newest first, with its model
    by(d, "gallery-search").send_keys("ZEBRA")
    by(d, "gallery-filter").click()
    wait(d, lambda d: "q=ZEBRA" in d.current_url and by(d, "gallery-search").get_attribute("value") == "ZEBRA")
    items = d.find_elements(By.CSS_SELECTOR, '[data-testid="gallery-item"]')
    assert [i.find_element(By.CLASS_NAME, "prompt").text for i in items] == ["a violet zebra crossing"]
    Select(by(d, "gallery-model")).select_by_value("tiny-klein")
    by(d, "gallery-filter").click()
    wait(d, lambda d: "model=tiny-klein" in d.current_url and d.find_elements(By.TAG_NAME, "main"))
    assert not d.find_elements(By.CSS_SELECTOR, '[data-testid="gallery-item"]') and "No image matches" in \
        d.find_element(By.TAG_NAME, "main").text
    # several at once: two ticked are downloaded as one zip, then deleted after a confirmation page
    with server.client() as api:
        for seed in (73, 74):
            api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": "a tick me square", "seed": seed,
                                                                         "steps": 1}}, headers={"Prefer": "wait=60"})
    d.get(server.url + "/gallery?q=tick+me")
    ticked = [a.get_attribute("href").rsplit("/", 1)[1]
              for a in d.find_elements(By.CSS_SELECTOR, '[data-testid="gallery-item"] a')]
    assert len(ticked) == 2
    cookie = d.get_cookie("fluxlab_session")["value"]
    zipped = httpx.post(server.url + "/gallery/selection", data={"action": "download", "ids": ticked},
                        cookies={"fluxlab_session": cookie}, headers={"Origin": server.url})
    import io
    import zipfile

    assert sorted(zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()) == sorted(f"{i}.png" for i in ticked)
    for box in d.find_elements(By.CSS_SELECTOR, '[data-testid="select"]'):
        box.click()
    by(d, "delete-selected").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="confirm-delete"]'))
    assert "Delete 2 images?" in d.find_element(By.TAG_NAME, "h1").text
    by(d, "confirm-delete").click()
    wait(d, lambda d: d.current_url.endswith("/gallery"))
    with server.client() as api:
        assert all(api.get(f"/v1/outputs/{i}/record").status_code == 404 for i in ticked)
    d.get(server.url + "/gallery?q=zebra")
    d.find_element(By.CSS_SELECTOR, '[data-testid="gallery-item"] a').click()
    wait(d, lambda d: by(d, "image-large").size["width"] >= 512)  # shown large, not at its 64 px
    out_id = d.current_url.rsplit("/", 1)[1]
    assert not by(d, "delete").is_displayed()  # behind a second click
    by(d, "delete-box").find_element(By.TAG_NAME, "summary").click()
    by(d, "delete").click()
    wait(d, lambda d: d.current_url.endswith("/gallery"))
    with server.client() as api:
        assert api.get(f"/v1/outputs/{out_id}/record").status_code == 404


def test_cancel_from_the_page(server, logged_in):
    d = logged_in
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, width=256, height=256, steps=300, seed=1)
    by(d, "submit").click()
    wait(d, lambda d: "step" in d.find_element(By.ID, "progress-text").text)
    by(d, "cancel").click()
    wait(d, lambda d: d.find_element(By.ID, "progress-text").text.startswith("canceled"))
    with server.client() as api:
        job = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    assert job["status"] == "canceled" and job["output"] is None
    assert not list((server.data / "outputs" / job["id"]).glob("*.png"))


def test_field_errors_and_text_that_stays_text(server, logged_in):
    d = logged_in
    with server.client() as api:
        before = len(api.get("/v1/predictions").json()["results"])
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, width=100)
    by(d, "submit").click()
    error = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="field-error"][data-field="width"]'))[0]
    assert "width 100 is not a multiple of 16" in error.text  # the CLI's words
    # every problem at once, each beside its own field, in the page's words
    d.get(server.url + "/")
    fill(d, prompt=PROMPT, width=100, steps=0, seed="abc", strength=0.5)
    by(d, "submit").click()
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="field-error"]')) >= 4)
    shown = {e.get_attribute("data-field"): e.text
             for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="field-error"]')}
    assert set(shown) == {"width", "steps", "seed", "strength"}, shown
    assert "width 100" in shown["width"] and "abc" in shown["seed"] and "Init image" in shown["strength"]
    for name in shown:  # each sits in its own field's label
        label = d.find_element(By.CSS_SELECTOR, f'[data-testid="field-error"][data-field="{name}"]').find_element(
            By.XPATH, "./ancestor::label[1]")
        assert label.find_elements(By.NAME, name), name
    with server.client() as api:
        assert len(api.get("/v1/predictions").json()["results"]) == before  # nothing was submitted
        answer = api.post("/v1/predictions/validate", json={"model": "demo", "input": {
            "prompt": PROMPT, "width": 100, "steps": 0, "seed": "abc", "strength": 0.5}}).json()
        assert not answer["valid"] and {e["field"] for e in answer["errors"]} == {"width", "steps", "seed", "strength"}
        assert api.post("/v1/predictions/validate", json={"model": "demo", "input": {"prompt": PROMPT}}).json() == \
            {"valid": True, "errors": []}
        import io

        png = io.BytesIO()
        Image.new("RGB", (64, 64), (20, 200, 20)).save(png, format="PNG")
        init = api.post("/v1/files", files={"file": ("start.png", png.getvalue())}).json()["id"]
        answer = api.post("/v1/predictions/validate", json={"model": "demo", "input": {  # the caller's own upload
            "prompt": PROMPT, "init": init, "strength": 0.5, "width": 100}}).json()
        assert [e["field"] for e in answer["errors"]] == ["width"], answer
        assert len(api.get("/v1/predictions").json()["results"]) == before  # checking queues nothing
    d.get(server.url + "/jobs/nope")  # a 404 keeps the site's navigation
    assert by(d, "not-found").is_displayed() and d.find_elements(By.CSS_SELECTOR, "header nav a[href='/gallery']")
    d.get(server.url + "/no/such/page")
    assert "/no/such/page" in by(d, "not-found").text and by(d, "who").text.startswith("tester-")
    hostile = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1;alert(1)</script> a red circle'
    d.get(server.url + "/")
    fill(d, prompt=hostile, steps=2)
    by(d, "submit").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
    d.find_elements(By.CSS_SELECTOR, "#results a")[0].click()
    assert hostile in by(d, "detail-settings").text  # shown as the text it is
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text  # noqa: B018 - asking is the check
    assert d.execute_script("return window.__pwned") is None


def test_pages_need_a_login_and_other_sites_are_refused(server, logged_in):
    pages = ["/", "/queue", "/gallery", "/grid", "/train", "/jobs/x", "/image/x", "/trainings/x"]
    with httpx.Client(base_url=server.url, follow_redirects=False) as anonymous:
        for page in pages:
            r = anonymous.get(page)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), page
        assert anonymous.get("/static/app.js").status_code == 200  # what the login page itself needs
    cookie = logged_in.get_cookie("fluxlab_session")["value"]
    with httpx.Client(base_url=server.url, cookies={"fluxlab_session": cookie}) as c:
        body = {"model": "demo", "input": {"prompt": PROMPT}}
        evil = c.post("/v1/predictions", json=body, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and "evil.example" in evil.json()["detail"]
        assert c.post("/v1/predictions", json=body).status_code == 403  # no Origin at all: not from our pages
        assert c.post("/generate", data={"prompt": PROMPT}, headers={"Origin": "http://evil.example"}
                      ).status_code == 403
        page = c.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert server.token not in page.text


def test_train_from_the_page_then_generate_with_it(server, logged_in, tmp_path):
    from test_serve import demo_zip

    d = logged_in
    d.get(server.url + "/train")
    by(d, "train-zip").send_keys(str(demo_zip(tmp_path / "rings.zip")))
    fill(d, train_trigger="zxq", train_steps=40)
    by(d, "train-submit").click()
    wait(d, lambda d: "/trainings/" in d.current_url)
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="sample"]'), timeout=180)
    wait(d, lambda d: d.find_element(By.ID, "status").text == "succeeded", timeout=180)
    wait(d, lambda d: int(by(d, "loss-chart").get_attribute("data-points")) == 40, timeout=10)  # a step, a point
    assert by(d, "loss-chart").get_attribute("data-smoothed") == "40"  # the moving average beside the raw line
    by(d, "loss-scale").click()
    wait(d, lambda d: "scale=log" in d.current_url and by(d, "loss-chart").get_attribute("data-scale") == "log")
    with httpx.Client(base_url=server.url, cookies={"fluxlab_session": d.get_cookie("fluxlab_session")["value"]}) as c:
        page = c.get(urlsplit(d.current_url).path).text  # without JavaScript: the chart the server drew
    assert '<polyline class="raw"' in page and '<polyline class="smooth"' in page and "step 40" in page
    assert int(by(d, "train-progress").get_attribute("value")) == 40
    link = wait(d, lambda d: d.find_elements(By.ID, "download-lora"), timeout=10)[0].get_attribute("href")
    cookie = d.get_cookie("fluxlab_session")["value"]
    lora = httpx.get(link, cookies={"fluxlab_session": cookie})
    assert lora.status_code == 200 and lora.content[8:9] == b"{"  # a safetensors file
    training = d.current_url.split("?")[0]
    d.get(server.url + "/train")  # the run is listed, and found again from there
    row = by(d, "training-row")
    assert "zxq" in row.text and "succeeded" in row.text and "40" in row.text
    row.find_element(By.TAG_NAME, "a").click()
    wait(d, lambda d: d.current_url == training and d.find_elements(By.ID, "generate-with-it"))
    d.find_element(By.ID, "generate-with-it").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="lora"]'))
    assert by(d, "lora").get_attribute("value")
    label = Select(by(d, "lora")).first_selected_option.text
    assert label.startswith("training of 20") and label.endswith("(zxq)")  # a date and its trigger, not an id
    fill(d, prompt="a ring in the center")
    by(d, "add-trigger").click()  # the trigger word offered for the prompt
    assert by(d, "prompt").get_attribute("value") == "zxq a ring in the center"
    assert not by(d, "add-trigger").is_displayed()
    fill(d, prompt="a zxq in the center", seed=5)
    by(d, "submit").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
    out_id = d.find_elements(By.CSS_SELECTOR, "#results a")[0].get_attribute("href").rsplit("/", 1)[1]
    with server.client() as api:
        tuned = np.asarray(Image.open(__import__("io").BytesIO(api.get(f"/v1/outputs/{out_id}").content)))
        plain = api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": "a zxq in the center",
                                                                             "seed": 5}},
                         headers={"Prefer": "wait=60"}).json()
        base = np.asarray(Image.open(__import__("io").BytesIO(api.get(plain["output"][0]).content)))
    assert np.abs(tuned.astype(int) - base.astype(int)).max() > 0
    # A stack: the training's LoRA at 0.5 beside the same file uploaded from the page (listed by its file name).
    (tmp_path / "zxq.safetensors").write_bytes(lora.content)
    d.get(server.url + f"/?lora={Select(by(d, 'lora')).first_selected_option.get_attribute('value')}")
    fill(d, prompt="a zxq in the center", seed=5, lora_scale=0.5)
    by(d, "lora-file").send_keys(str(tmp_path / "zxq.safetensors"))
    by(d, "submit").click()
    wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded"))
    with server.client() as api:
        job = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
    assert [lo["scale"] for lo in job["input"]["lora"]] == [0.5, 1.0]
    d.get(server.url + "/")
    assert "uploaded zxq.safetensors" in [o.text for o in Select(by(d, "lora-2")).options]
    # the gallery filtered by the LoRA: the two images made with it, not the one made without
    name = job["input"]["lora"][0]["name"]
    d.get(server.url + "/gallery")
    Select(by(d, "gallery-lora")).select_by_value(name)
    by(d, "gallery-filter").click()
    wait(d, lambda d: "lora=" in d.current_url and d.find_elements(By.TAG_NAME, "main"))
    shown = {a.get_attribute("href").rsplit("/", 1)[1]
             for a in d.find_elements(By.CSS_SELECTOR, '[data-testid="gallery-item"] a')}
    stacked = job["output"][0].split("?")[0].rstrip("/").split("/")[-1]
    plain_id = plain["output"][0].split("?")[0].rstrip("/").split("/")[-1]
    assert shown == {out_id, stacked} and plain_id not in shown


def test_the_generate_page_fits_a_phone(server, logged_in):
    d = logged_in
    d.set_window_size(390, 844)
    try:
        d.get(server.url + "/")
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        d.get(server.url + "/gallery")
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        d.set_window_size(1100, 1300)


def test_queue_shows_pending_jobs_and_cancels_one(server, logged_in):
    d = logged_in
    with server.client() as api:
        api.post("/v1/queue/pause")
        try:
            queue_flow(d, server, api)
        finally:  # a paused queue would stall every later test
            api.post("/v1/queue/resume")
    with server.client() as api, api.stream("GET", "/v1/queue", headers={"Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines).startswith("id:") and next(lines) == "event: queue"
        assert set(json.loads(next(lines).removeprefix("data: "))) == {"paused", "running", "workers", "pending"}


def queue_flow(d, server, api):
    ids = [api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "seed": i}}).json()["id"]
           for i in range(2)]
    d.get(server.url + "/queue")
    items = d.find_elements(By.CSS_SELECTOR, '[data-testid="queue-item"]')
    assert [i for i in ids if any(i in x.text for x in items)] == ids
    d.execute_script("window.__before = 1")
    items[0].find_element(By.CSS_SELECTOR, "button").click()
    # the Cancel form posts and comes back to /queue: wait for that new page, not the one clicked on
    wait(d, lambda d: d.current_url.endswith("/queue") and d.execute_script(
        "return window.__before === undefined && document.readyState === 'complete'"))
    d.execute_script("window.__same = 1")  # gone if the page reloads

    def listed(d):  # read in one step: the list may be replaced between two reads
        return " ".join(d.execute_script(
            "return Array.from(document.querySelectorAll('[data-testid=\"queue-item\"]'), e => e.textContent)"))

    wait(d, lambda d: ids[0] not in listed(d))
    third = api.post("/v1/predictions", json={"model": "demo", "input": {"prompt": PROMPT, "seed": 9}}).json()["id"]
    wait(d, lambda d: third in listed(d))
    assert d.execute_script("return window.__same") == 1  # updated from the event stream, not reloaded
    api.post("/v1/queue/resume")
    assert server.wait(api, ids[0])["status"] == "canceled"
    assert server.wait(api, ids[1])["status"] == "succeeded"
    wait(d, lambda d: third not in listed(d))


def test_a_grid_from_the_page(server, logged_in):
    """The grid takes the settings its cells share (size, sampler, ...); an axis's error sits beside that axis."""
    d = logged_in
    d.get(server.url + "/grid")
    d.find_element(By.NAME, "prompt").send_keys(PROMPT)
    d.find_element(By.NAME, "x").send_keys("steps=2,4")
    d.find_element(By.NAME, "y").send_keys("colour=2,6")
    by(d, "grid-submit").click()
    error = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="field-error"][data-field="y"]'))[0]
    assert "colour" in error.text
    d.find_element(By.NAME, "y").clear()
    d.find_element(By.NAME, "y").send_keys("guidance=2,6")
    fill(d, grid_width=80, grid_height=64)
    Select(by(d, "grid-sampler")).select_by_value("heun")
    by(d, "grid-submit").click()
    wait(d, lambda d: "/jobs/" in d.current_url)
    with server.client() as api:
        grid = api.get("/v1/grids/" + d.current_url.rstrip("/").split("/")[-1]).json()
    assert {k: grid["input"][k] for k in ("width", "height", "seed", "sampler")} == \
        {"width": 80, "height": 64, "seed": 0, "sampler": "heun"}, grid["input"]
    wait(d, lambda d: d.find_elements(By.ID, "sheet"), timeout=120)
    assert len(d.find_elements(By.CSS_SELECTOR, "#results img")) == 4
    cookie = d.get_cookie("fluxlab_session")["value"]
    csv = httpx.get(d.find_element(By.ID, "csv").get_attribute("href"), cookies={"fluxlab_session": cookie})
    rows = csv.text.strip().splitlines()
    assert csv.status_code == 200 and len(rows) == 5 and rows[0].startswith("row,col,x_field")


def test_the_page_works_without_javascript(server, logged_in):
    """Plain forms: the generate form posts, the job's page reloads itself until the image is there."""
    cookie = logged_in.get_cookie("fluxlab_session")["value"]
    with httpx.Client(base_url=server.url, cookies={"fluxlab_session": cookie},
                      headers={"Origin": server.url}) as c:
        r = c.post("/generate", data={"prompt": PROMPT, "seed": "31", "steps": "3", "model": "demo"})
        assert r.status_code == 303 and r.headers["location"].startswith("/jobs/")
        page = c.get(r.headers["location"])
        assert 'http-equiv="refresh"' in page.text or "succeeded" in page.text
        deadline = time.time() + 60
        while "succeeded" not in page.text and time.time() < deadline:
            time.sleep(0.3)
            page = c.get(r.headers["location"])
        assert "/image/out_" in page.text
        thumb = re.search(r'<img src="(/v1/outputs/[^"]+)"', page.text).group(1)  # a thumbnail, not the PNG
        assert "sig=" not in thumb and c.get(thumb).headers["content-type"] == "image/jpeg"
        # Cancel without JavaScript: the page it lands on says canceled
        r = c.post("/generate", data={"prompt": PROMPT, "seed": "33", "steps": "300", "width": "256",
                                      "height": "256", "model": "demo"})
        job_url = r.headers["location"]
        with server.client() as api:
            deadline = time.time() + 60
            while api.get("/v1/predictions/" + job_url.split("/")[-1]).json()["status"] != "processing" and \
                    time.time() < deadline:
                time.sleep(0.1)
        after = c.post(job_url + "/cancel", headers={"Referer": server.url + job_url}, follow_redirects=True)
        assert after.status_code == 200 and 'data-testid="cancel-note"' in after.text
        assert "Canceled" in after.text and '<strong id="status">canceled</strong>' in after.text
        bad = c.post("/generate", data={"prompt": PROMPT, "width": "100", "model": "demo"})
        assert bad.status_code == 422 and 'data-field="width"' in bad.text and "multiple of 16" in bad.text
        # "random" without JavaScript: the seed field says an empty seed is random, and two such images differ
        page = c.get("/")
        assert 'placeholder="random when empty"' in page.text
        assert 'id="dice" title="a random seed" hidden' in page.text
        seeds = []
        for _ in range(2):
            r = c.post("/generate", data={"prompt": PROMPT, "steps": "1", "model": "demo"})
            with server.client() as api:
                job = server.wait(api, r.headers["location"].rsplit("/", 1)[1])
                out_id = job["output"][0].split("?")[0].rsplit("/", 1)[1]
                seeds.append(api.get(f"/v1/outputs/{out_id}/record").json()["request"]["seed"])
        assert seeds[0] != seeds[1]
        # The size preset works without JavaScript: the posted preset is the image's size.
        r = c.post("/generate", data={"prompt": PROMPT, "seed": "32", "steps": "2", "model": "demo",
                                      "aspect_preset": "64x112"})
        assert r.status_code == 303
        with server.client() as api:
            job = api.get("/v1/predictions", params={"limit": 1}).json()["results"][0]
        assert (job["input"]["width"], job["input"]["height"]) == (64, 112)


def test_a_dataset_is_captioned_edited_and_trained_from_the_page(server, logged_in, tmp_path):
    """Without JavaScript: upload a zip of uncaptioned rings to "Caption the missing ones" (the demo captioner),
    the dataset page shows each image and its caption, one caption is edited, and the training uses the edited
    text."""
    import re
    import zipfile

    from fluxlab.demo.data import render
    from fluxlab.demo.lora import ring_scenes

    archive = tmp_path / "rings.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, s in enumerate(ring_scenes(4, 2)):
            path = tmp_path / f"ring_{i}.png"
            render(s, seed=i).save(path)
            z.write(path, path.name)
        Image.new("RGB", (40, 40), (250, 250, 250)).save(tmp_path / "tiny.png")  # smaller than the demo trains at
        z.write(tmp_path / "tiny.png", "tiny.png")
    cookie = logged_in.get_cookie("fluxlab_session")["value"]
    with httpx.Client(base_url=server.url, cookies={"fluxlab_session": cookie}, headers={"Origin": server.url},
                      timeout=120) as c:
        r = c.post("/datasets", data={"captioner": "demo", "trigger_word": "zxq", "detail": "short"},
                   files={"images": ("rings.zip", archive.read_bytes(), "application/zip")})
        assert r.status_code == 303 and r.headers["location"].startswith("/datasets/"), r.text
        page = c.get(r.headers["location"])
        deadline = time.time() + 60
        while "Train with these captions" not in page.text and time.time() < deadline:
            assert 'http-equiv="refresh"' in page.text  # a page that waits reloads itself
            time.sleep(0.3)
            page = c.get(r.headers["location"])
        first = ring_scenes(4, 2)[0].caption.replace("ring", "zxq")
        assert page.text.count('data-testid="dataset-item"') == 5 and first in page.text
        thumb = re.search(r'<img src="(/v1/outputs/[^"]+)"', page.text).group(1)
        assert c.get(thumb).headers["content-type"] == "image/jpeg"
        # before training: how many are captioned, and what would train badly (too few, too small)
        assert re.search(r"5 of 5 images captioned", page.text)
        warnings = re.search(r'data-testid="dataset-warnings">(.*?)</ul>', page.text, re.S).group(1)
        assert "5 images" in warnings and "1 smaller than the 64 px" in warnings and "tiny.png" in warnings
        assert "tiny.png · 40x40" in page.text
        t = c.post(r.headers["location"] + "/train", data={
            "caption_0": "zxq, edited by hand", "model": "demo", "trigger_word": "zxq", "steps": "2",
            "sample_prompts": "a zxq on a table\n\n[trigger] alone\n"})
        assert t.status_code == 303 and t.headers["location"].startswith("/trainings/"), t.text
        job_id = t.headers["location"].rsplit("/", 1)[1]
        with server.client() as api:
            job = server.wait(api, job_id, kind="training")
        assert job["status"] == "succeeded"
        assert job["input"]["sample_prompts"] == ["a zxq on a table", "[trigger] alone"]
        labels = re.findall(r'data-testid="sample-label">([^<]*)<', c.get(t.headers["location"]).text)
        assert labels == ["step 1 · a zxq on a table", "step 1 · zxq alone", "step 2 · a zxq on a table",
                          "step 2 · zxq alone"], labels
    uploads = sorted(server.data.glob("files/*/dataset.zip"), key=lambda p: p.stat().st_mtime)
    with zipfile.ZipFile(uploads[-1]) as z:
        assert z.read("ring_0.txt").decode() == "zxq, edited by hand\n"
        assert z.read("ring_1.txt").decode().startswith("a ") and "zxq" in z.read("ring_1.txt").decode()


LOOK = """
const lum = (c) => {
  const [r, g, b] = c.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const rgba = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
const backdrop = (el) => {  // the first ancestor (or itself) with an opaque background
  for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
  }
  return rgba(getComputedStyle(document.documentElement).color).slice(0, 3).map((v) => 255 - v);
};
const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
const shown = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden";
const low = [], unlabeled = [];
for (const el of document.querySelectorAll("body *")) {
  if (!shown(el)) continue;
  const field = ["INPUT", "SELECT", "TEXTAREA"].includes(el.tagName) && el.type !== "file";
  const text = Array.from(el.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!field && !text) continue;
  const r = ratio(rgba(getComputedStyle(el).color).slice(0, 3), backdrop(el));
  if (r < 4.5) low.push(`${el.tagName} "${(el.textContent || el.value || "").trim().slice(0, 30)}" ${r.toFixed(2)}`);
}
for (const c of document.querySelectorAll("input, select, textarea, button")) {
  if (c.type === "hidden" || !shown(c)) continue;
  const named = c.closest("label") || c.getAttribute("aria-label") ||
    (c.id && document.querySelector(`label[for="${c.id}"]`)) || (c.tagName === "BUTTON" && c.textContent.trim());
  if (!named) unlabeled.push(c.outerHTML.slice(0, 90));
}
return {low, unlabeled, page: rgba(getComputedStyle(document.body).backgroundColor).slice(0, 3),
        overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth};
"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_look_measured_contrast_labels_focus_and_no_sideways_scroll(server, logged_in, scheme):
    """What a Lighthouse run would check, measured in the browser: every text at least 4.5:1 against what is
    behind it, every control labelled, keyboard focus visible, and no horizontal scrolling on a 390 px phone;
    in the light and the dark theme (the system's setting)."""
    d = logged_in
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
    try:
        for path in ("/", "/gallery", "/train", "/grid", "/queue", "/models"):
            d.get(server.url + path)
            seen = d.execute_script(LOOK)
            assert not seen["low"], (path, seen["low"])
            assert not seen["unlabeled"], (path, seen["unlabeled"])
            dark = sum(seen["page"]) < 3 * 60
            assert dark == (scheme == "dark"), (path, seen["page"])
        d.get(server.url + "/")
        body = d.find_element(By.TAG_NAME, "body")
        for _ in range(12):  # the keyboard's focus ring shows on every control it reaches
            body.send_keys(Keys.TAB) if d.switch_to.active_element.tag_name == "body" else \
                d.switch_to.active_element.send_keys(Keys.TAB)
            style = d.execute_script("const s = getComputedStyle(document.activeElement);"
                                     "return [document.activeElement.tagName, s.outlineStyle, s.outlineWidth];")
            assert style[1] != "none" and float(style[2].rstrip("px")) >= 2, style
        d.set_window_size(390, 844)
        d.get(server.url + "/")
        assert d.execute_script(LOOK)["overflow"] <= 0
    finally:
        d.set_window_size(1100, 1300)
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_screenshots_of_every_page_at_desktop_and_phone_width(server, logged_in, tmp_path):
    """The generate page (with a finished result), gallery, image, train and training pages at 1280 and 390 px,
    each checked to fit its width; written to docs/screenshots (the README's pictures) when
    FLUXLAB_UPDATE_SCREENSHOTS=1, else to a temporary folder."""
    from selenium.webdriver.common.action_chains import ActionChains
    from serving import demo_zip

    d = logged_in
    folder = ROOT / "docs" / "screenshots" if os.environ.get("FLUXLAB_UPDATE_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    alice = server.add_token("alice")  # the pictures show a person's name, not the suite's token name
    d.get(server.url + "/login")
    by(d, "token-input").send_keys(alice)
    by(d, "login-submit").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="prompt"]'))
    with server.client(alice) as api:
        up = api.post("/v1/files", files={"file": ("rings.zip", demo_zip(tmp_path / "rings.zip").read_bytes())})
        training = api.post("/v1/trainings", json={"model": "demo", "input": {
            "input_images": up.json()["id"], "trigger_word": "zxq", "steps": 8, "name": "rings"}}).json()
        assert server.wait(api, training["id"], kind="training")["status"] == "succeeded"
    d.set_window_size(1280, 900)
    d.get(server.url + "/")
    fill(d, prompt="a red circle in the top left on a white background", seed=7, steps=8, num_images=4)
    by(d, "submit").click()
    wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded in"))
    results = d.find_elements(By.CSS_SELECTOR, '#results [data-testid="result"] img')
    out_id = results[0].find_element(By.XPATH, "..").get_attribute("href").rsplit("/", 1)[1]
    pages = {"generate": None, "gallery": "/gallery", "image": f"/image/{out_id}", "train": "/train",
             "training": f"/trainings/{training['id']}"}
    written = []
    # the mask editor over a result sent to inpainting, with a stroke painted
    d.get(server.url + f"/?from={out_id}&send=inpaint")
    canvas = wait(d, lambda d: by(d, "mask-canvas") if by(d, "mask-editor").is_displayed() else None)
    wait(d, lambda d: canvas.get_attribute("width") == "64")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(d).move_to_element_with_offset(canvas, -100, -60).click_and_hold().move_by_offset(180, 90) \
        .release().perform()
    assert d.save_screenshot(str(folder / "inpaint-desktop.png"))
    written.append(folder / "inpaint-desktop.png")
    d.get(server.url + "/")
    fill(d, prompt="a red circle in the top left on a white background", seed=7, steps=8, num_images=4)
    by(d, "submit").click()
    wait(d, lambda d: by(d, "progress-text").text.startswith("succeeded in"))
    try:
        for width, height, label in ((1280, 900, "desktop"), (390, 844, "phone")):
            d.set_window_size(width, height)
            for name, path in pages.items():
                if path is not None:
                    d.get(server.url + path)
                    wait(d, lambda d: d.execute_script("return document.readyState") == "complete")
                    wait(d, lambda d: d.execute_script(  # the images in view have loaded
                        "return Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight"
                        " && i.getClientRects().length).every(i => i.complete)"))
                d.execute_script("window.scrollTo(0, 0)")
                assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), \
                    (name, label)
                file = folder / f"{name}-{label}.png"
                assert d.save_screenshot(str(file))
                written.append(file)
            d.get(server.url + "/")  # the generate page again, for the phone's turn (its result is gone)
            pages["generate"] = "/"
    finally:
        d.set_window_size(1100, 1300)
    for file in written:
        with Image.open(file) as im:
            pixels = np.asarray(im.convert("L"))
        assert im.width >= 390 and pixels.std() > 10, file  # a page, not a blank frame
