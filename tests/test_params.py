"""params.yaml: the shipped file is valid, tries inherit from train, and every mistake is named."""

import copy

import pytest

from stages.errors import ParamsError
from stages.params import PARAMS_FILE, check_params, load_params, resolve_try
from tests.conftest import ROOT


@pytest.fixture
def params():
    return load_params(ROOT / PARAMS_FILE)


def test_shipped_params_are_valid_and_hold_the_posts_settings(params):
    assert check_params(params) == []
    assert {k: params["train"][k] for k in ("epochs", "batch_size", "lr", "optimizer")} == {
        "epochs": 12,
        "batch_size": 100,
        "lr": 0.001,
        "optimizer": "adam",
    }
    assert list(params["tries"]) == ["lenet", "lenet2", "lenet2_aug"]


@pytest.mark.parametrize(
    "name, model, augment", [("lenet", "lenet", False), ("lenet2", "lenet2", False), ("lenet2_aug", "lenet2", True)]
)
def test_a_try_overlays_its_keys_on_train(params, name, model, augment):
    config = resolve_try(params, name)
    assert (config["model"], config["augment"], config["epochs"]) == (model, augment, 12)


def test_train_augment_reaches_every_try_that_does_not_set_its_own(params):
    params["train"]["augment"] = True
    params["tries"]["lenet"]["augment"] = False
    assert [resolve_try(params, t)["augment"] for t in params["tries"]] == [False, True, True]


def test_a_null_try_key_inherits_and_a_set_one_overrides(params):
    params["train"]["lr"] = 0.01
    params["tries"]["lenet"].update(lr=None, augment=True)
    assert check_params(params) == []
    assert (resolve_try(params, "lenet")["lr"], resolve_try(params, "lenet")["augment"]) == (0.01, True)


def test_an_unknown_try_is_named():
    with pytest.raises(ParamsError, match="tries.nope: no such try"):
        resolve_try({"tries": {"lenet": {"model": "lenet"}}}, "nope")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda p: p["tries"]["lenet"].update(epoch=3), "tries.lenet.epoch: unknown key (did you mean 'epochs'?)"),
        (lambda p: p.update(extra={}), "extra: unknown key"),
        (lambda p: p["augment"].update(blur=1), "augment.blur: unknown key"),
        (lambda p: p["tries"]["x"].update(model="vgg"), "tries.x.model: got 'vgg'; expected one of 'lenet', 'lenet2'"),
        (lambda p: p["tries"]["x"].pop("model"), "tries.x.model: missing"),
        (lambda p: p["train"].update(epochs=0), "train.epochs: got 0; expected an integer > 0"),
        (lambda p: p["train"].update(epochs="12"), "train.epochs: got '12'; expected an integer > 0"),
        (lambda p: p["train"].update(epochs=True), "train.epochs: got True"),
        (lambda p: p["train"].update(batch_size=-100), "train.batch_size: got -100"),
        (lambda p: p["train"].update(lr=0), "train.lr: got 0; expected a number > 0"),
        (lambda p: p["train"].update(lr=[0.1]), "train.lr: got [0.1]"),
        (lambda p: p["tries"]["x"].update(lr=-1e-3), "tries.x.lr: got -0.001"),
        (lambda p: p["train"].update(augment="yes"), "train.augment: got 'yes'; expected true or false"),
        (
            lambda p: p["train"].update(device="tpu"),
            "train.device: got 'tpu'; expected one of 'auto', 'cpu', 'cuda', 'mps'",
        ),
        (lambda p: p["train"].update(optimizer="rmsprop"), "train.optimizer: got 'rmsprop'"),
        (lambda p: p["augment"].update(scale=[1.2, 0.8]), "augment.scale: got [1.2, 0.8]"),
        (lambda p: p["augment"].update(flip_p=2), "augment.flip_p: got 2; expected a number from 0 to 1"),
        (lambda p: p["data"].update(md5="abc"), "data.md5: got 'abc'; expected 32 hexadecimal digits"),
        (lambda p: p["train"].pop("seed"), "train.seed: missing"),
        (lambda p: p.pop("augment"), "augment: missing section"),
        (lambda p: p["tries"].update(y=[1]), "tries.y: expected a mapping"),
        (lambda p: p["tries"].update({"a/b": {"model": "lenet"}}), "tries.a/b: a try name may hold only"),
        (lambda p: p.update(tries={}), "tries: expected a non-empty mapping"),
    ],
)
def test_each_mistake_is_reported_with_key_value_and_what_is_allowed(params, change, expected):
    params["tries"]["x"] = {"model": "lenet2"}
    change(params)
    problems = check_params(params)
    assert any(expected in problem for problem in problems), problems


def test_all_problems_come_in_one_message(tmp_path, params):
    bad = copy.deepcopy(params)
    bad["tries"]["lenet"]["epoch"] = 3
    bad["train"]["lr"] = -1
    bad["tries"]["lenet2"]["model"] = "resnet"
    path = tmp_path / "params.yaml"
    path.write_text(__import__("yaml").safe_dump(bad))
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    message = str(raised.value)
    assert "3 problem(s)" in message
    assert all(key in message for key in ("tries.lenet.epoch", "train.lr", "tries.lenet2.model"))


@pytest.mark.parametrize("text, expected", [("train: [", "not valid YAML"), ("", "expected a mapping")])
def test_unreadable_params_files_are_refused(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=expected):
        load_params(path)
