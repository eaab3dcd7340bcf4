"""The parsers people feed by hand, fed by hypothesis: each either succeeds or raises UserError (one line), never
anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxlab.errors import UserError
from fluxlab.spec.catalog import CATALOG

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)), max_leaves=12)
request_keys = st.sampled_from(["prompt", "negative", "width", "height", "aspect", "steps", "guidance", "seed",
                                "seeds", "num_images", "sampler", "schedule", "eta", "preset", "template",
                                "strength", "stpes", "images"])


def one_line(e: UserError) -> None:
    assert str(e) and "\n" not in str(e).strip(), str(e)


@SETTINGS
@given(st.dictionaries(request_keys, json_values, max_size=6))
def test_request_fields(fields):
    from fluxlab.spec.request import make_request
    from fluxlab.spec.resolve import resolve

    fields.pop("images", None)  # paths are checked against the disk; covered by the bad-input table
    try:
        request = make_request(**fields)
        job = resolve(request, CATALOG["demo"])
    except UserError as e:
        one_line(e)
        return
    assert 64 <= job.width <= 256 and 1 <= job.steps <= 500 and all(0 <= s < 2**32 for s in job.seeds)


@SETTINGS
@given(st.text(max_size=40))
def test_grid_axes(text):
    from fluxlab.service.grid import parse_axis

    try:
        axis = parse_axis(text)
    except UserError as e:
        one_line(e)
        return
    assert axis.values


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.lists(st.integers(), max_size=5).map(lambda v: ",".join(map(str, v)))))
def test_seed_lists(text):
    from fluxlab.cli.options import parse_int_list

    try:
        assert all(isinstance(v, int) for v in parse_int_list(text, "--seeds"))
    except UserError as e:
        one_line(e)


@SETTINGS
@given(st.one_of(st.text(max_size=30),
                 st.tuples(st.text(max_size=10), st.floats(allow_nan=True, allow_infinity=True)).map(
                     lambda t: f"{t[0]}.safetensors:{t[1]}")))
def test_lora_file_and_scale(text):
    import math

    from fluxlab.spec.request import lora_ref

    try:
        ref = lora_ref(text)
    except UserError as e:
        one_line(e)
        return
    assert ref.path and math.isfinite(ref.scale) and abs(ref.scale) <= 16


@SETTINGS
@given(json_values)
def test_png_metadata(data):
    from fluxlab.spec.record import parse_record

    try:
        parse_record(data, "x.png")
    except UserError as e:
        one_line(e)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["prompt", "model", "seed", "width", "steps", "schedule", "inputs", "loras",
                                        "request", "runtime", "fluxlab"]), json_values, max_size=6))
def test_png_metadata_with_likely_keys(data):
    from fluxlab.spec.record import parse_record

    try:
        parse_record(data, "x.png")
    except UserError as e:
        one_line(e)


train_keys = st.sampled_from(["job", "config", "name", "process", "type", "training_folder", "datasets",
                              "folder_path", "train", "steps", "lr", "model", "name_or_path", "network", "linear",
                              "resolution", "save", "sample", "learning_rate"])
configs = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(train_keys, inner, max_size=5)),
                       max_leaves=20)


@SETTINGS
@given(configs)
def test_training_config_objects(data):
    from fluxlab.spec.trainconfig import parse

    try:
        parse(data)
    except UserError as e:
        one_line(e)


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("yaml")


@SETTINGS
@given(st.one_of(st.text(max_size=200), configs.map(lambda d: json.dumps(d))))
def test_training_yaml_text(yaml_dir, text):
    from fluxlab.spec.trainconfig import load_yaml

    path = yaml_dir / "cfg.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        load_yaml(path)
    except UserError as e:
        one_line(e)
