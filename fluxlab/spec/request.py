"""The three typed objects every front end speaks: what to make, with which weights, and how to run it.

* `GenerateRequest`: prompt(s), size, steps, guidance, seeds, sampler, schedule, input images. The CLI's flags,
  the Python API's keywords, the HTTP body's `input` and a batch JSONL line are all this object.
* `ModelRef`: which weights: a catalog name, a local diffusers directory or a hub repo id (+ revision), a
  single-file transformer, LoRAs with scales, quantization, dtype. Frozen and hashable: it keys the model pool.
* `Runtime`: where and how: device, memory plan, budget, batch size, threads, previews.

All three are torch-free, strict (a string is not a number, True is not a seed) and JSON-serialisable; an image
records them as written here, so `--from` is a `model_validate`.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

from pydantic import ConfigDict, Field, field_validator

from ..errors import UserError
from .typed import Strict, validate

MAX_PROMPT_CHARS = 10_000  # ~20x what a 512-token encoder reads; keeps what metadata stores bounded
MAX_LORA_SCALE = 16.0
DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZE = ("int8", "fp8", "nf4")
MEMORY_MODES = ("auto", "speed", "balanced", "low")


def _cli(*flags: str, help: str) -> dict:
    """Field metadata the CLI derives its options from (flags and help live here, once)."""
    return {"description": help, "json_schema_extra": {"flags": list(flags)}}


def check_text(text: str, what: str) -> str:
    """Prompts are text a person wrote: no NUL or other control characters but newlines and tabs, bounded."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what} is {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    bad = sorted({c for c in text if (ord(c) < 32 and c not in "\n\t\r") or ord(c) == 127})
    if bad:
        raise ValueError(f"{what} contains control character(s) {', '.join(repr(c) for c in bad)}; remove them")
    return text


class FileRef(Strict):
    """An input file by path, optionally pinned by its SHA-256 (then a changed file is refused, not used)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @classmethod
    def of(cls, value) -> FileRef:
        return value if isinstance(value, FileRef) else cls(path=value)


def _as_ref(value):
    """A bare path string stands for {"path": ...}."""
    return {"path": value} if isinstance(value, str) else value


class GenerateRequest(Strict):
    """What to generate. Unset values take the model's defaults (or the preset's)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    field_noun: ClassVar[str] = "request field"

    prompt: str | list[str] = Field(**_cli(help="What to draw (several prompts: one image set each)."))
    negative: str | None = Field(None, **_cli("--negative", help="Negative prompt (base models with real CFG)."))
    width: int | None = Field(None, **_cli("-W", "--width", help="Width in pixels (multiple of 16)."))
    height: int | None = Field(None, **_cli("-H", "--height", help="Height in pixels (multiple of 16)."))
    aspect: str | None = Field(None, **_cli("--aspect", help="Size preset: 1:1 9:16 3:4 4:3 16:9 512 768."))
    steps: int | None = Field(None, **_cli("--steps", help="Denoising steps (default: the model's)."))
    guidance: float | None = Field(None, **_cli("--guidance", help="Guidance scale (default: the model's)."))
    seed: int | None = Field(None, **_cli("--seed", help="Seed 0..4294967295 (random when omitted)."))
    seeds: list[int] | None = Field(None, **_cli("--seeds", help="Explicit seeds, e.g. 1,5,9 (one image each)."))
    num_images: int | None = Field(None, **_cli("-n", "--num-images", help="Images with seeds S, S+1, ..."))
    sampler: str | None = Field(None, **_cli("--sampler", help=(
        "euler (reference) | heun | dpmpp_2m | ddim (on a rectified flow DDIM's update equals Euler's; kept for "
        "the familiar name) | euler_ancestral (stochastic, see --eta).")))
    schedule: str | None = Field(None, **_cli("--schedule", help="default (the model's) | linear | shift:S."))
    eta: float | None = Field(None, **_cli("--eta", help="Re-noising for stochastic samplers, 0..1 (default 1)."))
    cache: str | None = Field(None, **_cli("--cache", help=(
        "Step caching: fbc[:THRESHOLD] (First Block Cache: a step whose first block changes its output by less than "
        "THRESHOLD, default 0.1, reuses the other blocks' last change) | taylorseer[:N] (TaylorSeer: after 3 full "
        "steps, one in N, default 3, runs and the others are predicted from them) | none (default). Faster; the "
        "pixels move.")))
    upsample_prompt: bool | None = Field(None, **_cli("--upsample-prompt", help=(
        "Rewrite each prompt into a detailed one with the model's own text encoder first (FLUX.2; BFL's system "
        "messages); the image records both.")))
    upsample_temperature: float | None = Field(None, **_cli("--upsample-temperature", help=(
        "Sampling temperature of the rewrite, 0..2 (default 0.15; 0: greedy). Seeded by the image's seed.")))
    upsample_max_tokens: int | None = Field(None, **_cli("--upsample-max-tokens", help=(
        "Longest rewrite in tokens, 1..2048 (default 512).")))
    upsampled_from: str | None = Field(None, description=(
        "Recorded: the prompt as written before upsampling (the prompt field holds the rewrite, so --from does not "
        "rewrite it again)."))
    preset: str | None = Field(None, **_cli("--preset", help="preview | balanced | quality, or a saved preset."))
    template: str | None = Field(None, **_cli("--template", help="Prompt template: photo, oil-painting, ... or a "
                                                                  "saved one."))
    images: list[FileRef] | None = Field(None, **_cli("--image", "-i", help=(
        "Reference image (repeatable): FLUX.2 editing, or the image to edit with flux1-kontext-dev.")))
    init: FileRef | None = Field(None, **_cli("--init", help="Start image for img2img or inpainting."))
    strength: float | None = Field(None, **_cli("--strength", help=(
        "img2img strength, 0 < S <= 1 (default 0.6; 1.0 with --mask).")))
    mask: FileRef | None = Field(None, **_cli("--mask", help="Inpainting mask for --init: white = repaint."))

    @field_validator("images", mode="before")
    @classmethod
    def _image_paths(cls, v):
        return [_as_ref(x) for x in v] if isinstance(v, list) else v

    @field_validator("init", "mask", mode="before")
    @classmethod
    def _path(cls, v):
        return _as_ref(v)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("no prompt given")
        for t in texts:
            if not t.strip():
                raise ValueError("the prompt is empty; describe the image to draw")
            check_text(t, "the prompt")
        return v

    @field_validator("negative")
    @classmethod
    def _negative(cls, v):
        return v if v is None else check_text(v, "the negative prompt")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class LoraRef(Strict):
    """A LoRA file with its scale (stacked in order), pinned by SHA-256 once it has been read."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(min_length=1)
    scale: float = 1.0
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v):
        if not math.isfinite(v) or abs(v) > MAX_LORA_SCALE:
            raise ValueError(f"LoRA scale {v} is invalid; it must be a number from -{MAX_LORA_SCALE:g} to "
                             f"{MAX_LORA_SCALE:g}")
        return v


class ModelRef(Strict):
    """Which weights. `base()` (without the LoRAs, unless they are fused in) keys the pool of loaded models."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    field_noun: ClassVar[str] = "model field"

    name: str = Field(min_length=1, description="Catalog name, local diffusers dir, or hub repo id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    transformer: FileRef | None = Field(None, description="Single-file transformer over the base model.")
    loras: tuple[LoraRef, ...] = Field((), description="LoRA FILE[:SCALE] (repeatable: stacked).")
    fuse_lora: bool = Field(False, description="Merge the LoRAs into the weights (faster steps).")
    quantize: str | None = Field(None, description="Quantize weights: int8 (any device) | fp8 | nf4 (CUDA).",
                                 json_schema_extra={"enum": list(QUANTIZE)})
    dtype: str = Field("auto", description="auto|bf16|fp16|fp32 (auto: bf16 where fast).",
                       json_schema_extra={"enum": list(DTYPES)})

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v):
        return _one_of(v, QUANTIZE, "quantization") if v is not None else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        return _one_of(v, DTYPES, "dtype")

    @field_validator("loras", mode="before")
    @classmethod
    def _tuple(cls, v):
        return tuple(v) if isinstance(v, list) else v

    @field_validator("transformer", mode="before")
    @classmethod
    def _path(cls, v):
        return _as_ref(v)

    def base(self) -> ModelRef:
        """The loaded weights this reference needs: LoRAs are switched per job on top of them (unless fused)."""
        return self if self.fuse_lora else self.model_copy(update={"loras": ()})


class Runtime(Strict):
    """Where and how to run. Only the first fields are recorded in images; the rest are front-end knobs."""

    model_config = ConfigDict(extra="forbid", strict=True)
    field_noun: ClassVar[str] = "runtime field"

    device: str = Field("auto", description=(
        "auto|cpu|cuda|cuda:N|mps, or several devices to split one model over: cuda:0,cuda:1."),
        json_schema_extra={"flags": ["--device", "--devices"]})
    memory: str = Field("auto", description="Memory plan: auto | speed | balanced | low.",
                        json_schema_extra={"enum": list(MEMORY_MODES)})
    budget: str | None = Field(None, description="Plan for this much device memory, e.g. 6GB.")
    batch_size: Annotated[int, Field(ge=1, le=1000)] | None = Field(None, description=(
        "Images per forward pass (default: from free memory)."))
    compute: str = Field("auto", description=(
        "auto: fp32 products for bf16 weights on CPUs where fp32 multiplies faster; native: the weights' own dtype."),
        json_schema_extra={"enum": ["auto", "native"]})
    lean: bool = Field(True, description="Load FLUX.2 text encoders only up to the deepest layer they use.")
    kv_cache: bool = Field(True, description="Reuse reference K/V across steps (klein KV models).")
    threads: Annotated[int, Field(ge=1, le=1024)] | None = Field(None, description=(
        "torch threads (default: the CPUs this process may use, shared with other fluxlab processes; fewer when "
        "the machine is busy). CPU results can differ in the last bit with the thread count, so images record it."))
    preview_every: Annotated[int, Field(ge=0)] = Field(0, exclude=True, description=(
        "Send a cheap preview of the clean estimate every k steps (0: none)."))
    preview_vae_every: Annotated[int, Field(ge=0)] = Field(0, exclude=True, description=(
        "Decode previews with the VAE every k steps (0: never)."))
    release_encoders: bool = Field(False, exclude=True, description=(
        "Drop the text encoders once every prompt is encoded (one-shot runs: one big model in memory at a time)."))

    @field_validator("memory")
    @classmethod
    def _memory(cls, v):
        return _one_of(v, MEMORY_MODES, "memory mode")

    @field_validator("compute")
    @classmethod
    def _compute(cls, v):
        return _one_of(v, ("auto", "native"), "compute mode")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        import re

        names = [d.strip() for d in v.split(",")]
        for d in names:
            if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,2})?", d):
                raise ValueError(f"unknown device {d!r}; valid: auto, cpu, cuda, cuda:N, mps, or a list such as "
                                 f"cuda:0,cuda:1")
        if len(names) > 1:
            if "auto" in names or "mps" in names:
                raise ValueError(f"device list {v!r}: list cpu and cuda:N devices only (auto alone uses every GPU)")
            seen = [("cuda:0" if d == "cuda" else d) for d in names if d != "cpu"]
            twice = sorted({d for d in seen if seen.count(d) > 1})
            if twice:
                raise ValueError(f"device list {v!r} names {twice[0]} twice; list each GPU once (only cpu may "
                                 f"repeat, which tests a split in host memory)")
        return ",".join(names)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        import re

        if v is not None and not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B?|B)?\s*", v, re.IGNORECASE):
            raise ValueError(f"--budget {v!r} is not a size; use e.g. 6GB or 512MB")
        return v


def _one_of(value: str, valid, what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


def make_request(**fields) -> GenerateRequest:
    """A request from keyword arguments, any problem raised as one UserError line naming the field."""
    return validate(GenerateRequest, fields)


def model_ref(name, **fields) -> ModelRef:
    return validate(ModelRef, {"name": name, **fields})


def runtime(**fields) -> Runtime:
    return validate(Runtime, fields)


def lora_ref(text_or_pair) -> LoraRef:
    """'FILE[:SCALE]', (path, scale), a dict or a LoraRef -> LoraRef, with a bad scale named as a scale."""
    if isinstance(text_or_pair, LoraRef):
        return text_or_pair
    if isinstance(text_or_pair, dict):
        return validate(LoraRef, text_or_pair, "lora")
    if isinstance(text_or_pair, (tuple, list)):
        path, scale = text_or_pair
        return validate(LoraRef, {"path": str(path), "scale": float(scale)}, "lora")
    if not isinstance(text_or_pair, str):
        raise UserError(f"a LoRA is given as 'FILE[:SCALE]', got {type(text_or_pair).__name__}")
    path, scale = parse_lora_text(text_or_pair)
    return validate(LoraRef, {"path": path, "scale": scale}, "--lora")


def parse_lora_text(text: str) -> tuple[str, float]:
    """'style.safetensors:0.8' -> (path, 0.8); no scale means 1.0. A suffix after the last ':' that is not a
    number is a bad scale when the part before it names a .safetensors file (`FILE:abc`), else part of the path."""
    import os

    path, sep, scale = text.rpartition(":")
    if not sep or not path or scale.startswith(("/", "\\")):
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        if path.endswith(".safetensors") or os.path.exists(path):
            raise UserError(f"--lora {text}: the scale {scale!r} is not a number (give FILE or FILE:SCALE, e.g. "
                            f"{path}:0.8)") from None
        return text, 1.0
