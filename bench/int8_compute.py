"""int8 that computes in int8: klein-4B-shaped layers at 512x512, side by side in one process.

    .venv/bin/python bench/int8_compute.py [--tokens 1536] [--repeats 3]

Times one double-stream block's worth of products of FLUX.2 klein-4B (hidden 3072, MLP 9216) over the tokens
of a 512x512 image plus its prompt, in fp32, bf16, int8 weight-only (dequantized per product) and int8 x int8
(dynamic activations, what int8_matmul_is_faster picks where it wins), and prints each as a ratio to the
fastest of fp32/bf16, with the relative error against fp32. The CPU's flags are printed first: int8 x int8
pays only with VNNI / AMX-INT8 units.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import copy
import time

SHAPES = [(3072, 3 * 3072), (3072, 3072), (3072, 2 * 9216), (9216, 3072)]  # qkv, out, MLP in (gated), MLP out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    from fluxlab.runtime.devices import cpu_flags, cpu_summary
    from fluxlab.runtime.loading import quiet_libraries
    from fluxlab.runtime.quantize import INT8_DOT, int8_activations, quantize_model

    quiet_libraries()
    torch.manual_seed(0)
    print(cpu_summary(), "| int8 dot-product flags:", " ".join(f for f in INT8_DOT if f in cpu_flags()) or "none")
    layers = [torch.nn.Linear(i, o, bias=False) for i, o in SHAPES]
    x = {i: torch.randn(a.tokens, i) for i, _ in SHAPES}

    def variant(kind):
        out = [copy.deepcopy(m) for m in layers]
        for m in out:
            if kind == "bf16":
                m.to(torch.bfloat16)
            elif kind.startswith("int8"):
                quantize_model(m, "int8", None)
                if kind == "int8 x int8":
                    int8_activations(m)
        return out

    def run(ms, kind):
        dt = torch.bfloat16 if kind == "bf16" else torch.float32
        return [m(x[m.in_features].to(dt)).float() for m in ms]

    rows = {}
    with torch.no_grad():
        ref = run(layers, "fp32")
        for kind in ("fp32", "bf16", "int8 weight-only", "int8 x int8"):
            ms = variant(kind)
            out = run(ms, kind)  # warm-up, and the error
            err = max(((o - r).norm() / r.norm()).item() for o, r in zip(out, ref, strict=True))
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                run(ms, kind)
                best = min(best, time.perf_counter() - t0)
            rows[kind] = (best, err)
            print(f"  {kind:18s} {best:8.3f} s   rel. error vs fp32 {err:.4f}", flush=True)
    floor = min(rows["fp32"][0], rows["bf16"][0])
    print("ratio to the fastest of fp32/bf16:", ", ".join(f"{k} {t / floor:.2f}x" for k, (t, _) in rows.items()))


if __name__ == "__main__":
    main()
