"""POST/PUT /v1/predictions and a prediction's step preview (get, list, cancel and stream come from serve.jobs)."""

import contextlib
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from .. import compat, refs
from ..deps import Server, Srv, Who, model_name, named_loras, own_job
from ..http import ApiError
from ..inputs import file_input
from ..jobs import submit
from ..schemas import ERRORS, Job, PredictionCreate
from ..store import new_id

router = APIRouter(prefix="/v1/predictions", tags=["predictions"], responses=ERRORS)
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


def target(srv: Server, body: PredictionCreate, who: str) -> refs.Version:
    """The version a prediction runs: from `version`, an owner/name `model` (its latest version), or a fluxlab
    model name (its one version)."""
    if body.version is not None:
        ref, version = refs.parse(body.version, "version")
        return refs.find(srv, who, ref, version)
    if "/" in body.model:
        ref = None
        with contextlib.suppress(ApiError):
            ref = refs.parse(body.model, "model")[0]
        try:
            if ref is None or ":" in body.model:
                raise ApiError(404, "not a model reference")
            return refs.find(srv, who, ref, None, "model")
        except ApiError as e:
            if e.status != 404:
                raise
            valid = ", ".join([*refs.shared_models(srv), *(f"{who}/{m['name']}" for m in srv.store.models(who))])
            raise ApiError(422, f"model: unknown model {body.model!r}; valid: {valid} (a version goes in "
                                f"`version`)") from None
    model_name(srv, body.model)  # a 422 naming the valid ones
    ref = next((r for r, n in refs.shared_models(srv).items() if n == body.model), body.model)
    return refs.Version(ref, refs.base_version(srv, body.model), "base", body.model)


def default_size(model: str) -> tuple[int, int]:
    from ...runtime.loading import locate

    spec = locate(model).spec
    return tuple(spec.default_size) if spec else (1024, 1024)


def plan(srv: Server, body: PredictionCreate, who: str, job_id: str) -> dict:
    """The stored plan: the request resolved by the same service.prepare the CLI uses, files by path."""
    from ...service.generate import prepare
    from ...spec.request import GenerateRequest, LoraRef, ModelRef, Runtime
    from ...spec.typed import validate

    version = target(srv, body, who)
    if version.kind == "trainer":
        raise ApiError(422, f"{version.ref} trains LoRAs; start a training: POST /v1/models/{version.ref}/versions/"
                            f"{version.id}/trainings")
    t = compat.translate(body.input.model_dump(exclude_unset=True), default_size(model_name(srv, version.model)))
    if t.base is not None and version.kind != "trained":
        raise ApiError(422, f"input.model: {version.ref} is a base model; `model` picks the base of a trained "
                            f"version")
    fields = t.fields
    loras = fields.pop("lora", None) or []
    for key in ("init", "mask"):
        if fields.get(key) is not None:
            f = file_input(srv, fields[key], who, ("image",), f"input.{key}")
            fields[key] = {"path": f["path"], "sha256": f["sha256"]}
    if fields.get("images"):
        fields["images"] = [(lambda f: {"path": f["path"], "sha256": f["sha256"]})(
            file_input(srv, x, who, ("image",), f"input.images[{i}]")) for i, x in enumerate(fields["images"])]
    lora_refs = named_loras(srv, loras, who)
    if version.kind == "trained":
        lo = version.lora
        lora_refs.insert(0, LoraRef(path=lo["path"], scale=1.0 if t.lora_scale is None else t.lora_scale,
                                    sha256=lo["sha256"]))
    elif t.lora_scale is not None:
        t.notes.append(f"lora_scale ignored: {version.ref} has no LoRA of its own (extra_lora adds one)")
    if t.extra_lora is not None:
        lora_refs.append(extra_lora(srv, t.extra_lora, t.extra_lora_scale, who))
    request = validate(GenerateRequest, fields, "input")
    ref = ModelRef(name=model_name(srv, t.base or version.model), loras=tuple(lora_refs))
    prep = prepare(request, ref, Runtime(), check_files=False)
    concrete = request.model_copy(update={"seeds": list(prep.job.seeds), "seed": None, "num_images": None})
    return {"request": concrete.model_dump(mode="json", exclude_none=True),
            "model": ref.model_dump(mode="json", exclude_none=True),
            "out": str(srv.settings.data / "outputs" / job_id), "images": prep.job.count,
            "version": version.id, "ref": body.model or version.ref, "notes": t.notes + list(prep.job.notices),
            "output": t.output}


def extra_lora(srv: Server, value: str, scale: float, who: str):
    """input.extra_lora: a LoRA or training of the caller's by name, or a LoRA file (id, URL or data: URI)."""
    from ...spec.request import LoraRef

    row = srv.store.lora(value, who) if isinstance(value, str) else None
    if row is None:
        row = file_input(srv, value, who, ("lora",), "input.extra_lora")
    return LoraRef(path=row["path"], scale=scale, sha256=row["sha256"])


@router.post("", status_code=201, response_model=Job)
async def create_prediction(body: PredictionCreate, who: Who, srv: Srv, request: Request,
                            prefer: Annotated[str | None, Header()] = None):
    """Queue a prediction. `Prefer: wait=N` answers when it ends (or after N seconds)."""
    return await submit(srv, "prediction", body, who, new_id(), plan, request, prefer)


@router.post("/validate")
def validate_prediction(body: dict, who: Who, srv: Srv) -> dict:
    """Check a prediction's body without queueing it, and name every problem at once: `errors` lists each as
    {field, detail} (`field` the input key it names, or null), the same one-line details POST would answer one at
    a time. What a form shows beside each of its fields."""
    from pydantic import ValidationError

    from ...errors import UserError
    from ..http import body_error, public

    body = {**body, "input": dict(body.get("input") or {}) if isinstance(body.get("input"), dict) else {}}
    errors: list[dict] = []
    for _ in range(24):  # each round finds one more problem and sets its field aside
        try:
            parsed = PredictionCreate.model_validate(body)
        except ValidationError as e:
            for err in e.errors():
                loc = [p for p in err["loc"] if p != "body"]
                key = loc[1] if len(loc) > 1 and loc[0] == "input" else (loc[0] if loc else None)
                errors.append({"field": key if isinstance(key, str) else None, "detail": body_error(err)})
            dropped = {e["field"] for e in errors} & set(body["input"])
            if not dropped:
                break
            body["input"] = {k: v for k, v in body["input"].items() if k not in dropped}
            continue
        try:
            plan(srv, parsed, who.name, "validate")
            break
        except (ApiError, UserError) as e:
            if isinstance(e, ApiError) and e.status != 422:
                raise
            detail = e.detail if isinstance(e, ApiError) else str(e)
            key = named_field(detail, [*body["input"], "model", "version"])
            errors.append({"field": key, "detail": detail})
            if key not in body["input"]:
                break
            body["input"] = {k: v for k, v in body["input"].items() if k != key}
    return {"valid": not errors, "errors": [{**e, "detail": public(e["detail"], srv.settings)} for e in errors]}


def named_field(detail: str, keys: list[str]) -> str | None:
    """The input key an error names: its `input.KEY:` prefix, its first word, or the earliest key (or its CLI flag,
    --num-images for num_images) the sentence mentions."""
    m = re.match(r"^(?:input\.)?([a-z_]+)", detail)
    if m and m.group(1) in keys:
        return m.group(1)
    found = []
    for key in keys:
        hit = re.search(rf"(?<![\w-])(?:{re.escape(key)}|--{re.escape(key.replace('_', '-'))})\b", detail)
        if hit:
            found.append((hit.start(), key))
    return min(found)[1] if found else None


@router.put("/{prediction_id}", status_code=201, response_model=Job)
async def put_prediction(prediction_id: str, body: PredictionCreate, who: Who, srv: Srv, request: Request,
                         prefer: Annotated[str | None, Header()] = None):
    """Create with a chosen id; the same id again returns the existing prediction (idempotent)."""
    if not re.match(ID_PATTERN, prediction_id):
        raise ApiError(422, f"prediction id {prediction_id!r} is not valid: 1-64 lowercase letters, digits, '-' or "
                            f"'_'")
    return await submit(srv, "prediction", body, who, prediction_id, plan, request, prefer)


@router.get("/{prediction_id}/preview", responses={200: {"content": {"image/jpeg": {}}}}, response_class=Response)
def preview(job: Annotated[dict, Depends(own_job("prediction"))], srv: Srv,
            step: Annotated[int | None, Query(ge=0, le=100_000)] = None):
    """The latest step preview (a small JPEG of the clean estimate)."""
    data = srv.broker.previews.get(job["id"])
    if data is None:
        raise ApiError(404, f"no preview for {job['id']!r} yet")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})
