"""Presets (named sets of request values) and prompt templates: built-ins plus the user's own.

User presets and templates live as readable JSON in the user's config directory ($FLUXLAB_CONFIG_DIR, else
$XDG_CONFIG_HOME/fluxlab, else ~/.config/fluxlab). Nothing is read or created until a command asks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError, did_you_mean

# Seed 000's steps guidance (preview 10-15, good 20-30, max 40-50). Distilled models have fixed steps, so
# their presets trade size instead.
BUILTIN_PRESETS = {
    "steps": {
        "preview": {"steps": 12},
        "balanced": {"steps": 28},
        "quality": {"steps": 50},
    },
    "distilled": {
        "preview": {"width": 512, "height": 512},
        "balanced": {"width": 768, "height": 768},
        "quality": {"width": 1024, "height": 1024},
    },
}

BUILTIN_TEMPLATES = {
    # The photo structure from seed 004: subject. setting. camera. lighting. texture.
    "photo": (
        "A photorealistic photograph of {prompt}. Natural, uncluttered setting with depth. Shot on a full-frame "
        "camera with a 50mm f/1.8 lens, shallow depth of field. Soft natural window light. Fine, realistic "
        "texture and detail."
    ),
    "oil-painting": (
        "An oil painting of {prompt}, visible brush strokes and rich impasto texture, classical composition, "
        "warm earthy palette, museum quality."
    ),
    "watercolor": "A loose watercolor painting of {prompt}, soft washes bleeding into each other, white paper texture.",
    "product": (
        "A studio product photograph of {prompt} on a seamless light grey background, softbox lighting, "
        "crisp focus, catalogue style."
    ),
}

# Request fields a preset may set.
PRESET_FIELDS = ("width", "height", "aspect", "steps", "guidance", "negative", "sampler", "schedule", "eta")


def config_dir() -> Path:
    if os.environ.get("FLUXLAB_CONFIG_DIR"):
        return Path(os.environ["FLUXLAB_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fluxlab"


def _load(name: str) -> dict:
    f = config_dir() / name
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e}); fix or delete it") from None
    except OSError as e:
        raise UserError(f"cannot read {f} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{f} should hold a JSON object of name -> value; fix or delete it")
    return data


def _store(name: str, data: dict) -> Path:
    from ..files import atomic_write

    f = config_dir() / name
    try:
        atomic_write(f, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
    except OSError as e:
        raise UserError(f"cannot write {f} ({e.strerror or e})") from None
    return f


def check_preset(name: str, values, source: str) -> dict:
    """A preset's values, checked as request fields: only PRESET_FIELDS, each of the request's type."""
    from .request import GenerateRequest
    from .typed import validate

    if not isinstance(values, dict):
        raise UserError(f"{source}: preset {name!r} should be an object of settings; fix or delete it")
    bad = sorted(set(values) - set(PRESET_FIELDS))
    if bad:
        raise UserError(f"{source}: preset {name!r} cannot set {', '.join(bad)}; a preset may set "
                        f"{', '.join(PRESET_FIELDS)}")
    validate(GenerateRequest, {"prompt": "x", **values}, f"{source}: preset {name!r}")
    return dict(values)


def user_presets() -> dict:
    f = config_dir() / "presets.json"
    return {name: check_preset(name, values, str(f)) for name, values in _load("presets.json").items()}


def user_templates() -> dict:
    f = config_dir() / "templates.json"
    data = _load("templates.json")
    for name, text in data.items():
        if not isinstance(text, str) or "{prompt}" not in text:
            raise UserError(f"{f}: template {name!r} should be text with a {{prompt}} placeholder; fix or delete it")
    return data


def preset_values(name: str, distilled: bool) -> dict:
    """A preset's values: a user preset of that name wins over a built-in."""
    users = user_presets()
    if name in users:
        return dict(users[name])
    builtin = BUILTIN_PRESETS["distilled" if distilled else "steps"]
    if name in builtin:
        return dict(builtin[name])
    valid = sorted(set(builtin) | set(users))
    raise UserError(f"unknown preset {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}")


def apply_template(name: str, prompt: str) -> str:
    templates = {**BUILTIN_TEMPLATES, **user_templates()}
    if name not in templates:
        valid = sorted(templates)
        raise UserError(f"unknown template {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
    return templates[name].replace("{prompt}", prompt)


def save_preset(name: str, values: dict) -> Path:
    """Save a preset after checking it as a generation would: types, ranges, sampler and schedule names."""
    from ..files import safe_name
    from .request import make_request
    from .samplers import sampler_info
    from .values import MAX_STEPS, parse_schedule

    safe_name(name, "preset name")
    bad = sorted(set(values) - set(PRESET_FIELDS))
    if bad:
        raise UserError(f"a preset cannot set {', '.join(bad)}; it may set {', '.join(PRESET_FIELDS)}")
    if not values:
        raise UserError(f"preset {name!r} would be empty; give the flags it should set, e.g. --steps 20")
    make_request(prompt="x", **values)  # the same type checks as a generation request
    if "steps" in values and not 1 <= values["steps"] <= MAX_STEPS:
        raise UserError(f"steps {values['steps']} is out of range; valid: 1..{MAX_STEPS}")
    for side in ("width", "height"):
        if side in values and (values[side] < 16 or values[side] % 16):
            raise UserError(f"{side} {values[side]} must be a multiple of 16 (and at least 16)")
    if "sampler" in values:
        sampler_info(values["sampler"])
    if "schedule" in values:
        parse_schedule(values["schedule"])
    for key in ("guidance", "eta"):
        if key in values and not (0 <= values[key] <= (1 if key == "eta" else 100)):
            raise UserError(f"{key} {values[key]} is out of range; valid: 0..{1 if key == 'eta' else 100}")
    if "aspect" in values:
        from .values import ASPECTS

        if values["aspect"] not in ASPECTS:
            raise UserError(f"unknown aspect {values['aspect']!r}; valid: {', '.join(ASPECTS)}")
    return _store("presets.json", {**user_presets(), name: values})


def _delete(file: str, kind: str, name: str) -> Path:
    data = _load(file)
    if name not in data:
        raise UserError(f"no user {kind} {name!r}; user {kind}s: {', '.join(sorted(data)) or 'none'}")
    del data[name]
    return _store(file, data)


def delete_preset(name: str) -> Path:
    return _delete("presets.json", "preset", name)


def save_template(name: str, text: str) -> Path:
    from ..files import safe_name
    from .request import check_text

    safe_name(name, "template name")
    try:
        check_text(text, "the template")
    except ValueError as e:
        raise UserError(str(e)) from None
    if "{prompt}" not in text:
        raise UserError("a template needs a {prompt} placeholder, e.g. \"a charcoal sketch of {prompt}\"")
    return _store("templates.json", {**user_templates(), name: text})


def delete_template(name: str) -> Path:
    return _delete("templates.json", "template", name)
