"""LoRA files: detect their format and model family, read them into diffusers names, and write them in the
formats other tools read. (runtime.adapters applies them to a loaded model.)

Formats (key names):
* diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight`, `.lora_B.weight` (alpha = rank). ai-toolkit
  saves FLUX.1 LoRAs this way.
* ai-toolkit (FLUX.2): `diffusion_model.<BFL module>.lora_A.weight`, `.lora_B.weight`.
* comfyui: `diffusion_model.<BFL module>.lora_A/lora_B` for both families (what ComfyUI reads for BFL models).
* kohya / musubi: `lora_unet_<BFL module, dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`.

kohya and BFL-named files go through our key tables (keys.py; kohya's alpha is baked into B), which also undo
the final layer's shift/scale order that BFL and diffusers disagree on.
Where BFL fuses projections (qkv; FLUX.1's single-block linear1), a LoRA per diffusers projection becomes one
fused LoRA whose A stacks the parts' A and whose B is block-diagonal: the same weight update, exactly; reading
one back drops the other parts' rows again (`compact`), so a rank-r LoRA stays rank r through any conversion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .keys import TABLES, _regex, bfl_module

WRITE_FORMATS = ("diffusers", "kohya", "ai-toolkit", "comfyui")


@dataclass
class Lora:
    path: str
    format: str
    family: str
    state: dict  # diffusers names with the "transformer." prefix, lora_A / lora_B
    metadata: dict = field(default_factory=dict)
    # Text-encoder LoRA (trained with train_text_encoder): peft names under text_encoder. / text_encoder_2.,
    # written unchanged in every format.
    te_state: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def modules(self) -> list[str]:
        return sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in self.state})

    @property
    def rank(self) -> int:
        return max(v.shape[0] for k, v in self.state.items() if ".lora_A." in k)


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith("lora_unet_") or ".lora_down.weight" in k for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "ai-toolkit"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("transformer.") and ".lora_A." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("double_blocks.", "single_blocks.")) and ".lora_A." in k for k in keys):
        return "bfl"
    sample = ", ".join(keys[:3]) or "none"
    raise UserError(f"not a LoRA fluxlab recognises (keys like {sample}); expected diffusers/PEFT, kohya, "
                    f"ai-toolkit or ComfyUI key names")


def detect_family(state: dict) -> str:
    """flux1 or flux2, from module names that exist in only one family, else from shapes."""
    text = " ".join(state)
    flux2 = ("to_qkv_mlp_proj", "double_stream_modulation", "single_stream_modulation", "ff.linear_in",
             "ff_context.linear_in")
    flux1 = ("img_mod", "txt_mod", "modulation_lin", "modulation.lin", "vector_in", "ff.net.0", "proj_mlp",
             "norm1.linear", "norm1_context", "text_embedder")
    if any(s in text for s in flux2):
        return "flux2"
    if any(s in text for s in flux1):
        return "flux1"
    # Otherwise by widths relative to the hidden size h: the double-block MLP input is 6h in FLUX.2 (SwiGLU)
    # and 4h in FLUX.1; the single-block linear1 is 9h against 7h.
    def rows(pattern):
        return [v.shape[0] for k, v in state.items() if re.search(pattern, k) and re.search("lora_B|lora_up", k)]

    hidden = rows(r"img_attn[._]proj|txt_attn[._]proj|linear2|to_out") or \
        [n // 3 for n in rows(r"img_attn[._]qkv|txt_attn[._]qkv")]
    wide = rows(r"img_mlp[._]0|txt_mlp[._]0|ff[._]linear_in|linear1")
    if hidden and wide:
        ratio = wide[0] / hidden[0]
        if ratio in (6, 9):
            return "flux2"
        if ratio in (4, 7):
            return "flux1"
    raise UserError("cannot tell whether this LoRA is for FLUX.1 or FLUX.2 from its keys")


MAX_LORA_BYTES = 8 * 2**30


def _header_metadata(data: bytes) -> dict:
    """The __metadata__ of a safetensors file's JSON header (strings only)."""
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def read(path: str | Path) -> Lora:
    """Read a LoRA file in any supported format into diffusers names. The file is read once: its SHA-256, its
    header and its tensors come from the same bytes. Non-finite values and empty files are refused."""
    import hashlib

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    p = Path(path)
    if p.is_dir():
        raise UserError(f"LoRA {path} is a folder; give a .safetensors file")
    if not p.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    if p.suffix != ".safetensors":
        raise UserError(f"LoRA file {path} is not .safetensors (fluxlab never loads pickle files)")
    if p.stat().st_size > MAX_LORA_BYTES:
        raise UserError(f"LoRA file {path} is {p.stat().st_size / 2**30:.1f} GB; a LoRA is at most "
                        f"{MAX_LORA_BYTES // 2**30} GB")
    data = p.read_bytes()
    try:
        raw = load_bytes(data)
        metadata = _header_metadata(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    if not raw:
        raise UserError(f"LoRA file {path} holds no tensors; it is empty")
    for k, v in raw.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"LoRA file {path} has non-finite values (NaN or Inf) in {k}; it is damaged")
    te_state = {k: v for k, v in raw.items() if k.split(".", 1)[0] in ("text_encoder", "text_encoder_2")}
    raw = {k: v for k, v in raw.items() if k not in te_state}
    if not raw and te_state:
        raise UserError(f"{path} holds only a text-encoder LoRA; fluxlab applies LoRAs that include the transformer")
    fmt = detect_format(raw)
    family = detect_family(raw)
    if fmt == "kohya":
        state = from_bfl(kohya_to_bfl(raw, family), family)
    elif fmt in ("ai-toolkit", "bfl"):
        state = from_bfl({k.removeprefix("diffusion_model."): v for k, v in raw.items()}, family)
    elif fmt == "peft":
        state = {"transformer." + k.removeprefix("base_model.model."): v for k, v in raw.items()}
    else:
        state = dict(raw)
    state = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in state.items()}
    for k, v in state.items():
        if ".lora_" in k and v.ndim != 2:
            raise UserError(f"LoRA file {path}: {k} has shape {tuple(v.shape)}; LoRA weights are matrices")
    return Lora(str(p), fmt, family, compact(state), metadata, te_state, hashlib.sha256(data).hexdigest())


def compact(state: dict) -> dict:
    """Drop the rank components a part of a fused LoRA does not use.

    A fused projection (qkv) trained as three LoRAs is written with A stacked (3r rows) and B block-diagonal, so
    reading it back gives each part all 3r rows of A, of which only its own r reach the output (the other
    columns of its B are zero). Keeping only those restores the trained rank, the same update exactly."""
    out = dict(state)
    for key_b, b in state.items():
        if ".lora_B." not in key_b:
            continue
        key_a = key_b.replace(".lora_B.", ".lora_A.")
        a = state.get(key_a)
        if a is None or b.shape[1] != a.shape[0]:
            continue
        used = b.abs().sum(dim=0) != 0
        if used.all() or not used.any():
            continue
        out[key_a], out[key_b] = a[used].clone(), b[:, used].clone()
    return out


def kohya_to_bfl(raw: dict, family: str) -> dict:
    """kohya/musubi names (lora_unet_<module with underscores>.lora_down/lora_up/alpha) -> BFL lora_A/lora_B,
    with alpha/rank baked into B. Module names are recovered by matching against the BFL table, since the
    underscores that replaced dots cannot be told apart from the names' own underscores otherwise.

    (diffusers has a kohya FLUX.2 converter, but it drops the modulation and final-layer modules.)
    """
    modules, fused = TABLES[family]
    patterns = [bfl for _, bfl in modules] + [bfl for _, bfl in fused]
    rx = [(re.compile("^" + re.escape(p.replace(".", "_")).replace(r"\{i\}", r"(\d+)") + "$"), p)
          for p in patterns]
    groups: dict[str, dict] = {}
    for key, value in raw.items():
        name, _, suffix = key.removeprefix("lora_unet_").partition(".")
        groups.setdefault(name, {})[suffix] = value
    out = {}
    for name, parts in groups.items():
        module = None
        for r, pattern in rx:
            m = r.match(name)
            if m:
                module = pattern.replace("{i}", m.group(1)) if m.groups() else pattern
                break
        if module is None or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise UserError(f"kohya LoRA module lora_unet_{name} names no {family} transformer module")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        out[f"{module}.lora_A.weight"] = down
        out[f"{module}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


def from_bfl(raw: dict, family: str) -> dict:
    """BFL-named lora_A/lora_B -> diffusers names. A fused LoRA gives each part the shared A and its rows of B."""
    modules, fused = TABLES[family]
    out = {}
    for key, value in raw.items():
        module, _, rest = key.partition(".lora_")
        rest = "lora_" + rest
        hit = False
        for parts, bfl in fused:
            m = _regex(bfl).match(module)
            if m:
                i = m.groupdict().get("i", "")
                names = [p.replace("{i}", i) for p in parts]
                if rest.startswith("lora_A"):
                    for n in names:
                        out[f"{n}.{rest}"] = value
                else:
                    for n, chunk in zip(names, _split_rows(value, family, len(names)), strict=True):
                        out[f"{n}.{rest}"] = chunk
                hit = True
                break
        if hit:
            continue
        for dif, bfl in modules:
            m = _regex(bfl).match(module)
            if m:
                name = dif.replace("{i}", m.groupdict().get("i", ""))
                if rest.startswith("lora_B") and dif == "norm_out.linear":
                    value = _swap_halves(value)
                out[f"{name}.{rest}"] = value
                hit = True
                break
        if not hit:
            raise UserError(f"LoRA key {key} names no {family} transformer module")
    return {"transformer." + k: v for k, v in out.items()}


def _split_rows(b, family: str, parts: int):
    """Split a fused B into its parts' rows: equal thirds for qkv; FLUX.1 linear1 is q, k, v (h each), mlp (4h)."""
    if parts == 4:
        h = b.shape[0] // 7
        return [b[:h], b[h:2 * h], b[2 * h:3 * h], b[3 * h:]]
    return list(b.chunk(parts, dim=0))


def _swap_halves(t):
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_bfl(state: dict, family: str) -> dict:
    """diffusers-named LoRA -> BFL module names, fusing parts BFL fuses (stacked A, block-diagonal B)."""
    import torch

    modules: dict[str, dict] = {}
    for key, value in state.items():
        module, _, rest = key.removeprefix("transformer.").partition(".lora_")
        kind = "A" if rest.startswith("A") else "B"
        target = bfl_module(module, family)
        if target is None:
            raise UserError(f"LoRA module {module} has no BFL name in {family}")
        bfl, part, n = target
        modules.setdefault(bfl, {"n": n, "parts": {}})["parts"].setdefault(part, {})[kind] = value
    out = {}
    for bfl, entry in modules.items():
        parts, n = entry["parts"], entry["n"]
        if n == 1:
            a, b = parts[0]["A"], parts[0]["B"]
            if bfl.endswith("adaLN_modulation.1"):
                b = _swap_halves(b)
            out[bfl] = (a, b)
            continue
        some = next(iter(parts.values()))
        hidden = some["B"].shape[0] if not (n == 4 and 3 in parts and len(parts) == 1) else some["B"].shape[0] // 4
        outs = [parts[i]["B"].shape[0] if i in parts else (4 * hidden if i == 3 else hidden) for i in range(n)]
        a = torch.cat([parts[i]["A"] for i in sorted(parts)], dim=0)
        b = torch.zeros(sum(outs), a.shape[0], dtype=some["B"].dtype)
        row, col = 0, 0
        for i in range(n):
            if i in parts:
                pb = parts[i]["B"]
                b[row:row + outs[i], col:col + pb.shape[1]] = pb
                col += pb.shape[1]
            row += outs[i]
        out[bfl] = (a, b)
    return out


def to_format(lora: Lora, fmt: str) -> dict:
    """The LoRA's tensors under another format's key names (weights unchanged; alpha = rank)."""
    import torch

    if fmt not in WRITE_FORMATS:
        raise UserError(f"unknown LoRA format {fmt!r}; valid: {', '.join(WRITE_FORMATS)}")
    te = {k: v.clone().contiguous() for k, v in lora.te_state.items()}
    if fmt == "diffusers" or (fmt == "ai-toolkit" and lora.family == "flux1"):
        # clone: parts read from a fused LoRA share their A, which a safetensors file cannot hold twice
        return {**{k: v.clone().contiguous() for k, v in lora.state.items()}, **te}
    fused = to_bfl(lora.state, lora.family)
    out = dict(te)
    for module, (a, b) in fused.items():
        if fmt == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = a.contiguous()
            out[f"{name}.lora_up.weight"] = b.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))
        else:
            out[f"diffusion_model.{module}.lora_A.weight"] = a.contiguous()
            out[f"diffusion_model.{module}.lora_B.weight"] = b.contiguous()
    return out


def write(lora: Lora, fmt: str, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from ..files import atomic_write

    tensors = to_format(lora, fmt)
    meta = {**{k: str(v) for k, v in lora.metadata.items()}, **(metadata or {}), "format": fmt,
            "fluxlab.family": lora.family}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return Path(path)


def info(lora: Lora) -> dict:
    def block(module):  # "transformer_blocks.3.attn.to_q" -> "transformer_blocks.3"; "proj_out" stays
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]

    blocks = sorted({block(m) for m in lora.modules})
    return {"path": lora.path, "format": lora.format, "family": lora.family, "rank": lora.rank,
            "modules": len(lora.modules), "blocks": blocks[:8] + (["..."] if len(blocks) > 8 else []),
            "metadata": {k: (v if len(str(v)) < 200 else str(v)[:200] + "...") for k, v in lora.metadata.items()}}
