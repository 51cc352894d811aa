"""Property-based: generated params files, valid ones accepted, invalid ones refused with the key named."""

import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.errors import ParamsError
from stages.models import MODELS
from stages.params import (
    AUGMENT_SCHEMA,
    DEVICES,
    OPTIMIZERS,
    SCALE_RANGE,
    TRAIN_SCHEMA,
    TTA_MODES,
    check_params,
    load_params,
)

positive_ints = st.integers(1, 10_000)
positive_floats = st.floats(1e-8, 10, allow_nan=False)
non_negative_floats = st.floats(0, 10, allow_nan=False)
TRAIN_VALUES = {
    "epochs": positive_ints,
    "batch_size": positive_ints,
    "lr": positive_floats,
    "optimizer": st.sampled_from(OPTIMIZERS),
    "momentum": st.floats(0, 0.99),
    "nesterov": st.just(False),  # true is valid only with sgd and a momentum: test_params checks that pairing
    "weight_decay": non_negative_floats,
    "norm_bias_lr": positive_floats,
    "muon_lr": non_negative_floats,
    "muon_momentum": st.floats(0, 0.99),
    "warmup": st.floats(0, 0.99),
    "lr_start": non_negative_floats,
    "lr_end": non_negative_floats,
    "label_smoothing": st.floats(0, 0.99),
    "lookahead": st.floats(0, 0.99),
    "augment": st.booleans(),
    "flip": st.booleans() | st.just("alternate"),
    "translate": st.integers(0, 16),
    "tta": st.sampled_from(TTA_MODES),
    "seed": st.integers(0, 2**31),
    "device": st.sampled_from(DEVICES),
    "threads": st.integers(0, 256),
    "amp": st.booleans(),
}
AUGMENT_VALUES = {
    "flip_p": st.floats(0, 1),
    "rotation": non_negative_floats,
    "shear": non_negative_floats,
    "scale": st.tuples(st.floats(0.01, 1), st.floats(1, 3)).map(list),
    "brightness": non_negative_floats,
    "contrast": non_negative_floats,
    "saturation": non_negative_floats,
}
try_names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
# A try's key may be null: it then inherits train's value.
try_settings = st.fixed_dictionaries(
    {"model": st.sampled_from(list(MODELS))}, optional={k: st.none() | v for k, v in TRAIN_VALUES.items()}
)
valid_params = st.fixed_dictionaries({
    "data": st.fixed_dictionaries({"url": st.just("https://example.org/c.tar.gz"),
                                   "md5": st.from_regex(r"[0-9a-f]{32}", fullmatch=True)}),
    "train": st.fixed_dictionaries(TRAIN_VALUES),
    "augment": st.fixed_dictionaries(AUGMENT_VALUES),
    "tries": st.dictionaries(try_names, try_settings, min_size=1, max_size=4),
})  # fmt: skip

# Values no key accepts, whatever its type: each must be reported with the key that holds it.
wrong_values = st.one_of(
    st.text(max_size=5).filter(lambda s: s not in DEVICES + OPTIMIZERS + TTA_MODES + tuple(MODELS)),
    st.lists(st.integers(), max_size=2),
    st.just({"nested": 1}),
    st.integers(max_value=-1),
)
SECTIONS = {"train": TRAIN_SCHEMA, "augment": AUGMENT_SCHEMA}
# No time limit per example: on a shared machine one example of a few ms may take half a second, which
# Hypothesis's default deadline (200 ms) would report as a failure.
NO_DEADLINE = {"deadline": None}


@settings(**NO_DEADLINE)
@given(valid_params)
def test_valid_params_are_accepted(params):
    assert check_params(params) == []


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60, **NO_DEADLINE)
@given(valid_params, st.data())
def test_a_wrong_value_anywhere_is_named_with_what_is_allowed(tmp_path, params, data):
    section = data.draw(st.sampled_from(["train", "augment", "tries"]))
    if section == "tries":
        name = data.draw(st.sampled_from(list(params["tries"])))
        key = data.draw(st.sampled_from(["model", *TRAIN_SCHEMA]))
        where, mapping = f"tries.{name}.{key}", params["tries"][name]
    else:
        key = data.draw(st.sampled_from(list(SECTIONS[section])))
        where, mapping = f"{section}.{key}", params[section]
    wrong = wrong_values if section == "tries" and key != "model" else wrong_values | st.none()
    # The one value among wrong_values that a key takes: a list [low, high] as augment.scale (not the rule under
    # test as the filter, which would hide a rule that takes too much).
    bad = data.draw(wrong.filter(lambda value: not (key == "scale" and SCALE_RANGE.accepts(value))))
    mapping[key] = bad
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    try:
        load_params(path)
    except ParamsError as error:
        line = next(p for p in error.problems if p.startswith(f"{where}:"))
        # A hint may come between the two, in parentheses: "(did you mean 'adam'?)", or that "yes" is a word.
        assert re.search(rf"got {re.escape(repr(bad))}(?: \([^)]*\))?; expected", line), line
    else:
        raise AssertionError(f"{where}={bad!r} was accepted")


@settings(**NO_DEADLINE)
@given(valid_params, st.data())
def test_an_unknown_key_at_any_level_is_named(params, data):
    level = data.draw(st.sampled_from(["top", "train", "augment", "try"]))
    key = data.draw(st.from_regex(r"[a-z]{1,8}x", fullmatch=True))
    target = {"top": params, "train": params["train"], "augment": params["augment"],
              "try": next(iter(params["tries"].values()))}[level]  # fmt: skip
    target[key] = 1
    assert any(f"{key}: unknown key" in problem for problem in check_params(params))
