"""One model over several devices against one device, in one process: denoising time, the hand-over's cost, and
the peak memory of each device.

    .venv/bin/python bench/split_devices.py -m flux2-klein-4b --devices cuda:0,cuda:1 [--budget 6GB] [--size 512]
    .venv/bin/python bench/split_devices.py -m demo --devices cpu,cpu --budget 12MB       # the code path, on a CPU

Runs the first device alone, then the list (with `--budget`, each device's budget, which is what forces a cut for
a model that would fit one device), with the same seeds, and prints both plans, the denoise time of each, the
largest latent difference and, on GPUs, each device's peak allocated memory.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse


def run(model: str, device: str, budget: str | None, size: int, steps: int | None, seeds: int):
    import torch

    import fluxlab

    said = []
    pipe = fluxlab.load(model, device=device, budget=budget, notify=said.append)
    for d in pipe.devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    kw = dict(prompt="a red circle in the top left on a white background", width=size, height=size)
    if steps:
        kw["steps"] = steps
    results = list(pipe.generate_iter(**kw, seed=0, num_images=seeds, batch_size=1))
    peaks = {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in pipe.devices if d.type == "cuda"}
    denoise = sum(r.timings.get("denoise", 0.0) for r in results)
    plan = next((m for m in reversed(said) if m.startswith("plan:")), "plan: (none printed: resident)")
    return torch.cat([r.latents for r in results]), denoise, peaks, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--devices", required=True)
    ap.add_argument("--budget")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    from fluxlab.runtime.devices import cpu_summary
    from fluxlab.spec.catalog import CATALOG

    size = a.size or (CATALOG[a.model].default_size[0] if a.model in CATALOG else 512)
    print(cpu_summary())
    one, t1, p1, plan1 = run(a.model, a.devices.split(",")[0], None, size, a.steps, a.seeds)
    many, t2, p2, plan2 = run(a.model, a.devices, a.budget, size, a.steps, a.seeds)
    print(f"one device:  {plan1}\n  denoise {t1:.2f} s, peaks {p1 or 'host memory'}")
    print(f"{a.devices}: {plan2}\n  denoise {t2:.2f} s ({t2 / t1:.2f}x), peaks {p2 or 'host memory'}")
    print(f"largest latent difference: {(one.float() - many.float()).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
