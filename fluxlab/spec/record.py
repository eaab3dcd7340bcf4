"""What an image records about how it was made, as typed objects: `{"request", "model", "runtime", "resolved"}`.

The request, model reference and runtime are written exactly as their spec objects dump them, so reading a
record back is a `model_validate` and `--from` reproduces everything, LoRAs included. `resolved` holds what the
run derived (schedule shift, guidance mode, plan) for people and tools to read; it is not needed to reproduce.

Images written before these objects existed (flat keys: prompt, seed, width, ...) are read into the same shape.
Anything else (a JSON list, missing keys, wrong types) is one line saying what is wrong.
"""

from __future__ import annotations

from pydantic import Field, ValidationError

from ..errors import UserError
from .request import FileRef, GenerateRequest, LoraRef, ModelRef, Runtime
from .typed import Strict, explain

FORMAT = 2  # 1: the flat layout of fluxlab before the typed records


class ImageRecord(Strict):
    fluxlab: str  # the version that wrote it
    format: int = FORMAT
    request: GenerateRequest
    model: ModelRef
    runtime: Runtime = Runtime()
    resolved: dict = Field(default_factory=dict)
    timings: dict | None = None

    @property
    def seed(self) -> int:
        return self.request.seed

    def flat(self) -> dict:
        """One level of readable settings, for `fluxlab show`, CSV files and tables."""
        req = self.request.model_dump(exclude_none=True)
        for key in ("images", "init", "mask"):
            req.pop(key, None)
        out = {"model": self.model.name, **req}
        if self.model.transformer:
            out["transformer"] = self.model.transformer.path
        if self.model.loras:
            out["loras"] = ", ".join(f"{lo.path}:{lo.scale:g}" for lo in self.model.loras)
        if self.model.quantize:
            out["quantize"] = self.model.quantize
        out["dtype"] = self.model.dtype
        out["device"] = self.runtime.device
        for key in ("schedule", "guidance_mode", "family", "compute", "memory_plan"):
            if key in self.resolved:
                out[f"{key}" if key != "schedule" else "schedule_mu"] = (
                    self.resolved[key].get("mu") if key == "schedule" else self.resolved[key])
        inputs = [("reference", r) for r in self.request.images or []]
        inputs += [(k, getattr(self.request, k)) for k in ("init", "mask") if getattr(self.request, k)]
        if inputs:
            out["inputs"] = "; ".join(f"{role} {r.path} (sha256 {(r.sha256 or '?')[:16]}...)" for role, r in inputs)
        out["fluxlab"] = self.fluxlab
        return out


def parse_record(data, source: str) -> ImageRecord:
    """A record from an image's `fluxlab` JSON (current or flat layout), or one UserError line."""
    if not isinstance(data, dict):
        raise UserError(f"{source} has fluxlab metadata that is not an object (a {type(data).__name__}); "
                        f"it was not written by fluxlab or was edited")
    if "request" not in data:
        data = _from_flat(data, source)
    try:
        return ImageRecord.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source} has invalid fluxlab metadata: {explain(e, ImageRecord)}") from None


def _from_flat(meta: dict, source: str) -> dict:
    """The flat layout (format 1) -> the typed layout. Its settings keys are the request's own names."""
    for key in ("prompt", "model", "seed"):
        if key not in meta:
            raise UserError(f"{source} has fluxlab metadata without {key!r}; it cannot be read as settings")
    fields = ("prompt", "negative", "width", "height", "steps", "guidance", "seed", "sampler", "eta", "strength")
    request = {k: meta[k] for k in fields if meta.get(k) is not None}
    schedule = meta.get("schedule")
    if schedule is not None:  # {"name": ...} in this layout; whatever it holds is checked like the new layout's
        request["schedule"] = schedule.get("name") if isinstance(schedule, dict) else schedule
    inputs = meta.get("inputs") or []
    if not isinstance(inputs, list):
        raise UserError(f"{source} has fluxlab metadata whose 'inputs' is not a list")
    for row in inputs:
        if not isinstance(row, dict) or not {"role", "path", "sha256"} <= set(row):
            raise UserError(f"{source} has an unreadable inputs entry in its fluxlab metadata")
        ref = {"path": row["path"], "sha256": row["sha256"]}
        if row["role"] == "reference":
            request.setdefault("images", []).append(ref)
        else:
            request[row["role"]] = ref
    model: dict = {"name": meta["model"]}
    if isinstance(meta.get("transformer_file"), str):
        model["transformer"] = {"path": meta["transformer_file"]}
    if isinstance(meta.get("loras"), list):
        model["loras"] = [{"path": lo.get("path"), "scale": lo.get("scale", 1.0)} for lo in meta["loras"]
                          if isinstance(lo, dict)]
    for key in ("quantize", "dtype"):
        if meta.get(key) is not None:
            model[key] = meta[key]
    runtime = {"device": meta["device"]} if isinstance(meta.get("device"), str) else {}
    resolved = {k: meta[k] for k in ("family", "guidance_mode", "schedule", "compute", "memory_plan") if k in meta}
    return {"fluxlab": str(meta.get("fluxlab", "?")), "format": 1, "request": request, "model": model,
            "runtime": runtime, "resolved": resolved, "timings": meta.get("timings")}


__all__ = ["FORMAT", "FileRef", "ImageRecord", "LoraRef", "ModelRef", "Runtime", "parse_record"]
