"""A demo generation's denoising alone, and beside a `fluxlab train` run computing on the same machine.

    python bench/busy_neighbour.py [--runs 3]

The neighbour is a real LoRA training on the demo model (its own process, its own thread decision). Three
numbers, medians of `--runs` fresh `fluxlab generate -m demo` processes each:
  alone                  the machine quiet;
  beside training        fluxlab's thread policy (it sees the neighbour and takes the free cores);
  beside, all threads    FLUXLAB_THREADS set to every CPU, as torch would do by default.
The goal is "beside training" within 2.5x of "alone". Run it on a machine with nothing else running.
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
FLUXLAB = str(Path(sys.executable).with_name("fluxlab"))
PROMPT = "a red circle in the top left on a white background"


def denoise(tmp: Path, i: int, env: dict) -> tuple[float, int]:
    report = tmp / f"r{i}.json"
    subprocess.run([FLUXLAB, "generate", PROMPT, "-m", "demo", "-o", str(tmp / f"{i}.png"), "--seed", "1",
                    "--report", str(report), "--quiet"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = json.loads(report.read_text())
    return data["phases_s"]["denoise"], data.get("threads", 0)


def images(folder: Path) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir()
    for k, (colour, where) in enumerate([("red", (8, 8)), ("blue", (32, 8)), ("green", (8, 32)), ("red", (32, 32))]):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse([*where, where[0] + 24, where[1] + 24], outline=colour, width=4)
        im.save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"a {colour} zxq on a white background")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("FLUXLAB_THREADS", "OMP_NUM_THREADS")}
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images(tmp / "imgs")
        alone = [denoise(tmp, i, base) for i in range(a.runs)]
        with open(tmp / "train.log", "w") as log:
            neighbour = subprocess.Popen([FLUXLAB, "train", "--images", str(tmp / "imgs"), "--trigger", "zxq",
                                          "--steps", "100000", "-m", "demo", "--out", str(tmp / "runs")],
                                         cwd=ROOT, env=base, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(20)  # past its imports and loading: computing steps
            if neighbour.poll() is not None:
                sys.exit(f"the training neighbour stopped: {(tmp / 'train.log').read_text()[-2000:]}")
            beside = [denoise(tmp, 10 + i, base) for i in range(a.runs)]
            forced = [denoise(tmp, 20 + i, {**base, "FLUXLAB_THREADS": str(cpus)}) for i in range(a.runs)]
        finally:
            neighbour.kill()
            neighbour.wait()
    med = statistics.median
    t_alone, t_beside, t_forced = (med(x for x, _ in r) for r in (alone, beside, forced))
    from fluxlab.runtime.devices import cpu_summary

    print(f"machine: {cpu_summary()}; medians of {a.runs}")
    print(f"denoise alone:                      {t_alone:.3f} s  ({alone[0][1]} thread(s))")
    print(f"denoise beside training (policy):   {t_beside:.3f} s  ({beside[0][1]} thread(s))  "
          f"{t_beside / t_alone:.2f}x alone")
    print(f"denoise beside training, {cpus} threads: {t_forced:.3f} s  {t_forced / t_alone:.2f}x alone")


if __name__ == "__main__":
    main()
