"""`fluxlab quantize`: a model's transformer written as a GGUF file (Q8_0 or Q4_0), for `--transformer FILE.gguf`
here and for the tools that read community GGUFs (ComfyUI-GGUF, diffusers)."""

from __future__ import annotations

from pathlib import Path


def quantize(model: str, to: str, out: str, notify=None) -> dict:
    """Read MODEL's transformer (catalog name, local diffusers directory or hub repo) one tensor at a time and
    write it to OUT as GGUF. Returns what was written."""
    from ..errors import UserError
    from ..files import check_file_target, check_safetensors
    from ..runtime.gguf_files import WRITABLE, require_gguf, write_gguf
    from ..runtime.loading import fetch, locate, quiet_libraries
    from ..runtime.singlefile import config_family

    kind = to.lower()
    if kind not in WRITABLE:
        raise UserError(f"--to {to!r} is not a type fluxlab writes; valid: {', '.join(WRITABLE)}")
    target = Path(out).expanduser()
    if target.suffix != ".gguf":
        raise UserError(f"-o {out}: the output must be a .gguf file")
    require_gguf()
    check_file_target(target)
    quiet_libraries()
    source = fetch(locate(model))
    folder = source.path / "transformer"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors transformer weights")
    check_safetensors(files)
    _, family = config_family(folder)
    from ..runtime.reader import TensorFiles

    tensors = TensorFiles(files)  # read one tensor at a time, as write_gguf asks for them
    try:
        written = write_gguf(tensors, family, target, kind, notify)
    except ValueError as e:
        raise UserError(f"{folder}: {e}") from None
    finally:
        tensors.close()
    stored = sum(f.stat().st_size for f in files)
    return {"path": str(target), "family": family, "type": kind.upper(), **written,
            "source_bytes": stored, "ratio": round(written["bytes"] / stored, 3)}
