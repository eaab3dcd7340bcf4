"""Step caching (`--cache fbc:T`, `--cache taylorseer:N`) on the demo model at 20 steps, side by side in one
process against no cache: denoising time (summed over every image), how far the pixels move (max and mean
|difference| over the same seeds), and the demo's prompt adherence on its held-out prompts (colour, shape and
position read back from the images, as `python -m fluxlab.demo.evaluate` reads them).

    .venv/bin/python bench/step_cache.py [--seeds 2] [--steps 20]
"""

from __future__ import annotations

import argparse

import numpy as np

THRESHOLDS = ("none", "fbc:0.05", "fbc:0.1", "fbc:0.15", "fbc:0.2", "fbc:0.3", "taylorseer:2", "taylorseer:3",
              "taylorseer:4")


def run(pipe, scenes, seeds: int, steps: int, cache: str):
    from fluxlab.demo.evaluate import Tally, read

    tally, images, denoise = Tally(), [], 0.0
    for i, s in enumerate(scenes):
        for k in range(seeds):
            r = pipe.generate(prompt=s.caption, seed=1000 * k + i, steps=steps, cache=cache)[0]
            denoise += r.timings.get("denoise", 0.0)
            images.append(np.asarray(r.image, dtype=np.int16))
            tally.add(read(r.image), s.colour, s.shape, s.position)
    return tally, images, denoise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import fluxlab
    from fluxlab.demo.data import scenes

    pipe = fluxlab.load("demo", notify=lambda m: None)
    held = list(scenes("heldout"))
    pipe.generate(prompt=held[0].caption, seed=0, steps=2)  # warm
    rows, base = [], None
    for cache in THRESHOLDS:
        tally, images, denoise = run(pipe, held, args.seeds, args.steps, cache)
        if base is None:
            base = (images, denoise)
        diff = np.stack([np.abs(a - b) for a, b in zip(images, base[0], strict=True)])
        rates = tally.rates()
        rows.append(f"| {cache} | {denoise:.2f} s | {base[1] / denoise:.2f}x | {diff.max()} | {diff.mean():.2f} | "
                    f"{rates['colour']:.1%} | {rates['shape']:.1%} | {rates['position']:.1%} | {rates['all']:.1%} |")
    print(f"demo, {len(held)} held-out prompts x {args.seeds} seeds, {args.steps} steps")
    print("| cache | denoise | speed-up | max diff | mean diff | colour | shape | position | all three |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
