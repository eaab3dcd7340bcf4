"""Read safetensors tensors one at a time into memory we own, and build a model from them layer by layer.

Why not safetensors' own `safe_open`/`load_file`: they memory-map the whole file, and every page a load touches
stays counted in the process's resident memory until the mapping closes - a whole bf16 model's worth while it
is being quantized. Here each tensor is read with a positioned read (`os.preadv`) into a fresh buffer, so
what a load holds at any moment is what it has built plus one tensor. The file format is safetensors' (an
8-byte little-endian header length, a JSON header of dtype/shape/offsets, then the data), checked beforehand
by files.check_safetensors.

`build_layerwise` is what quantize-on-load uses: the model is created with empty (meta) parameters by
accelerate's init_empty_weights, then filled module by module, and each Linear is quantized as soon as its
weight is in, so a full-precision copy of the model never exists.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import UserError

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class TensorFiles:
    """The tensors of one or more safetensors files, by name, read on demand."""

    def __init__(self, files):
        self.entries: dict[str, tuple] = {}  # name -> (path, dtype, shape, start, end)
        for f in files:
            f = Path(f)
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            base = 8 + n
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                start, end = e["data_offsets"]
                self.entries[name] = (f, e["dtype"], tuple(e["shape"]), base + start, base + end)
        self._fds: dict[Path, int] = {}

    def keys(self):
        return self.entries.keys()

    def read(self, name: str):
        import torch

        path, dtype, shape, start, end = self.entries[name]
        if dtype not in DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}, which fluxlab does not read")
        # The buffer sits at the file offset's alignment (mod 64), as the tensor does in a memory map of the file:
        # a resident model's weights are such views, and some CPUs' kernels (AVX2 sgemm) add in another order
        # for another alignment, so only the same alignment gives the resident model's bits.
        raw = torch.empty(end - start + 64, dtype=torch.uint8)
        shift = (start - raw.data_ptr()) % 64
        buf = raw[shift:shift + end - start]
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        got = os.preadv(fd, [memoryview(buf.numpy())], start)
        if got != end - start:
            raise UserError(f"{path} is truncated: tensor {name} needs {end - start} bytes, the file has {got}")
        return buf.view(getattr(torch, DTYPES[dtype])).reshape(shape)

    __getitem__ = read  # a read-on-demand mapping: keys() and [name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def build_layerwise(make, files, dtype, on_linear=None, prefixes=("",), stream: bool = False):
    """A model made by `make()` (called under init_empty_weights), its parameters and persistent buffers read
    from `files` one module at a time in `dtype` (floating tensors only), `on_linear(module)` called on each
    nn.Linear right after its weights are in. A model name is looked up in the files under each of `prefixes`
    in turn (a bare Qwen3Model reads a Qwen3ForCausalLM's files, whose names start with "model."). Keys the
    files hold that the model lacks are ignored (a lean encoder reads a full model's files); tied weights
    missing from the files are tied afterwards. With `stream`, the blocks are left empty and read each time they
    run (runtime.streaming)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = make()
    blocks = []
    if stream:
        from .streaming import block_modules

        blocks = block_modules(model)
    streamed = tuple(name + "." for name, _ in blocks)
    tensors = TensorFiles(files)
    try:
        for prefix, module in model.named_modules():
            if streamed and (prefix + ".").startswith(streamed):
                continue
            own = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
            own += [(n, b, False) for n, b in module.named_buffers(recurse=False)
                    if n not in module._non_persistent_buffers_set]
            for name, current, is_param in own:
                full = f"{prefix}.{name}" if prefix else name
                key = next((p + full for p in prefixes if p + full in tensors.entries), None)
                if key is None:
                    continue  # tied weights (filled after the loop), or a buffer the model computed itself
                value = tensors.read(key)
                if tuple(value.shape) != tuple(current.shape):
                    raise UserError(f"{tensors.entries[key][0]}: {key} has shape {tuple(value.shape)}, the model "
                                    f"expects {tuple(current.shape)}")
                if value.is_floating_point():
                    value = value.to(dtype)
                if is_param:
                    module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[name] = value
            if on_linear is not None and isinstance(module, torch.nn.Linear) and module.weight.device.type != "meta":
                on_linear(module)
    finally:
        tensors.close()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if stream:
        from .streaming import attach

        attach(model, TensorFiles(files), dtype, prefixes)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"
               and not (streamed and n.startswith(streamed))]
    if missing:
        raise UserError(f"{Path(files[0]).parent} lacks {len(missing)} of the model's weights (e.g. {missing[0]})")
    return model.eval()
