"""Replicate's input names for FLUX models, mapped once onto fluxlab's own before the request is validated.

A client written for Replicate sends `num_inference_steps`, `guidance_scale`, `aspect_ratio` + `megapixels`,
`num_outputs`, `image` + `prompt_strength`, `output_format`... The server accepts them beside fluxlab's names
(giving both names of one setting is a 422), turns them into the GenerateRequest fields the CLI uses, and says
in the job's `logs` what it computed or ignored. What is left (LoRA scales, the base of a trained version, the
output format) goes to the caller, which knows the version being run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .http import ApiError
from .schemas import ASPECT_RATIOS

RENAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_outputs": "num_images",
           "prompt_strength": "strength", "image": "init"}
BASES = {"dev": "flux1-dev", "schnell": "flux1-schnell"}  # a trained version's `model` input
LOSSY_QUALITY = 80  # Replicate's default output_quality


@dataclass
class Translated:
    fields: dict  # GenerateRequest fields (files still as the client gave them)
    lora_scale: float | None = None
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0
    base: str | None = None  # a catalog name from `model: dev|schnell`
    output: dict = field(default_factory=lambda: {"format": "png"})
    notes: list[str] = field(default_factory=list)


def size_for(ratio: str, megapixels: str | None, default_size: tuple[int, int]) -> tuple[int, int]:
    """Width and height for an aspect ratio at `megapixels` (default: the model's own area), multiples of 16."""
    a, b = (int(x) for x in ratio.split(":"))
    area = float(megapixels) * 1024 * 1024 if megapixels else default_size[0] * default_size[1]
    return max(16, round(math.sqrt(area * a / b) / 16) * 16), max(16, round(math.sqrt(area * b / a) / 16) * 16)


def translate(given: dict, default_size: tuple[int, int]) -> Translated:
    f = dict(given)
    out = Translated(f)
    for theirs, ours in RENAMES.items():
        if theirs in f:
            if ours in f:
                raise ApiError(422, f"input.{theirs} and input.{ours} are one setting; give one of them")
            f[ours] = f.pop(theirs)
    if "input_image" in f:
        if "images" in f:
            raise ApiError(422, "input.input_image and input.images are one setting; give one of them")
        f["images"] = [f.pop("input_image")]
    ratio, megapixels = f.pop("aspect_ratio", None), f.pop("megapixels", None)
    if ratio is not None or megapixels is not None:
        if "aspect" in f:
            raise ApiError(422, "input.aspect and input.aspect_ratio are one setting; give one of them")
        if ratio == "custom":
            if "width" not in f or "height" not in f:
                raise ApiError(422, "input.aspect_ratio custom needs input.width and input.height")
            if megapixels is not None:
                out.notes.append("megapixels ignored: aspect_ratio custom uses width and height")
        else:
            ratio = ratio or "1:1"
            assert ratio in ASPECT_RATIOS
            if "width" in f or "height" in f:
                out.notes.append(f"width and height ignored: aspect_ratio {ratio} sets the size (use "
                                 f"aspect_ratio=custom to give them)")
            f["width"], f["height"] = size_for(ratio, megapixels, default_size)
            at = f"{megapixels} MP" if megapixels else "the model's own area"
            out.notes.append(f"aspect_ratio {ratio} at {at}: {f['width']}x{f['height']}")
    fmt, quality = f.pop("output_format", None) or "png", f.pop("output_quality", None)
    out.output = {"format": fmt} if fmt == "png" else {"format": fmt, "quality": LOSSY_QUALITY if quality is None
                                                       else quality}
    if quality is not None and fmt == "png":
        out.notes.append("output_quality ignored: png is lossless")
    if f.pop("go_fast", None):
        out.notes.append("go_fast: fluxlab keeps one exact path (the CLI's pixels); nothing changed")
    f.pop("disable_safety_checker", None)  # no checker runs: nothing to disable
    out.lora_scale = f.pop("lora_scale", None)
    out.extra_lora = f.pop("extra_lora", None)
    scale = f.pop("extra_lora_scale", None)
    if scale is not None:
        if out.extra_lora is None:
            out.notes.append("extra_lora_scale ignored: no extra_lora given")
        out.extra_lora_scale = scale
    if (base := f.pop("model", None)) is not None:
        out.base = BASES[base]
    return out
