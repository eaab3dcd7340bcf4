"""The memory planner: a pure function from sizes and a budget to a plan. No devices, no torch.

Written by hand because no library plans across a whole pipeline: diffusers and accelerate offer the
mechanisms (model offload hooks, group offloading, VAE tiling), not the choice between them. The choice is
arithmetic, so it lives here where it can be unit-tested with numbers; `executor.py` applies a plan.

Placements, fastest first:
* resident: every model stays on the device;
* phase: one model on the device at a time (text encoder, then transformer, then VAE), the others in host
  memory: seed 001's strategy;
* stream: even one model does not fit, so its blocks stream through the device in groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

GB = 1024**3
MODES = ("auto", "speed", "balanced", "low")
Placement = Literal["resident", "phase", "stream"]


@dataclass(frozen=True)
class ModelSizes:
    """Bytes each component takes in the run's dtype, and how many blocks the big models have."""

    transformer: int
    text_encoder: int
    vae: int
    transformer_blocks: int = 25
    text_encoder_blocks: int = 36
    hidden: int = 3072  # transformer width (activation estimate)


@dataclass(frozen=True)
class Plan:
    placement: Placement
    batch_size: int
    vae_tiling: bool
    blocks_per_group: int | None  # stream: blocks resident at once
    peak: int  # predicted peak device bytes
    budget: int
    fits: bool

    def line(self) -> str:
        where = {"resident": "all models resident", "phase": "phase offload (one model on the device at a time)",
                 "stream": f"block streaming ({self.blocks_per_group} blocks at a time)"}[self.placement]
        tiling = "VAE tiling on" if self.vae_tiling else "VAE tiling off"
        fit = "" if self.fits else " (does NOT fit)"
        return (f"plan: {where}, {tiling}, batch {self.batch_size}; predicted peak {self.peak / GB:.1f} GB of "
                f"{self.budget / GB:.1f} GB{fit}")

    def as_dict(self) -> dict:
        return {"placement": self.placement, "batch_size": self.batch_size, "vae_tiling": self.vae_tiling,
                "blocks_per_group": self.blocks_per_group, "predicted_peak_gb": round(self.peak / GB, 2),
                "budget_gb": round(self.budget / GB, 2)}


def parse_size(text: str) -> int:
    """'6GB', '6 GiB', '512MB', '6' (GB) -> bytes (binary units: a '6GB' GPU has 6 GiB)."""
    from ..errors import UserError

    t = text.strip().upper().replace(" ", "").removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024**2, "G": GB, "T": 1024 * GB}
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(float(t) * GB)
    except ValueError:
        raise UserError(f"--budget {text!r} is not a size; use e.g. 6GB or 512MB") from None


def activation_bytes(width: int, height: int, batch: int, hidden: int, text_tokens: int, dtype_bytes: int,
                     ref_tokens: int = 0) -> int:
    """Transformer activations at their peak (inside one block): about 24 tensors of tokens x hidden live at
    once (q, k, v, attention output, the 3x-wide SwiGLU pair, residuals, modulations), per image."""
    tokens = (width // 16) * (height // 16) + ref_tokens + text_tokens
    return batch * tokens * hidden * dtype_bytes * 24


def vae_decode_bytes(width: int, height: int, batch: int) -> int:
    """VAE decoder activations at full resolution: ~6 fp32 maps of 128 channels (GroupNorm runs in fp32)."""
    return batch * width * height * 128 * 4 * 6


TILE = 512  # VAE tiles are 512x512 pixels


def make_plan(sizes: ModelSizes, width: int, height: int, batch: int, budget: int, *, mode: str = "auto",
              reserve: int = GB // 2, text_tokens: int = 512, dtype_bytes: int = 2, ref_tokens: int = 0,
              activation_scale: float = 1.0) -> Plan:
    """Choose placement, VAE tiling and batch size for one generation.

    auto: the fastest plan predicted to fit (resident > phase > stream, shrinking the batch before streaming);
    speed: resident with the requested batch, fit or not; balanced: at least phase offload; low: stream,
    VAE tiling, batch 1. `activation_scale` corrects the activation estimate by a measured ratio (from
    `fluxlab bench`'s hardware profile).
    """
    if mode not in MODES:
        from ..errors import UserError

        raise UserError(f"unknown memory mode {mode!r}; valid: {', '.join(MODES)}")
    room = budget - reserve

    def act(b):
        return int(activation_scale * activation_bytes(width, height, b, sizes.hidden, text_tokens, dtype_bytes,
                                                       ref_tokens))

    def vae_need(b, tiling):
        return vae_decode_bytes(min(width, TILE), min(height, TILE), 1) if tiling else vae_decode_bytes(width,
                                                                                                       height, b)

    def peak(placement, b, tiling, group=None):
        decode = sizes.vae + vae_need(b, tiling)
        if placement == "resident":
            return max(sizes.text_encoder + sizes.transformer + sizes.vae + act(b),
                       sizes.text_encoder + sizes.transformer + decode)
        if placement == "phase":
            return max(sizes.text_encoder, sizes.transformer + act(b), decode)
        per_block = sizes.transformer // sizes.transformer_blocks
        per_te_block = sizes.text_encoder // sizes.text_encoder_blocks
        return max(group * per_te_block, group * per_block + act(b), decode)

    def build(placement, b, tiling, group=None):
        p = peak(placement, b, tiling, group)
        return Plan(placement, b, tiling, group, p, budget, p <= room)

    def tiling_for(placement, b, group=None):
        # Tile only when a whole-image decode would not fit (or the image is very large).
        return build(placement, b, False, group).peak > room or width * height > 2048 * 2048

    if mode == "speed":
        return build("resident", batch, tiling_for("resident", batch))
    if mode == "low":
        return _stream(sizes, 1, build, room)
    placements = ["phase"] if mode == "balanced" else ["resident", "phase"]
    for placement in placements:
        for b in _halvings(batch):
            plan = build(placement, b, tiling_for(placement, b))
            if plan.fits:
                return plan
    for b in _halvings(batch):
        plan = _stream(sizes, b, build, room)
        if plan.fits:
            return plan
    return plan  # the smallest plan tried; fits=False tells the caller


def _halvings(batch: int):
    b = batch
    while b >= 1:
        yield b
        b //= 2


def _stream(sizes: ModelSizes, b: int, build, room: int) -> Plan:
    """The largest block group that fits (fewer transfers), down to one block at a time."""
    best = None
    for group in range(max(sizes.transformer_blocks, sizes.text_encoder_blocks), 0, -1):
        plan = build("stream", b, True, group)
        best = plan
        if plan.fits:
            return plan
    return best


def next_smaller(plan: Plan | SplitPlan) -> Plan | SplitPlan | None:
    """One rung down the out-of-memory ladder: VAE tiling, then a smaller batch, then more offloading (a split
    plan has no further rung: the caller says so)."""
    if not plan.vae_tiling:
        return replace(plan, vae_tiling=True)
    if plan.batch_size > 1:
        return replace(plan, batch_size=plan.batch_size // 2)
    if isinstance(plan, SplitPlan):
        return None
    if plan.placement == "resident":
        return replace(plan, placement="phase")
    if plan.placement == "phase":
        return replace(plan, placement="stream", blocks_per_group=4)
    if plan.blocks_per_group and plan.blocks_per_group > 1:
        return replace(plan, blocks_per_group=plan.blocks_per_group // 2)
    return None


# -- several devices -----------------------------------------------------------------------------------
# One model over several devices (`--device cuda:0,cuda:1`): each component gets a device, and a transformer no
# single device can hold is cut into runs of consecutive blocks, one run per device, activations handed over at
# the boundaries (the way accelerate's device_map and diffusers' device_map="balanced" place models). What no
# device has room for runs from host memory. The executor applies it with accelerate's hooks.

HOST = -1  # a component kept in host memory and run there

# Double + single transformer blocks and width, by the catalog's bf16 transformer size: what a plan needs before
# a model is loaded (FLUX.1: 19 + 38; FLUX.2 [dev]: 8 + 48; klein 4B: 5 + 20; klein 9B: 8 + 24; the demo 2 + 4).
SHAPES = {0.008: (6, 128), 7.75: (25, 3072), 18.2: (32, 4096), 23.8: (57, 3072), 64.4: (56, 6144)}


def catalog_sizes(sizes_gb: dict, dtype_bytes: int = 2, declared_bytes: int = 2) -> ModelSizes | None:
    """A catalog model's sizes for the planner in a dtype of `dtype_bytes`, from the sizes it declares in its own
    dtype (`declared_bytes`: bf16 for the FLUX models, fp32 for the demo); None when it declares none."""
    if not sizes_gb or sizes_gb.get("transformer") not in SHAPES:
        return None
    blocks, hidden = SHAPES[sizes_gb["transformer"]]
    scale = dtype_bytes / declared_bytes
    return ModelSizes(int(sizes_gb["transformer"] * GB * scale), int(sizes_gb["text_encoder"] * GB * scale),
                      int(sizes_gb["vae"] * GB * scale), transformer_blocks=blocks, hidden=hidden)


@dataclass(frozen=True)
class SplitPlan:
    devices: tuple[str, ...]
    transformer: tuple[tuple[int, int, int], ...]  # (device index, first block, end block), in block order
    text_encoder: int  # a device index, or HOST
    vae: int
    batch_size: int
    vae_tiling: bool
    peaks: tuple[int, ...]  # predicted peak bytes per device
    budgets: tuple[int, ...]
    fits: bool

    @property
    def main(self) -> int:
        """The device the denoising loop's tensors live on: the one holding the transformer's first blocks."""
        return self.transformer[0][0]

    @property
    def handovers(self) -> int:
        return len(self.transformer) - 1

    def where(self, index: int) -> str:
        return "the host (CPU)" if index == HOST else self.devices[index]

    def line(self) -> str:
        runs = ", ".join(f"blocks {a}-{b - 1} on {self.devices[d]}" for d, a, b in self.transformer)
        peaks = ", ".join(f"{self.devices[i]} {human(p)} of {human(b)}"
                          for i, (p, b) in enumerate(zip(self.peaks, self.budgets, strict=True)))
        tiling = "VAE tiling on" if self.vae_tiling else "VAE tiling off"
        fit = "" if self.fits else " (does NOT fit)"
        return (f"plan: transformer {runs}; text encoder on {self.where(self.text_encoder)}; VAE on "
                f"{self.where(self.vae)}; {tiling}, batch {self.batch_size}; predicted peaks {peaks}{fit}")

    def as_dict(self) -> dict:
        return {"placement": "split", "devices": list(self.devices), "batch_size": self.batch_size,
                "vae_tiling": self.vae_tiling,
                "transformer": [{"device": self.devices[d], "blocks": [a, b]} for d, a, b in self.transformer],
                "text_encoder": self.where(self.text_encoder), "vae": self.where(self.vae),
                "predicted_peak_gb": [round(p / GB, 2) for p in self.peaks],
                "budget_gb": [round(b / GB, 2) for b in self.budgets]}


def human(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1024**2:.1f} MB"


def split_plan(sizes: ModelSizes, devices: tuple[str, ...], budgets: tuple[int, ...], width: int, height: int,
               batch: int, *, reserve: int = GB // 2, text_tokens: int = 512, dtype_bytes: int = 2,
               ref_tokens: int = 0, activation_scale: float = 1.0) -> SplitPlan:
    """Place one model over `devices` (each with its budget in bytes). Pure and deterministic.

    The transformer goes whole onto the first device that holds it with its activations; otherwise onto the
    fewest devices whose room adds up (largest rooms first, then used in the order given), its blocks cut into
    consecutive runs, each device also holding the activations of the block it runs. The text encoder and the
    VAE (with its decode) then take the first device with room left, or stay on the host. The batch halves until
    the plan fits; `fits` is False when even batch 1 does not (the caller falls back to one device's ladder).
    """
    rooms = [b - reserve for b in budgets]
    blocks = max(1, sizes.transformer_blocks)
    per_block = sizes.transformer // blocks
    base = sizes.transformer - per_block * blocks  # embedders and the output layer: with the first run

    def act(b):
        return int(activation_scale * activation_bytes(width, height, b, sizes.hidden, text_tokens, dtype_bytes,
                                                       ref_tokens))

    def attempt(b: int, tiling: bool) -> SplitPlan:
        used = [0] * len(devices)
        need = sizes.transformer + act(b)
        whole = next((i for i, r in enumerate(rooms) if r >= need), None)
        if whole is not None:
            runs = [(whole, 0, blocks)]
            used[whole] = need
        else:
            runs = _cut(rooms, blocks, per_block, base, act(b))
            for d, first, end in runs:
                used[d] = (end - first) * per_block + act(b) + (base if first == 0 else 0)

        def home(nbytes: int) -> int:
            for i in range(len(devices)):
                if used[i] + nbytes <= rooms[i]:
                    used[i] += nbytes
                    return i
            return HOST

        decode = vae_decode_bytes(min(width, TILE), min(height, TILE), 1) if tiling else vae_decode_bytes(
            width, height, b)
        te = home(sizes.text_encoder)
        vae = home(sizes.vae + decode)
        fits = all(u <= r for u, r in zip(used, rooms, strict=True))
        return SplitPlan(tuple(devices), tuple(runs), te, vae, b, tiling, tuple(used), tuple(budgets), fits)

    plan = None
    for b in _halvings(batch):
        for tiling in (False, True) if width * height <= 2048 * 2048 else (True,):
            plan = attempt(b, tiling)
            if plan.fits and (plan.vae != HOST or tiling):
                return plan
    return plan


def _cut(rooms: list[int], blocks: int, per_block: int, base: int, act: int) -> list[tuple[int, int, int]]:
    """Runs of consecutive blocks over the fewest devices: 2, 3, ... devices, those with the most room (ties in
    the order given), filled in the order given. When even all of them fall short, every device is used and the
    last run takes the blocks left (over its budget: the plan then says it does not fit)."""
    order = sorted(range(len(rooms)), key=lambda i: (-rooms[i], i))

    def fill(chosen: list[int], force_last: bool = False):
        runs, start = [], 0
        for n, d in enumerate(chosen):
            room = rooms[d] - act - (base if start == 0 else 0)
            take = blocks if per_block == 0 else max(0, room // per_block)
            end = blocks if force_last and n == len(chosen) - 1 else min(blocks, start + take)
            if end > start:
                runs.append((d, start, end))
            start = end
        return runs, start

    for k in range(2, len(rooms) + 1):
        runs, done = fill(sorted(order[:k]))
        if done >= blocks:
            return runs
    return fill(list(range(len(rooms))), force_last=True)[0]
