"""POST /v1/batches: prompts x seeds run by the same code as `fluxlab batch` (get, list, cancel and stream come from
serve.jobs)."""

from typing import Annotated

from fastapi import APIRouter, Header, Request

from ..deps import Server, Srv, Who, model_name, named_loras
from ..http import ApiError
from ..jobs import submit
from ..schemas import ERRORS, BatchCreate, Job
from ..store import new_id

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERRORS)
MOST = 10_000  # images in one batch through the server


def plan(srv: Server, body: BatchCreate, who: str, job_id: str) -> dict:
    from ...batch import check
    from ...batch.plan import BatchPlan, parse_seeds
    from ...spec.request import GenerateRequest, ModelRef, Runtime
    from ...spec.typed import validate

    fields = body.input.model_dump(exclude_unset=True)
    loras = named_loras(srv, fields.pop("lora", None) or [], who)
    most = max(1, MOST // len(body.prompts))
    seeds = parse_seeds(body.seeds, most, "seeds") if isinstance(body.seeds, str) else body.seeds
    if not seeds or len(seeds) * len(body.prompts) > MOST:
        raise ApiError(422, f"seeds: {len(seeds)} seeds x {len(body.prompts)} prompts; a batch makes 1 to {MOST} "
                            f"images")
    validate(GenerateRequest, {"prompt": "x", **fields}, "input")
    batch = BatchPlan(ModelRef(name=model_name(srv, body.model), loras=tuple(loras)),
                      Runtime(**{**srv.settings.runtime, "threads": srv.settings.runtime.get("threads")}), fields,
                      [{"prompt": p} for p in body.prompts], list(seeds), "api")
    check(batch, check_files=False)
    return {"batch": batch.to_json(), "out": str(srv.settings.data / "batches" / job_id), "images": len(batch.items())}


@router.post("", status_code=201, response_model=Job)
async def create_batch(body: BatchCreate, who: Who, srv: Srv, request: Request,
                       prefer: Annotated[str | None, Header()] = None):
    """Queue a batch (prompts x seeds) run by the same code as `fluxlab batch`; progress counts images."""
    return await submit(srv, "batch", body, who, new_id(), plan, request, prefer)
