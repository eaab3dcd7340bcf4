"""The request bodies and response shapes of the /v1 API, derived from the spec objects where they mirror them (a
field added to GenerateRequest is accepted here), strict (unknown fields and wrong types are refused), and every
string checked to be text that can be stored (a lone surrogate is refused before anything is kept)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..spec.request import FileRef, GenerateRequest
from ..spec.typed import check_text

STATUS = Literal["starting", "processing", "succeeded", "failed", "canceled"]
WebhookEvent = Literal["start", "output", "logs", "completed"]
Cursor = r"^[0-9]{1,18}$"  # a job's sequence number, as `next` gives it


class Error(BaseModel):
    detail: str


ERRORS: dict = {code: {"model": Error, "description": text} for code, text in [
    (401, "missing or invalid token"), (403, "not allowed for this token, or a cross-site request"),
    (404, "no such object for this token"), (409, "not possible now"), (413, "too large"), (422, "invalid input"),
    (429, "too many pending jobs or failed logins"), (507, "the server's disk is full")]}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data):
        check_text(data, "")
        return data


class LoraInput(Body):
    name: str = Field(min_length=1, max_length=128, description="A training id, a LoRA name, or an uploaded file id.")
    scale: float = 1.0


def _prediction_input() -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, f in GenerateRequest.model_fields.items():
        annotation = f.annotation
        if annotation == FileRef | None:
            annotation = str | None  # an uploaded file's id
        elif annotation == list[FileRef] | None:
            annotation = list[str] | None
        fields[name] = (annotation, Field(f.default, description=f.description))
    fields["lora"] = (list[LoraInput] | None, Field(None, description="LoRAs to apply, with scales."))
    return create_model("PredictionInput", __base__=Body, **fields)


PredictionInput = _prediction_input()
Webhook = Field(None, pattern=r"^https?://", max_length=2048,
                description="A URL to POST the job to as it changes (refused when it names an internal address).")
Priority = Field(0, ge=0, le=10, description="Higher runs first; above 0 needs an admin token.")


class JobCreate(Body):
    webhook: str | None = Webhook
    webhook_events_filter: list[WebhookEvent] | None = None
    priority: int = Priority


class PredictionCreate(JobCreate):
    model: str = Field(min_length=1, max_length=512)
    input: PredictionInput


class TrainingInput(Body):
    input_images: str | list[str] = Field(description="The id of an uploaded zip of images (with .txt captions), "
                                                      "or the ids of uploaded images.")
    trigger_word: str = Field(min_length=1, max_length=200)
    steps: int = Field(1000, ge=1, le=100_000)
    name: str | None = Field(None, description="The LoRA's name (default: the training's id).")
    lora_rank: int | None = Field(None, ge=1, le=256)
    learning_rate: float | None = Field(None, gt=0, le=1)
    resolution: int | None = Field(None, ge=64, le=4096)
    config: str | None = Field(None, max_length=100_000, description="An ai-toolkit YAML (its paths are the server's).")


class TrainingCreate(JobCreate):
    model: str = Field(min_length=1, max_length=512)
    input: TrainingInput


def _shared_input(name: str, drop: tuple) -> type[BaseModel]:
    """The prediction input without the fields a batch or grid sets itself."""
    fields = {k: (f.annotation, Field(f.default, description=f.description))
              for k, f in PredictionInput.model_fields.items() if k not in drop}
    return create_model(name, __base__=Body, **fields)


BatchInput = _shared_input("BatchInput", ("prompt", "seed", "seeds", "num_images", "images", "init", "mask"))
GridInput = _shared_input("GridInput", ("prompt", "seeds", "num_images", "images", "init", "mask"))


class BatchCreate(JobCreate):
    model: str = Field(min_length=1, max_length=512)
    prompts: list[str] = Field(min_length=1, max_length=1000, description="One prompt per item group.")
    seeds: str | list[int] = Field("0", description="Seeds for every prompt: '0-7', '1,5,9' or a list.")
    input: BatchInput = Field(default_factory=lambda: BatchInput(), description="Settings every image shares.")


class GridCreate(JobCreate):
    model: str = Field(min_length=1, max_length=512)
    prompt: str = Field(min_length=1, max_length=10_000)
    x: str = Field(min_length=3, max_length=2000, description="Column axis FIELD=V1,V2,... e.g. steps=10,25,50.")
    y: str | None = Field(None, max_length=2000, description="Row axis, e.g. guidance=3,7,12.")
    input: GridInput = Field(default_factory=lambda: GridInput(), description="Settings every cell shares.")


class Job(BaseModel):
    id: str
    model: str
    input: dict
    status: STATUS
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    output: list[str] | dict | None = None
    error: str | None = None
    metrics: dict = Field(default_factory=dict)
    urls: dict[str, str]
    queue_position: int | None = None
    progress: dict | None = None


class Page(BaseModel):
    next: str | None
    previous: str | None
    results: list[Job]


class FileInfo(BaseModel):
    id: str
    name: str
    bytes: int
    sha256: str
    kind: Literal["image", "zip", "lora"]
    created_at: str
