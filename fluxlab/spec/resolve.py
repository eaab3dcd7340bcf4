"""Resolving a request against a model, once: every value concrete and checked, seeds drawn, inputs read.

`resolve(request, spec)` turns a `GenerateRequest` into a `Job`: size, steps, guidance, sampler, schedule and
seeds set; input images read once, hashed and checked; and the notices that tell the user what was adjusted or
ignored. Random seeds are drawn here and nowhere else, so every file name, printed line and metadata record of
a run agrees on them.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .families import RULES, SIZE_MULTIPLE
from .request import FileRef, GenerateRequest
from .values import ASPECTS, MAX_IMAGES, MAX_SEED, MAX_STEPS, TAYLOR_WARMUP, parse_cache, parse_schedule


@dataclass(frozen=True)
class Job:
    """A request made concrete for one model: every value set, every value valid."""

    prompts: tuple[str, ...]  # final prompts (template applied), one image set each
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
    cache: str | None = None  # "fbc:T": step caching (core.stages.denoise)
    upsample: tuple | None = None  # (temperature, max tokens): rewrite the prompts first (runtime.upsample)
    upsampled_from: tuple | None = None  # the prompts as written, once rewritten (one per prompt)

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def count(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def items(self) -> list[tuple[int, str, int]]:
        """(prompt index, prompt, seed) of every image, in output order: each prompt's seeds in turn."""
        return [(i, p, s) for i, p in enumerate(self.prompts) for s in self.seeds]

    @property
    def steps_run(self) -> int:
        """Steps actually run: img2img keeps the last int(steps * strength) of the schedule."""
        return self.steps if self.init is None else kept_steps(self.steps, self.strength)

    def record(self, prompt: str, seed: int) -> GenerateRequest:
        """The request that makes exactly one of this job's images again: every value explicit, the template
        already in the prompt, the preset already applied, the inputs pinned by SHA-256."""
        def ref(info):
            return None if info is None else FileRef(path=str(Path(info.path).resolve()), sha256=info.sha256)

        return GenerateRequest(
            prompt=prompt, negative=self.negative, width=self.width, height=self.height, steps=self.steps,
            guidance=self.guidance, seed=seed, sampler=self.sampler, schedule=self.schedule,
            eta=self.eta or None, images=[ref(i) for i in self.images] or None, init=ref(self.init),
            strength=self.strength, mask=ref(self.mask), cache=self.cache,
            upsampled_from=self.upsampled_from[self.prompts.index(prompt)] if self.upsampled_from else None,
        )


def _check_side(name: str, value: int, lo: int, hi: int) -> None:
    if value % SIZE_MULTIPLE:
        down = max(SIZE_MULTIPLE, value - value % SIZE_MULTIPLE)
        up = down + SIZE_MULTIPLE
        raise UserError(
            f"{name} {value} is not a multiple of {SIZE_MULTIPLE}; nearest valid values: {down} or {up}"
        )
    if not lo <= value <= hi:
        raise UserError(f"{name} {value} is outside this model's range {lo}..{hi}")


def _with_preset(req: GenerateRequest, spec) -> tuple[GenerateRequest, list[str]]:
    """Fill the fields the user did not set from the preset (explicit values always win)."""
    from .presets import preset_values

    values = preset_values(req.preset, spec.distilled)
    given = req.model_fields_set
    if {"width", "height", "aspect"} & given:  # an explicit size replaces the preset's size as a whole
        values = {k: v for k, v in values.items() if k not in ("width", "height", "aspect")}
    fill = {k: v for k, v in values.items() if k not in given}
    said = [f"preset {req.preset}: " + ", ".join(f"{k}={v}" for k, v in fill.items())] if fill else []
    return req.model_copy(update=fill), said


def resolve(req: GenerateRequest, spec) -> Job:
    """Validate `req` against model `spec` (a catalog ModelSpec), fill in the defaults, draw random seeds and
    read the input images."""
    from .samplers import sampler_info

    notices: list[str] = []
    if req.preset is not None:
        req, said = _with_preset(req, spec)
        notices += said
    prompts = req.prompts
    if req.template is not None:
        from .presets import apply_template

        prompts = [apply_template(req.template, p) for p in prompts]
    refs, init, mask, strength = _edit_inputs(req, spec)
    if req.aspect is not None:
        if req.width is not None or req.height is not None:
            raise UserError(f"--aspect {req.aspect} conflicts with an explicit width/height; give one or the other")
        if req.aspect not in ASPECTS:
            raise UserError(f"unknown aspect {req.aspect!r}; valid: {', '.join(ASPECTS)}")
        width, height = ASPECTS[req.aspect]
    elif req.width is None and req.height is None and (init or refs):
        source, kind = (init, "the init image") if init else (refs[0], "the first reference")
        width, height = RULES[spec.family].output_size(source.width, source.height, len(refs), init is not None,
                                                       spec.max_side)
        if (width, height) != tuple(spec.default_size):
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
        if not math.isfinite(req.guidance) or req.guidance < 0 or req.guidance > 100:
            raise UserError(f"guidance {req.guidance} is invalid; it must be a finite number from 0 to 100")
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
    info = sampler_info(sampler)
    schedule = req.schedule or "default"
    parse_schedule(schedule)
    eta = 0.0
    if info.stochastic:
        eta = 1.0 if req.eta is None else req.eta
        if not (math.isfinite(eta) and 0 <= eta <= 1):
            raise UserError(f"eta {req.eta} is out of range; valid: 0..1")
    elif req.eta is not None:
        notices.append(f"sampler {sampler} is deterministic; --eta {req.eta:g} is ignored")

    cache = parse_cache(req.cache)
    if cache is not None and cache[0] == "taylorseer" and steps <= TAYLOR_WARMUP + 1:
        notices.append(f"--cache {req.cache} predicts no step of {steps}: TaylorSeer runs the first "
                       f"{TAYLOR_WARMUP} in full and then one in {cache[1]:g}")
    elif cache is not None and spec.distilled and steps <= 8:
        notices.append(f"{spec.name} runs {steps} steps: First Block Cache rarely skips one so few (each step changes "
                       f"the image a lot); --cache {req.cache} is kept")

    if strength is not None:
        kept = kept_steps(steps, strength)
        if kept < 1:
            raise UserError(f"strength {strength:g} with {steps} steps leaves no step to run; raise --strength or "
                            f"--steps")
        if kept < steps:
            notices.append(f"img2img at strength {strength:g} runs the last {kept} of {steps} steps")
    upsample = _upsample(req, spec, notices)
    seeds = _seeds(req, len(prompts))
    return Job(tuple(prompts), negative, width, height, steps, guidance, seeds, sampler, schedule, eta, tuple(refs),
               init, strength, mask, tuple(notices), cache=f"{cache[0]}:{cache[1]:g}" if cache else None,
               upsample=upsample,
               upsampled_from=(req.upsampled_from,) * len(prompts) if req.upsampled_from and not upsample else None)


def upsample_refusal(spec) -> str | None:
    """Why a model cannot upsample prompts (None when it can): only FLUX.2's encoders are language models."""
    if spec.family != "flux2":
        return (f"{spec.name} cannot upsample prompts: FLUX.1's text encoders (T5, CLIP) embed text and cannot "
                f"write it; FLUX.2 models (klein, dev) can")
    if spec.bundled:
        return (f"{spec.name} cannot upsample prompts: its 4-layer text encoder was trained to embed the demo's "
                f"prompts, not to write; FLUX.2 models (klein, dev) can")
    return None


def _upsample(req: GenerateRequest, spec, notices: list[str]) -> tuple | None:
    if not req.upsample_prompt:
        for name, value in (("--upsample-temperature", req.upsample_temperature),
                            ("--upsample-max-tokens", req.upsample_max_tokens)):
            if value is not None:
                notices.append(f"{name} is ignored without --upsample-prompt")
        return None
    refusal = upsample_refusal(spec)
    if refusal:
        raise UserError(refusal)
    t = 0.15 if req.upsample_temperature is None else req.upsample_temperature
    if not (math.isfinite(t) and 0 <= t <= 2):
        raise UserError(f"upsample temperature {req.upsample_temperature} is out of range; valid: 0..2 (0: greedy)")
    n = 512 if req.upsample_max_tokens is None else req.upsample_max_tokens
    if not 1 <= n <= 2048:
        raise UserError(f"upsample max tokens {n} is out of range; valid: 1..2048")
    return (float(t), n)


def kept_steps(steps: int, strength: float) -> int:
    """Steps an img2img run keeps: the last int(N*S) of the schedule, computed as diffusers' get_timesteps."""
    init_timestep = min(steps * strength, steps)
    return steps - int(max(steps - init_timestep, 0))


def _input(ref: FileRef, what: str, check_shape: bool = True):
    """Read and check one input image; a pinned SHA-256 must still match the file."""
    from .images import inspect

    info = inspect(ref.path, what, check_shape)
    if ref.sha256 is not None and ref.sha256 != info.sha256:
        raise UserError(f"{what} {ref.path} has changed since it was recorded (SHA-256 differs); pass the image "
                        f"again to use it as it is now")
    return info


def _edit_inputs(req: GenerateRequest, spec):
    """Check reference/init/mask images and strength against the model; returns their ImageInfo."""
    refs = []
    if req.images:
        if spec.max_references == 0:
            raise UserError(f"{spec.name} takes no reference images (--image); use a FLUX.2 model or "
                            f"flux1-kontext-dev")
        if len(req.images) > spec.max_references:
            raise UserError(f"{len(req.images)} reference images given; {spec.name} takes at most "
                            f"{spec.max_references}")
    if req.mask is not None and req.init is None:
        raise UserError("--mask needs --init: the image whose white mask area is repainted")
    if req.strength is not None:
        if req.init is None:
            raise UserError("--strength needs --init: the image to start from")
        if not (math.isfinite(req.strength) and 0 < req.strength <= 1):
            raise UserError(f"strength {req.strength:g} is out of range; valid: 0 < strength <= 1")
    if spec.fill and (req.init is None or req.mask is None):
        raise UserError(f"{spec.name} repaints a masked area: give --init IMAGE and --mask MASK (white = repaint)")
    refs = [_input(r, "reference image") for r in req.images or []]
    init = _input(req.init, "init image") if req.init is not None else None
    mask = _input(req.mask, "mask", check_shape=False) if req.mask is not None else None
    strength = None
    if init is not None:
        # diffusers' default for img2img; inpainting repaints the masked area from pure noise by default.
        strength = req.strength if req.strength is not None else (1.0 if mask is not None else 0.6)
        if spec.fill and req.strength is None:
            strength = 1.0
    return refs, init, mask, strength


def _seeds(req: GenerateRequest, prompts: int = 1) -> tuple[int, ...]:
    if req.seeds is not None:
        if req.seed is not None:
            raise UserError("give either --seed or --seeds, not both")
        if not req.seeds:
            raise UserError("--seeds is empty; give seeds like --seeds 1,5,9")
        if req.num_images is not None and req.num_images != len(req.seeds):
            raise UserError(f"--num-images {req.num_images} does not match the {len(req.seeds)} seeds given")
        if len(req.seeds) * prompts > MAX_IMAGES:
            raise UserError(f"{len(req.seeds) * prompts} images is too many for one request; valid: up to "
                            f"{MAX_IMAGES}")
        for s in req.seeds:
            if not 0 <= s <= MAX_SEED:
                raise UserError(f"seed {s} is out of range; valid: 0..{MAX_SEED}")
        return tuple(req.seeds)
    n = 1 if req.num_images is None else req.num_images
    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"num_images {n} is out of range; valid: 1..{MAX_IMAGES}")
    if n * prompts > MAX_IMAGES:
        raise UserError(f"{n * prompts} images is too many for one request; valid: up to {MAX_IMAGES}")
    seed = req.seed
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1 - n + 1)
    elif not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed {seed} is out of range; valid: 0..{MAX_SEED}")
    if seed + n - 1 > MAX_SEED:
        raise UserError(f"seeds {seed}..{seed + n - 1} pass {MAX_SEED}; choose a smaller --seed")
    return tuple(range(seed, seed + n))
