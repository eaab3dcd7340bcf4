"""The typed generation request and its one validation path.

`GenerateRequest` is what a user asks for (CLI flags and Python keyword arguments build the same object);
`resolve()` checks it against the model and turns it into a `Job` with every value concrete (size, steps,
guidance, seeds), plus the notices that tell the user what was adjusted or ignored.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

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
    images: list[str] | None = None  # FLUX.2 reference images (in-context editing)
    init: str | None = None  # img2img / inpainting start image
    strength: float | None = None  # img2img: how much of the schedule to run, 0 < S <= 1
    mask: str | None = None  # inpainting: white = repaint


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
    images: tuple = ()  # ImageInfo of each reference
    init: object = None  # ImageInfo
    strength: float | None = None
    mask: object = None  # ImageInfo
    notices: tuple[str, ...] = field(default=(), compare=False)

    def inputs(self) -> list[dict]:
        """Provenance: every input file with its role, path and SHA-256."""
        rows = [("reference", i) for i in self.images] + [("init", self.init), ("mask", self.mask)]
        return [{"role": r, "file": Path(i.path).name, "path": str(Path(i.path).resolve()), "sha256": i.sha256}
                for r, i in rows if i is not None]


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
    refs, init, mask, strength = _edit_inputs(req, spec)
    if req.aspect is not None:
        if req.width is not None or req.height is not None:
            raise UserError(f"--aspect {req.aspect} conflicts with an explicit width/height; give one or the other")
        if req.aspect not in ASPECTS:
            raise UserError(f"unknown aspect {req.aspect!r}; valid: {', '.join(ASPECTS)}")
        width, height = ASPECTS[req.aspect]
    elif req.width is None and req.height is None and (init or refs):
        source, kind = (init, "the init image") if init else (refs[0], "the first reference")
        if init is None and spec.family == "flux1":  # Kontext: the input's preferred Kontext resolution
            width, height = kontext_size(source.width, source.height)
        else:
            width, height = input_size(source.width, source.height, len(refs) if not init else 1, spec.max_side)
        notices.append(f"output size {width}x{height} follows {kind} ({source.width}x{source.height}); "
                       f"set -W/-H to choose")
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

    if strength is not None and kept_steps(steps, strength) < 1:
        raise UserError(f"strength {strength:g} with {steps} steps leaves no step to run; raise --strength or --steps")
    seeds = _seeds(req)
    return Job(prompt, negative, width, height, steps, guidance, seeds, sampler, schedule, eta, tuple(refs), init,
               strength, mask, tuple(notices))


def kept_steps(steps: int, strength: float) -> int:
    """Steps an img2img run keeps: the last int(N*S) of the schedule, computed as diffusers' get_timesteps."""
    init_timestep = min(steps * strength, steps)
    return steps - int(max(steps - init_timestep, 0))


def input_size(w: int, h: int, count: int, max_side: int) -> tuple[int, int]:
    """The size an input image is used at: its pixel count capped (1024^2 when several references, BFL's
    2024^2 for one), its sides capped to the model's limit, then floored to multiples of 16."""
    cap = 1024 * 1024 if count > 1 else 2024 * 2024
    if w * h > cap:
        scale = math.sqrt(cap / (w * h))
        w, h = int(w * scale), int(h * scale)
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = int(w * scale), int(h * scale)
    m = SIZE_MULTIPLE
    return max(m, w // m * m), max(m, h // m * m)


def kontext_size(w: int, h: int) -> tuple[int, int]:
    """The Kontext training resolution closest in aspect to w x h (the table diffusers and BFL use)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    _, kw, kh = min((abs(w / h - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
    return kw // SIZE_MULTIPLE * SIZE_MULTIPLE, kh // SIZE_MULTIPLE * SIZE_MULTIPLE


def _edit_inputs(req: GenerateRequest, spec):
    """Check reference/init/mask images and strength against the model; returns their ImageInfo."""
    from .images import inspect

    refs = []
    if req.images:
        if spec.max_references == 0:
            raise UserError(f"{spec.name} takes no reference images (--image); use a FLUX.2 model or "
                            f"flux1-kontext-dev")
        if len(req.images) > spec.max_references:
            raise UserError(f"{len(req.images)} reference images given; {spec.name} takes at most "
                            f"{spec.max_references}")
        refs = [inspect(p, "reference image") for p in req.images]
    if req.mask is not None and req.init is None:
        raise UserError("--mask needs --init: the image whose white mask area is repainted")
    if req.strength is not None:
        if req.init is None:
            raise UserError("--strength needs --init: the image to start from")
        if not (math.isfinite(req.strength) and 0 < req.strength <= 1):
            raise UserError(f"strength {req.strength:g} is out of range; valid: 0 < strength <= 1")
    if spec.fill and (req.init is None or req.mask is None):
        raise UserError(f"{spec.name} repaints a masked area: give --init IMAGE and --mask MASK (white = repaint)")
    init = inspect(req.init, "init image") if req.init is not None else None
    mask = inspect(req.mask, "mask", check_shape=False) if req.mask is not None else None
    strength = None
    if init is not None:
        # diffusers' default for img2img; inpainting repaints the masked area from pure noise by default.
        strength = req.strength if req.strength is not None else (1.0 if mask is not None else 0.6)
        if spec.fill and req.strength is None:
            strength = 1.0
    return refs, init, mask, strength


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
