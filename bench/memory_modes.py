"""Peak memory and wall time of fluxlab's low-memory modes against diffusers' default pipeline, same files.

    python bench/memory_modes.py [--model bench/cache/klein-4b] [--size 512] [--steps 4] [--modes ...]

Modes: diffusers, bf16 (fluxlab's default plan), low (--memory low), int8 (--quantize int8), q8_0 / q4_0 (a GGUF
transformer written by `fluxlab quantize`), joined with + (q4_0+int8: GGUF transformer, int8 text encoder).

Each configuration runs in its own process (bench/compare.run_child: wall from start to exit, peak RSS from the
kernel's ru_maxrss). The GGUF files are written first with `fluxlab quantize` (Q8_0, Q4_0). Ratios are against
diffusers' Flux2KleinPipeline in bf16 with everything resident, the configuration people start from.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, run_child

PROMPT = "a red circle in the top left on a white background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "bench/cache/klein-4b"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workdir", help="keep the GGUF files and images here (GGUF files found there are reused)")
    ap.add_argument("--modes", default="diffusers,bf16,low,int8,q8_0,q8_0+int8,q4_0+int8")
    a = ap.parse_args()
    from fluxlab.runtime.devices import cpu_summary

    tmp = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    modes = a.modes.split(",")
    ggufs = {}
    for kind in ("q8_0", "q4_0"):
        if any(m.startswith(kind) for m in modes):
            ggufs[kind] = tmp / f"{kind}.gguf"
            if ggufs[kind].is_file():
                continue
            t0 = time.perf_counter()
            wall, peak = run_child([py, "-m", "fluxlab", "quantize", a.model, "--to", kind, "-o", str(ggufs[kind])])
            print(f"fluxlab quantize --to {kind}: {time.perf_counter() - t0:.0f} s, peak RSS {peak / 2**30:.2f} GiB, "
                  f"{ggufs[kind].stat().st_size / 2**30:.2f} GiB file", flush=True)
    print(f"machine: {cpu_summary()}")
    results = {}
    for mode in modes:
        if mode == "diffusers":
            cmd = [py, str(ROOT / "bench/diffusers_run.py"), a.model, str(tmp / "d.png"), "--size", str(a.size),
                   "--steps", str(a.steps), "--report", str(tmp / "d.json")]
        else:
            cmd = [py, "-m", "fluxlab", "generate", PROMPT, "-m", a.model, "-W", str(a.size), "-H", str(a.size),
                   "--steps", str(a.steps), "--seed", "0", "--dtype", "bf16", "-q", "-o", str(tmp / f"{mode}.png")]
            for part in mode.split("+"):
                if part in ggufs:
                    cmd += ["--transformer", str(ggufs[part])]
                elif part == "int8":
                    cmd += ["--quantize", "int8"]
                elif part == "low":
                    cmd += ["--memory", "low"]
        wall, peak = run_child(cmd)
        results[mode] = {"wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2)}
        print(f"{mode:12s} wall {wall:7.1f} s  peak RSS {peak / 2**30:6.2f} GiB", flush=True)
    if "diffusers" in results:
        d = results["diffusers"]
        for r in results.values():
            r["rss_vs_diffusers"] = round(r["peak_rss_gib"] / d["peak_rss_gib"], 2)
            r["wall_vs_diffusers"] = round(r["wall_s"] / d["wall_s"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
