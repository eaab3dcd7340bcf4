"""The demo's synthetic data and its evaluator: captions, held-out combinations, and the evaluator's accuracy
on ground-truth renders (it must be >= 98% before it may judge a model)."""

from __future__ import annotations

from fluxlab.demo.data import COLOURS, POSITIONS, SHAPES, Scene, held_out, render, scenes
from fluxlab.demo.evaluate import read


def test_captions_and_split():
    s = Scene("red", "circle", "top left", "large", "white")
    assert s.caption == "a red circle in the top left on a white background"
    assert Scene("blue", "square", "center", "small", "black").caption == \
        "a small blue square in the center on a black background"
    train, held = list(scenes("train")), list(scenes("heldout"))
    assert held and all(held_out(x.colour, x.shape, x.position) for x in held)
    assert not any(held_out(x.colour, x.shape, x.position) for x in train)
    # Every colour, shape and position is still seen in training, only some combinations are not.
    assert {x.colour for x in train} == set(COLOURS) and {x.shape for x in train} == set(SHAPES)
    assert {x.position for x in train} == set(POSITIONS)


def test_renders_are_deterministic():
    s = Scene("green", "triangle", "bottom right", "large", "gray")
    assert render(s, seed=3).tobytes() == render(s, seed=3).tobytes()
    assert render(s, seed=3).tobytes() != render(s, seed=4).tobytes()


def test_evaluator_reads_ground_truth_renders():
    total = correct = 0
    for i, s in enumerate(list(scenes("train")) + list(scenes("heldout"))):
        r = read(render(s, seed=i))
        for got, want in ((r.colour, s.colour), (r.shape, s.shape), (r.position, s.position)):
            total += 1
            correct += got == want
    assert total > 1000
    assert correct / total >= 0.98, correct / total
