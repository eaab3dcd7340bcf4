"""The page's routes: server-rendered templates, each action carried out through the public /v1 API.

A page handler asks the API in-process (httpx over ASGI, with the visitor's session cookie), so the page can do
nothing a token holder could not do with curl, and its forms work with JavaScript off (then a job's page reloads
itself to show progress). With JavaScript on, app.js talks to the same API directly and follows Server-Sent
Events. Templates escape all user text; a Content-Security-Policy allows only fluxlab's own scripts and styles.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
INTS = ("width", "height", "steps", "seed", "num_images")
FLOATS = ("guidance", "strength", "eta")
TEXTS = ("prompt", "negative", "sampler", "schedule", "preset", "template")
FIELDS = (*TEXTS, *INTS, *FLOATS, "lora", "images", "init", "mask", "model", "input_images", "trigger_word",
          "config")


def field_of(message: str) -> str:
    """The form field a 422 names ("width 100 is not ...", "input.steps: ..."), or "" for the form as a whole."""
    m = re.match(r"^(?:input\.)?([a-z_]+)", message or "")
    if m and m.group(1) in FIELDS:
        return m.group(1)
    for f in FIELDS:
        if re.search(rf"\b{f}\b", message or ""):
            return f
    return ""


def number(text: str, kind):
    """A form value as the request's type, or the text unchanged (the API then names it)."""
    text = text.strip()
    try:
        value = kind(text)
    except ValueError:
        return text
    return value if kind is int or math.isfinite(value) else text


def mount(app: FastAPI, store, settings) -> None:
    from ..serve.app import SESSION_COOKIE, ApiError, check_origin

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if not request.url.path.startswith(("/v1/", "/docs", "/redoc", "/openapi.json")):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["Referrer-Policy"] = "same-origin"
        return response

    def who(request: Request) -> str | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        return store.session_owner(cookie) if cookie else None

    def login_redirect(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    def render(request: Request, template: str, status: int = 200, **ctx) -> Response:
        return templates.TemplateResponse(request, template, {"owner": who(request), **ctx}, status_code=status)

    async def call(request: Request, method: str, path: str, **kw):
        """The public API, asked in-process as this visitor (their cookie, this server's Origin)."""
        import httpx

        origin = f"{request.url.scheme}://{request.headers.get('host', '')}"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=origin,
                                     cookies={SESSION_COOKIE: request.cookies.get(SESSION_COOKIE, "")},
                                     headers={"origin": origin}, timeout=120) as client:
            return await client.request(method, path, **kw)

    def guarded(handler):
        """A page that needs a login (and, for a POST, this server's own Origin)."""
        import functools

        @functools.wraps(handler)
        async def page(request: Request, *args, **kwargs):
            if who(request) is None:
                return login_redirect(request)
            if request.method == "POST":
                try:
                    check_origin(request)
                except ApiError as e:
                    return Response(e.detail, status_code=403, media_type="text/plain")
            return await handler(request, *args, **kwargs)
        return page

    # -- login -------------------------------------------------------------------------------------------------
    @app.get("/login", include_in_schema=False)
    async def login_page(request: Request, next: str = "/"):
        return render(request, "login.html", page="login", title="Log in", next=_safe_next(next), error=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"):
        try:
            check_origin(request)
        except ApiError as e:
            return Response(e.detail, status_code=403, media_type="text/plain")
        name = store.owner_of(token.strip()) if token.strip() else None
        if name is None:
            return render(request, "login.html", status=401, page="login", title="Log in", next=_safe_next(next),
                          error="this token is not valid (create one with `fluxlab token create NAME`)")
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(SESSION_COOKIE, store.create_session(name), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=14 * 86400, path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            store.end_session(cookie)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- generate ------------------------------------------------------------------------------------------------
    async def choices(request: Request) -> dict:
        from ..spec.presets import BUILTIN_PRESETS, BUILTIN_TEMPLATES
        from ..spec.samplers import SAMPLERS
        from ..spec.values import ASPECTS

        data = (await call(request, "GET", "/v1/models")).json()
        models = [m for m in data["models"] if m.get("bundled") or m.get("cached_gb") or m["name"] in settings.models]
        for m in models:
            m.setdefault("guidance_mode", "cfg")
            m.setdefault("steps", "")
            m.setdefault("default_size", ["", ""])
        presets = sorted({p for group in BUILTIN_PRESETS.values() for p in group})
        return {"models": models, "loras": data["loras"], "samplers": list(SAMPLERS), "aspects": ASPECTS,
                "presets": presets, "templates": sorted(BUILTIN_TEMPLATES)}

    @app.get("/", include_in_schema=False)
    @guarded
    async def generate_page(request: Request):
        form: dict = {"model": "demo"}
        source = request.query_params.get("from")
        c = await choices(request)
        if source:
            r = await call(request, "GET", f"/v1/outputs/{source}/record")
            if r.status_code == 200:
                form = reuse(r.json(), c["loras"], settings.models)
        if request.query_params.get("lora"):
            form["lora"] = request.query_params["lora"]
        return render(request, "generate.html", page="generate", title="Generate", form=form, errors={}, **c)

    @app.post("/generate", include_in_schema=False)
    @guarded
    async def generate_form(request: Request):
        data = await request.form()
        form = {k: v for k, v in data.items() if isinstance(v, str)}
        inp: dict = {}
        for k in TEXTS:
            if form.get(k):
                inp[k] = form[k]
        for k in INTS:
            if form.get(k, "").strip():
                inp[k] = number(form[k], int)
        for k in FLOATS:
            if form.get(k, "").strip():
                inp[k] = number(form[k], float)
        if form.get("lora"):
            inp["lora"] = [{"name": form["lora"], "scale": number(form.get("lora_scale") or "1", float)}]
        errors: dict = {}
        for k in ("images", "init", "mask"):
            ids = []
            for f in data.getlist(k):
                if hasattr(f, "filename") and f.filename:
                    r = await call(request, "POST", "/v1/files", files={"file": (f.filename, await f.read())})
                    if r.status_code != 201:
                        errors[k] = r.json().get("detail", str(r.status_code))
                    else:
                        ids.append(r.json()["id"])
            if ids:
                inp[k] = ids if k == "images" else ids[0]
        if not errors:
            r = await call(request, "POST", "/v1/predictions", json={"model": form.get("model", "demo"), "input": inp})
            if r.status_code == 201:
                return RedirectResponse(f"/jobs/{r.json()['id']}", status_code=303)
            detail = r.json().get("detail", str(r.status_code))
            errors[field_of(detail)] = detail
        return render(request, "generate.html", status=422, page="generate", title="Generate", form=form,
                      errors=errors, **(await choices(request)))

    # -- a job's page ------------------------------------------------------------------------------------------
    async def find_job(request: Request, job_id: str):
        for kind, path in (("prediction", "predictions"), ("grid", "grids"), ("batch", "batches")):
            r = await call(request, "GET", f"/v1/{path}/{job_id}")
            if r.status_code == 200:
                return kind, path, r.json()
        return None, None, None

    @app.get("/jobs/{job_id}", include_in_schema=False)
    @guarded
    async def job_page(request: Request, job_id: str):
        kind, _, job = await find_job(request, job_id)
        if job is None:
            return Response(f"no job {job_id}", status_code=404, media_type="text/plain")
        p = job.get("progress") or {}
        if "step" in p:
            progress = {"value": p["step"], "max": p["total"], "text": f"step {p['step']}/{p['total']}"}
        elif "done" in p:
            progress = {"value": p["done"], "max": p["total"], "text": f"{p['done']}/{p['total']}"}
        else:
            done = job["status"] == "succeeded"
            progress = {"value": 1 if done else 0, "max": 1, "text": job["status"]}
        images = job["output"] if isinstance(job["output"], list) else (job["output"] or {}).get("cell", [])
        outputs = [{"id": u.rsplit("/", 1)[1], "url": u} for u in images or []]
        grid = job["output"] if kind == "grid" else None
        return render(request, "job.html", page="job", title=f"{kind} {job_id}", job=job, kind=kind,
                      done=job["status"] in ("succeeded", "failed", "canceled"), progress=progress, outputs=outputs,
                      grid=grid)

    @app.post("/jobs/{job_id}/cancel", include_in_schema=False)
    @guarded
    async def job_cancel(request: Request, job_id: str):
        _, path, _ = await find_job(request, job_id)
        if path is None:
            r = await call(request, "POST", f"/v1/trainings/{job_id}/cancel")
            return RedirectResponse(f"/trainings/{job_id}" if r.status_code == 200 else "/queue", status_code=303)
        await call(request, "POST", f"/v1/{path}/{job_id}/cancel")
        return RedirectResponse(request.headers.get("referer") or f"/jobs/{job_id}", status_code=303)

    # -- queue, gallery, image ---------------------------------------------------------------------------------
    @app.get("/queue", include_in_schema=False)
    @guarded
    async def queue_page(request: Request):
        queue = (await call(request, "GET", "/v1/queue")).json()
        return render(request, "queue.html", page="queue", title="Queue", queue=queue)

    @app.post("/queue/{action}", include_in_schema=False)
    @guarded
    async def queue_action(request: Request, action: str):
        if action in ("pause", "resume"):
            await call(request, "POST", f"/v1/queue/{action}")
        return RedirectResponse("/queue", status_code=303)

    @app.get("/gallery", include_in_schema=False)
    @guarded
    async def gallery_page(request: Request):
        params = {"limit": 48}
        if request.query_params.get("before"):
            params["before"] = request.query_params["before"]
        data = (await call(request, "GET", "/v1/outputs", params=params)).json()
        nxt = data.get("next")
        before = re.search(r"before=([0-9.]+)", nxt).group(1) if nxt else None
        return render(request, "gallery.html", page="gallery", title="Gallery", outputs=data.get("results", []),
                      next=before)

    @app.get("/image/{out_id}", include_in_schema=False)
    @guarded
    async def image_page(request: Request, out_id: str):
        r = await call(request, "GET", f"/v1/outputs/{out_id}/record")
        if r.status_code != 200:
            return Response(f"no image {out_id}", status_code=404, media_type="text/plain")
        from ..spec.record import ImageRecord

        record = ImageRecord.model_validate(r.json())
        return render(request, "image.html", page="image", title="Image", out_id=out_id, flat=record.flat(),
                      timings=record.timings or {})

    @app.post("/image/{out_id}/delete", include_in_schema=False)
    @guarded
    async def image_delete(request: Request, out_id: str):
        await call(request, "DELETE", f"/v1/outputs/{out_id}")
        return RedirectResponse("/gallery", status_code=303)

    # -- grid ------------------------------------------------------------------------------------------------------
    @app.get("/grid", include_in_schema=False)
    @guarded
    async def grid_page(request: Request):
        c = await choices(request)
        return render(request, "grid.html", page="grid", title="Grid", form={"model": "demo"}, errors={}, **c)

    @app.post("/grid", include_in_schema=False)
    @guarded
    async def grid_form(request: Request):
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        body = {"model": form.get("model", "demo"), "prompt": form.get("prompt", ""), "x": form.get("x", ""),
                "y": form.get("y") or None, "input": {}}
        if form.get("seed", "").strip():
            body["input"]["seed"] = number(form["seed"], int)
        r = await call(request, "POST", "/v1/grids", json=body)
        if r.status_code == 201:
            return RedirectResponse(f"/jobs/{r.json()['id']}", status_code=303)
        detail = r.json().get("detail", str(r.status_code))
        return render(request, "grid.html", status=422, page="grid", title="Grid", form=form,
                      errors={"": detail}, **(await choices(request)))

    # -- training --------------------------------------------------------------------------------------------------
    @app.get("/train", include_in_schema=False)
    @guarded
    async def train_page(request: Request):
        c = await choices(request)
        # seed 004's recipe where it fits a first run: rank 16, learning rate 4e-4 (its 1000 steps on a real model)
        form = {"model": "demo", "steps": "1000", "lora_rank": "16", "learning_rate": "0.0004"}
        return render(request, "train.html", page="train", title="Train", form=form, errors={}, **c)

    @app.post("/train", include_in_schema=False)
    @guarded
    async def train_form(request: Request):
        data = await request.form()
        form = {k: v for k, v in data.items() if isinstance(v, str)}
        errors: dict = {}
        ids = []
        for f in data.getlist("images"):
            if hasattr(f, "filename") and f.filename:
                r = await call(request, "POST", "/v1/files", files={"file": (f.filename, await f.read())})
                if r.status_code != 201:
                    errors["input_images"] = r.json().get("detail", str(r.status_code))
                    break
                ids.append(r.json())
        if not ids and not errors:
            errors["input_images"] = "input_images: give a zip of images, or images"
        if not errors:
            zipped = len(ids) == 1 and ids[0]["kind"] == "zip"
            inp = {"input_images": ids[0]["id"] if zipped else [i["id"] for i in ids],
                   "trigger_word": form.get("trigger_word", ""), "steps": number(form.get("steps") or "1000", int)}
            for k, kind in (("lora_rank", int), ("learning_rate", float)):
                if form.get(k, "").strip():
                    inp[k] = number(form[k], kind)
            if form.get("name", "").strip():
                inp["name"] = form["name"].strip()
            if form.get("config", "").strip():
                inp["config"] = form["config"]
            r = await call(request, "POST", "/v1/trainings", json={"model": form.get("model", "demo"), "input": inp})
            if r.status_code == 201:
                return RedirectResponse(f"/trainings/{r.json()['id']}", status_code=303)
            detail = r.json().get("detail", str(r.status_code))
            field = field_of(detail)
            if detail.startswith(("input.config", "training")) or "config." in detail:
                field = "config"
            errors[field] = detail
        c = await choices(request)
        return render(request, "train.html", status=422, page="train", title="Train", form=form, errors=errors, **c)

    @app.get("/trainings/{job_id}", include_in_schema=False)
    @guarded
    async def training_page(request: Request, job_id: str):
        r = await call(request, "GET", f"/v1/trainings/{job_id}")
        if r.status_code != 200:
            return Response(f"no training {job_id}", status_code=404, media_type="text/plain")
        job = r.json()
        losses = [s["loss"] for s in (await call(request, "GET", f"/v1/trainings/{job_id}/loss")).json()["steps"]]
        p = job.get("progress") or {}
        steps = job["input"].get("steps", 1)
        progress = {"value": p.get("step", len(losses)), "max": p.get("total", steps),
                    "text": f"step {p.get('step', len(losses))}/{p.get('total', steps)}"}
        return render(request, "training.html", page="training", title=f"Training {job_id}", job=job,
                      done=job["status"] in ("succeeded", "failed", "canceled"), progress=progress,
                      losses=[round(x, 6) for x in losses])

    @app.post("/trainings/{job_id}/{action}", include_in_schema=False)
    @guarded
    async def training_action(request: Request, job_id: str, action: str):
        if action in ("cancel", "resume"):
            await call(request, "POST", f"/v1/trainings/{job_id}/{action}")
        return RedirectResponse(f"/trainings/{job_id}", status_code=303)


def reuse(record: dict, loras: list, models: dict) -> dict:
    """The generate form filled from an image's record ("use these settings")."""
    request = record.get("request", {})
    form = {k: str(v) for k, v in request.items() if k in (*TEXTS, *INTS, *FLOATS) and v is not None}
    name = record.get("model", {}).get("name", "demo")
    by_path = {str(Path(p).resolve()): n for n, p in models.items()}
    form["model"] = by_path.get(name, name)
    used = record.get("model", {}).get("loras") or []
    if used:
        match = next((lo["name"] for lo in loras if lo.get("sha256") == used[0].get("sha256")), None)
        if match:
            form["lora"], form["lora_scale"] = match, str(used[0].get("scale", 1.0))
    return form


def _safe_next(target: str) -> str:
    """Only a path on this server (never another site) after logging in."""
    return target if target.startswith("/") and not target.startswith("//") else "/"
