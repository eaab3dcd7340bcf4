"""Prompt upsampling with the model's own text encoder (tiny random Qwen3 and Mistral encoders): parity with
diffusers' Flux2Pipeline.upsample_prompt, determinism, the record and --from, and the models that cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

import fluxlab
from fluxlab.errors import UserError

KW = dict(prompt="a red circle", seed=5, steps=2, width=64, height=64)


def notes(pipe, said: list, **fields) -> list:
    """The results of one generate call, its notices appended to `said`."""
    from fluxlab.service.events import Notice

    return list(pipe.generate_iter(events=lambda e: said.append(e.text) if isinstance(e, Notice) else None,
                                   **fields))


@pytest.fixture(scope="module")
def pipes(tiny_dirs):
    return {k: fluxlab.load(str(tiny_dirs[k]), device="cpu", dtype="fp32", notify=lambda m: None)
            for k in ("flux2-klein", "flux2-dev")}


def test_the_rewrite_matches_diffusers_upsample_prompt_on_mistral(tiny_dirs, pipes):
    """Same chat (BFL's text-to-image system message), same padding, same sampling at the same seed: the same
    words as diffusers' Flux2Pipeline.upsample_prompt writes with the same weights."""
    from diffusers import Flux2Pipeline

    from fluxlab.runtime.upsample import upsample

    reference = Flux2Pipeline.from_pretrained(tiny_dirs["flux2-dev"], torch_dtype=torch.float32)
    reference.tokenizer.tokenizer = reference.tokenizer  # a processor's inner tokenizer, which the tiny one lacks
    for temperature in (0.15, 0.7):
        torch.manual_seed(11)
        theirs = reference.upsample_prompt(["a red circle", "a blue square"], temperature=temperature, device="cpu")
        ours = upsample(pipes["flux2-dev"].model, ["a red circle", "a blue square"], temperature=temperature,
                        seed=11, max_tokens=512)
        assert ours == [t.strip() or p for t, p in zip(theirs, ["a red circle", "a blue square"], strict=True)]


@pytest.mark.parametrize("kind", ["flux2-klein", "flux2-dev"])
def test_same_request_same_rewrite_and_the_record_keeps_both(pipes, kind):
    pipe = pipes[kind]
    said = []
    first = notes(pipe, said, **KW, upsample_prompt=True, upsample_max_tokens=16)[0]
    again = pipe.generate(**KW, upsample_prompt=True, upsample_max_tokens=16)[0]
    request = first.metadata["request"]
    assert request["upsampled_from"] == "a red circle" and request["prompt"] != "a red circle"
    assert again.metadata["request"]["prompt"] == request["prompt"]
    assert torch.equal(first.latents, again.latents)
    assert any(m.startswith("upsampled prompt") and request["prompt"] in m for m in said), said
    other = pipe.generate(**{**KW, "seed": 6}, upsample_prompt=True, upsample_max_tokens=16)[0]
    assert other.metadata["request"]["prompt"] != request["prompt"]  # seeded by the image's seed
    greedy = [pipe.generate(**{**KW, "seed": s}, upsample_prompt=True, upsample_temperature=0.0,
                            upsample_max_tokens=16)[0].metadata["request"]["prompt"] for s in (1, 2)]
    assert greedy[0] == greedy[1]  # temperature 0: no sampling, the seed does not matter


def test_from_reuses_the_rewrite_without_writing_again(pipes, tiny_dirs, tmp_path, capsys):
    klein = str(tiny_dirs["flux2-klein"])
    code, _, err = run(capsys, "generate", "a red circle", "-m", klein, "--device", "cpu", "--dtype", "fp32",
                         "--seed", "5", "--steps", "2", "-W", "64", "-H", "64", "--upsample-prompt",
                         "--upsample-max-tokens", "16", "-o", tmp_path / "a.png")
    assert code == 0 and "upsampled prompt" in err, err
    code, _, err = run(capsys, "generate", "--from", tmp_path / "a.png", "-o", tmp_path / "b.png")
    assert code == 0 and "upsampl" not in err, err
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b)


def test_klein_says_it_reads_no_images(pipes, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ref)
    said = []
    notes(pipes["flux2-klein"], said, **KW, images=[str(ref)], upsample_prompt=True, upsample_max_tokens=8)
    assert any("reads no images" in m for m in said), said


def test_mistral_is_shown_the_images_of_an_edit_with_the_editing_message(pipes):
    """With reference images FLUX.2 [dev] is asked with BFL's editing system message and shown the images (their
    own user turn, as format_input builds it): the tokens it reads differ from the text-to-image chat's."""
    from diffusers.pipelines.flux2 import system_messages as bfl

    from fluxlab.runtime.upsample import chat, chat_inputs, writer

    im = Image.new("RGB", (1024, 1024), (200, 30, 30))
    turns = chat("make it blue", bfl.SYSTEM_MESSAGE_UPSAMPLING_I2I, [im])
    assert [t["role"] for t in turns] == ["system", "user", "user"] and turns[1]["content"][0]["type"] == "image"
    assert turns[0]["content"][0]["text"] == bfl.SYSTEM_MESSAGE_UPSAMPLING_I2I
    model = pipes["flux2-dev"].model
    lm = writer(model, lambda m: None)
    edit = chat_inputs(model, lm, ["make it blue"], [im])["input_ids"][0].tolist()
    plain = chat_inputs(model, lm, ["make it blue"])["input_ids"][0].tolist()
    image_token = model.components.tokenizer.convert_tokens_to_ids("[IMG]")
    assert image_token in edit and image_token not in plain and edit != plain


@pytest.mark.parametrize("model, words", [
    ("demo", "demo cannot upsample prompts: its 4-layer text encoder"),
    ("flux1-dev", "cannot upsample prompts: FLUX.1's text encoders (T5, CLIP)"),
])
def test_models_that_cannot_write_say_so_before_loading(tiny_dirs, tmp_path, capsys, model, words):
    name = model if model == "demo" else str(tiny_dirs[model])
    code, _, err = run(capsys, "generate", "a red circle", "-m", name, "--upsample-prompt", "-o", tmp_path / "x.png")
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_bad_upsample_values(pipes):
    with pytest.raises(UserError, match=r"upsample temperature 3.0 is out of range; valid: 0..2"):
        pipes["flux2-klein"].generate(**KW, upsample_prompt=True, upsample_temperature=3.0)
    with pytest.raises(UserError, match="upsample max tokens 0 is out of range"):
        pipes["flux2-klein"].generate(**KW, upsample_prompt=True, upsample_max_tokens=0)
