"""Device and dtype choice: `auto` picks what runs fast on this machine."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from ..errors import UserError

DTYPES = ("auto", "bf16", "fp16", "fp32")


@cache
def cpu_flags() -> frozenset:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles for bf16, where bf16 matmuls run several times faster than fp32.

    AVX512-BF16 alone is not enough: on such a CPU (2 cores, no AMX) torch's bf16 matmul measured 0.15
    TFLOP/s against 0.25-0.30 for fp32, so there bf16 is worth it for memory, not for speed.
    """
    return "amx_bf16" in cpu_flags()


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name == "auto":
        if device.type in ("cuda", "mps") or (device.type == "cpu" and cpu_has_fast_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def dtype_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def upcast_linears(model) -> int:
    """Run a bf16 model's Linear layers in fp32 while keeping bf16 weights in memory.

    On a CPU without AMX, fp32 matmuls are faster than bf16 ones (see cpu_has_fast_bf16): each layer converts
    its weight for the product and returns bf16 activations, so memory stays that of bf16 weights and the
    arithmetic is at least as accurate. Quantized weights are left alone. Returns the layers changed.
    """
    import torch
    import torch.nn.functional as F

    def forward(self, x):
        b = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), b).to(x.dtype)

    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.bfloat16:
            m.forward = forward.__get__(m)
            n += 1
    return n
