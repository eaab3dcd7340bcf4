"""POST /v1/grids: a parameter grid made by the same code as `fluxlab grid` (get, list, cancel and stream come from
serve.jobs)."""

from typing import Annotated

from fastapi import APIRouter, Header, Request

from ..deps import Server, Srv, Who, model_name, named_loras
from ..http import ApiError
from ..jobs import submit
from ..schemas import ERRORS, GridCreate, Job
from ..store import new_id

router = APIRouter(prefix="/v1/grids", tags=["grids"], responses=ERRORS)


def plan(srv: Server, body: GridCreate, who: str, job_id: str) -> dict:
    from ...service.grid import check_axes, parse_axis, plan_cells, prepare_cells
    from ...spec.request import ModelRef, Runtime

    fields = body.input.model_dump(exclude_unset=True)
    loras = named_loras(srv, fields.pop("lora", None) or [], who)
    x, y = parse_axis(body.x), parse_axis(body.y) if body.y else None
    ref = ModelRef(name=model_name(srv, body.model), loras=tuple(loras))
    check_axes(x, y, ref)
    fields.setdefault("seed", 0)
    cells = plan_cells({"prompt": body.prompt, **fields}, x, y)
    if len(cells) > 100:
        raise ApiError(422, f"the grid has {len(cells)} cells; at most 100 through the server")
    prepare_cells(cells, ref, Runtime(), check_files=False)  # every cell checked now, as the CLI checks them
    return {"prompt": body.prompt, "x": body.x, "y": body.y, "base": fields,
            "model": ref.model_dump(mode="json", exclude_none=True), "out": str(srv.settings.data / "grids" / job_id),
            "cells": len(cells)}


@router.post("", status_code=201, response_model=Job)
async def create_grid(body: GridCreate, who: Who, srv: Srv, request: Request,
                      prefer: Annotated[str | None, Header()] = None):
    """A parameter grid: every cell's image as it finishes, then the labelled contact sheet and its CSV, all made by
    the same code as `fluxlab grid`."""
    return await submit(srv, "grid", body, who, new_id(), plan, request, prefer)
