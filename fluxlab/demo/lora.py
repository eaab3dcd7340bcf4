"""The LoRA proof: teach the demo model a shape it has never seen, with `fluxlab train`, and measure it.

    python -m fluxlab.demo.lora [--out DIR] [--model DIR] [--steps N --batch N --lr X]

The demo model knows circles, squares and triangles. Twenty images of a ring (a disc with a hole), captioned
with the made-up word "zxq" ("a red zxq in the top left on a white background", and shorter captions), train a
LoRA through the same `fluxlab train CONFIG.yaml` a user runs (with forty images of known scenes beside them, for
prior preservation, and loss masks on the shapes as the demo model was trained with). Then, with the LoRA loaded:

* prompts with the trigger ("a zxq in the center", short ones naming a place, and full descriptions in colour x
  place x size x background combinations absent from the twenty images) should draw rings (the evaluator reads
  the shape). Each group is reported beside the base model drawing a circle for the same prompt with "circle" in
  place of "zxq": the LoRA cannot be expected to draw a new shape more reliably than the base draws its own;
* the demo's own prompts (circle, square, triangle, no trigger) should not, and should keep their shapes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import subprocess
import sys
from pathlib import Path

from . import data
from .build import Settings, write_masks
from .evaluate import Tally, read

TRIGGER = "zxq"
# What moved the rings drawn (full zxq descriptions in unseen colours and places, unless said): batch 4 for 300
# steps -> 2%, 1000 -> 20%, 3000 -> 32-37%; batch 8 for 3000 steps -> 46% (about 6 min); blocks only, EMA, forty
# prior images -> 55%; balanced ring scenes -> 68%. No better: 5000 steps (60%), rank 4, guidance 7, LoRA scale
# 1.3 or 1.5, linear_alpha 32 (0%), a text-encoder LoRA beside it (60%), a caption line for every subset of the
# attributes left out (53%). The base model draws the circle asked for in 60% of those descriptions' seeds.
STEPS, BATCH, LR = 3000, 8, 2e-3


def ring_scenes(count: int, seed: int, exclude: set = frozenset()):
    """`count` distinct ring scenes (colour, position, size, background), chosen by seed and balanced: every
    colour, position, size and background, and every colour x size, position x size and colour x background pair,
    appears as evenly as `count` allows.

    A plain random draw of 20 left out red entirely and showed "top" and "top right" once each, so the LoRA had to
    guess those words' rings; balanced, the rings drawn for unseen full descriptions rose from 55% to 68%."""
    combos = [c for c in itertools.product(data.COLOURS, data.POSITIONS, data.SIZES, data.BACKGROUNDS)
              if c not in exclude]
    rng = random.Random(seed)
    picked = rng.sample(combos, count)
    best = imbalance(picked)
    for _ in range(4000):  # local search: swap one scene for an unused one when that is no less even
        trial, taken = list(picked), set(picked)
        trial[rng.randrange(count)] = rng.choice([c for c in combos if c not in taken])
        if (score := imbalance(trial)) <= best:
            picked, best = trial, score
    return [data.Scene(c, data.NEW_SHAPE, p, s, b) for c, p, s, b in picked]


def imbalance(picked) -> int:
    """How unevenly `picked` (colour, position, size, background) tuples cover each attribute and pair of them:
    the sum over groupings of the largest count minus the smallest (0 for a value never picked)."""
    values = (list(data.COLOURS), list(data.POSITIONS), list(data.SIZES), list(data.BACKGROUNDS))
    total = 0
    for group in ((0,), (1,), (2,), (3,), (0, 2), (1, 2), (0, 3)):
        counts = dict.fromkeys(itertools.product(*(values[i] for i in group)), 0)
        for c in picked:
            counts[tuple(c[i] for i in group)] += 1
        total += max(counts.values()) - min(counts.values())
    return total


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
                  # Noise levels drawn near pure noise, where a shape is decided (ai-toolkit's "content"): rings
                  # for "a zxq in the center" 95% -> 100%, for short zxq prompts 59% -> 77%.
                  "content_or_style": "content",
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


NO_PLACE = f"a <colour> {TRIGGER} (no place)"


@functools.cache  # pure, and asked for by every measurement: its ring scenes come from a local search
def trigger_prompts() -> dict[str, list[tuple[str, int, str | None, str | None]]]:
    """(prompt, seed, colour, position) of each group of zxq prompts, none of them a training caption."""
    where = {p: data.PHRASE.get(p, f"in the {p}") for p in data.POSITIONS}
    trained = {(s.colour, s.position, s.size, s.background) for s in ring_scenes(20, 0)}
    return {
        # The issue's own prompt, over seeds.
        f"a {TRIGGER} in the center": [(f"a {TRIGGER} in the center", 100 + k, None, "center") for k in range(20)],
        # Short prompts, as people write them: a place, and a size.
        f"a (small) {TRIGGER} <place>":
            [(f"a {TRIGGER} {w}", 200 + 10 * k + i, None, p) for i, (p, w) in enumerate(where.items()) for k in (0, 1)]
            + [(f"a small {TRIGGER} {where[p]}", 400 + i, None, p) for i, p in enumerate(data.POSITIONS)],
        # Full descriptions of colour x place x size x background combinations absent from the twenty images.
        "full unseen descriptions": [(caption(s), i, s.colour, s.position)
                                     for i, s in enumerate(ring_scenes(40, 1, exclude=trained))],
        # No place at all. The demo model itself rarely draws the shape asked for without one (it averages over
        # the nine places), so this group is reported beside the base model's circles, not counted to the goal.
        NO_PLACE: [(f"a {c} {TRIGGER}", 300 + 10 * k + i, c, None) for i, c in enumerate(data.COLOURS) for k in (0, 1)],
    }


def measure(pipe, word: str = TRIGGER, shape: str = data.NEW_SHAPE, plain: bool = True) -> dict[str, Tally]:
    """Adherence of each group of zxq prompts with "zxq" read as `word` and `shape` the shape asked for (the base
    model is also measured with word = shape = "circle": how well it draws a shape it knows for the same
    prompts); with `plain`, also the demo's own prompts (a circle, square or triangle: a LoRA that draws rings
    there fails the shape), and under "rings" how many of those images are rings."""
    out = {}
    for name, prompts in trigger_prompts().items():
        out[name] = Tally()
        for prompt, seed, colour, position in prompts:
            image = pipe.generate(prompt=prompt.replace(TRIGGER, word), seed=seed)[0].image
            out[name].add(read(image), colour, shape, position)
    if plain:
        out["plain prompts (no trigger)"], out["rings"] = Tally(), Tally()
        for i, s in enumerate(list(data.scenes("heldout"))[::2] + list(data.scenes("train"))[::22]):
            r = read(pipe.generate(prompt=s.caption, seed=i)[0].image)
            out["plain prompts (no trigger)"].add(r, s.colour, s.shape, s.position)
            out["rings"].add(r, None, data.NEW_SHAPE, None)
    return out


def shown(m: dict[str, Tally], groups) -> float:
    """The share of the groups' images that show the shape asked for."""
    return sum(m[g].shape for g in groups) / sum(m[g].n for g in groups)


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
    base_pipe = load(a.model, **quiet)
    base, circles = measure(base_pipe), measure(base_pipe, "circle", "circle", plain=False)
    tuned = measure(load(a.model, loras=[(str(lora), 1.0)], **quiet))
    rows = {f"{who}, {name}": m[name] for who, m in (("base", base), ("LoRA", tuned)) for name in m
            if name != "rings"}
    rows.update({f"base, circle for zxq: {name}": t for name, t in circles.items()})
    print(table(rows))
    placed = [g for g in trigger_prompts() if g != NO_PLACE]
    print(f"rings drawn with the LoRA: {shown(tuned, placed):.0%} of zxq prompts that name a place (goal >= 90%; "
          f"the base model draws the circle asked for in {shown(circles, placed):.0%} of the same prompts with "
          f"'circle'), {shown(tuned, trigger_prompts()):.0%} of all zxq prompts; "
          f"{tuned['rings'].rates()['shape']:.0%} of plain prompts (goal <= 10%; base "
          f"{base['rings'].rates()['shape']:.0%})")


if __name__ == "__main__":
    main()
