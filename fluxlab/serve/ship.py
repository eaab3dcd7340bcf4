"""Jobs for a worker that does not share the API node's data folder (a Ray node without `--shared-data`).

The API node stays the one place files live. A job's plan names files under the data folder (uploaded inputs,
LoRAs, a training's run folder to resume from); `pack` sends their bytes with the job, `unpack` writes them under
the worker's own scratch folder and rewrites the plan's paths to it. The files a worker writes (images, a grid's
sheet, a training's checkpoints and LoRA) go back with the event that names them (`send_back`), and the broker
writes them where the plan said, atomically (`receive`), before anyone is told of them.
"""

from __future__ import annotations

from pathlib import Path

FOLDER_EVENTS = ("checkpoint", "lora")  # a training's whole run folder goes back: a resume on any worker needs it


def _json(text: str):
    """A plan field that holds JSON (a batch's plan): the object, else None."""
    import json

    if not text.startswith("{"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _strings(obj):
    if isinstance(obj, str):
        inner = _json(obj)
        if inner is not None:
            yield from _strings(inner)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _moved(obj, src: str, dst: str):
    if isinstance(obj, str):
        inner = _json(obj)
        if inner is not None:
            import json

            return json.dumps(_moved(inner, src, dst))
        return dst + obj[len(src):] if obj == src or obj.startswith(src + "/") else obj
    if isinstance(obj, dict):
        return {k: _moved(v, src, dst) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_moved(v, src, dst) for v in obj]
    return obj


def _files(path: Path, root: Path) -> dict[str, bytes]:
    if path.is_file():
        return {str(path.relative_to(root)): path.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def needed(plan: dict, root: Path) -> list[Path]:
    """The files and folders under `root` a plan reads. A training names the folder all runs live in: only its own
    run folder is sent."""
    runs = name = None
    try:  # a training's plan: {"config": {"config": {"name": ..., "process": [{"training_folder": ...}]}}}
        config = plan["config"]["config"]
        runs, name = Path(config["process"][0]["training_folder"]), config["name"]
    except (KeyError, IndexError, TypeError):
        pass
    found = []
    for s in _strings(plan):
        if not s.startswith(str(root) + "/"):
            continue
        p = Path(s)
        if runs is not None and p == runs:
            p = runs / name
        if p.exists() and root in p.resolve().parents:
            found.append(p)
    return found


def pack(job: dict, root: Path) -> dict:
    """The job with the bytes of every file its plan reads under `root`."""
    files: dict[str, bytes] = {}
    for p in needed(job["plan"], Path(root)):
        files.update(_files(p, Path(root)))
    return {**job, "files": files}


def _write(files: dict[str, bytes], root) -> None:
    """Write each relative path's bytes under `root`, atomically; a path that would leave `root` is skipped."""
    from ..errors import UserError
    from ..files import atomic_write, inside

    for rel, data in files.items():
        try:
            target = inside(Path(root), rel, "shipped file")
        except UserError:
            continue
        atomic_write(target, lambda t, d=data: t.write_bytes(d))


def unpack(job: dict, api_root: str, root: str) -> dict:
    """Write a packed job's files under this worker's `root` and point its plan there."""
    _write(job.get("files") or {}, root)
    return {k: v for k, v in job.items() if k != "files"} | {"plan": _moved(job["plan"], api_root, root)}


def send_back(event: dict, root: str, api_root: str) -> dict:
    """An event with the files it names (under this worker's `root`), its paths pointed at the API node's folder."""
    path = event.get("path")
    if not isinstance(path, str) or not path.startswith(root + "/"):
        return event
    p = Path(path)
    source = p.parent if event["type"] in FOLDER_EVENTS else p
    files = _files(source, Path(root)) if source.exists() else {}
    return {**event, "path": api_root + path[len(root):], "files": files}


def receive(event: dict, root: Path) -> None:
    """Write the files an event brought back under the API node's data folder (never outside it)."""
    _write(event.get("files") or {}, root)
