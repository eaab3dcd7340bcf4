"""fluxlab against diffusers' Flux2KleinPipeline on the same full-size klein-4B files (bench/build_klein4b.py).

    python bench/compare.py [--model bench/cache/klein-4b] [--runs 3] [--size 512] [--steps 4]
    python bench/compare.py --tiny        # the same comparison on a tiny random model, in seconds

Each tool runs in its own process, `--runs` times; the medians are reported: wall time (process start to
exit), peak RSS (the child's ru_maxrss), phase times, and the FLOP floor: the FLOPs the generation needs
(text encoding up to the deepest layer FLUX.2 reads, the transformer steps, the VAE decode; counted with
torch's FlopCounterMode on meta tensors) divided by the matmul rate measured in this run.

diffusers runs in the fastest configuration that fits this machine: bf16 where bf16 is fast (AMX); otherwise
fp32 when an fp32 copy of every model fits in the memory available, else bf16 (the only one that fits) - or
not at all when the FLOP floor at the bf16 rate exceeds --max-minutes, which is then said, with why.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def matmul_tflops(seconds: float = 3.0, dtype: str = "bfloat16") -> float:
    """Matmul throughput of this machine in `dtype`, on a transformer-shaped product."""
    import torch

    a = torch.randn(1536, 3072, dtype=getattr(torch, dtype))
    b = torch.randn(3072, 9216, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1536 * 3072 * 9216 * n / (time.perf_counter() - t0) / 1e12


def work_flops(model_dir: Path, size: int, steps: int) -> dict:
    """FLOPs of encoding, denoising and decoding, counted on meta tensors (no real compute)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from fluxlab.spec.catalog import text_encoder_layers

    def count(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    # The encoder analytically (its mask code cannot run on meta tensors): 2 FLOPs per weight per token in the
    # projections and MLP, plus the two attention products, for the layers FLUX.2 reads.
    cfg = AutoConfig.from_pretrained(model_dir / "text_encoder")
    layers, t, d = max(text_encoder_layers(cfg.num_hidden_layers)), 512, cfg.hidden_size
    heads, kv, hd, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = 2 * t * (d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * inter) + 4 * t * t * heads * hd
    enc = layers * per_layer
    with torch.device("meta"):
        tcfg = Flux2Transformer2DModel.load_config(model_dir / "transformer")
        tr = Flux2Transformer2DModel.from_config(tcfg).to(torch.bfloat16)
        vae = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(model_dir / "vae")).to(torch.bfloat16)
        n = (size // 16) ** 2
        img_ids = torch.zeros(1, n, 4, dtype=torch.long)
        txt_ids = torch.zeros(1, 512, 4, dtype=torch.long)
        step = count(lambda: tr(hidden_states=torch.zeros(1, n, tcfg["in_channels"], dtype=torch.bfloat16),
                                encoder_hidden_states=torch.zeros(1, 512, tcfg["joint_attention_dim"],
                                                                  dtype=torch.bfloat16),
                                timestep=torch.ones(1, dtype=torch.bfloat16), img_ids=img_ids, txt_ids=txt_ids))
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.zeros(1, vae.config.latent_channels, size // scale, size // scale, dtype=torch.bfloat16)
        dec = count(lambda: vae.decode(z))
    return {"encode": enc, "denoise": steps * step, "decode": dec}


def diffusers_dtype(model: Path, fast_bf16: bool) -> tuple[str, str]:
    """The fastest diffusers dtype this machine can hold, and why."""
    if fast_bf16:
        return "bfloat16", "bf16 is this CPU's fastest arithmetic (measured)"
    stored = sum(f.stat().st_size for f in model.rglob("*.safetensors"))  # bf16 files: 2 bytes a weight
    need = stored * 2
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    if need < 0.8 * avail:
        return "float32", f"fp32 is faster on this CPU; its {need / 2**30:.1f} GiB fit in {avail / 2**30:.1f} GiB"
    return "bfloat16", (f"fp32 would be faster here, but fp32 weights need {need / 2**30:.1f} GiB and "
                        f"{avail / 2**30:.1f} GiB are available: bf16 is the configuration that fits")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "bench/cache/klein-4b"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead (quick check)")
    ap.add_argument("--tools", default="fluxlab,diffusers")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="skip a tool whose FLOP floor exceeds this")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = Path(a.model)
    if a.tiny:
        from fluxlab.tiny import build_tiny

        model = build_tiny("flux2-klein", tmp / "tiny")
    from fluxlab.runtime.devices import bf16_matmul_is_faster, cpu_summary

    rates = {"bfloat16": matmul_tflops(), "float32": matmul_tflops(dtype="float32")}
    flops = work_flops(model, a.size, a.steps)
    work = sum(flops.values())
    print(f"machine: {cpu_summary()}; matmul bf16 {rates['bfloat16']:.3f} TFLOP/s, fp32 "
          f"{rates['float32']:.3f} TFLOP/s")
    print(f"work: encode {flops['encode'] / 1e12:.2f} + denoise {flops['denoise'] / 1e12:.2f} + decode "
          f"{flops['decode'] / 1e12:.2f} TFLOP", flush=True)
    # fluxlab multiplies in fp32 where that is faster (bf16 weights upcast per layer, devices.upcast_linears).
    compute = {"fluxlab": "bfloat16" if bf16_matmul_is_faster() else "float32"}
    compute["diffusers"], why = diffusers_dtype(model, bf16_matmul_is_faster())
    print(f"diffusers configuration: {compute['diffusers']} ({why})")
    py = sys.executable
    cmds = {
        "fluxlab": lambda i: [py, "-m", "fluxlab", "generate", "a red circle in the top left on a white background",
                              "-m", str(model), "-W", str(a.size), "-H", str(a.size), "--steps", str(a.steps),
                              "--seed", "0", "--dtype", "bf16", "--device", "cpu", "-q", "-o",
                              str(tmp / f"fluxlab-{i}.png"), "--report", str(tmp / f"fluxlab-{i}.json")],
        "diffusers": lambda i: [py, str(ROOT / "bench/diffusers_run.py"), str(model), str(tmp / f"diffusers-{i}.png"),
                                "--size", str(a.size), "--steps", str(a.steps), "--report",
                                str(tmp / f"diffusers-{i}.json"), "--dtype", compute["diffusers"]],
    }
    results = {}
    for tool in a.tools.split(","):
        floor_min = work / (rates[compute[tool]] * 1e12) / 60
        if floor_min > a.max_minutes:
            print(f"{tool}: not run: at this machine's {compute[tool]} rate its FLOP floor alone is "
                  f"{floor_min:.0f} min (over --max-minutes {a.max_minutes:.0f})")
            continue
        walls, rss, gens = [], [], []
        for i in range(a.runs):
            wall, peak = run_child(cmds[tool](i))
            rep = json.loads((tmp / f"{tool}-{i}.json").read_text())
            phases = rep["phases_s"] if tool == "fluxlab" else rep["phases"]
            gen = sum(phases[k] for k in ("encode", "denoise", "decode"))
            walls.append(wall)
            rss.append(peak)
            gens.append(gen)
            print(f"{tool} run {i + 1}: wall {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB, "
                  f"phases {json.dumps({k: round(v, 2) for k, v in phases.items()})}", flush=True)
        results[tool] = {"wall_s": statistics.median(walls), "peak_rss_gib": statistics.median(rss) / 2**30,
                         "generate_s": statistics.median(gens), "phases": phases}
    floors = {}
    for tool, r in results.items():
        floors[tool] = work / (rates[compute[tool]] * 1e12)
        print(f"{tool}: wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, generation "
              f"{r['generate_s']:.1f} s = {r['generate_s'] / floors[tool]:.2f}x its floor ({floors[tool]:.1f} s at "
              f"the {compute[tool]} rate)")
    floor = floors
    if "fluxlab" in results and "diffusers" in results:
        f, d = results["fluxlab"], results["diffusers"]
        print(f"ratios fluxlab/diffusers: wall {f['wall_s'] / d['wall_s']:.2f}x, peak RSS "
              f"{f['peak_rss_gib'] / d['peak_rss_gib']:.2f}x")
    print(json.dumps({"results": results, "floor_s": floor, "tflops": rates, "flops": flops}))


if __name__ == "__main__":
    main()
