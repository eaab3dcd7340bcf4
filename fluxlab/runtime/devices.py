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


def cpu_summary() -> str:
    """The CPU's model name and the flags that decide fluxlab's CPU choices (AMX, AVX-512 bf16, AVX-512,
    AVX2), for benchmark reports: the same code is 6x faster or 64x slower in bf16 depending on them."""
    import os

    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in cpu_flags()]
    shown = " ".join(flags) or "none of amx/avx512/avx2"
    return f"{name}, {len(os.sched_getaffinity(0))} usable CPU(s), flags: {shown}"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles for bf16, where bf16 matmuls run several times faster than fp32.

    AVX512-BF16 alone is not enough: on such a CPU (2 cores, no AMX) torch's bf16 matmul measured 0.15
    TFLOP/s against 0.25-0.30 for fp32, so there bf16 is worth it for memory, not for speed.
    """
    return "amx_bf16" in cpu_flags()


@cache
def bf16_matmul_is_faster() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 ones: what decides if bf16 weights compute in
    bf16 or are upcast per layer (upcast_linears).

    AMX: yes (~6x). No bf16 instructions at all (AVX2 only): no, bf16 is emulated (64x slower measured on an
    EPYC). AVX512-BF16 without AMX goes both ways - 0.65 against 0.15 TFLOP/s fp32 on one 2-core EPYC, 0.15
    against 0.25-0.30 on a Xeon - so there it is measured, once per process (~0.1 s), on a transformer-shaped
    product.
    """
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False
    import time

    import torch

    def seconds(dtype) -> float:
        a, b = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return best

    return seconds(torch.bfloat16) < 0.8 * seconds(torch.float32)


def resolve_devices(name: str = "auto") -> list:
    """Every device a run may use, main first: a comma-separated list (one model split over them), or `auto`,
    which on a machine with several GPUs lists them all (the planner still keeps a model on one when it fits)."""
    import torch

    if name == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [resolve_device(n.strip()) for n in name.split(",")]


def resolve_device(name: str = "auto"):
    """The device `name` means; for a list, its first (the main device until a plan says otherwise)."""
    import torch

    if "," in name:
        return resolve_devices(name)[0]
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

    On many CPUs without AMX, fp32 matmuls are faster than bf16 ones (bf16_matmul_is_faster): each layer converts
    its weight for the product and returns bf16 activations, so memory stays that of bf16 weights and the
    arithmetic is at least as accurate. Quantized weights are left alone. Returns the layers changed.
    """
    import torch
    import torch.nn.functional as F

    def forward(self, x):
        if type(self.weight.data) is not torch.Tensor:  # quantized since (quantize_model): its own kernels
            return torch.nn.Linear.forward(self, x)
        b = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), b).to(x.dtype)

    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.bfloat16:
            m.forward = forward.__get__(m)
            n += 1
    return n
