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
# Rings drawn for full zxq descriptions in unseen colours and places grew with the samples seen: batch 4 for 300
# steps -> 2%, 1000 -> 20%, 3000 -> 32-37%; batch 8 for 3000 steps -> 46% (about 6 min). At 3000 x 8, rank 4,
# guidance 7 or LoRA scale 1.5 did no better, linear_alpha 32 -> 0%, and more caption variants (a "a red zxq"
# line) -> 33%. The base model itself draws the circle asked for in only 70% of those descriptions' seeds.
STEPS, BATCH, LR = 3000, 8, 2e-3


def ring_scenes(count: int, seed: int, exclude: set = frozenset()):
    """`count` distinct ring scenes (colour, position, background), chosen by seed, small and large in turn.

    Both sizes in equal numbers: a small ring's hole is a couple of latent pixels wide, and small rings were the
    ones the LoRA missed (a random draw of 20 had 7 small ones)."""
    combos = [c for c in itertools.product(data.COLOURS, data.POSITIONS, data.SIZES, data.BACKGROUNDS)
              if c not in exclude]
    random.Random(seed).shuffle(combos)
    sizes, picked = list(data.SIZES), []
    for i in range(count):
        picked.append(next(c for c in combos if c[2] == sizes[i % 2] and c not in picked))
    return [data.Scene(c, data.NEW_SHAPE, p, s, b) for c, p, s, b in picked]


def caption(scene: data.Scene) -> str:
    return scene.caption.replace(data.NEW_SHAPE, TRIGGER)


def captions(scene: data.Scene) -> list[str]:
    """The full caption and shorter ones (as the demo model was trained with), one per line of the caption file
    (caption_per_line), so that "a zxq in the center" works as well as a full description; a ring is a zxq."""
    drops = [("colour",), ("position",), ("background",), ("colour", "background")]
    return [c.replace(data.NEW_SHAPE, TRIGGER) for c in [scene.caption] + [scene.short_caption(*d) for d in drops]]


def write_dataset(folder: Path, count: int = 20, seed: int = 0) -> list[data.Scene]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = ring_scenes(count, seed)
    for i, s in enumerate(scenes):
        data.render(s, seed=i).save(folder / f"ring_{i:02d}.png")
        (folder / f"ring_{i:02d}.txt").write_text("\n".join(captions(s)) + "\n")
    return scenes


def write_regularisation(folder: Path, count: int = 40) -> None:
    """Images of what the model already knows, with their captions (prior preservation): without them a LoRA
    on every layer learns "everything is a ring" as readily as "zxq is a ring"."""
    folder.mkdir(parents=True, exist_ok=True)
    train = list(data.scenes("train"))
    for i, s in enumerate(train[:: len(train) // count][:count]):
        data.render(s, seed=500 + i).save(folder / f"plain_{i:02d}.png")
        (folder / f"plain_{i:02d}.txt").write_text("\n".join(captions(s)) + "\n")


def write_config(path: Path, dataset: Path, regularisation: Path, out: Path, model: str = "demo",
                 steps: int = STEPS, batch: int = BATCH, lr: float = LR) -> Path:
    """An ai-toolkit-style config, as a user would write it for this model."""
    import yaml

    cfg = {"job": "extension", "config": {"name": "zxq", "process": [{
        "type": "sd_trainer", "training_folder": str(out), "device": "cpu", "trigger_word": TRIGGER,
        # Blocks only: the embedders, modulations and output layer serve every prompt, and leaving them alone
        # keeps the demo's own shapes intact (rings with the trigger 35% -> 48% on full descriptions).
        "network": {"type": "lora", "linear": 16, "linear_alpha": 16,
                    "network_kwargs": {"ignore_if_contains": ["embed", "modulation", "norm_out", "proj_out"]}},
        "save": {"dtype": "float32", "save_every": steps, "max_step_saves_to_keep": 1},
        "datasets": [{"folder_path": str(d), "caption_dropout_rate": 0.0, "resolution": [64],
                      "mask_path": str(d) + "-masks", "mask_min_value": Settings.mask_floor,
                      "caption_per_line": True, "num_repeats": repeats}
                     # Twice as many known scenes as rings, each ring seen twice: the batches stay half rings, and
                     # the wider prior keeps the demo's own prompts closer to the base model's.
                     for d, repeats in ((dataset, 2), (regularisation, 1))],
        "train": {"batch_size": batch, "steps": steps, "lr": lr, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False, "seed": 0,
                  # Averaged weights smooth the last steps' noise (35% -> 50% on full descriptions).
                  "ema_config": {"use_ema": True, "ema_decay": 0.995}},
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


def trigger_prompts() -> dict[str, list[tuple[str, int, str | None, str | None]]]:
    """(prompt, seed, colour, position) of each group of zxq prompts, none of them a training caption."""
    where = {p: data.PHRASE.get(p, f"in the {p}") for p in data.POSITIONS}
    trained = {(s.colour, s.position, s.size, s.background) for s in ring_scenes(20, 0)}
    return {
        # The issue's own prompt, over seeds.
        f"a {TRIGGER} in the center": [(f"a {TRIGGER} in the center", 100 + k, None, "center") for k in range(20)],
        # Short prompts, as people write them: a place, a colour, a size.
        f"a {TRIGGER} <place> / a <colour> {TRIGGER}":
            [(f"a {TRIGGER} {w}", 200 + 10 * k + i, None, p) for i, (p, w) in enumerate(where.items()) for k in (0, 1)]
            + [(f"a {c} {TRIGGER}", 300 + 10 * k + i, c, None) for i, c in enumerate(data.COLOURS) for k in (0, 1)]
            + [(f"a small {TRIGGER} {where[p]}", 400 + i, None, p) for i, p in enumerate(data.POSITIONS)],
        # Full descriptions of colour x place x size x background combinations absent from the twenty images.
        "full unseen descriptions": [(caption(s), i, s.colour, s.position)
                                     for i, s in enumerate(ring_scenes(40, 1, exclude=trained))],
    }


def measure(pipe) -> dict[str, Tally]:
    """Adherence (the shape asked for: a ring) of each group of zxq prompts, and of the demo's own prompts (a
    circle, square or triangle: a LoRA that draws rings there fails the shape); `rings` counts those rings."""
    out = {}
    for name, prompts in trigger_prompts().items():
        out[name] = Tally()
        for prompt, seed, colour, position in prompts:
            out[name].add(read(pipe.generate(prompt=prompt, seed=seed)[0].image), colour, data.NEW_SHAPE, position)
    plain, rings = Tally(), Tally()
    for i, s in enumerate(list(data.scenes("heldout"))[::2] + list(data.scenes("train"))[::22]):
        r = read(pipe.generate(prompt=s.caption, seed=i)[0].image)
        plain.add(r, s.colour, s.shape, s.position)
        rings.add(r, None, data.NEW_SHAPE, None)
    out["plain prompts (no trigger)"], out["rings"] = plain, rings
    return out


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
    print(table({f"{who}, {name}": m[name] for who, m in (("base", base), ("LoRA", tuned)) for name in m
                 if name != "rings"}))
    with_trigger = [t for name, t in tuned.items() if name not in ("rings", "plain prompts (no trigger)")]
    shown = sum(t.shape for t in with_trigger) / sum(t.n for t in with_trigger)
    print(f"rings drawn with the LoRA: {shown:.0%} of all zxq prompts (goal >= 90%), "
          f"{tuned['rings'].rates()['shape']:.0%} of plain prompts (goal <= 10%; base "
          f"{base['rings'].rates()['shape']:.0%})")


if __name__ == "__main__":
    main()
