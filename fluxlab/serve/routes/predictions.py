"""POST/PUT /v1/predictions and a prediction's step preview (get, list, cancel and stream come from serve.jobs)."""

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from ..deps import Server, Srv, Who, model_name, named_loras, own_file, own_job
from ..http import ApiError
from ..jobs import submit
from ..schemas import ERRORS, Job, PredictionCreate
from ..store import new_id

router = APIRouter(prefix="/v1/predictions", tags=["predictions"], responses=ERRORS)
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


def plan(srv: Server, body: PredictionCreate, who: str, job_id: str) -> dict:
    """The stored plan: the request resolved by the same service.prepare the CLI uses, files by path."""
    from ...service.generate import prepare
    from ...spec.request import GenerateRequest, ModelRef, Runtime
    from ...spec.typed import validate

    fields = body.input.model_dump(exclude_unset=True)
    loras = fields.pop("lora", None) or []
    for key in ("init", "mask"):
        if fields.get(key) is not None:
            f = own_file(srv, fields[key], who, ("image",), f"input.{key}")
            fields[key] = {"path": f["path"], "sha256": f["sha256"]}
    if fields.get("images"):
        fields["images"] = [(lambda f: {"path": f["path"], "sha256": f["sha256"]})(
            own_file(srv, x, who, ("image",), f"input.images[{i}]")) for i, x in enumerate(fields["images"])]
    refs = named_loras(srv, loras, who)
    request = validate(GenerateRequest, fields, "input")
    ref = ModelRef(name=model_name(srv, body.model), loras=tuple(refs))
    prep = prepare(request, ref, Runtime(), check_files=False)
    concrete = request.model_copy(update={"seeds": list(prep.job.seeds), "seed": None, "num_images": None})
    return {"request": concrete.model_dump(mode="json", exclude_none=True),
            "model": ref.model_dump(mode="json", exclude_none=True),
            "out": str(srv.settings.data / "outputs" / job_id), "images": prep.job.count}


@router.post("", status_code=201, response_model=Job)
async def create_prediction(body: PredictionCreate, who: Who, srv: Srv, request: Request,
                            prefer: Annotated[str | None, Header()] = None):
    """Queue a prediction. `Prefer: wait=N` answers when it ends (or after N seconds)."""
    return await submit(srv, "prediction", body, who, new_id(), plan, request, prefer)


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
