"""Weight quantization of the transformer and text encoders: int8 (torchao), fp8 (torchao), nf4 (bitsandbytes).

int8 weight-only runs everywhere, the CPU included: weights are stored as int8 with a per-channel scale and
dequantized inside the matmul, halving their memory against bf16. On a CPU with int8 dot-product units
(AVX512-VNNI, AVX-VNNI, AMX-INT8) the same int8 weights can also compute in int8: each layer's activations
are quantized per row on the fly and the product runs int8 x int8 (torchao's dynamic-activation path, oneDNN
underneath). Whether that is faster is measured once per process (int8_matmul_is_faster), as the bf16 choice
is; without those units it is not tried (measured 28x slower than weight-only on an AVX2 EPYC). fp8 needs an
NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); nf4 needs CUDA and bitsandbytes.
"""

from __future__ import annotations

import logging
import os
from functools import cache

from ..errors import UserError
from .devices import cpu_flags

MODES = ("int8", "fp8", "nf4")


def supported_modes(device) -> list[str]:
    """The quantization modes this device can run."""
    modes = ["int8"]
    if device.type == "cuda":
        import torch

        if torch.cuda.get_device_capability(device) >= (8, 9):
            modes.append("fp8")
        try:
            import bitsandbytes  # noqa: F401

            modes.append("nf4")
        except ImportError:
            pass
    return modes


def _torchao():
    # torchao logs a warning for each optional CUDA kernel library it cannot load on a CPU-only machine.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization as q

    return q


QUANTIZED = ("transformer", "text_encoder", "text_encoder_2")


INT8_DOT = ("amx_int8", "avx512_vnni", "avx_vnni")  # CPU flags of int8 dot-product instructions
INT8_CHOICES = ("auto", "dynamic", "weight-only")


@cache
def int8_matmul_is_faster() -> bool:
    """Whether int8 layers on this CPU should compute int8 x int8 (dynamic activations) rather than dequantize
    their weights for each product. FLUXLAB_INT8=dynamic|weight-only decides it outright (benchmarks, tests);
    otherwise a CPU without int8 dot-product units says no, and one with them is measured once (~0.2 s) on a
    transformer-shaped layer: dynamic must take under 0.8x the weight-only time."""
    choice = os.environ.get("FLUXLAB_INT8", "auto")
    if choice not in INT8_CHOICES:
        raise UserError(f"FLUXLAB_INT8={choice!r} is not a choice; valid: {', '.join(INT8_CHOICES)}")
    if choice != "auto":
        return choice == "dynamic"
    if not any(f in cpu_flags() for f in INT8_DOT):
        return False
    import time

    import torch

    layer = torch.nn.Linear(1024, 1024, bias=False)
    quantize_model(layer, "int8", None)
    x = torch.randn(256, 1024)

    def seconds() -> float:
        layer(x)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - t0)
        return best

    with torch.no_grad():
        weight_only = seconds()
        int8_activations(layer)
        return seconds() < 0.8 * weight_only


def int8_activations(model) -> int:
    """Switch a model's int8 weight-only Linear layers to int8 x int8 products, in place. The int8 codes and
    per-row scales are the same in both (torchao's two configs quantize weights alike); only the activation
    rule changes, so nothing is requantized. Returns the layers changed."""
    import torch

    probe = torch.nn.Linear(16, 16, bias=False)
    q = _torchao()
    q.quantize_(probe, q.Int8DynamicActivationInt8WeightConfig())
    rule = probe.weight.__tensor_flatten__()[1]["act_quant_kwargs"]
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, torch.nn.Linear) or not hasattr(w, "__tensor_flatten__"):
            continue
        names, meta = w.__tensor_flatten__()
        if "act_quant_kwargs" not in meta or meta["act_quant_kwargs"] is not None:
            continue
        inner = {k: getattr(w, k) for k in names if getattr(w, k) is not None}
        joined = type(w).__tensor_unflatten__(inner, {**meta, "act_quant_kwargs": rule}, w.shape, w.stride())
        m.weight = torch.nn.Parameter(joined, requires_grad=False)
        n += 1
    return n


def quantize_on_load(components, mode: str, device, notify=None, int8_compute: bool = False) -> None:
    """Quantize the transformer's and text encoders' Linear weights as each is loaded; with `int8_compute`, int8
    layers then multiply in int8 (int8_activations)."""
    if mode not in MODES:
        raise UserError(f"unknown quantization {mode!r}; valid: {', '.join(MODES)}")
    ok = supported_modes(device)
    if mode not in ok:
        raise UserError(f"--quantize {mode} is not supported on {device.type}; this device supports: {', '.join(ok)}")

    def hook(name):
        def run(model):
            if getattr(model, "is_quantized", False):  # a GGUF transformer: already quantized, kept as it is
                if notify is not None:
                    notify(f"{name} is already quantized (GGUF): --quantize {mode} applies to the text encoder")
                return
            if getattr(model, "fluxlab_quantized", None) != mode:  # else quantized while loading
                quantize_model(model, mode, device)
            how = ""
            if int8_compute and mode == "int8" and int8_activations(model):
                how = " (int8 x int8 products: measured faster than dequantizing on this CPU)"
            if notify is not None:
                notify(f"quantized {name} to {mode}{how}")
        return run

    for name in QUANTIZED:
        components.after_load.setdefault(name, []).append(hook(name))


def quantize_model(model, mode: str, device) -> None:
    """Quantize one model's (or one Linear layer's) Linear weights in place."""
    if mode == "nf4":
        _nf4(model, device)
        return
    q = _torchao()
    q.quantize_(model, q.Int8WeightOnlyConfig() if mode == "int8" else q.Float8WeightOnlyConfig())


def quantize_linear(module, mode: str, max_weights: int = 1 << 18) -> None:
    """Quantize one Linear layer as it loads, in slices of rows for a large int8 layer.

    torchao's int8 quantization works on fp32 copies: about 12 bytes per weight at its peak, 1 GB for the
    largest layer of klein 4B. int8 weight-only has one scale per output row, so quantizing `max_weights`
    weights' worth of rows at a time gives the same codes and scales (joined through the tensor subclass's
    flatten/unflatten protocol) with a working set of ~3 MB. The size matters to glibc too: with 2**18
    weights the fp32 temporaries (1 MB) get their own pages (heap.own_pages) and the int8 slices are small
    heap blocks, so the model's footprint stays within 3% of its bytes (2**20 left 19% in freed holes).
    """
    import torch

    w = module.weight
    rows = max(1, max_weights // max(1, w.shape[1]))
    if mode != "int8" or w.shape[0] <= rows or w.dim() != 2:
        quantize_model(module, mode, None)
        return
    parts = []
    for start in range(0, w.shape[0], rows):
        part = torch.nn.Linear(w.shape[1], min(rows, w.shape[0] - start), bias=False, device="meta")
        part.weight = torch.nn.Parameter(w[start:start + rows], requires_grad=False)
        quantize_model(part, mode, None)
        parts.append(part.weight)
    names, meta = parts[0].__tensor_flatten__()
    inner = {n: torch.cat([getattr(p, n) for p in parts]) for n in names if getattr(parts[0], n) is not None}
    joined = type(parts[0]).__tensor_unflatten__(inner, meta, w.shape, w.stride())
    module.weight = torch.nn.Parameter(joined, requires_grad=False)


def _nf4(model, device) -> None:
    """Replace Linear layers by bitsandbytes 4-bit NF4 layers (CUDA only)."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = child.bias
                setattr(parent, child_name, q.to(device))


def param_bytes(p) -> int:
    """Bytes a parameter really takes: quantized tensor subclasses report their inner tensors; a streamed block's
    empty placeholder takes none."""
    if p.device.type == "meta":
        return 0
    if hasattr(p, "__tensor_flatten__"):
        names = p.__tensor_flatten__()[0]
        return sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
    return p.numel() * p.element_size()
