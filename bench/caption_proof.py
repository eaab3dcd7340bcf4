"""What captioning buys, on the demo: the LoRA proof's recipe (fluxlab.demo.lora) trained three times on the
same twenty ring images, with their hand captions, with captions written by the demo captioner (what `fluxlab
caption -m demo --trigger zxq --detail detailed` writes), and with none (each image trains on the trigger word
alone), then measured the same way: rings drawn for the proof's zxq prompts.

    .venv/bin/python bench/caption_proof.py [--out DIR] [--steps N]

Each training is the proof's full run (3000 steps, about 6-10 minutes on a CPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def prepare(variant: str, root: Path) -> Path:
    """The variant's folder: the proof's twenty rings and forty known scenes, with the rings' captions as the
    variant has them."""
    from fluxlab.demo import lora
    from fluxlab.demo.build import write_masks
    from fluxlab.service.caption import caption

    out = root / variant
    lora.write_dataset(out / "rings")
    lora.write_regularisation(out / "plain")
    for name in ("rings", "plain"):
        write_masks(out / name, out / f"{name}-masks")
    if variant != "hand":
        for f in (out / "rings").glob("*.txt"):
            f.unlink()
    if variant == "auto":
        caption(out / "rings", "demo", trigger=lora.TRIGGER, detail="detailed")
    return out


def same_captions(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in (a / "rings").glob("*.txt"))
    return files == sorted(p.name for p in (b / "rings").glob("*.txt")) and all(
        (a / "rings" / f).read_bytes() == (b / "rings" / f).read_bytes() for f in files)


def run(variant: str, root: Path, steps: int) -> dict:
    from fluxlab import load
    from fluxlab.demo import lora

    out = root / variant
    cfg = lora.write_config(out / "zxq.yaml", out / "rings", out / "plain", out / "runs", steps=steps)
    if not (out / "runs" / "zxq" / "zxq.safetensors").is_file():  # a finished run is measured again, not retrained
        subprocess.run([sys.executable, "-m", "fluxlab", "train", str(cfg)], check=True, stdout=subprocess.DEVNULL)
    pipe = load("demo", loras=[(str(out / "runs" / "zxq" / "zxq.safetensors"), 1.0)], notify=lambda m: None)
    m = lora.measure(pipe, plain=False)
    placed = [g for g in lora.trigger_prompts() if g != lora.NO_PLACE]
    return {"full unseen descriptions": m["full unseen descriptions"].rates()["shape"],
            "placed zxq prompts": lora.shown(m, placed)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/cache/caption-proof"))
    ap.add_argument("--steps", type=int, default=3000)
    a = ap.parse_args(argv)
    rows = {}
    for variant in ("hand", "auto", "none"):
        prepare(variant, a.out)
    for variant in ("hand", "auto", "none"):
        if variant == "auto" and same_captions(a.out / "auto", a.out / "hand"):
            # The same images, masks, config and captions, byte for byte: the training (seeded, fp32) is the hand
            # run's, so it is not run twice.
            print("auto  captions: byte-identical to the hand captions for all twenty rings: the same training",
                  flush=True)
            rows[variant] = rows["hand"]
            continue
        rows[variant] = run(variant, a.out, a.steps)
        print(f"{variant:5s} captions: rings for full unseen descriptions "
              f"{rows[variant]['full unseen descriptions']:.0%}, for all placed zxq prompts "
              f"{rows[variant]['placed zxq prompts']:.0%}", flush=True)
    gap = abs(rows["auto"]["full unseen descriptions"] - rows["hand"]["full unseen descriptions"]) * 100
    print(f"demo-captioned vs hand-captioned, full unseen descriptions: {gap:.0f} points apart (goal <= 5)")


if __name__ == "__main__":
    main()
