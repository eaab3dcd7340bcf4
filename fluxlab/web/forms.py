"""The page's forms (generate, grid, train): a form's fields become a /v1 request, and the API's answer a redirect
to the job or the form again with the error beside its field."""

import re
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from ..serve.deps import SESSION_COOKIE
from ..serve.http import ApiError, check_origin
from .site import (
    FIELDS,
    FLOATS,
    INTS,
    LORA_ROWS,
    TEXTS,
    call,
    choices,
    dataset_view,
    field_of,
    guarded,
    in_page_words,
    lora_key,
    not_found,
    number,
    render,
    safe_next,
    store,
)

router = APIRouter(include_in_schema=False)


@router.post("/login")
async def login(request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"):
    try:
        check_origin(request)
    except ApiError as e:
        return Response(e.detail, status_code=403, media_type="text/plain")
    name = store(request).owner_of(token.strip()) if token.strip() else None
    if name is None:
        wait = request.app.state.server.throttle.failed(request.client.host if request.client else "?")
        return render(request, "login.html", status=429 if wait else 401, page="login", title="Log in",
                      next=safe_next(next), error=f"too many failed logins; wait {wait:.0f} s" if wait else
                      "this token is not valid (create one with `fluxlab token create NAME`)")
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, store(request).create_session(name), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=14 * 86400, path="/")
    return response


@router.post("/logout")
async def logout(request: Request):
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        store(request).end_session(cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def prediction_input(form: dict) -> dict:
    inp: dict = {}
    preset = form.get("aspect_preset", "")
    if preset and not (form.get("width", "").strip() or form.get("height", "").strip()):  # the page without JS
        w, _, h = preset.partition("x")
        form = {**form, "width": w, "height": h}
    for k in TEXTS:
        if form.get(k):
            inp[k] = form[k]
    for k in INTS:
        if form.get(k, "").strip():
            inp[k] = number(form[k], int)
    for k in FLOATS:
        if form.get(k, "").strip():
            inp[k] = number(form[k], float)
    stack = []
    for i in range(LORA_ROWS):  # the form's LoRA rows, in order: lora/lora_scale, lora_2/lora_scale_2, ...
        key = lora_key(i)
        if form.get(f"lora{key}"):
            stack.append({"name": form[f"lora{key}"], "scale": number(form.get(f"lora_scale{key}") or "1", float)})
    if stack:
        inp["lora"] = stack
    return inp


async def upload_all(request: Request, uploads: list) -> tuple[list[dict], str | None]:
    """Each file of a form field uploaded through /v1/files: their infos, or the first error."""
    infos = []
    for f in uploads:
        if hasattr(f, "filename") and f.filename:
            r = await call(request, "POST", "/v1/files", files={"file": (f.filename, await f.read())})
            if r.status_code != 201:
                return infos, r.json().get("detail", str(r.status_code))
            infos.append(r.json())
    return infos, None


async def kept_files(request: Request, ids: list) -> list[tuple[str, str]]:
    """The uploads a form keeps by id (the visitor's own, checked through /v1/files), with their names."""
    kept = []
    for file_id in ids[:16]:
        ok = isinstance(file_id, str) and re.fullmatch(r"file_[a-z0-9]{1,64}", file_id)
        r = await call(request, "GET", f"/v1/files/{file_id}") if ok else None
        if r is not None and r.status_code == 200:
            kept.append((file_id, r.json()["name"]))
    return kept


async def every_error(request: Request, check: str, body: dict, refused) -> dict:
    """Every problem of a refused form at once, each beside the field it names (in the page's words): the API's
    validate call lists them all; the refusal's own line stays when that call finds nothing more."""
    errors: dict = {}
    r = await call(request, "POST", check, json=body)
    found = r.json().get("errors", []) if r.status_code == 200 else []
    if not found:
        detail = refused.json().get("detail", str(refused.status_code))
        found = [{"field": field_of(detail), "detail": detail}]
    for e in found:
        field = e["field"] if e["field"] in FIELDS else field_of(e["detail"])
        text = in_page_words(e["detail"])
        errors[field] = f"{errors[field]}; {text}" if field in errors else text
    return errors


@router.post("/generate")
@guarded
async def generate_form(request: Request):
    data = await request.form()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    inp = prediction_input(form)
    errors: dict = {}
    kept = {k: await kept_files(request, data.getlist(f"keep_{k}")) for k in ("images", "init", "mask")}
    for k in ("images", "init", "mask"):
        infos, error = await upload_all(request, data.getlist(k))
        if error:
            errors[k] = error
        # kept uploads (from a reused or sent image), by id: a new init or mask replaces the kept one, new
        # reference images join the kept ones; all of them stay kept if the form comes back
        new = [(i["id"], i["name"]) for i in infos]
        form[f"{k}_files"] = chosen = kept[k] + new if k == "images" else new or kept[k]
        if not error and chosen:
            inp[k] = [i for i, _ in chosen] if k == "images" else chosen[0][0]
    infos, error = await upload_all(request, data.getlist("lora_file"))  # a LoRA file joins the stack at scale 1
    if error:
        errors["lora_file"] = error
    elif infos:
        inp["lora"] = [*inp.get("lora", []), {"name": infos[0]["id"], "scale": 1.0}]
    if not errors:
        body = {"model": form.get("model", "demo"), "input": inp}
        r = await call(request, "POST", "/v1/predictions", json=body)
        if r.status_code == 201:
            return RedirectResponse(f"/jobs/{r.json()['id']}", status_code=303)
        errors = await every_error(request, "/v1/predictions/validate", body, r)
    return render(request, "generate.html", status=422, page="generate", title="Generate", form=form,
                  errors=errors, **(await choices(request)))


@router.post("/grid")
@guarded
async def grid_form(request: Request):
    """A grid with the base settings every cell shares (the generate form's size, steps, guidance, seed, sampler
    and LoRA stack); an error beside the field it names, the axis it is about included."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    base = {k: v for k, v in prediction_input(form).items() if k in ("width", "height", "steps", "guidance", "seed",
                                                                      "sampler", "lora")}
    body = {"model": form.get("model", "demo"), "prompt": form.get("prompt", ""), "x": form.get("x", ""),
            "y": form.get("y") or None, "input": base}
    r = await call(request, "POST", "/v1/grids", json=body)
    if r.status_code == 201:
        return RedirectResponse(f"/jobs/{r.json()['id']}", status_code=303)
    detail = r.json().get("detail", str(r.status_code))
    field = field_of(detail)
    for axis in ("x", "y"):  # an axis's error quotes its text or names its field
        text = form.get(axis, "").strip()
        name = text.partition("=")[0].strip()
        if re.match(rf"^{axis}\b", detail) or (text and (repr(text) in detail or (name and (
                f"axis {name}" in detail or repr(name) in detail)))):
            field = axis
            break
    return render(request, "grid.html", status=422, page="grid", title="Grid", form=form,
                  errors={field: in_page_words(detail)}, **(await choices(request)))


def training_input(form: dict, ids: list[dict]) -> dict:
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
    prompts = [line.strip() for line in form.get("sample_prompts", "").splitlines() if line.strip()]
    if prompts:
        inp["sample_prompts"] = prompts
    return inp


@router.post("/train")
@guarded
async def train_form(request: Request):
    data = await request.form()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    errors: dict = {}
    ids, error = await upload_all(request, data.getlist("images"))
    if error:
        errors["input_images"] = error
    elif not ids:
        errors["input_images"] = "input_images: give a zip of images, or images"
    if not errors:
        r = await call(request, "POST", "/v1/trainings", json={"model": form.get("model", "demo"),
                                                               "input": training_input(form, ids)})
        if r.status_code == 201:
            return RedirectResponse(f"/trainings/{r.json()['id']}", status_code=303)
        detail = r.json().get("detail", str(r.status_code))
        field = field_of(detail)
        if detail.startswith(("input.config", "training")) or "config." in detail:
            field = "config"
        errors[field] = detail
    return render(request, "train.html", status=422, page="train", title="Train", form=form, errors=errors,
                  **(await choices(request)))


@router.post("/datasets")
@guarded
async def dataset_form(request: Request):
    """Upload a set and caption what has no caption (POST /v1/captions); its page shows the result."""
    data = await request.form()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    ids, error = await upload_all(request, data.getlist("images"))
    if not error and not ids:
        error = "images: give a zip of images, or images"
    if not error:
        zipped = len(ids) == 1 and ids[0]["kind"] == "zip"
        inp = {"images": ids[0]["id"] if zipped else [i["id"] for i in ids], "detail": form.get("detail", "short")}
        if form.get("trigger_word", "").strip():
            inp["trigger_word"] = form["trigger_word"].strip()
        r = await call(request, "POST", "/v1/captions", json={"model": form.get("captioner", "demo"), "input": inp})
        if r.status_code == 201:
            return RedirectResponse(f"/datasets/{r.json()['id']}", status_code=303)
        error = r.json().get("detail", str(r.status_code))
    return render(request, "train.html", status=422, page="train", title="Train", form=form,
                  errors={"dataset": error}, **(await choices(request)))


@router.post("/datasets/{job_id}/train")
@guarded
async def dataset_train(request: Request, job_id: str):
    """Train on a captioned set with the captions as edited on its page: the images and those captions zipped,
    uploaded through /v1/files, and trained through /v1/trainings."""
    import io
    import zipfile
    from pathlib import PurePosixPath
    from urllib.parse import urlsplit

    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    r = await call(request, "GET", f"/v1/captions/{job_id}")
    if r.status_code != 200 or r.json()["status"] != "succeeded":
        return not_found(request, f"no captioned dataset {job_id}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, row in enumerate(r.json()["output"]["captions"]):
            image = await call(request, "GET", urlsplit(row["url"]).path)
            name = PurePosixPath(row["image"])
            z.writestr(str(name), image.content)
            z.writestr(str(name.with_suffix(".txt")), form.get(f"caption_{i}", row["caption"]).strip() + "\n")
    up = await call(request, "POST", "/v1/files", files={"file": ("dataset.zip", buf.getvalue())})
    if up.status_code != 201:
        return Response(up.json().get("detail", "upload failed"), status_code=422, media_type="text/plain")
    t = await call(request, "POST", "/v1/trainings", json={"model": form.get("model", "demo"),
                                                           "input": training_input(form, [up.json()])})
    if t.status_code == 201:
        return RedirectResponse(f"/trainings/{t.json()['id']}", status_code=303)
    return await dataset_view(request, r.json(), form, {"": t.json().get("detail", str(t.status_code))}, 422)
