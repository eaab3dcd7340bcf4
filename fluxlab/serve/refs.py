"""Models and versions as Replicate's API names them, so its official clients work against `fluxlab serve`.

Every model a request may name has an `owner/name`: a catalog model its `ref` (black-forest-labs/flux-schnell,
fluxlab/demo), a `--model NAME=DIR` folder `fluxlab/NAME`, the LoRA trainer `fluxlab/lora-trainer`, and each
token's own models `OWNER/NAME` (made by POST /v1/models, given a version by each training that succeeds into
them). A token sees its own models only; the shared ones are everybody's.

A version id is 64 hex digits derived from what the version loads, so it is the same after a restart and on
another server with the same files: a hub model's repo, a folder's files (names, sizes, and the bytes at both
ends of each, so a 20 GB checkpoint is not read whole), the trainer's recipe, a trained version's base version
and LoRA file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .http import ApiError, iso

TRAINER = "fluxlab/lora-trainer"
TRAINER_RECIPE = "fluxlab-lora-1"  # changes when what a training does for the same inputs changes
# What version objects say they were built with. Clients read it: below cog 0.3.9 an array output is taken for an
# iterator of chunks; ours is a plain list of file URLs.
COG_VERSION = "0.16.9"
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


@dataclass(frozen=True)
class Version:
    """One runnable version: what a prediction or training naming it runs."""

    ref: str  # owner/name
    id: str  # 64 hex digits
    kind: str  # "base" (a catalog or server model), "trained" (a base and a LoRA), "trainer"
    model: str = ""  # the fluxlab model name a `model` field would give (base and trained)
    lora: dict | None = None  # a trained version's LoRA row
    created_at: float = 0.0


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=64)
def _fingerprint(folder: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for rel, size, _ in stamp:
        h.update(f"{rel}\0{size}\0".encode())
        with open(Path(folder) / rel, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()


def fingerprint(folder: Path) -> str:
    """A folder's files, by name, size and the bytes at both ends (cached until a file's size or mtime changes)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(folder), stamp)


def shared_models(srv) -> dict[str, str]:
    """owner/name -> the fluxlab model name, for the catalog and the server's own folders."""
    from ..spec.catalog import CATALOG

    refs = {spec.ref: spec.name for spec in CATALOG.values()}
    refs |= {f"fluxlab/{name}": name for name in srv.settings.models}
    return refs


def base_version(srv, name: str) -> str:
    from ..spec.catalog import CATALOG, bundled_path

    if name in srv.settings.models:
        return digest("folder", fingerprint(Path(srv.settings.models[name])))
    spec = CATALOG[name]
    if spec.bundled:
        return digest("bundled", fingerprint(bundled_path(spec)))
    return digest("hub", spec.repo)


def trained_id(base: str, lora_sha256: str) -> str:
    """A trained version's id: its base version and its LoRA file."""
    return digest("lora", base, lora_sha256)


def trainer_version() -> str:
    return digest("trainer", TRAINER_RECIPE)


def trained_versions(srv, owner: str, ref: str) -> list[Version]:
    """The versions of the owner's model `ref`, newest first: one per training that succeeded into it."""
    versions = []
    for job in srv.store.trained_into(owner, ref):
        lora = srv.store.lora(job["plan"].get("lora_name") or job["id"], owner)
        if lora is None:
            continue
        base = job["plan"]["base"]
        versions.append(Version(ref, trained_id(job["plan"]["base_version"], lora["sha256"]), "trained", base,
                                lora, job["completed_at"] or job["created_at"]))
    return versions


def versions(srv, owner: str, ref: str) -> list[Version]:
    """A model's versions (404 when the caller has no model of that name)."""
    shared = shared_models(srv)
    if ref == TRAINER:
        return [Version(ref, trainer_version(), "trainer")]
    if ref in shared:
        return [Version(ref, base_version(srv, shared[ref]), "base", shared[ref])]
    owner_part, _, name = ref.partition("/")
    if owner_part != owner or srv.store.model(owner, name) is None:
        raise ApiError(404, f"no model {ref!r}")
    return trained_versions(srv, owner, ref)


def find(srv, owner: str, ref: str | None, version: str | None, field: str = "version") -> Version:
    """The version a request names: `ref` alone (its latest version), `ref` and a version id, or a bare version
    id (searched among the shared models and the caller's own)."""
    if ref is not None:
        found = versions(srv, owner, ref)
        if version is None:
            if not found:
                raise ApiError(422, f"{ref} has no version yet: train one into it (POST "
                                    f"/v1/models/{TRAINER}/versions/{trainer_version()}/trainings)")
            return found[0]
        for v in found:
            if v.id == version:
                return v
        have = ", ".join(v.id for v in found[:5]) or "none yet"
        raise ApiError(404, f"{field}: {ref} has no version {version!r} (its versions: {have})")
    candidates = [*[v for r in [TRAINER, *shared_models(srv)] for v in versions(srv, owner, r)],
                  *[v for m in srv.store.models(owner) for v in trained_versions(srv, owner, f"{owner}/{m['name']}")]]
    for v in candidates:
        if v.id == version:
            return v
    raise ApiError(404, f"{field}: no version {version!r}; list a model's versions at "
                        f"/v1/models/OWNER/NAME/versions")


def parse(text: str, field: str) -> tuple[str | None, str | None]:
    """'owner/name', 'owner/name:version' or a bare version id -> (ref or None, version or None)."""
    head, _, version = text.partition(":")
    if "/" not in head:
        if ":" in text or not all(c in "0123456789abcdef" for c in text) or len(text) != 64:
            raise ApiError(422, f"{field}: {text[:100]!r} is not owner/name, owner/name:VERSION or a 64-hex version "
                                f"id")
        return None, text
    owner, _, name = head.partition("/")
    import re

    if not (re.match(REF_PATTERN, owner) and re.match(REF_PATTERN, name)) or (":" in text and not version):
        raise ApiError(422, f"{field}: {text[:100]!r} is not owner/name or owner/name:VERSION")
    return f"{owner}/{name}", version or None


# -- the objects the clients read ---------------------------------------------------------------------------
def _schema(model, output: dict) -> dict:
    """A version's openapi_schema (cog's layout: components.schemas.Input and .Output)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.pop("$defs", {})
    schema["title"] = "Input"
    return {"openapi": "3.0.2", "info": {"title": "fluxlab", "version": "1"}, "paths": {},
            "components": {"schemas": {**components, "Input": schema, "Output": output}}}


@lru_cache(maxsize=2)
def openapi_schema(kind: str) -> dict:
    from .schemas import PredictionInput, TrainerInput

    if kind == "trainer":
        return _schema(TrainerInput, {"title": "Output", "type": "object", "properties": {
            "version": {"type": "string", "title": "Version"},
            "weights": {"type": "string", "format": "uri", "title": "Weights"}}})
    return _schema(PredictionInput, {"title": "Output", "type": "array",
                                     "items": {"type": "string", "format": "uri"}})


def version_obj(v: Version) -> dict:
    return {"id": v.id, "created_at": iso(v.created_at) or "1970-01-01T00:00:00Z", "cog_version": COG_VERSION,
            "openapi_schema": openapi_schema("trainer" if v.kind == "trainer" else "prediction")}


def model_obj(srv, owner: str, ref: str, base: str) -> dict:
    from ..spec.catalog import CATALOG

    found = versions(srv, owner, ref)
    shared = shared_models(srv)
    name = shared.get(ref)
    own = srv.store.model(owner, ref.partition("/")[2]) if ref not in shared and ref != TRAINER else None
    if ref == TRAINER:
        description = "Train a FLUX LoRA from a zip of images (fluxlab's trainer, ai-toolkit's settings)"
    elif name in CATALOG:
        description = CATALOG[name].description
    elif name:
        description = f"the server's model {name}"
    else:
        description = own["description"] if own else None
    return {"url": f"{base}/v1/models/{ref}", "owner": ref.partition("/")[0], "name": ref.partition("/")[2],
            "description": description, "visibility": own["visibility"] if own else "public",
            "github_url": None, "paper_url": None, "license_url": None, "cover_image_url": None,
            "run_count": srv.store.run_count(owner, ref), "default_example": None,
            "latest_version": version_obj(found[0]) if found else None}
