"""Request validation: defaults per model, notices, and bounds."""

from __future__ import annotations

import pytest

from fluxlab.errors import UserError
from fluxlab.spec.catalog import CATALOG
from fluxlab.spec.request import make_request
from fluxlab.spec.resolve import ASPECTS, resolve


def test_defaults_come_from_the_model():
    job = resolve(make_request(prompt="a cat", seed=1), CATALOG["flux1-dev"])
    assert (job.width, job.height, job.steps, job.guidance, job.seeds) == (1024, 1024, 28, 3.5, (1,))
    base = resolve(make_request(prompt="a cat", seed=1), CATALOG["flux2-klein-base-4b"])
    assert base.negative == ""  # real CFG against the empty prompt, as the reference does


def test_aspect_presets_from_the_lesson():
    assert ASPECTS["9:16"] == (576, 1024) and ASPECTS["16:9"] == (1024, 576) and ASPECTS["512"] == (512, 512)
    job = resolve(make_request(prompt="x", aspect="3:4", seed=0), CATALOG["flux2-klein-4b"])
    assert (job.width, job.height) == (768, 1024)


def test_num_images_uses_consecutive_seeds():
    job = resolve(make_request(prompt="x", seed=41, num_images=3), CATALOG["flux2-klein-4b"])
    assert job.seeds == (41, 42, 43)
    with pytest.raises(UserError, match="pass 4294967295"):
        resolve(make_request(prompt="x", seed=2**32 - 1, num_images=2), CATALOG["flux2-klein-4b"])


def test_random_seed_is_in_range():
    seeds = {resolve(make_request(prompt="x"), CATALOG["flux2-klein-4b"]).seeds[0] for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


def test_notices_for_ignored_settings():
    job = resolve(make_request(prompt="x", guidance=5, negative="ugly", steps=8, seed=0), CATALOG["flux2-klein-4b"])
    text = " | ".join(job.notices)
    assert "guidance 5 is ignored" in text and "negative prompt is ignored" in text and "running 8" in text
    assert job.guidance == 1.0 and job.negative is None and job.steps == 8


def test_step_cache_notices_and_default():
    four = resolve(make_request(prompt="x", seed=0, cache="taylorseer"), CATALOG["flux2-klein-4b"])
    assert four.cache == "taylorseer:3" and "predicts no step of 4" in " | ".join(four.notices)
    many = resolve(make_request(prompt="x", seed=0, cache="taylorseer:4"), CATALOG["flux1-dev"])
    assert many.cache == "taylorseer:4" and not any("TaylorSeer" in n for n in many.notices)
    fbc = resolve(make_request(prompt="x", seed=0, cache="fbc"), CATALOG["flux2-klein-4b"])
    assert fbc.cache == "fbc:0.1" and "rarely skips" in " | ".join(fbc.notices)


def test_klein_size_limits():
    with pytest.raises(UserError, match=r"range 64\.\.1792"):
        resolve(make_request(prompt="x", width=2048, height=1024), CATALOG["flux2-klein-4b"])


def test_unknown_field_is_named():
    with pytest.raises(UserError, match="unknown request field 'stpes'"):
        make_request(prompt="x", stpes=4)
