"""GGUF transformer checkpoints: loading the community files (city96's and unsloth's FLUX.1 / FLUX.2 GGUFs, Q8_0
down to Q2_K) and writing them (`fluxlab quantize`).

Loading is diffusers' (`from_single_file` with its GGUF quantizer: weights stay in their GGUF blocks in memory and
are dequantized layer by layer inside each matmul). diffusers cannot write GGUF, so writing is done here with the
gguf package's own quantizers, in the layout ComfyUI-GGUF and diffusers read: `general.architecture = "flux"`,
BFL tensor names (runtime.keys), 2-D weights quantized along their input dimension, and whatever cannot or
should not be quantized (biases, norm scales, rows that are not whole 32-weight blocks) kept in F32.

Files are checked before diffusers sees them, so a wrong or damaged file is one clear line: the architecture
field, the family its tensor names belong to, truncation, and quantization types diffusers can dequantize.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

WRITABLE = ("q8_0", "q4_0")  # what gguf-py can quantize (its K-quants only dequantize)
# A tensor name only one family has: how a file says which FLUX it holds (both use architecture "flux").
FAMILY_MARKERS = {"flux2": "double_stream_modulation_img.lin.weight", "flux1": "double_blocks.0.img_mod.lin.weight"}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF files need the gguf package: pip install 'fluxlab[gguf]'") from None
    return gguf


def check_gguf(path: Path, family: str | None = None) -> dict:
    """Read a GGUF file's header and tensor table; one clear line for anything fluxlab cannot load.
    Returns {"family", "tensors", "types": {type name: count}}."""
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise UserError(f"{path} is not a readable GGUF file (truncated or damaged: {e})") from None
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != "flux":
        raise UserError(f"{path} holds a {arch or 'unnamed'} model (general.architecture), not a FLUX transformer "
                        f"(architecture 'flux')")
    names = {t.name.removeprefix("model.diffusion_model.") for t in reader.tensors}
    found = next((f for f, marker in FAMILY_MARKERS.items() if marker in names), None)
    if found is None:
        raise UserError(f"{path} has architecture 'flux' but none of a FLUX.1 or FLUX.2 transformer's tensors")
    if family is not None and found != family:
        raise UserError(f"{path} holds a {found} transformer; the base model is {family}")
    size = path.stat().st_size
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    types: dict[str, int] = {}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
        if t.tensor_type not in plain and t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            ok = ", ".join(sorted(q.name for q in SUPPORTED_GGUF_QUANT_TYPES))
            raise UserError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which diffusers cannot dequantize "
                            f"(supported: {ok}, F32, F16, BF16)")
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"family": found, "tensors": len(reader.tensors), "types": types}


def load_gguf_transformer(path: Path, config_dir: Path, dtype, family: str):
    """A GGUF transformer over the base model's transformer config, weights kept quantized (computed in
    `dtype`)."""
    check_gguf(path, family)
    import diffusers

    cls = "Flux2Transformer2DModel" if family == "flux2" else "FluxTransformer2DModel"
    try:
        model = getattr(diffusers, cls).from_single_file(
            read_gguf(path), config=str(config_dir.parent), subfolder=config_dir.name, torch_dtype=dtype,
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype), local_files_only=True)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} does not fit the base model's {family} transformer ({first})") from None
    return model.eval()


def read_gguf(path: Path) -> dict:
    """A GGUF file's tensors as diffusers' GGUF quantizer takes them (GGUFParameter blocks; F32/F16 as plain
    tensors), each read with a positioned read into memory we own. diffusers' own reader copies each tensor out
    of a memory map that stays open for the whole load, so every page of the file is counted twice in resident
    memory until the end (8.1 GiB peak for a 3.8 GiB Q8_0 klein-4B)."""
    import os

    import torch
    from diffusers.quantizers.gguf.utils import GGUFParameter

    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for t in reader.tensors:
            layout = t.data  # a memory-mapped view: only its dtype and shape are used, no page is read
            buf = torch.empty(int(t.n_bytes), dtype=torch.uint8)
            if os.preadv(fd, [memoryview(buf.numpy())], int(t.data_offset)) != t.n_bytes:
                raise UserError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
            w = torch.from_numpy(buf.numpy().view(layout.dtype).reshape(layout.shape))
            out[t.name] = w if t.tensor_type in plain else GGUFParameter(w, quant_type=t.tensor_type)
    finally:
        os.close(fd)
    return out


def quantizable(shape: tuple, block: int) -> bool:
    """2-D weights whose rows are whole blocks; the rest stays F32 (biases and norm scales are tiny anyway)."""
    return len(shape) == 2 and shape[-1] % block == 0 and shape[0] > 1


def write_gguf(state, family: str, out: Path, kind: str, notify=None) -> dict:
    """Write a diffusers-named transformer as a GGUF file (BFL names), quantizing 2-D weights to `kind` (q8_0 or
    q4_0). `state` is a state dict or a reader.TensorFiles: the tensor table is written first from the shapes,
    then each tensor is made, quantized and written in turn, so what is held at once is one tensor (a whole
    klein-4B held 12.2 GiB this way round: every tensor and its quantized copy). Written atomically. Returns
    {"quantized", "kept", "bytes"}."""
    import math

    import numpy as np

    gguf = require_gguf()
    if kind not in WRITABLE:
        raise UserError(f"unknown GGUF type {kind!r}; fluxlab writes: {', '.join(WRITABLE)}")
    from ..files import atomic_write
    from .keys import bfl_recipe, bfl_shape, bfl_tensor

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    recipe = bfl_recipe(state.keys(), family)

    def shape_of(key: str) -> tuple:
        entries = getattr(state, "entries", None)
        return tuple(entries[key][2]) if entries is not None else tuple(state[key].shape)

    shapes = {name: bfl_shape(how, [shape_of(k) for k in keys]) for name, (how, keys) in recipe.items()}
    counts = {"quantized": 0, "kept": 0}

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch="flux")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
        for name, shape in shapes.items():
            if quantizable(shape, block):
                stored = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(name, stored, np.dtype(np.uint8), math.prod(stored), raw_dtype=qtype)
            else:
                w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, (how, keys) in recipe.items():
            a = bfl_tensor(how, [state[k] for k in keys]).float().numpy()
            if quantizable(shapes[name], block):
                w.write_tensor_data(gguf.quants.quantize(a, qtype))
                counts["quantized"] += 1
            else:
                w.write_tensor_data(a)
                counts["kept"] += 1
        w.close()

    atomic_write(out, write)
    return {**counts, "bytes": out.stat().st_size}
