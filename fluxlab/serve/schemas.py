"""The request bodies and response shapes of the /v1 API, derived from the spec objects where they mirror them (a
field added to GenerateRequest is accepted here), strict (unknown fields and wrong types are refused), and every
string checked to be text that can be stored (a lone surrogate is refused before anything is kept)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


FILE = "an uploaded file's id or URL, an https URL, or a data: URI"
ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
# The inputs Replicate's FLUX models take, accepted beside fluxlab's own names (serve.compat maps them).
REPLICATE_INPUTS: dict[str, Any] = {
    "num_inference_steps": (int | None, "Denoising steps (fluxlab: steps)."),
    "guidance_scale": (float | None, "Guidance (fluxlab: guidance)."),
    "aspect_ratio": (Literal[(*ASPECT_RATIOS, "custom")] | None, "Aspect ratio at `megapixels` (default: the "
                                                                  "model's own size); custom: width and height."),
    "megapixels": (Literal["1", "0.25"] | None, "Image size for aspect_ratio (default: the model's own area)."),
    "num_outputs": (Annotated[int, Field(ge=1, le=16)] | None, "Images to make (fluxlab: num_images)."),
    "output_format": (Literal["png", "webp", "jpg"] | None, "png (default, lossless, with fluxlab's record), webp "
                                                            "or jpg (the record in EXIF)."),
    "output_quality": (Annotated[int, Field(ge=0, le=100)] | None, "webp/jpg quality (default 80)."),
    "image": (str | None, f"Image to start from (img2img; fluxlab: init): {FILE}."),
    "prompt_strength": (float | None, "How much of `image` is redrawn, 0..1 (fluxlab: strength)."),
    "input_image": (str | None, f"Reference image to edit (Kontext, FLUX.2; fluxlab: images): {FILE}."),
    "lora_scale": (float | None, "Scale of a trained version's LoRA (default 1)."),
    "extra_lora": (str | None, "Another LoRA: a LoRA name, a training id, or a LoRA .safetensors as "
                               f"{FILE}."),
    "extra_lora_scale": (float | None, "Scale of extra_lora (default 1)."),
    "model": (Literal["dev", "schnell"] | None, "A trained version's base: dev (flux1-dev) or schnell "
                                                "(flux1-schnell); default: the base it was trained on."),
    "go_fast": (bool | None, "Accepted; fluxlab keeps one exact path (the CLI's pixels), so it changes nothing."),
    "disable_safety_checker": (bool | None, "Accepted; fluxlab runs no safety checker."),
}


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
    fields |= {name: (annotation, Field(None, description=text))
               for name, (annotation, text) in REPLICATE_INPUTS.items()}
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
    model: str | None = Field(None, min_length=1, max_length=512, description=(
        "A model: fluxlab's name (demo, flux1-dev) or owner/name (black-forest-labs/flux-dev, me/my-lora)."))
    version: str | None = Field(None, min_length=1, max_length=300, description=(
        "A version instead of `model`: its 64-hex id, or owner/name:VERSION (what Replicate's clients send)."))
    stream: bool | None = Field(None, description="Accepted; every prediction has urls.stream.")
    input: PredictionInput

    @model_validator(mode="after")
    def _one(self):
        if (self.model is None) == (self.version is None):
            raise ValueError("give `model` or `version`, one of them")
        return self


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
    sample_prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None, max_length=8, description="Prompts sampled at every quarter of the run ([trigger] is the trigger word); "
                                        "default: the trigger word alone.")


class TrainingCreate(JobCreate):
    model: str = Field(min_length=1, max_length=512)
    input: TrainingInput
    destination: str | None = Field(None, max_length=200, description=(
        "owner/name of a model of yours (POST /v1/models) that gets the trained LoRA as a new version."))


class TrainerInput(TrainingInput):
    """The LoRA trainer's inputs under the names Replicate's FLUX LoRA trainer uses (and fluxlab's own)."""

    input_images: str | list[str] = Field(description=f"A zip of images with .txt captions ({FILE}), or images.")
    trigger_word: str = Field("TOK", min_length=1, max_length=200)
    resolution: int | str | None = Field(None, description="Side(s) to train at: 512 or '512,768,1024' "
                                                           "(default: the model's own size).")
    batch_size: int | None = Field(None, ge=1, le=64)
    caption_dropout_rate: float | None = Field(None, ge=0, le=1)
    optimizer: Literal["adamw", "adamw8bit"] | None = None
    autocaption: bool | None = Field(None, description="Caption images that have no .txt (needs a captioner on "
                                                       "the server; without one they train on the trigger word).")
    autocaption_prefix: str | None = Field(None, max_length=500)
    autocaption_suffix: str | None = Field(None, max_length=500)
    base_model: str | None = Field(None, max_length=200, description=(
        "The model to train on: dev, schnell, owner/name or a fluxlab name (default: dev, FLUX.1 [dev])."))


class ReplicateTraining(JobCreate):
    destination: str = Field(min_length=3, max_length=200, description="owner/name of a model of yours.")
    input: TrainerInput


class CaptionInput(Body):
    images: str | list[str] = Field(description=f"A zip of images ({FILE}), or images.")
    trigger_word: str | None = Field(None, max_length=200, description="Put in each caption, once.")
    detail: Literal["short", "detailed"] = "short"
    prefix: str = Field("", max_length=500)
    suffix: str = Field("", max_length=500)
    overwrite: bool = Field(False, description="Replace the captions a zip has (default: keep them).")


class CaptionCreate(JobCreate):
    model: str = Field("florence-2-large", max_length=100, description="The captioner: florence-2-large, "
                                                                         "florence-2-base, qwen2.5-vl-3b or demo.")
    input: CaptionInput


class ModelCreate(Body):
    owner: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    visibility: Literal["public", "private"] = "private"
    hardware: str | None = Field(None, max_length=100, description="Accepted; the server's own device runs it.")
    description: str | None = Field(None, max_length=2000)
    github_url: str | None = Field(None, max_length=2048)
    paper_url: str | None = Field(None, max_length=2048)
    license_url: str | None = Field(None, max_length=2048)
    cover_image_url: str | None = Field(None, max_length=2048)


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
    version: str = Field("", description="The version that ran (64 hex digits).")
    destination: str | None = None
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
    logs: str = Field("", description="What the server adjusted or ignored, one line each.")


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
    content_type: str
    size: int
    etag: str
    checksums: dict[str, str]
    metadata: dict
    expires_at: str | None = None
    urls: dict[str, str]
