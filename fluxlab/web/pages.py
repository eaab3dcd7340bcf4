"""The page's routes: server-rendered templates, each action carried out through the public /v1 API.

A page handler asks the API in-process (httpx over ASGI, with the visitor's session cookie), so the page can do
nothing a token holder could not do with curl, and its forms work with JavaScript off (then a job's page reloads
itself to show progress). With JavaScript on, app.js talks to the same API directly and follows Server-Sent
Events. Templates escape all user text; a Content-Security-Policy allows only fluxlab's own scripts and styles.
The forms' handlers are in web.forms, what every page shares in web.site.
"""

import re
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from .site import (
    FLOATS,
    HERE,
    INTS,
    LORA_ROWS,
    TEXTS,
    call,
    choices,
    dataset_view,
    guarded,
    lora_key,
    not_found,
    render,
    safe_next,
    who,
)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
router = APIRouter(include_in_schema=False)
OUTPUT_ID = re.compile(r"out_[a-z0-9]{1,64}")


def mount(app: FastAPI) -> None:
    from . import forms

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if not request.url.path.startswith(("/v1/", "/docs", "/redoc", "/openapi.json")):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["Referrer-Policy"] = "same-origin"
        return response

    app.include_router(router)
    app.include_router(forms.router)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def missing(request: Request, e: HTTPException):
        """An unknown page is the site's 404 page for a visitor who is logged in; the API keeps its JSON."""
        if e.status_code == 404 and not request.url.path.startswith(("/v1/", "/static/")) and who(request):
            return not_found(request, f"There is no page {request.url.path[:200]}.")
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(request, e)


@router.get("/login")
async def login_page(request: Request, next: str = "/"):
    return render(request, "login.html", page="login", title="Log in", next=safe_next(next), error=None)


@router.get("/")
@guarded
async def generate_page(request: Request):
    form: dict = {"model": "demo"}
    source = request.query_params.get("from")
    c = await choices(request)
    if source:
        r = await call(request, "GET", f"/v1/outputs/{source}/record")
        if r.status_code == 200:
            form = reuse(r.json(), c["loras"], request.app.state.server.settings.models)
            if request.query_params.get("send") in SENDS and OUTPUT_ID.fullmatch(source):
                form = await send_to(request, source, request.query_params["send"], form)
    if request.query_params.get("lora"):
        form["lora"] = request.query_params["lora"]
    return render(request, "generate.html", page="generate", title="Generate", form=form, errors={}, **c)


async def find_job(request: Request, job_id: str):
    for kind, path in (("prediction", "predictions"), ("grid", "grids"), ("batch", "batches"),
                       ("download", "downloads")):
        r = await call(request, "GET", f"/v1/{path}/{job_id}")
        if r.status_code == 200:
            return kind, path, r.json()
    return None, None, None


@router.get("/jobs/{job_id}")
@guarded
async def job_page(request: Request, job_id: str):
    kind, _, job = await find_job(request, job_id)
    if job is None:
        return not_found(request, f"no job {job_id}")
    p = job.get("progress") or {}
    if "step" in p:
        progress = {"value": p["step"], "max": p["total"], "text": f"step {p['step']}/{p['total']}"}
    elif "done_bytes" in p:
        progress = {"value": p["done_bytes"], "max": max(p["total_bytes"], 1),
                    "text": f"{p['done_bytes'] / 1e9:.2f} of {p['total_bytes'] / 1e9:.2f} GB"}
    elif "done" in p:
        progress = {"value": p["done"], "max": p["total"], "text": f"{p['done']}/{p['total']}"}
    else:
        progress = {"value": 1 if job["status"] == "succeeded" else 0, "max": 1, "text": job["status"]}
    images = job["output"] if isinstance(job["output"], list) else (job["output"] or {}).get("cell", [])
    # The page shows outputs by id under the visitor's own login, without the signed URL's query (which a
    # thumbnail's ?thumb= would otherwise follow).
    paths = [urlsplit(u).path for u in images or []]
    outputs = [{"id": p.rsplit("/", 1)[1], "url": p} for p in paths]
    return render(request, "job.html", page="job", title=f"{kind} {job_id}", job=job, kind=kind,
                  cancel_asked=request.query_params.get("cancel") == "asked",
                  done=job["status"] in ("succeeded", "failed", "canceled"), progress=progress, outputs=outputs,
                  grid=job["output"] if kind == "grid" else None)


@router.post("/jobs/{job_id}/cancel")
@guarded
async def job_cancel(request: Request, job_id: str):
    _, path, _ = await find_job(request, job_id)
    if path is None:
        r = await call(request, "POST", f"/v1/trainings/{job_id}/cancel")
        return RedirectResponse(f"/trainings/{job_id}" if r.status_code == 200 else "/queue", status_code=303)
    await call(request, "POST", f"/v1/{path}/{job_id}/cancel")
    if urlsplit(request.headers.get("referer") or "").path == "/queue":
        return RedirectResponse("/queue", status_code=303)
    # Without JavaScript the next page is all the visitor sees: wait (briefly) for the worker to stop, so it
    # says canceled rather than still running.
    import asyncio

    for _ in range(50):
        r = await call(request, "GET", f"/v1/{path}/{job_id}")
        if r.status_code != 200 or r.json()["status"] in ("succeeded", "failed", "canceled"):
            break
        await asyncio.sleep(0.1)
    return RedirectResponse(f"/jobs/{job_id}?cancel=asked", status_code=303)


@router.get("/queue")
@guarded
async def queue_page(request: Request):
    queue = (await call(request, "GET", "/v1/queue")).json()
    return render(request, "queue.html", page="queue", title="Queue", queue=queue)


@router.post("/queue/{action}")
@guarded
async def queue_action(request: Request, action: str):
    if action in ("pause", "resume"):
        await call(request, "POST", f"/v1/queue/{action}")
    return RedirectResponse("/queue", status_code=303)


@router.get("/models")
@guarded
async def models_page(request: Request):
    """Every model this server offers, with its state and how to get it; an admin starts a download here."""
    c = await choices(request)
    r = await call(request, "GET", "/v1/downloads", params={"limit": 20})
    downloads = r.json().get("results", []) if r.status_code == 200 else []
    running = {d["input"].get("model"): d for d in downloads if d["status"] in ("starting", "processing")}
    return render(request, "models.html", page="models", title="Models", models=c["models"], running=running,
                  downloads=downloads[:10], error=None)


@router.post("/models/download")
@guarded
async def models_download(request: Request):
    model = (await request.form()).get("model", "")
    r = await call(request, "POST", "/v1/downloads", json={"model": model if isinstance(model, str) else ""})
    if r.status_code == 201:
        return RedirectResponse(f"/jobs/{r.json()['id']}", status_code=303)
    c = await choices(request)
    return render(request, "models.html", status=r.status_code, page="models", title="Models", models=c["models"],
                  running={}, downloads=[], error=r.json().get("detail", str(r.status_code)))


@router.get("/gallery")
@guarded
async def gallery_page(request: Request):
    from urllib.parse import urlencode

    params: dict = {"limit": 48}
    for key in ("before", "q", "model", "lora"):
        if request.query_params.get(key):
            params[key] = request.query_params[key][:200]
    r = await call(request, "GET", "/v1/outputs", params=params)
    data = r.json() if r.status_code == 200 else {}
    nxt = data.get("next")
    older = None
    if nxt:
        kept = {k: v for k, v in params.items() if k in ("q", "model", "lora")}
        older = "/gallery?" + urlencode({**kept, "before": re.search(r"before=([0-9.]+)", nxt).group(1)})
    c = await choices(request)
    return render(request, "gallery.html", status=r.status_code, page="gallery",
                  title="Gallery", outputs=data.get("results", []), older=older, q=params.get("q", ""),
                  model=params.get("model", ""), lora=params.get("lora", ""), loras=c["loras"],
                  models=[m["name"] for m in c["models"]], error=None if r.status_code == 200 else r.json()["detail"])


@router.post("/gallery/selection")
@guarded
async def gallery_selection(request: Request):
    """Ticked images: downloaded as one zip (POST /v1/outputs/zip), or a page that asks before deleting them."""
    data = await request.form()
    ids = [i for i in data.getlist("ids") if isinstance(i, str) and OUTPUT_ID.fullmatch(i)][:200]
    if not ids:
        return RedirectResponse("/gallery", status_code=303)
    if data.get("action") == "download":
        r = await call(request, "POST", "/v1/outputs/zip", json={"ids": ids})
        if r.status_code != 200:
            return not_found(request, r.json().get("detail", "no such image"))
        return Response(r.content, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="images.zip"'})
    return render(request, "delete.html", page="gallery", title="Delete images", ids=ids)


@router.post("/gallery/delete")
@guarded
async def gallery_delete(request: Request):
    for i in (await request.form()).getlist("ids")[:200]:
        if isinstance(i, str) and OUTPUT_ID.fullmatch(i):
            await call(request, "DELETE", f"/v1/outputs/{i}")
    return RedirectResponse("/gallery", status_code=303)


@router.get("/image/{out_id}")
@guarded
async def image_page(request: Request, out_id: str):
    r = await call(request, "GET", f"/v1/outputs/{out_id}/record")
    if r.status_code != 200:
        return not_found(request, f"no image {out_id}")
    from ..spec.record import ImageRecord

    record = ImageRecord.model_validate({k: v for k, v in r.json().items() if k != "files"})
    return render(request, "image.html", page="image", title="Image", out_id=out_id, flat=record.flat(),
                  timings=record.timings or {})


@router.post("/image/{out_id}/delete")
@guarded
async def image_delete(request: Request, out_id: str):
    await call(request, "DELETE", f"/v1/outputs/{out_id}")
    return RedirectResponse("/gallery", status_code=303)


@router.get("/grid")
@guarded
async def grid_page(request: Request):
    c = await choices(request)
    return render(request, "grid.html", page="grid", title="Grid", form={"model": "demo"}, errors={}, **c)


@router.get("/train")
@guarded
async def train_page(request: Request):
    c = await choices(request)
    # the FLUX LoRA trainer's recipe where it fits a first run: rank 16, learning rate 4e-4
    form = {"model": "demo", "steps": "1000", "lora_rank": "16", "learning_rate": "0.0004", "captioner": "demo"}
    return render(request, "train.html", page="train", title="Train", form=form, errors={},
                  trainings=await trainings_list(request), **c)


async def trainings_list(request: Request) -> list[dict]:
    """This user's trainings, newest first, as the Train page lists them (each links to its own page)."""
    r = await call(request, "GET", "/v1/trainings", params={"limit": 50})
    rows = []
    for job in r.json().get("results", []) if r.status_code == 200 else []:
        inp = job.get("input") or {}
        rows.append({"id": job["id"], "name": inp.get("name") or (job.get("output") or {}).get("lora") or job["id"],
                     "trigger": inp.get("trigger_word") or "", "status": job["status"],
                     "steps": inp.get("steps") or "", "date": (job.get("created_at") or "")[:16].replace("T", " ")})
    return rows


@router.get("/datasets/{job_id}")
@guarded
async def dataset_page(request: Request, job_id: str):
    """A captioned set: while its captions job runs, its progress; then each image with its caption, editable,
    and the form that trains on them."""
    r = await call(request, "GET", f"/v1/captions/{job_id}")
    if r.status_code != 200:
        return not_found(request, f"no dataset {job_id}")
    return await dataset_view(request, r.json(), {"model": "demo"}, {})


@router.get("/trainings/{job_id}")
@guarded
async def training_page(request: Request, job_id: str):
    r = await call(request, "GET", f"/v1/trainings/{job_id}")
    if r.status_code != 200:
        return not_found(request, f"no training {job_id}")
    job = r.json()
    losses = [s["loss"] for s in (await call(request, "GET", f"/v1/trainings/{job_id}/loss")).json()["steps"]]
    p = job.get("progress") or {}
    steps = job["input"].get("steps", 1)
    progress = {"value": p.get("step", len(losses)), "max": p.get("total", steps),
                "text": f"step {p.get('step', len(losses))}/{p.get('total', steps)}"}
    from .chart import loss_svg

    log = request.query_params.get("scale") == "log"
    return render(request, "training.html", page="training", title=f"Training {job_id}", job=job,
                  prompts=job["output"]["sample_prompts"],
                  done=job["status"] in ("succeeded", "failed", "canceled"), progress=progress,
                  losses=[round(x, 6) for x in losses], chart=loss_svg(losses, log), log=log)


@router.post("/trainings/{job_id}/{action}")
@guarded
async def training_action(request: Request, job_id: str, action: str):
    if action in ("cancel", "resume"):
        await call(request, "POST", f"/v1/trainings/{job_id}/{action}")
    return RedirectResponse(f"/trainings/{job_id}", status_code=303)


SENDS = ("img2img", "inpaint", "reference")


async def send_to(request: Request, out_id: str, mode: str, form: dict) -> dict:
    """"Send to img2img / inpaint / reference": the image's settings, with the image itself as the init (a fresh
    mask to draw for inpainting) or as the only reference image. The image becomes the visitor's own upload, by
    the same /v1/files a script would use (the same bytes twice are one upload)."""
    image = await call(request, "GET", f"/v1/outputs/{out_id}")
    up = await call(request, "POST", "/v1/files", files={"file": (f"{out_id}.png", image.content)}) \
        if image.status_code == 200 else image
    if up.status_code != 201:
        return form
    form = {k: v for k, v in form.items() if not k.startswith(("init_", "mask_", "images_"))}
    kept = [(up.json()["id"], f"{out_id}.png")]
    if mode == "reference":
        form.pop("strength", None)
        form["images_files"] = kept
    else:
        form["init_files"] = kept
        form["open_mask"] = "1" if mode == "inpaint" else ""
    return form


def reuse(record: dict, loras: list, models: dict) -> dict:
    """The generate form filled from an image's record ("use these settings")."""
    request = record.get("request", {})
    form = {k: str(v) for k, v in request.items() if k in (*TEXTS, *INTS, *FLOATS) and v is not None}
    name = record.get("model", {}).get("name", "demo")
    by_path = {str(Path(p).resolve()): n for n, p in models.items()}
    form["model"] = by_path.get(name, name)
    files, request = record.get("files") or {}, record.get("request", {})
    for key in ("init", "mask"):  # kept by upload id, shown by name
        if files.get(key):
            form[f"{key}_files"] = [(files[key], Path(request[key]["path"]).name)]
    if files.get("images"):
        names = [Path(r["path"]).name for r in request.get("images") or []]
        form["images_files"] = list(zip(files["images"], names, strict=False))
    used = record.get("model", {}).get("loras") or []
    for i, lora in enumerate(used[:LORA_ROWS]):  # each LoRA of the stack into its row, by its bytes
        match = next((lo["name"] for lo in loras if lo.get("sha256") == lora.get("sha256")), None)
        if match:
            key = lora_key(i)
            form[f"lora{key}"], form[f"lora_scale{key}"] = match, str(lora.get("scale", 1.0))
    return form
