"""How long the README's first command takes with the bundled demo model, cold, split into its parts.

    python bench/demo_latency.py [--runs 5]

Each run is a fresh process (`fluxlab generate ... -m demo --report F.json`), so imports and loading are paid
every time, as a newcomer pays them. Reported as medians: the whole command's wall time; a bare `import
torch`; importing torch and the three model classes the demo runs (diffusers' Flux2Transformer2DModel and
AutoencoderKLFlux2, transformers' Qwen3Model: the floor no diffusers-based command can go under, since
diffusers imports torch._dynamo and peft with them); and the phases fluxlab measured inside the command
(load, encode, denoise, decode, save). "Generation" is encode + prepare + denoise + decode: the work after the
models are loaded.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle in the top left on a white background"
CLASSES = ("import torch\nfrom diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel\n"
           "from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2\n"
           "from transformers.models.qwen3.modeling_qwen3 import Qwen3Model")


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    fluxlab = str(Path(sys.executable).with_name("fluxlab"))
    torches, imports, walls, phases = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            torches.append(wall([sys.executable, "-c", "import torch"]))
            imports.append(wall([sys.executable, "-c", CLASSES]))
            report = Path(tmp) / f"r{i}.json"
            walls.append(wall([fluxlab, "generate", PROMPT, "-m", "demo", "-o", str(Path(tmp) / f"{i}.png"),
                               "--report", str(report), "--quiet"]))
            phases.append(json.loads(report.read_text())["phases_s"])
    med = statistics.median
    gen = med([p["encode"] + p["prepare"] + p["denoise"] + p["decode"] for p in phases])
    print(f"runs: {a.runs} cold processes, medians")
    print(f"whole command (wall):              {med(walls):.2f} s")
    print(f"import torch:                      {med(torches):.2f} s (own process)")
    print(f"import torch + the demo's classes: {med(imports):.2f} s (own process)")
    for k in ("load", "encode", "prepare", "denoise", "decode", "save"):
        print(f"  {k:8s} {med([p[k] for p in phases]):.3f} s")
    print(f"generation (encode..decode):       {gen:.3f} s")


if __name__ == "__main__":
    main()
