"""POST /v1/captions: a caption for each image of an uploaded set, by the same service.caption as `fluxlab caption`
(get, list, cancel and stream come from serve.jobs; progress events carry each caption as it is written)."""

from typing import Annotated

from fastapi import APIRouter, Header, Request

from ..deps import Server, Srv, Who
from ..http import ApiError
from ..inputs import file_input
from ..jobs import submit
from ..schemas import ERRORS, CaptionCreate, Job
from ..store import new_id
from ..uploads import gather_images

router = APIRouter(prefix="/v1/captions", tags=["captions"], responses=ERRORS)


def plan(srv: Server, body: CaptionCreate, who: str, job_id: str) -> dict:
    from ...caption.catalog import CAPTIONERS

    if body.model not in CAPTIONERS:  # a client names a captioner; it never points the server at a folder
        raise ApiError(422, f"model: unknown captioner {body.model!r}; valid: {', '.join(CAPTIONERS)}")
    inp = body.input
    several = isinstance(inp.images, list)
    ids = inp.images if several else [inp.images]
    if not 1 <= len(ids) <= 1000:
        raise ApiError(422, f"input.images: give 1 to 1000 files, not {len(ids)}")
    files = [file_input(srv, x, who, ("zip", "image"), f"input.images[{i}]" if several else "input.images")
             for i, x in enumerate(ids)]
    if len(files) == 1 and files[0]["kind"] == "zip":
        source = files[0]["path"]
    elif any(f["kind"] == "zip" for f in files):
        raise ApiError(422, "input.images: give one zip, or images, not both")
    else:
        source = str(gather_images(files, srv.settings.data / "caption-inputs" / job_id))
    options = {"trigger": inp.trigger_word, "detail": inp.detail, "prefix": inp.prefix, "suffix": inp.suffix,
               "overwrite": inp.overwrite}
    return {"source": source, "captioner": body.model, "options": options,
            "out": str(srv.settings.data / "captions" / job_id)}


@router.post("", status_code=201, response_model=Job)
async def create_captions(body: CaptionCreate, who: Who, srv: Srv, request: Request,
                          prefer: Annotated[str | None, Header()] = None):
    """Caption a training set (a zip, or images): each image's caption in the job's output, and the set zipped with
    its captions, ready for a training."""
    return await submit(srv, "caption", body, who, new_id(), plan, request, prefer)
