"""/v1/models: the catalog and the caller's LoRAs (fluxlab's shape), and models as Replicate's API has them: each
by owner/name with its versions, the caller's own models (training destinations), predictions and trainings
started from a model or version, and /v1/account."""

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request

from .. import refs
from ..deps import Owner, Srv, Who, base, model_name
from ..http import ApiError, iso
from ..jobs import submit
from ..schemas import (
    ERRORS,
    Job,
    JobCreate,
    ModelCreate,
    PredictionCreate,
    PredictionInput,
    ReplicateTraining,
    TrainingCreate,
)
from ..store import new_id
from . import predictions, trainings

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)
account = APIRouter(prefix="/v1/account", tags=["models"], responses=ERRORS)


def visible(owner: str, name: str, who: Owner, srv: Srv) -> str:
    """The path's model as owner/name, or 404 for one the caller cannot see (checked before any body is read, so
    another owner's model answers 404 whatever is sent)."""
    refs.versions(srv, who, f"{owner}/{name}")
    return f"{owner}/{name}"


Visible = Annotated[str, Depends(visible)]


class ModelPrediction(JobCreate):
    input: PredictionInput
    stream: bool | None = None


def defaults_of(folder: str) -> dict:
    """A --model folder's family, defaults and size range (from its own files), as catalog rows carry them."""
    from ...errors import UserError
    from ...runtime.loading import locate

    try:
        spec = locate(folder).spec
    except UserError:  # a folder gone since the server started: listed without defaults
        return {}
    if spec is None:
        return {}
    return {"family": spec.family, "steps": spec.steps, "guidance": spec.guidance,
            "guidance_mode": spec.guidance_mode, "default_size": list(spec.default_size),
            "min_side": spec.min_side, "max_side": spec.max_side}


@router.get("")
def models(who: Owner, srv: Srv, request: Request) -> dict:
    """The catalog, the server's own models, which are loaded, and this token's LoRAs; and, as Replicate lists
    models, every model this token can run (`results`)."""
    from ...service.info import models as catalog

    loaded, loading = srv.broker.loaded, srv.broker.loading
    rows = [{**r, "loaded": r["name"] in loaded, "loading": r["name"] in loading} for r in catalog()]
    # a --model folder is loaded and named by workers as its resolved path (what model_name gives them)
    folders = {n: str(Path(p).resolve()) for n, p in srv.settings.models.items()}
    rows += [{"name": n, "ref": f"fluxlab/{n}", "bundled": False, "loaded": folders[n] in loaded,
              "loading": folders[n] in loading, **defaults_of(p)} for n, p in srv.settings.models.items()]
    loras = [{"name": r["name"], "training": r["job_id"], "trigger_word": r["trigger"], "sha256": r["sha256"],
              "created_at": iso(r["created_at"])} for r in srv.store.loras(who)]
    # LoRA files uploaded through /v1/files: usable by their id, listed by their file name
    loras += [{"name": f["id"], "file": f["name"], "training": None, "trigger_word": None, "sha256": f["sha256"],
               "created_at": iso(f["created_at"])} for f in srv.store.files(who) if f["kind"] == "lora"]
    names = [*refs.shared_models(srv), refs.TRAINER, *(f"{who}/{m['name']}" for m in srv.store.models(who))]
    results = [refs.model_obj(srv, who, ref, base(request)) for ref in names]
    return {"models": rows, "loras": loras, "results": results, "next": None, "previous": None}


@router.post("", status_code=201)
def create_model(body: ModelCreate, who: Owner, srv: Srv, request: Request) -> dict:
    """A model of yours, to train into (its versions are the trainings that succeed into it)."""
    if body.owner != who:
        raise ApiError(403, f"owner: models are made under your own name, {who!r} (GET /v1/account), not "
                            f"{body.owner!r}")
    if f"{who}/{body.name}" in refs.shared_models(srv) or not srv.store.add_model(who, body.name, body.description,
                                                                                    body.visibility):
        raise ApiError(409, f"the model {who}/{body.name} exists already")
    return refs.model_obj(srv, who, f"{who}/{body.name}", base(request))


@router.get("/{owner}/{name}")
def get_model(ref: Visible, who: Owner, srv: Srv, request: Request) -> dict:
    return refs.model_obj(srv, who, ref, base(request))


@router.delete("/{owner}/{name}", status_code=204)
def delete_model(ref: Visible, who: Owner, srv: Srv) -> None:
    """Delete a model of yours that has no versions (its trainings and LoRAs stay)."""
    owner, _, name = ref.partition("/")
    if owner != who or srv.store.model(who, name) is None:
        raise ApiError(403, f"{ref} is the server's; only your own models can be deleted")
    if refs.versions(srv, who, ref):
        raise ApiError(409, f"{ref} has versions; a model with versions is kept")
    srv.store.delete_model(who, name)


@router.get("/{owner}/{name}/versions")
def list_versions(ref: Visible, who: Owner, srv: Srv) -> dict:
    return {"results": [refs.version_obj(v) for v in refs.versions(srv, who, ref)], "next": None,
            "previous": None}


@router.get("/{owner}/{name}/versions/{version_id}")
def get_version(ref: Visible, version_id: str, who: Owner, srv: Srv) -> dict:
    return refs.version_obj(refs.find(srv, who, ref, version_id))


@router.post("/{owner}/{name}/predictions", status_code=201, response_model=Job)
async def model_prediction(ref: Visible, body: ModelPrediction, who: Who, srv: Srv, request: Request,
                           prefer: Annotated[str | None, Header()] = None):
    """Run a model's latest version (Replicate's `models.predictions.create`, `run("owner/name")`)."""
    full = PredictionCreate(model=ref, input=body.input, webhook=body.webhook,
                            webhook_events_filter=body.webhook_events_filter, priority=body.priority)
    return await submit(srv, "prediction", full, who, new_id(), predictions.plan, request, prefer)


@router.post("/{owner}/{name}/versions/{version_id}/trainings", status_code=201, response_model=Job)
async def version_training(ref: Visible, version_id: str, body: ReplicateTraining, who: Who, srv: Srv,
                           request: Request):
    """Train a LoRA into `destination` with the trainer (fluxlab/lora-trainer; the base from input.base_model) or
    on a base model named in the path (Replicate's `trainings.create`)."""
    version = refs.find(srv, who.name, ref, version_id)
    if version.kind == "trainer":
        base_model = trainer_base(srv, body.input.base_model)
    elif version.kind == "base" and body.input.base_model is None:
        base_model = version.model
    else:
        raise ApiError(422, f"{version.ref} is not trained with a base_model input; train with {refs.TRAINER}, or "
                            f"leave input.base_model out")
    full = TrainingCreate(model=base_model, input=body.input, destination=body.destination, webhook=body.webhook,
                          webhook_events_filter=body.webhook_events_filter, priority=body.priority)

    def plan(srv, body, who, job_id):
        return {**trainings.plan(srv, body, who, job_id), "ref": version.ref, "version": version.id}

    return await submit(srv, "training", full, who, new_id(), plan, request, None)


def trainer_base(srv, value: str | None) -> str:
    """The trainer's input.base_model as a fluxlab model name: dev, schnell, a shared owner/name or a name."""
    from ..compat import BASES

    if value is None or value in BASES:
        return BASES[value or "dev"]
    if "/" in value:
        shared = refs.shared_models(srv)
        if value not in shared:
            raise ApiError(422, f"input.base_model: no base model {value!r}; valid: dev, schnell, "
                                f"{', '.join(shared)}")
        return shared[value]
    try:
        model_name(srv, value)
    except ApiError as e:
        raise ApiError(422, f"input.base_{e.detail}") from None
    return value


@account.get("")
def get_account(who: Owner) -> dict:
    """The token's account: its name is the owner of the models it creates."""
    return {"type": "user", "username": who, "name": who, "github_url": None}
