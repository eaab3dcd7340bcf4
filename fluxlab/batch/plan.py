"""A batch as data: its items (prompt x seed), their file names, the fingerprint of what changes pixels, and the
folder's record of what is done.

An item is one image: a prompt (a line of a .txt file, or a JSONL line that may override settings for its
prompt), one seed, and a file name derived from its index and seed. `DIR/job.json` records the settings and
their fingerprint; each image is a PNG with fluxlab's usual record, written atomically; `DIR/manifest.jsonl` lists
the finished items and can always be rebuilt from the images; `DIR/failures.jsonl` holds items that failed for a
reason of their own. Torch-free: the driver of a cluster run plans without loading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from .. import __version__
from ..errors import UserError
from ..files import atomic_write, check_writable
from ..spec.request import ModelRef, Runtime
from ..spec.typed import Strict

JOB = "job.json"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
MAX_ITEMS = 1_000_000


def parse_seeds(text: str, most: int = MAX_ITEMS, what: str = "--seeds") -> list[int]:
    """'0-7' -> 0..7, '1,5,9' -> [1, 5, 9], '0-3,10' -> [0, 1, 2, 3, 10]. The seeds are counted before any list is
    built, so a short text naming millions of seeds is refused at once (one parser for the CLI, the API and the
    page)."""
    from ..spec.values import MAX_SEED

    ranges, count = [], 0
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise UserError(f"{what} {text[:80]!r} is not a list of seeds like 0-7 or 1,5,9") from None
        if not (0 <= a <= b <= MAX_SEED):
            raise UserError(f"{what} {text[:80]!r}: {part} is not a range of seeds within 0..{MAX_SEED}")
        count += b - a + 1
        if count > most:
            raise UserError(f"{what} {text[:80]!r} names more than {most:,} seeds, the most a batch takes")
        ranges.append((a, b))
    if not ranges:
        raise UserError(f"{what} {text[:80]!r} names no seed; give e.g. 0-7 or 1,5,9")
    return [seed for a, b in ranges for seed in range(a, b + 1)]


@dataclass(frozen=True)
class Item:
    index: int
    prompt_index: int
    seed: int
    request: dict  # the GenerateRequest fields of this one image (validated when it runs: a bad line fails alone)
    error: str | None = None  # a line that could not even be read

    @property
    def file(self) -> str:
        return f"{self.index:06d}-{self.seed}.png"


def read_prompts(path: str | Path) -> list[dict | str]:
    """The lines of a prompts file: a .txt line is a prompt (# comments and blanks skipped); a .jsonl line is an
    object of request fields with at least a prompt (an unreadable line is kept, as its error, to fail alone)."""
    from ..spec.prompts import read_prompt_file

    p = Path(path)
    if p.suffix.lower() != ".jsonl":
        return [{"prompt": t} for t in read_prompt_file(str(p))]
    if not p.is_file():
        raise UserError(f"prompts file {path} does not exist")
    data = p.read_bytes()
    if b"\0" in data:
        raise UserError(f"prompts file {path} holds NUL bytes: it is not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows: list[dict | str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            rows.append(f"{p.name} line {n} is not JSON ({e})")
            continue
        rows.append(row if isinstance(row, dict) else f"{p.name} line {n} is not a JSON object")
    if not rows:
        raise UserError(f"prompts file {path} has no lines")
    if all(isinstance(r, str) for r in rows):  # not one usable line: the file, not a line, is wrong
        raise UserError(f"prompts file {path} has no JSON object line ({rows[0]})")
    return rows


class PlanFile(Strict):
    """job.json's plan as written: read back through this model, so a hand-edited or damaged file is one line."""

    model: ModelRef
    runtime: Runtime
    base: dict
    prompts: list[dict | str]
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(min_length=1, max_length=MAX_ITEMS)
    source: str = ""


@dataclass
class BatchPlan:
    """Everything a batch run needs, plain and JSON-serialisable (it crosses process and machine boundaries)."""

    model: ModelRef
    runtime: Runtime
    base: dict  # request fields every item shares (flags given on the command line)
    prompts: list  # one entry per prompt line: request fields (dict) or the error of an unreadable line (str)
    seeds: list[int]
    source: str = ""  # the prompts file, for the record

    def items(self) -> list[Item]:
        out, index = [], 0
        for pi, row in enumerate(self.prompts):
            if isinstance(row, str):
                out.append(Item(index, pi, self.seeds[0], {}, row))
                index += 1
                continue
            line_seeds = row.get("seeds") or ([row["seed"]] if isinstance(row.get("seed"), int) else self.seeds)
            for seed in line_seeds if isinstance(line_seeds, list) else self.seeds:
                fields = {**self.base, **{k: v for k, v in row.items() if k not in ("seed", "seeds")}, "seed": seed}
                out.append(Item(index, pi, seed if isinstance(seed, int) else -1, fields))
                index += 1
        if len(out) > MAX_ITEMS:
            raise UserError(f"the batch has {len(out)} images; at most {MAX_ITEMS}")
        return out

    def settings(self) -> dict:
        """What changes pixels, as recorded in job.json and fingerprinted."""
        return {"model": self.model.model_dump(mode="json", exclude_none=True),
                "runtime": {k: v for k, v in self.runtime.model_dump(mode="json", exclude_none=True).items()
                            if k in ("device", "threads", "compute", "lean", "kv_cache", "memory", "budget")},
                "base": self.base, "items_sha256": hashlib.sha256(
                    json.dumps([(i.request, i.error) for i in self.items()], sort_keys=True).encode()).hexdigest()}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        return {"model": self.model.model_dump(mode="json", exclude_none=True),
                "runtime": self.runtime.model_dump(mode="json", exclude_none=True),
                "base": self.base, "prompts": self.prompts, "seeds": self.seeds, "source": self.source}

    @classmethod
    def from_json(cls, data: dict, source: str = "plan") -> BatchPlan:
        from ..spec.typed import validate

        p = validate(PlanFile, data, source)
        return cls(p.model, p.runtime, p.base, p.prompts, p.seeds, p.source)


def pin_loras(model: ModelRef) -> ModelRef:
    """LoRA files pinned by their SHA-256 (hashed here, without loading them), so the fingerprint changes with them."""
    pinned = []
    for lo in model.loras:
        p = Path(lo.path)
        if not p.is_file():
            raise UserError(f"LoRA file {lo.path} does not exist")
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        pinned.append(lo.model_copy(update={"path": str(p.resolve()), "sha256": digest}))
    return model.model_copy(update={"loras": tuple(pinned)})


def open_dir(plan: BatchPlan, out: Path) -> None:
    """Make `out` this batch's folder: write job.json, or check that the one there is this batch's."""
    check_writable(out, "--out folder")
    job = out / JOB
    settings, fingerprint = plan.settings(), plan.fingerprint()
    if job.is_file():
        try:
            old = json.loads(job.read_text())
        except (OSError, ValueError):
            raise UserError(f"{job} is damaged; remove it (and the folder's images) or use another --out") from None
        if old.get("fingerprint") != fingerprint:
            what = difference(old.get("settings", {}), settings)
            raise UserError(f"{out} holds a batch made with other settings ({what}); use another --out, or the same "
                            f"settings to resume it")
        return
    record = {"fluxlab": __version__, "fingerprint": fingerprint, "settings": settings, "plan": plan.to_json(),
              "items": len(plan.items())}
    atomic_write(job, lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n"))


def difference(old: dict, new: dict, prefix: str = "") -> str:
    """The first setting that differs, as 'key: old -> new'."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            return difference(a, b, f"{prefix}{key}.")
        if key == "items_sha256":
            return "the prompts or their seeds differ"
        return f"{prefix}{key}: {json.dumps(a)} there, {json.dumps(b)} now"
    return "nothing"


def load_plan(out: Path) -> BatchPlan:
    job = out / JOB
    if not job.is_file():
        raise UserError(f"{out} is not a batch folder (no {JOB})")
    try:
        data = json.loads(job.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{job} is damaged ({type(e).__name__}); it cannot be read") from None
    if not isinstance(data, dict) or "plan" not in data:
        raise UserError(f"{job} is damaged (no plan); it cannot be read")
    return BatchPlan.from_json(data["plan"], f"{job} plan")


def append_line(path: Path, row: dict) -> None:
    """One JSON line appended with a single write (O_APPEND): rows from several processes never interleave."""
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def done_items(out: Path, items: list[Item]) -> set[int]:
    """Items whose image is there (a finished write: temp files never carry the final name)."""
    return {i.index for i in items if (out / i.file).is_file()}


def failures(out: Path) -> dict[int, str]:
    rows: dict[int, str] = {}
    f = out / FAILURES
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[int(row["index"])] = str(row["error"])
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def status(out: Path) -> dict:
    plan = load_plan(out)
    items = plan.items()
    done = done_items(out, items)
    failed = {i: e for i, e in failures(out).items() if i not in done}
    pending = len(items) - len(done) - len(failed)
    return {"total": len(items), "done": len(done), "failed": len(failed), "pending": pending,
            "failures": [{"index": i, "file": items[i].file, "error": e} for i, e in sorted(failed.items())]}


def rebuild_manifest(out: Path) -> int:
    """manifest.jsonl from the images themselves (it is a convenience, never the truth)."""
    plan = load_plan(out)
    rows = []
    for item in plan.items():
        f = out / item.file
        if f.is_file():
            rows.append({"index": item.index, "prompt_index": item.prompt_index, "seed": item.seed, "file": item.file,
                         "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(text))
    return len(rows)


def verify(out: Path) -> list[str]:
    """Problems found: an image missing, unreadable, or whose record does not match its item's settings."""
    from ..service.outputs import read_record

    plan = load_plan(out)
    problems = []
    fails = failures(out)
    for item in plan.items():
        f = out / item.file
        if not f.is_file():
            why = f" (failed: {fails[item.index]})" if item.index in fails else ""
            problems.append(f"{item.file}: missing{why}")
            continue
        try:
            from PIL import Image

            with Image.open(f) as im:
                im.load()
            record = read_record(f)
        except (UserError, OSError, SyntaxError, ValueError) as e:
            problems.append(f"{item.file}: unreadable ({e})")
            continue
        got = record.request.model_dump(mode="json", exclude_none=True)
        for key, want in item.request.items():
            if key in ("images", "init", "mask", "preset", "template", "aspect") or (
                    key == "prompt" and "template" in item.request):
                continue  # resolved into other fields (paths pinned, prompt templated, size set)
            if got.get(key) != want:
                problems.append(f"{item.file}: {key} is {got.get(key)!r}, the batch asks for {want!r}")
                break
        want_loras = [(lo.sha256, lo.scale) for lo in plan.model.loras]
        if [(lo.sha256, lo.scale) for lo in record.model.loras] != want_loras:
            problems.append(f"{item.file}: made with other LoRAs than the batch's")
    return problems
