"""CLI options derived from the spec objects: a flag's names, type and help are declared once, on the field.

`@options(REQUEST, MODEL, RUNTIME)` adds the fields of GenerateRequest, ModelRef and Runtime to a command as
typer options; `split(kw)` hands the values back as the three objects' fields (only those the user gave, so
defaults, presets and `--from` can fill the rest). A field added to a spec object is a flag everywhere.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Annotated

import typer

from ..errors import UserError
from ..spec.request import FileRef, GenerateRequest, ModelRef, Runtime


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of whole numbers, e.g. 1,5,9") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Group:
    """The options one spec object contributes: field name -> (CLI type, flags, help, how to convert back)."""

    def __init__(self, model, fields: dict, prefix: str):
        self.model, self.fields, self.prefix = model, fields, prefix

    def parameters(self) -> list[inspect.Parameter]:
        out = []
        for name, (kind, flags, help_text, _) in self.fields.items():
            annotation = Annotated[kind, typer.Option(*flags, help=help_text)]
            out.append(inspect.Parameter(self.prefix + name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                         annotation=annotation))
        return out

    def take(self, kw: dict) -> dict:
        """This group's values from the command's keywords (removed there), converted, None = not given."""
        got = {}
        for name, (_, flags, _, convert) in self.fields.items():
            value = kw.pop(self.prefix + name, None)
            if value is not None:
                got[name] = convert(value, flags[0])
        return got


def _kind(annotation):
    """A field's type as the CLI takes it, and how a CLI value becomes the field's value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = args[0] if len(args) == 1 else annotation
    else:
        inner = annotation
    origin = typing.get_origin(inner)
    if inner in (int, float, str, bool):
        return inner | None, lambda v, flag: v
    if inner is FileRef:
        return str | None, lambda v, flag: {"path": v}
    if origin is list and typing.get_args(inner) == (int,):
        return str | None, parse_int_list
    if origin is list and typing.get_args(inner) == (FileRef,):
        return list[str] | None, lambda v, flag: [{"path": x} for x in v]
    if origin is typing.Literal:
        return str | None, lambda v, flag: v
    if origin is Annotated:
        return _kind(typing.get_args(inner)[0])
    raise TypeError(f"no CLI form for {annotation}")


def group(model, skip=(), prefix: str = "", help_overrides: dict | None = None) -> Group:
    fields = {}
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        kind, convert = _kind(f.annotation)
        extra = f.json_schema_extra or {}
        flags = extra.get("flags") or [_flag(name)]
        fields[name] = (kind, flags, (help_overrides or {}).get(name, f.description), convert)
    return Group(model, fields, prefix)


REQUEST = group(GenerateRequest, skip=("prompt", "upsampled_from"))
MODEL = group(ModelRef, skip=("name", "loras", "transformer"))
RUNTIME = group(Runtime, skip=("lean", "kv_cache", "preview_every", "preview_vae_every", "release_encoders"))


def options(*groups: Group):
    """Add the groups' options to a command whose signature ends in **kw."""
    def decorate(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.kind != inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = [p for g in groups for p in g.parameters() if p.name not in names]
        # typer wants options after arguments; keyword-only is fine for all of them.
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra

        @functools.wraps(fn)
        def command(**kw):
            return fn(**kw)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return command
    return decorate
