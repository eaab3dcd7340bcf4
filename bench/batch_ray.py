"""Images per second of `fluxlab batch` on a local Ray cluster with 1 and 2 workers, and the local engine, on the
bundled demo model (one run each, in this process; a fresh folder each time, so nothing is skipped).

    python bench/batch_ray.py [--prompts 4] [--seeds 8] [--steps 20]

On a 2-core machine expect no speed-up from a second worker (each worker computes with one thread; two share the
same two cores with the driver). The point is that the same command runs unchanged on a cluster, where each
worker has its own GPU: `--ray-address ADDR --workers N --gpus-per-worker 1`.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import os
import platform
import tempfile
from pathlib import Path

PROMPTS = ["a red circle in the center on a white background", "a blue square at the top on a black background",
           "a green triangle in the bottom left on a gray background", "a small yellow circle on a white background",
           "a purple square in the top right on a white background", "a large orange triangle in the center"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    import ray

    from fluxlab import batch

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS[: a.prompts]) + "\n")
        plan = batch.make_plan(prompts, "demo", seeds=f"0-{a.seeds - 1}", steps=a.steps)
        from fluxlab.runtime.devices import cpu_summary

        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
        print(f"{cpu_summary() or platform.machine()}, {os.cpu_count()} CPUs, load average {load} at the start; "
              f"demo model, {a.prompts} prompts x {a.seeds} seeds, {a.steps} steps, 1 thread per worker")
        runs = [("local", 1), ("ray", 1), ("ray", 2)]
        rates = {}
        for engine, workers in runs:
            report = batch.run(plan, Path(tmp) / f"{engine}-{workers}", engine=engine, workers=workers)
            rates[(engine, workers)] = report.images_per_s
            print(f"{engine:5s} x{workers}: {report.made} images in {report.seconds:.1f} s = "
                  f"{report.images_per_s:.2f} images/s (model loading included)")
        print(f"ray 2 workers / 1 worker: {rates[('ray', 2)] / rates[('ray', 1)]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
