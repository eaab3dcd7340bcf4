"""What front ends show without generating: the catalog and the local cache, this device, LoRA files, records."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def cached_repos() -> dict[str, int]:
    """Bytes in the local hub cache per model repo (empty when there is no cache)."""
    try:
        from huggingface_hub import scan_cache_dir

        return {r.repo_id: r.size_on_disk for r in scan_cache_dir().repos if r.repo_type == "model"}
    except Exception:  # no cache directory yet, or an unreadable one: nothing is cached
        return {}


def models() -> list[dict]:
    """The catalog, with what is in the local hub cache (and the bundled model's size)."""
    from ..spec.catalog import CATALOG, bundled_path

    cached = cached_repos()
    rows = []
    # FLUX.2, then FLUX.1, as the catalog lists them; the bundled demo last, on purpose: a toy, not a FLUX model
    for spec in sorted(CATALOG.values(), key=lambda s: bool(s.bundled)):
        size = sum(spec.sizes_gb.values())
        have = cached.get(spec.repo)
        if spec.bundled:  # shipped inside the package
            folder = bundled_path(spec)
            have = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({
            "name": spec.name, "ref": spec.ref, "repo": spec.repo, "family": spec.family, "steps": spec.steps,
            "guidance": spec.guidance, "guidance_mode": spec.guidance_mode, "text_encoder": spec.text_encoder,
            "license": spec.license, "gated": spec.gated, "size_gb": round(size, 3), "bundled": bool(spec.bundled),
            "cached_gb": None if have is None else round(have / 1e9, 3),
            "default_size": list(spec.default_size), "min_side": spec.min_side, "max_side": spec.max_side,
            "max_references": spec.max_references,
        })
    return rows


def device(name: str = "auto") -> dict:
    """What this machine offers: device, the dtype auto picks, free memory, quantization modes, CPU flags."""
    from ..runtime.devices import (
        bf16_matmul_is_faster,
        cpu_flags,
        cpu_has_fast_bf16,
        dtype_name,
        resolve_device,
        resolve_dtype,
    )
    from ..runtime.executor import device_budget
    from ..runtime.memory import GB
    from ..runtime.quantize import supported_modes
    from ..runtime.threads import decide

    dev = resolve_device(name)
    label = dev.type
    if dev.type == "cuda":
        import torch

        label = f"{torch.cuda.get_device_name(dev)} ({dev})"
    flags = sorted(f for f in cpu_flags() if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"))
    threads = decide()
    return {"device": label, "dtype_auto": dtype_name(resolve_dtype("auto", dev)),
            "amx": dev.type == "cpu" and cpu_has_fast_bf16(),
            "bf16_compute": dev.type != "cpu" or bf16_matmul_is_faster(), "free_gb": round(device_budget(dev) / GB, 1),
            "quantization": supported_modes(dev), "cpu_flags": flags, "threads": threads.count,
            "threads_reason": threads.reason}


def lora_info(path: str) -> dict:
    from ..runtime import loras as L

    return L.info(L.read(path))


def lora_convert(src: str, dst: str, to: str) -> str:
    from ..files import check_file_target
    from ..runtime import loras as L

    if to not in L.WRITE_FORMATS:
        raise UserError(f"unknown LoRA format {to!r}; valid: {', '.join(L.WRITE_FORMATS)}")
    if not str(dst).endswith(".safetensors"):
        raise UserError(f"{dst}: a LoRA is written as .safetensors; give a file name ending in .safetensors")
    check_file_target(Path(dst), "output LoRA")
    lo = L.read(src)
    L.write(lo, to, dst)
    return f"wrote {dst} ({to}, {lo.family}, rank {lo.rank}, {len(lo.modules)} modules) from {lo.format}"


def show(path: str):
    """The typed record of a fluxlab PNG."""
    from .outputs import read_record

    return read_record(path)
