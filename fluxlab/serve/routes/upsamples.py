"""POST /v1/upsamples: a prediction's prompt rewritten by its model's text encoder, without generating (the page's
"Upsample" button shows the rewrite, editable, before Generate). The body is a prediction's; the plan is the
prediction's plan with upsample_prompt on, so the rewrite is the one that prediction would make. Get, list, cancel
and stream come from serve.jobs."""

from typing import Annotated

from fastapi import APIRouter, Header, Request

from ..deps import Server, Srv, Who
from ..jobs import submit
from ..schemas import ERRORS, Job, PredictionCreate
from ..store import new_id
from . import predictions

router = APIRouter(prefix="/v1/upsamples", tags=["upsamples"], responses=ERRORS)


def plan(srv: Server, body: PredictionCreate, who: str, job_id: str) -> dict:
    asked = body.model_copy(update={"input": body.input.model_copy(update={"upsample_prompt": True})})
    return predictions.plan(srv, asked, who, job_id)


@router.post("", status_code=201, response_model=Job)
async def create_upsample(body: PredictionCreate, who: Who, srv: Srv, request: Request,
                          prefer: Annotated[str | None, Header()] = None):
    """Rewrite a prediction's prompt(s) with the model's own text encoder (FLUX.2): the output holds `prompts`
    and `upsampled_from`; send the rewrite back as the prediction's prompt with `upsampled_from` to keep both in
    the image's record."""
    return await submit(srv, "upsample", body, who, new_id(), plan, request, prefer)
