"""The typed generation request and its one validation path.

`GenerateRequest` is what a user asks for (CLI flags and Python keyword arguments build the same object);
`resolve()` checks it against the model and turns it into a `Job` with every value concrete (size, steps,
guidance, seeds), plus the notices that tell the user what was adjusted or ignored.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError

# Seed 000's presets: the common FLUX resolutions by aspect ratio, plus the two smaller squares.
ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "9:16": (576, 1024),
    "3:4": (768, 1024),
    "4:3": (1024, 768),
    "16:9": (1024, 576),
    "512": (512, 512),
    "768": (768, 768),
}
MAX_SEED = 2**32 - 1
MAX_STEPS = 500
MAX_IMAGES = 1000
SIZE_MULTIPLE = 16  # VAE 8x downsampling times the 2x2 latent patch


class GenerateRequest(BaseModel):
    """What to generate. Unset values take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    aspect: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    seeds: list[int] | None = None  # explicit seeds, one image each (instead of seed + num_images)
    num_images: int | None = None
    sampler: str | None = None  # default: euler
    schedule: str | None = None  # default | linear | shift:S
    eta: float | None = None  # stochastic samplers only
    preset: str | None = None
    template: str | None = None


def make_request(**fields) -> GenerateRequest:
    """Build a request, turning pydantic's report into one line naming the field and value."""
    try:
        return GenerateRequest(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        if err["type"] == "extra_forbidden":
            valid = ", ".join(GenerateRequest.model_fields)
            raise UserError(f"unknown request field {where!r}; valid fields: {valid}") from None
        raise UserError(f"{where}: {err['msg'].lower()} (got {err.get('input')!r})") from None


@dataclass(frozen=True)
class Job:
    """A request made concrete for one model: every value set, every value valid."""

    prompt: str
    negative: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    sampler: str = "euler"
    schedule: str = "default"
    eta: float = 0.0
    notices: tuple[str, ...] = field(default=(), compare=False)


def _check_side(name: str, value: int, lo: int, hi: int) -> None:
    if value % SIZE_MULTIPLE:
        down = max(SIZE_MULTIPLE, value - value % SIZE_MULTIPLE)
        up = down + SIZE_MULTIPLE
        raise UserError(
            f"{name} {value} is not a multiple of {SIZE_MULTIPLE}; nearest valid values: {down} or {up}"
        )
    if not lo <= value <= hi:
        raise UserError(f"{name} {value} is outside this model's range {lo}..{hi}")


def parse_schedule(text: str) -> tuple[str, float | None]:
    """'default' | 'linear' | 'shift:S' -> (kind, S)."""
    if text in ("default", "linear"):
        return text, None
    if text.startswith("shift:"):
        try:
            value = float(text.split(":", 1)[1])
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"schedule {text!r}: the shift must be a positive number, e.g. shift:3")
        return "shift", value
    raise UserError(f"unknown schedule {text!r}; valid: default, linear, shift:S (e.g. shift:3)")


def _with_preset(req: GenerateRequest, spec) -> tuple[GenerateRequest, list[str]]:
    """Fill the fields the user did not set from the preset (explicit values always win)."""
    from .presets import preset_values

    values = preset_values(req.preset, spec.distilled)
    given = req.model_fields_set
    if {"width", "height", "aspect"} & given:  # an explicit size replaces the preset's size as a whole
        values = {k: v for k, v in values.items() if k not in ("width", "height", "aspect")}
    fill = {k: v for k, v in values.items() if k not in given}
    return req.model_copy(update=fill), [f"preset {req.preset}: " + ", ".join(f"{k}={v}" for k, v in fill.items())]


def resolve(req: GenerateRequest, spec) -> Job:
    """Validate `req` against model `spec` (a catalog.ModelSpec) and fill in the defaults."""
    from .sampling import get_sampler

    notices: list[str] = []
    if req.preset is not None:
        req, said = _with_preset(req, spec)
        notices += said
    prompt = req.prompt
    if req.template is not None:
        from .presets import apply_template

        prompt = apply_template(req.template, prompt)
    if req.aspect is not None:
        if req.width is not None or req.height is not None:
            raise UserError(f"--aspect {req.aspect} conflicts with an explicit width/height; give one or the other")
        if req.aspect not in ASPECTS:
            raise UserError(f"unknown aspect {req.aspect!r}; valid: {', '.join(ASPECTS)}")
        width, height = ASPECTS[req.aspect]
    else:
        width = req.width if req.width is not None else spec.default_size[0]
        height = req.height if req.height is not None else spec.default_size[1]
    _check_side("width", width, spec.min_side, spec.max_side)
    _check_side("height", height, spec.min_side, spec.max_side)

    steps = spec.steps if req.steps is None else req.steps
    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps {steps} is out of range; valid: 1..{MAX_STEPS}")
    if req.steps is not None and spec.distilled and req.steps != spec.steps:
        notices.append(f"{spec.name} is step-distilled for {spec.steps} steps; running {steps} as asked")

    guidance = spec.guidance
    if req.guidance is not None:
        if not math.isfinite(req.guidance) or req.guidance < 0:
            raise UserError(f"guidance {req.guidance} is invalid; it must be a finite number >= 0")
        if spec.guidance_mode == "none":
            if req.guidance != spec.guidance:
                notices.append(
                    f"{spec.name} is distilled and takes no guidance; --guidance {req.guidance:g} is ignored"
                )
        else:
            guidance = req.guidance

    negative = req.negative
    if negative is not None and spec.guidance_mode != "cfg":
        notices.append(f"{spec.name} does not use classifier-free guidance; the negative prompt is ignored")
        negative = None
    elif spec.guidance_mode == "cfg" and negative is None:
        negative = ""  # the reference uncond prompt

    sampler = req.sampler or "euler"
    info = get_sampler(sampler)
    schedule = req.schedule or "default"
    parse_schedule(schedule)
    eta = 0.0
    if info.stochastic:
        eta = 1.0 if req.eta is None else req.eta
        if not (math.isfinite(eta) and 0 <= eta <= 1):
            raise UserError(f"eta {req.eta} is out of range; valid: 0..1")
    elif req.eta is not None:
        notices.append(f"sampler {sampler} is deterministic; --eta {req.eta:g} is ignored")

    seeds = _seeds(req)
    return Job(prompt, negative, width, height, steps, guidance, seeds, sampler, schedule, eta, tuple(notices))


def _seeds(req: GenerateRequest) -> tuple[int, ...]:
    if req.seeds is not None:
        if req.seed is not None:
            raise UserError("give either --seed or --seeds, not both")
        if not req.seeds:
            raise UserError("--seeds is empty; give seeds like --seeds 1,5,9")
        if req.num_images is not None and req.num_images != len(req.seeds):
            raise UserError(f"--num-images {req.num_images} does not match the {len(req.seeds)} seeds given")
        if len(req.seeds) > MAX_IMAGES:
            raise UserError(f"{len(req.seeds)} seeds is too many; valid: up to {MAX_IMAGES}")
        for s in req.seeds:
            if not 0 <= s <= MAX_SEED:
                raise UserError(f"seed {s} is out of range; valid: 0..{MAX_SEED}")
        return tuple(req.seeds)
    n = 1 if req.num_images is None else req.num_images
    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"num_images {n} is out of range; valid: 1..{MAX_IMAGES}")
    seed = req.seed
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1 - n + 1)
    elif not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed {seed} is out of range; valid: 0..{MAX_SEED}")
    if seed + n - 1 > MAX_SEED:
        raise UserError(f"seeds {seed}..{seed + n - 1} pass {MAX_SEED}; choose a smaller --seed")
    return tuple(range(seed, seed + n))
