"""`fluxlab preset ...` and `fluxlab template ...`: the user's own presets and prompt templates."""

from __future__ import annotations

from typing import Annotated

import typer

from ..spec.presets import PRESET_FIELDS
from ..spec.request import GenerateRequest
from . import app, escape, out
from .options import group, options

preset_app = typer.Typer(help="Named sets of generation settings (stored in your config folder).",
                         no_args_is_help=True)
template_app = typer.Typer(help="Prompt templates with a {prompt} placeholder.", no_args_is_help=True)
app.add_typer(preset_app, name="preset")
app.add_typer(template_app, name="template")

PRESET = group(GenerateRequest, skip=[f for f in GenerateRequest.model_fields if f not in PRESET_FIELDS])


@preset_app.command("save")
@options(PRESET)
def preset_save(name: Annotated[str, typer.Argument(help="Preset name.")], **kw):
    """Save the given flags as a preset (use it with generate --preset NAME)."""
    from ..spec.presets import save_preset

    f = save_preset(name, PRESET.take(kw))
    out.print(escape(f"saved preset {name} to {f}"))


@preset_app.command("list")
def preset_list():
    """Built-in and saved presets."""
    from ..spec.presets import BUILTIN_PRESETS, user_presets

    for kind, presets in BUILTIN_PRESETS.items():
        label = "distilled models (fixed steps: size changes)" if kind == "distilled" else "other models"
        for name, values in presets.items():
            out.print(escape(f"{name:<12} built-in, {label}: {values}"))
    for name, values in user_presets().items():
        out.print(escape(f"{name:<12} saved: {values}"))


@preset_app.command("delete")
def preset_delete(name: Annotated[str, typer.Argument()]):
    """Delete a saved preset."""
    from ..spec.presets import delete_preset

    delete_preset(name)
    out.print(escape(f"deleted preset {name}"))


@template_app.command("save")
def template_save(name: Annotated[str, typer.Argument()], text: Annotated[str, typer.Argument()]):
    """Save a template; {prompt} marks where the prompt goes."""
    from ..spec.presets import save_template

    out.print(escape(f"saved template {name} to {save_template(name, text)}"))


@template_app.command("list")
def template_list():
    """Built-in and saved templates."""
    from ..spec.presets import BUILTIN_TEMPLATES, user_templates

    for name, text in {**BUILTIN_TEMPLATES, **user_templates()}.items():
        out.print(f"[bold]{escape(name)}[/bold]: " + escape(text))


@template_app.command("delete")
def template_delete(name: Annotated[str, typer.Argument()]):
    """Delete a saved template."""
    from ..spec.presets import delete_template

    delete_template(name)
    out.print(escape(f"deleted template {name}"))
