"""POST /v1/downloads (admins): fetch a catalog model's weights into the server's hub cache on a worker, with
progress in bytes and cancel (get, list, cancel and stream come from serve.jobs). Offline, gated or missing repos
end the job with one line that says what to do instead."""

from typing import Annotated

from fastapi import APIRouter, Header, Request
from pydantic import Field

from ..deps import Admin, Server, Srv
from ..http import ApiError
from ..jobs import submit
from ..schemas import ERRORS, Job, JobCreate
from ..store import new_id

router = APIRouter(prefix="/v1/downloads", tags=["downloads"], responses=ERRORS)


class DownloadCreate(JobCreate):
    model: str = Field(min_length=1, max_length=200, description="A catalog model's name (flux2-klein-4b, ...).")


def plan(srv: Server, body: DownloadCreate, who: str, job_id: str) -> dict:
    from ...spec.catalog import CATALOG

    spec = CATALOG.get(body.model)
    if body.model in srv.settings.models:
        raise ApiError(422, f"model: {body.model} is this server's own folder; there is nothing to download")
    if spec is None:
        raise ApiError(422, f"model: unknown model {body.model!r}; valid: {', '.join(CATALOG)}")
    if spec.bundled:
        raise ApiError(422, f"model: {body.model} comes with fluxlab; there is nothing to download")
    return {"model": spec.name, "repo": spec.repo}


@router.post("", status_code=201, response_model=Job)
async def create_download(body: DownloadCreate, who: Admin, srv: Srv, request: Request,
                          prefer: Annotated[str | None, Header()] = None):
    """Download a catalog model's weights into the server's hub cache (what is there already is kept): progress
    {done_bytes, total_bytes}, and the model lists as ready once it ends."""
    return await submit(srv, "download", body, who, new_id(), plan, request, prefer)
