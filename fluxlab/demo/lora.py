"""The LoRA proof: teach the demo model a shape it has never seen, with `fluxlab train`, and measure it.

    python -m fluxlab.demo.lora [--out DIR] [--model DIR] [--steps N --batch N --lr X]

The demo model knows circles, squares and triangles. Twenty images of a ring (a disc with a hole), captioned
with the made-up word "zxq" ("a red zxq in the top left on a white background"), train a LoRA through the
same `fluxlab train CONFIG.yaml` a user runs (with twenty images of known scenes beside them, for prior
preservation, and loss masks on the shapes as the demo model was trained with). Then, with the LoRA loaded:

* prompts with the trigger ("a zxq in the center", and zxq captions in colours, places and backgrounds absent
  from the twenty images) should draw rings (the evaluator reads the shape);
* the demo's own prompts (circle, square, triangle, no trigger) should not, and should keep their shapes.
"""

from __future__ import annotations

import argparse
import itertools
import random
import subprocess
import sys
from pathlib import Path

from . import data
from .build import Settings, write_masks
from .evaluate import Tally, read

TRIGGER = "zxq"
# Rings drawn for zxq prompts in unseen colours and places grew with the samples seen: batch 4 for 300 steps
# -> 2%, 1000 -> 20%, 3000 -> 32-37%; batch 8 for 3000 steps -> 46% (about 7 min). Still short of the 90% goal.
STEPS, BATCH, LR = 3000, 8, 2e-3


def ring_scenes(count: int, seed: int, exclude: set = frozenset()):
    """`count` distinct ring scenes (colour, position, background, size), chosen by seed."""
    combos = [c for c in itertools.product(data.COLOURS, data.POSITIONS, data.SIZES, data.BACKGROUNDS)
              if c not in exclude]
    random.Random(seed).shuffle(combos)
    return [data.Scene(c, data.NEW_SHAPE, p, s, b) for c, p, s, b in combos[:count]]


def caption(scene: data.Scene) -> str:
    return scene.caption.replace(data.NEW_SHAPE, TRIGGER)


def write_dataset(folder: Path, count: int = 20, seed: int = 0) -> list[data.Scene]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = ring_scenes(count, seed)
    for i, s in enumerate(scenes):
        data.render(s, seed=i).save(folder / f"ring_{i:02d}.png")
        (folder / f"ring_{i:02d}.txt").write_text(caption(s) + "\n")
    return scenes


def write_regularisation(folder: Path, count: int = 20) -> None:
    """Images of what the model already knows, with their captions (prior preservation): without them a LoRA
    on every layer learns "everything is a ring" as readily as "zxq is a ring"."""
    folder.mkdir(parents=True, exist_ok=True)
    train = list(data.scenes("train"))
    for i, s in enumerate(train[:: len(train) // count][:count]):
        data.render(s, seed=500 + i).save(folder / f"plain_{i:02d}.png")
        (folder / f"plain_{i:02d}.txt").write_text(s.caption + "\n")


def write_config(path: Path, dataset: Path, regularisation: Path, out: Path, model: str = "demo",
                 steps: int = STEPS, batch: int = BATCH, lr: float = LR) -> Path:
    """An ai-toolkit-style config, as a user would write it for this model."""
    import yaml

    cfg = {"job": "extension", "config": {"name": "zxq", "process": [{
        "type": "sd_trainer", "training_folder": str(out), "device": "cpu", "trigger_word": TRIGGER,
        "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
        "save": {"dtype": "float32", "save_every": steps, "max_step_saves_to_keep": 1},
        "datasets": [{"folder_path": str(d), "caption_dropout_rate": 0.0, "resolution": [64],
                      "mask_path": str(d) + "-masks", "mask_min_value": Settings.mask_floor}
                     for d in (dataset, regularisation)],
        "train": {"batch_size": batch, "steps": steps, "lr": lr, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False, "seed": 0},
        "model": {"name_or_path": model},
    }]}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(out: Path, model: str = "demo", steps: int = STEPS, batch: int = BATCH, lr: float = LR) -> Path:
    """Train the LoRA with the CLI, in its own process; returns the LoRA file."""
    write_dataset(out / "rings")
    write_regularisation(out / "plain")
    for name in ("rings", "plain"):
        write_masks(out / name, out / f"{name}-masks")
    cfg = write_config(out / "zxq.yaml", out / "rings", out / "plain", out / "runs", model, steps, batch, lr)
    subprocess.run([sys.executable, "-m", "fluxlab", "train", str(cfg)], check=True)
    return out / "runs" / "zxq" / "zxq.safetensors"


def measure(pipe, seeds: int = 1) -> dict[str, Tally | float]:
    """Ring rates with and without the trigger, plus the usual adherence of both kinds of prompt."""
    trained = {(s.colour, s.position, s.size, s.background) for s in ring_scenes(20, 0)}
    new = ring_scenes(40, 1, exclude=trained)
    with_trigger, without = Tally(), Tally()
    rings_with = rings_without = 0
    prompts = [(f"a {TRIGGER} in the center", None, "center")] + \
        [(caption(s), s.colour, s.position) for s in new]
    for i, (prompt, colour, position) in enumerate(prompts):
        for k in range(seeds):
            r = read(pipe.generate(prompt=prompt, seed=1000 * k + i)[0].image)
            with_trigger.add(r, colour, data.NEW_SHAPE, position)
            rings_with += r.shape == data.NEW_SHAPE
    plain = list(data.scenes("heldout"))[::2] + list(data.scenes("train"))[::22]
    for i, s in enumerate(plain):
        for k in range(seeds):
            r = read(pipe.generate(prompt=s.caption, seed=1000 * k + i)[0].image)
            without.add(r, s.colour, s.shape, s.position)
            rings_without += r.shape == data.NEW_SHAPE
    return {"with": with_trigger, "without": without, "ring_with": rings_with / with_trigger.n,
            "ring_without": rings_without / without.n}


def main(argv: list[str] | None = None) -> None:
    from .. import load
    from .evaluate import table

    ap = argparse.ArgumentParser(prog="python -m fluxlab.demo.lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("output/demo-lora"))
    ap.add_argument("--model", default="demo", help="the model to teach (default: the bundled demo model)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=LR)
    a = ap.parse_args(argv)
    lora = train(a.out, a.model, a.steps, a.batch, a.lr)
    quiet = dict(notify=lambda m: None)
    base = measure(load(a.model, **quiet))
    tuned = measure(load(a.model, loras=[(str(lora), 1.0)], **quiet))
    print(table({"base, zxq prompts": base["with"], "base, plain prompts": base["without"],
                 "LoRA, zxq prompts": tuned["with"], "LoRA, plain prompts": tuned["without"]}))
    print(f"rings drawn: base {base['ring_with']:.0%} with the trigger, {base['ring_without']:.0%} without; "
          f"LoRA {tuned['ring_with']:.0%} with the trigger, {tuned['ring_without']:.0%} without")


if __name__ == "__main__":
    main()
