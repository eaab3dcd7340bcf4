"""POST /v1/trainings, resume and the loss curve (get, list, cancel and stream come from serve.jobs)."""

import contextlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request

from ...errors import UserError
from .. import refs
from ..deps import Owner, Server, Srv, Who, base, check_limits, model_name, own_job
from ..http import ApiError
from ..inputs import file_input
from ..jobs import render, submit
from ..schemas import ERRORS, Job, TrainerInput, TrainingCreate, TrainingInput
from ..store import new_id
from ..uploads import gather_images

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], responses=ERRORS)
OwnTraining = Annotated[dict, Depends(own_job("training"))]


def plan(srv: Server, body: TrainingCreate, who: str, job_id: str) -> dict:
    from ...files import safe_name

    inp = body.input
    several = isinstance(inp.input_images, list)
    ids = inp.input_images if several else [inp.input_images]
    if not 1 <= len(ids) <= 1000:
        raise ApiError(422, f"input.input_images: give 1 to 1000 files, not {len(ids)}")
    destination = body.destination and own_model(srv, body.destination, who)
    files = [file_input(srv, x, who, ("zip", "image"), f"input.input_images[{i}]" if several
                        else "input.input_images") for i, x in enumerate(ids)]
    if len(files) == 1 and files[0]["kind"] == "zip":
        archive = files[0]
        check_images(archive)
    elif any(f["kind"] == "zip" for f in files):
        raise ApiError(422, "input.input_images: give one zip, or images, not both")
    else:
        archive = None
    model = model_name(srv, body.model)
    name = safe_name(inp.name, "input.name") if inp.name else job_id
    if inp.name and srv.store.lora(name, who) is not None:
        raise ApiError(422, f"input.name: you have a LoRA named {name!r} already")
    folder = srv.settings.data / "trainings"
    device = srv.settings.runtime.get("device", "cpu")
    images = archive["path"] if archive else "(uploaded images)"
    notes: list[str] = []
    config = training_config(inp, images, model, job_id, folder, device, notes)
    if archive is None:  # made only once the request is known to be good: a refused one leaves nothing
        images = str(gather_images(files, srv.settings.data / "training-inputs" / job_id))
        for d in config.process.datasets:
            d.folder_path = images
    return {"config": config.model_dump(mode="json"), "trigger_word": inp.trigger_word, "lora_name": name,
            "destination": destination, "base": body.model, "base_version": refs.base_version(srv, body.model),
            "notes": notes, "version": refs.trainer_version()}


def check_images(archive: dict) -> None:
    """A zip given to train on holds images (checked now: a 422, not a training that fails in the queue)."""
    import zipfile

    from ...train.data import IMAGE_EXTS

    with zipfile.ZipFile(archive["path"]) as zf:
        if not any(Path(n).suffix.lower() in IMAGE_EXTS for n in zf.namelist()):
            raise ApiError(422, f"input.input_images: {archive['name']} holds no images "
                                f"({', '.join(sorted(IMAGE_EXTS))})")


def own_model(srv: Server, destination: str, who: str) -> str:
    """A training's destination: owner/name of a model the caller made."""
    ref, version = refs.parse(destination, "destination")
    owner, _, name = (ref or "").partition("/")
    if version is not None or owner != who or srv.store.model(who, name) is None:
        raise ApiError(422, f"destination: {destination[:100]!r} is not a model of yours; create it first (POST "
                            f"/v1/models with owner {who!r}) and give owner/name")
    return ref


def resolutions(inp: TrainingInput) -> list[int] | None:
    if inp.resolution is None or isinstance(inp.resolution, int):
        return None if inp.resolution is None else [inp.resolution]
    try:
        sides = [int(x) for x in inp.resolution.split(",") if x.strip()]
    except ValueError:
        sides = []
    if not sides:
        raise ApiError(422, f"input.resolution: {inp.resolution[:50]!r} is not a side or sides such as 512 or "
                            f"'512,768,1024'")
    return sides


def training_config(inp: TrainingInput, archive: str, model: str, job_id: str, folder: Path, device: str,
                    notes: list):
    """The training config: the one-line recipe, or the client's ai-toolkit YAML with every path replaced by the
    server's (the upload, the run folder) and its device the server's."""
    from ...spec.trainconfig import one_line, parse, yaml_text

    sides = resolutions(inp)
    if inp.config is None:
        job = one_line(archive, inp.trigger_word, inp.steps, model, job_id, str(folder), sides and sides[0],
                       device="cuda" if device.startswith("cuda") else "cpu")
        data = job.model_dump(mode="json")
    else:
        data = yaml_text(inp.config, "input.config")
        job = parse(data, "input.config")  # its own errors first, then ours
        data = job.model_dump(mode="json")
        process = data["config"]["process"][0]
        for i, d in enumerate(process["datasets"]):
            if d.get("control_path") or d.get("mask_path"):
                raise UserError(f"input.config: datasets[{i}] names control_path or mask_path; the server trains on "
                                f"the uploaded images only")
            d["folder_path"] = archive
        process["trigger_word"] = inp.trigger_word
        process["train"]["steps"] = inp.steps
        process["model"] = {**process["model"], "name_or_path": model}
        process.pop("sample", None)  # its size and prompts are the client's; samples below follow the model
    data["config"]["name"] = job_id
    process = data["config"]["process"][0]
    process["training_folder"] = str(folder)
    process["device"] = device  # the server's device, whatever the YAML said (a client cannot pick cuda:7)
    if not process.get("sample"):  # a sample at every quarter, of the trigger word alone, at the model's own size
        from ...runtime.loading import locate

        spec = locate(model).spec
        w, h = spec.default_size if spec else (1024, 1024)
        process["sample"] = {"sample_every": max(1, inp.steps // 4), "prompts": ["[trigger]"], "width": w,
                             "height": h, "sample_steps": spec.steps if spec else 20, "seed": 42}
    if inp.sample_prompts:
        process["sample"]["prompts"] = list(inp.sample_prompts)
    if inp.lora_rank:
        process["network"].update(linear=inp.lora_rank, linear_alpha=inp.lora_rank)
    if inp.learning_rate:
        process["train"]["lr"] = inp.learning_rate
    if isinstance(inp, TrainerInput):
        trainer_settings(inp, process, sides, device, notes)
    return parse(data, "training")


def trainer_settings(inp: TrainerInput, process: dict, sides: list | None, device: str, notes: list) -> None:
    """The trainer's own inputs (Replicate's FLUX LoRA trainer names) onto the config."""
    for d in process["datasets"]:
        if sides:
            d["resolution"] = sides
        if inp.caption_dropout_rate is not None:
            d["caption_dropout_rate"] = inp.caption_dropout_rate
    if inp.batch_size:
        process["train"]["batch_size"] = inp.batch_size
    if inp.optimizer == "adamw8bit" and not device.startswith("cuda"):
        notes.append("optimizer adamw8bit needs CUDA (bitsandbytes); training with adamw")
    elif inp.optimizer:
        process["train"]["optimizer"] = inp.optimizer
    if inp.autocaption:
        # The demo is captioned by its own captioner; every other model by Florence-2 (from the server's cache).
        captioner = "demo" if process["model"]["name_or_path"] == "demo" else "florence-2-large"
        for d in process["datasets"]:
            d["auto_caption"] = captioner
        notes.append(f"autocaption: images without a .txt caption are captioned by {captioner} first")
    if inp.autocaption_prefix or inp.autocaption_suffix:
        notes.append("autocaption_prefix/suffix ignored: fluxlab puts the trigger word in each caption itself")


@router.post("", status_code=201, response_model=Job)
async def create_training(body: TrainingCreate, who: Who, srv: Srv, request: Request,
                          prefer: Annotated[str | None, Header()] = None):
    """Queue a LoRA training on an uploaded zip; its output is the LoRA, usable by predictions by name."""
    return await submit(srv, "training", body, who, new_id(), plan, request, prefer)


@router.post("/{training_id}/resume", response_model=Job)
def resume_training(job: OwnTraining, who: Owner, srv: Srv, request: Request):
    """Queue a stopped, canceled or interrupted training again, from its last checkpoint."""
    state = srv.settings.data / "trainings" / job["id"] / "state" / "state.safetensors"
    if job["status"] not in ("failed", "canceled") or not state.is_file():
        raise ApiError(409, f"training {job['id']!r} is {job['status']} and has {'a' if state.is_file() else 'no'} "
                            f"checkpoint; only a stopped training with a checkpoint can be resumed")
    check_limits(srv, who)
    srv.store.update(job["id"], status="starting", dispatched_at=None, completed_at=None, error=None, resume=1)
    srv.broker.resumed(job["id"])
    srv.broker.submitted()
    return render(srv, srv.store.job(job["id"]), base(request))


@router.get("/{training_id}/loss")
def training_loss(job: OwnTraining, srv: Srv) -> dict:
    """The loss of every step so far (what a loss chart draws)."""
    import csv

    f = srv.settings.data / "trainings" / job["id"] / "loss.csv"
    rows = []
    if f.is_file():
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    rows.append({"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"])})
    return {"steps": rows}
