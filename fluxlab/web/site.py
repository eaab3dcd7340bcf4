"""What every page shares: the templates, who is logged in, the in-process call to the public /v1 API, and the
`guarded` wrapper (a login, and this server's own Origin for a POST)."""

import functools
import math
import re
from pathlib import Path

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from ..serve.deps import SESSION_COOKIE
from ..serve.http import ApiError, check_origin

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
INTS = ("width", "height", "steps", "seed", "num_images")
FLOATS = ("guidance", "strength", "eta")
TEXTS = ("prompt", "negative", "sampler", "schedule", "cache", "preset", "template", "upsampled_from")
CACHES = (("none", "none"), ("fbc", "First Block Cache (faster, pixels move a little)"),
          ("fbc:0.05", "First Block Cache, careful (0.05)"), ("fbc:0.2", "First Block Cache, fast (0.2)"),
          ("taylorseer", "TaylorSeer (faster still on 20+ steps, pixels move)"))
FIELDS = (*TEXTS, *INTS, *FLOATS, "lora", "lora_file", "images", "init", "mask", "model", "input_images",
          "trigger_word", "config", "sample_prompts")


# The CLI's flags as the page labels them: errors come from the one service layer in the CLI's words, and the page
# shows them in its own.
PAGE_WORDS = {"--strength": "Init strength", "--init": "Init image", "--mask": "Mask", "--image": "Reference images",
              "--width": "Width", "--height": "Height", "--steps": "Steps", "--guidance": "Guidance",
              "--seed": "Seed", "--negative": "Negative prompt", "--cache": "Step cache", "--sampler": "Sampler",
              "--schedule": "Schedule", "--eta": "Eta", "--preset": "Preset", "--template": "Template",
              "--lora": "LoRA", "--num-images": "Number of images", "--aspect": "Size"}


def in_page_words(message: str) -> str:
    for flag in sorted(PAGE_WORDS, key=len, reverse=True):
        message = re.sub(re.escape(flag) + r"\b", PAGE_WORDS[flag], message)
    return message


def store(request: Request):
    return request.app.state.server.store


def who(request: Request) -> str | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    return store(request).session_owner(cookie) if cookie else None


def render(request: Request, template: str, status: int = 200, **ctx) -> Response:
    name = who(request)
    admin = name is not None and store(request).role(name) == "admin"
    return templates.TemplateResponse(request, template, {"owner": name, "admin": admin, **ctx}, status_code=status)


def not_found(request: Request, message: str) -> Response:
    """A 404 as a page, with the site's navigation (a page that is gone, or someone else's)."""
    return render(request, "notfound.html", status=404, page="notfound", title="Not found", message=message)


async def call(request: Request, method: str, path: str, **kw):
    """The public API, asked in-process as this visitor (their cookie, this server's Origin)."""
    import httpx

    origin = f"{request.url.scheme}://{request.headers.get('host', '')}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=request.app), base_url=origin,
                                 cookies={SESSION_COOKIE: request.cookies.get(SESSION_COOKIE, "")},
                                 headers={"origin": origin}, timeout=120) as client:
        return await client.request(method, path, **kw)


def login_redirect(request: Request) -> RedirectResponse:
    from urllib.parse import quote

    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def guarded(handler):
    """A page that needs a login (and, for a POST, this server's own Origin)."""

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


def safe_next(target: str) -> str:
    """Only a path on this server (never another site) after logging in."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


LORA_ROWS = 3  # LoRAs a page form stacks (the API takes any number)


def lora_key(i: int) -> str:
    """The suffix of a LoRA row's fields: lora/lora_scale, then lora_2/lora_scale_2, ..."""
    return "" if i == 0 else f"_{i + 1}"


def lora_label(lo: dict) -> str:
    """How the page names a LoRA: its name, or for an unnamed training its date; its trigger word beside it."""
    when = (lo.get("created_at") or "")[:16].replace("T", " ")
    if lo.get("file"):
        name = f"uploaded {lo['file']}"
    elif lo.get("training") and lo["name"] == lo["training"]:
        name = f"training of {when}"
    else:
        name = lo["name"]
    return f"{name} ({lo['trigger_word']})" if lo.get("trigger_word") else name


def model_state(m: dict, named: bool) -> tuple[str, str]:
    """A model's state on this server, and what to do about it, in one line."""
    if m.get("loading"):
        return "ready", "loading now (a worker is reading its weights)"
    if m.get("bundled") or named:
        return "ready", "ready" + (" (loaded)" if m.get("loaded") else "")
    if m.get("cached_gb"):
        return "ready", f"ready: downloaded ({m['cached_gb']:.1f} GB)" + (", loaded" if m.get("loaded") else "")
    repo = m.get("repo", "")
    get = (f"an admin can download it on the Models page, or the server does on first use when it can reach the "
           f"hub; offline: `hf download {repo}` where you can and copy the hub cache to the server")
    if m.get("gated"):
        return "gated", (f"gated, not downloaded ({m.get('size_gb', 0):.1f} GB): accept the licence on "
                         f"https://huggingface.co/{repo} and `hf auth login` on the server; {get}")
    return "missing", f"not downloaded ({m.get('size_gb', 0):.1f} GB): {get}"


async def choices(request: Request) -> dict:
    from ..spec.presets import BUILTIN_PRESETS, BUILTIN_TEMPLATES
    from ..spec.samplers import SAMPLERS
    from ..spec.values import ASPECTS, sizes_for

    settings = request.app.state.server.settings
    data = (await call(request, "GET", "/v1/models")).json()
    models = data["models"]
    for m in models:
        m.setdefault("guidance_mode", "cfg")
        m.setdefault("steps", "")
        m.setdefault("guidance", "")
        m.setdefault("default_size", ["", ""])
        m["state"], m["note"] = model_state(m, m["name"] in settings.models)
        m["sizes"] = ",".join(f"{k}={w}x{h}" for k, (w, h) in sizes_for(
            tuple(m["default_size"]), m["min_side"], m["max_side"]).items()) if m.get("min_side") else ""
    models.sort(key=lambda m: m["state"] != "ready")  # what can run now first: every form's default
    presets = sorted({p for group in BUILTIN_PRESETS.values() for p in group})
    from ..caption.catalog import CAPTIONERS

    captioners = [{"name": c.name, "description": c.description} for c in CAPTIONERS.values()]
    for lo in data["loras"]:
        lo["label"] = lora_label(lo)
    return {"models": models, "loras": data["loras"], "lora_rows": LORA_ROWS, "samplers": list(SAMPLERS),
            "caches": CACHES, "aspects": ASPECTS,
            "page_words": PAGE_WORDS,
            "presets": presets, "templates": sorted(BUILTIN_TEMPLATES), "captioners": captioners}


async def dataset_view(request: Request, job: dict, form: dict, errors: dict, status: int = 200) -> Response:
    """A captions job as the dataset page shows it: progress while it runs, then each image with its caption."""
    from urllib.parse import urlsplit

    p = job.get("progress") or {}
    progress = {"value": p.get("done", 0), "max": p.get("total", 1),
                "text": f"{p.get('done', 0)}/{p.get('total', '?')}"}
    output = job["output"] or {}
    rows = [{**row, "thumb": urlsplit(row.get("url", "")).path + "?thumb=128"} for row in output.get("captions", [])]
    side = training_side(request, form.get("model") or "demo")
    return render(request, "dataset.html", status=status, page="dataset", title=f"Dataset {job['id']}", job=job,
                  rows=rows, captioned=sum(1 for r in rows if r.get("caption", "").strip()),
                  warnings=dataset_warnings(rows, side), done=job["status"] in ("succeeded", "failed", "canceled"),
                  progress=progress,
                  zip=urlsplit(output.get("zip") or "").path, form=form, errors=errors, **(await choices(request)))


FEW_IMAGES = 10  # below this a LoRA tends to copy its pictures rather than learn what they share


def dataset_warnings(rows: list[dict], side: int) -> list[str]:
    """What a set is likely to train badly on: too few images, images smaller than the size it trains at, images
    without a caption."""
    warnings = []
    if len(rows) < FEW_IMAGES:
        warnings.append(f"{len(rows)} image{'s' if len(rows) != 1 else ''}: a LoRA learns a subject or style more "
                        f"steadily from {FEW_IMAGES}-30 varied ones")
    small = [r["image"] for r in rows if r.get("width") and min(r["width"], r["height"]) < side]
    if small:
        warnings.append(f"{len(small)} smaller than the {side} px the model trains at (upscaled, so blurred): "
                        f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}")
    bare = [r["image"] for r in rows if not r.get("caption", "").strip()]
    if bare:
        warnings.append(f"{len(bare)} without a caption (they train on the trigger word alone): "
                        f"{', '.join(bare[:5])}{' ...' if len(bare) > 5 else ''}")
    return warnings


def training_side(request: Request, model: str) -> int:
    """The side a model trains at by default, as the training will choose it (a `--model` name is its folder)."""
    from ..spec.trainconfig import default_resolution

    return default_resolution(str(request.app.state.server.settings.models.get(model, model)))
