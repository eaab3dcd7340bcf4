"""What every typed spec object shares: unknown keys are errors, and a validation failure becomes one line.

pydantic reports every problem with its location; users need the first one, named the way they wrote it
(`width`, `config.process[0].train.lr`), with what would be valid. Requests, model references, runtimes,
training configs and image records all explain themselves through `explain`.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import UserError, did_you_mean


def check_text(value, where: str) -> None:
    """Refuse a string that is not storable text: a lone surrogate ("\\ud800" in JSON, or an undecodable byte in a
    command line) cannot be written as UTF-8 into a PNG, a database or a log, so it is named before anything is kept."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where or 'a value'} holds {value[e.start]!a} at character {e.start}, which is not "
                             f"text (a lone surrogate); send valid Unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


class Strict(BaseModel):
    """Unknown keys are refused by name; every string must be storable text."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data):
        check_text(data, getattr(cls, "text_prefix", ""))
        return data


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def location(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def explain(e: ValidationError, model: type[BaseModel], aliases: dict[str, str] | None = None) -> str:
    """The first error of `e` as one line: where, what is wrong, and what was given (or what is valid)."""
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "lax-or"))))
    where = location(loc)
    if err["type"] == "extra_forbidden":
        parent = location(loc[:-1])
        key = str(loc[-1])
        valid = fields_at(loc[:-1], model)
        hint = did_you_mean(key, valid) if valid else ""
        if not hint and aliases and aliases.get(key) in valid:
            hint = f" (did you mean {aliases[key]!r}?)"
        listing = f"; valid: {', '.join(valid)}" if valid and len(valid) <= 30 else ""
        if not parent and getattr(model, "field_noun", None):
            return f"unknown {model.field_noun} {key!r}{hint}{listing}"
        return f"unknown key {key!r} in {parent or 'the top level'}{hint}{listing}"
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = msg.removeprefix("value error, ")
    if err["type"] in ("missing", "value_error"):  # our own value errors name the value already
        return f"{where or 'input'}: {msg}"
    return f"{where or 'input'}: {msg} (got {_short(err.get('input'))})"


def fields_at(loc, model) -> list[str]:
    """Field names of the pydantic model reached by following `loc` from `model`."""
    current = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        nested = None
        for arg in (ann, *typing.get_args(ann), *(a for t in typing.get_args(ann) for a in typing.get_args(t))):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                nested = arg
                break
        if nested is None:
            return []
        current = nested
    return list(current.model_fields)


def validate(model: type[BaseModel], data, source: str = "", aliases: dict[str, str] | None = None):
    """model.model_validate(data), with a failure raised as one UserError line (prefixed by `source`)."""
    if not isinstance(data, dict):
        where = f"{source}: " if source else ""
        raise UserError(f"{where}expected a JSON object of {model.__name__} fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where = f"{source}: " if source else ""
        raise UserError(where + explain(e, model, aliases)) from None
