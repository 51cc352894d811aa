"""params.yaml: the shipped file is valid, tries inherit from train, and every mistake is named."""

import copy
import shutil

import pytest
from ruamel.yaml import YAML

from stages.configure import write_try_configs
from stages.errors import ParamsError, PipelineError
from stages.params import (
    PARAMS_FILE,
    check_params,
    load_params,
    read_try_config,
    read_yaml,
    resolve_try,
    try_config,
)
from tests.conftest import ROOT, SHIPPED_TRIES, dvc, run


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
    assert list(params["tries"]) == SHIPPED_TRIES


@pytest.mark.parametrize(
    "name, model, augment", [("lenet", "lenet", False), ("lenet2", "lenet2", False), ("lenet2_aug", "lenet2", True)]
)
def test_a_try_overlays_its_keys_on_train(params, name, model, augment):
    config = resolve_try(params, name)
    assert (config["model"], config["augment"], config["epochs"]) == (model, augment, 12)


def test_train_augment_reaches_every_try_that_does_not_set_its_own(params):
    params["train"]["augment"] = True
    params["tries"]["lenet"]["augment"] = False
    assert [resolve_try(params, t)["augment"] for t in params["tries"]] == [False, True, True, False]  # airbench: own


def test_an_effective_config_keeps_trains_order_then_the_trys(params):
    # configs/<try>.yaml and the checkpoint hold it: the same params must give the same bytes in every process.
    own = [key for key in params["tries"]["airbench"] if key not in params["train"]]
    assert list(resolve_try(params, "airbench")) == [*params["train"], *own]


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
        (
            lambda p: p["tries"]["x"].update(nesterov=True),
            "tries.x.nesterov: true needs optimizer sgd and a momentum > 0",
        ),
        (
            lambda p: p["train"].update(nesterov=True, optimizer="sgd"),
            "train.nesterov: true needs optimizer sgd and a momentum > 0, got optimizer 'sgd' and momentum 0.0",
        ),
        (lambda p: p["tries"]["x"].pop("model"), "tries.x.model: missing"),
        (lambda p: p["train"].update(epochs=0), "train.epochs: got 0; expected an integer > 0"),
        (lambda p: p["train"].update(epochs="12"), "train.epochs: got '12'; expected an integer > 0"),
        (lambda p: p["train"].update(epochs=True), "train.epochs: got True"),
        (lambda p: p["train"].update(batch_size=-100), "train.batch_size: got -100"),
        (lambda p: p["train"].update(lr=0), "train.lr: got 0; expected a number > 0"),
        (lambda p: p["train"].update(lr=[0.1]), "train.lr: got [0.1]"),
        (lambda p: p["tries"]["x"].update(lr=-1e-3), "tries.x.lr: got -0.001"),
        (lambda p: p["train"].update(augment="yes"), "train.augment: got 'yes' (a word, not a boolean, in YAML 1.2"),
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
        (lambda p: p["tries"].update({"-x": {"model": "lenet"}}), "and starts with a letter, digit or '_'"),
        (lambda p: p["tries"].update({"x2\n": {"model": "lenet"}}), "a try name may hold only"),  # a file name
        (lambda p: p["tries"].update({5: {"model": "lenet"}}), "tries.5: a try name must be text; quote it: '5'"),
        (  # its plots would go into the report's folder, which DVC refuses
            lambda p: p["tries"].update(report={"model": "lenet"}),
            "tries.report: the name is taken: plots/report is the report stage's output, where this try's plots",
        ),
        # What torch takes: a seed beyond 64 bits, or a count beyond a C int, would fail in training.
        (lambda p: p["train"].update(seed=2**64), f"train.seed: got {2**64}; expected an integer from 0 to 2**64 - 1"),
        (lambda p: p["tries"]["x"].update(threads=2**31), "tries.x.threads: got 2147483648; expected an integer"),
        (lambda p: p["train"].update(batch_size=2**63), "train.batch_size: got 9223372036854775808; expected"),
        (lambda p: p.update(tries={}), "tries: expected a non-empty mapping"),
        (  # -S '++tries.lent.lr=0.002', where tries.lenet was meant
            lambda p: p["tries"].update(lent={"lr": 0.002}),
            "tries.lent.model: missing; expected one of 'lenet', 'lenet2', 'lenet2_bn', 'airbench' (did you mean "
            "tries.lenet? a new try needs its model)",
        ),
        (lambda p: p["train"].update(nesterov="yes"), "train.nesterov: got 'yes' (a word, not a boolean, in YAML 1.2"),
        (
            lambda p: p["tries"]["x"].update(model="lenet_2"),
            "tries.x.model: got 'lenet_2' (did you mean 'lenet2'?); expected one of 'lenet', 'lenet2'",
        ),
        (lambda p: p["train"].update(optimizer="Adam"), "train.optimizer: got 'Adam' (did you mean 'adam'?); expected"),
        (lambda p: p["train"].update(norm_bias_lr=0), "train.norm_bias_lr: got 0; expected a number > 0"),
        (lambda p: p["train"].update(muon_lr=-0.1), "train.muon_lr: got -0.1; expected a number >= 0"),
        (lambda p: p["tries"]["x"].update(muon_momentum=1), "tries.x.muon_momentum: got 1; expected a number >= 0"),
        (lambda p: p["train"].update(warmup=1.0), "train.warmup: got 1.0; expected a number >= 0 and < 1"),
        (lambda p: p["tries"]["x"].update(momentum=1.5), "tries.x.momentum: got 1.5; expected a number >= 0 and < 1"),
        (lambda p: p["tries"]["x"].update(lr_start=-1), "tries.x.lr_start: got -1; expected a number >= 0"),
        (lambda p: p["train"].update(lr_end="0.1"), "train.lr_end: got '0.1'; expected a number >= 0"),
        (
            lambda p: p["train"].update(label_smoothing=1),
            "train.label_smoothing: got 1; expected a number >= 0 and < 1",
        ),
        (lambda p: p["tries"]["x"].update(lookahead=0.95, lookahead_every=5), "tries.x.lookahead_every: unknown key"),
        (lambda p: p["train"].update(lookahead=1.0), "train.lookahead: got 1.0; expected a number >= 0 and < 1"),
        (lambda p: p["train"].update(flip=1), "train.flip: got 1; expected true, false or 'alternate'"),
        (lambda p: p["train"].update(flip="always"), "train.flip: got 'always'; expected true, false or 'alternate'"),
        (lambda p: p["train"].update(translate=2.5), "train.translate: got 2.5; expected an integer from 0 to 16"),
        (lambda p: p["tries"]["x"].update(translate=40), "tries.x.translate: got 40"),
        (lambda p: p["train"].update(tta="mirror"), "train.tta: got 'mirror'; expected one of 'none', 'flip'"),
        (
            lambda p: p["tries"]["x"].update(widths=[16, 32, 64]),
            "tries.x.widths: model 'lenet2' does not take it; only airbench does, so remove the key",
        ),
        (
            lambda p: p["tries"]["x"].update(model="airbench", widths=[16, 32]),
            "tries.x.widths: got [16, 32]; model 'airbench' takes 3 widths, one per block",
        ),
        (
            lambda p: p["tries"]["x"].update(model="airbench", widths=[16, 0, 8]),
            "tries.x.widths: got [16, 0, 8]; expected a list of positive integers",
        ),
        (lambda p: p["train"].update(widths=[16, 32, 64]), "train.widths: unknown key"),
        (
            lambda p: p["tries"]["x"].update(whiten_bias_epochs=3),
            "tries.x.whiten_bias_epochs: model 'lenet2' does not take it; only airbench does, so remove the key",
        ),
        (
            lambda p: p["tries"]["x"].update(model="airbench", whiten_bias_epochs=-1),
            "tries.x.whiten_bias_epochs: got -1; expected an integer >= 0",
        ),
        (
            lambda p: p["tries"]["x"].update(logit_divisor=9),
            "tries.x.logit_divisor: model 'lenet2' does not take it; only airbench does, so remove the key",
        ),
        (
            lambda p: p["tries"]["x"].update(model="airbench", logit_divisor=0),
            "tries.x.logit_divisor: got 0; expected a number > 0",
        ),
        (
            lambda p: p["tries"]["x"].update(model="airbench", batchnorm_momentum=0),
            "tries.x.batchnorm_momentum: got 0; expected a number > 0 and <= 1",
        ),
        (
            lambda p: p["tries"]["x"].update(model="airbench", batchnorm_momentum=1.5),
            "tries.x.batchnorm_momentum: got 1.5; expected a number > 0 and <= 1",
        ),
        (lambda p: p["train"].update(batchnorm_momentum=0.4), "train.batchnorm_momentum: unknown key"),
        (
            lambda p: p["tries"]["x"].update(model="airnet"),
            "expected one of 'lenet', 'lenet2', 'lenet2_bn', 'airbench'; a model of your own goes in "
            "stages/models.py and stages/params.py (README: Adding a model)",
        ),
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
    assert "is invalid (3 problems); fix these and rerun" in message
    assert all(key in message for key in ("tries.lenet.epoch", "train.lr", "tries.lenet2.model"))


def test_a_combination_that_cannot_work_is_named_beside_other_problems(params):
    params["tries"]["lenet"]["epoch"] = 3
    params["augment"]["rotation"] = -1
    params["tries"]["lenet2_aug"]["nesterov"] = True  # with adam: valid alone, not with the try's optimizer
    problems = check_params(params)
    assert len(problems) == 3, problems
    assert [problem.split(":")[0] for problem in problems] == [
        "augment.rotation",
        "tries.lenet.epoch",
        "tries.lenet2_aug.nesterov",
    ]
    # A key the combination reads is unsound: it cannot be judged, and is not guessed at.
    params["train"]["momentum"] = -1
    assert [problem.split(":")[0] for problem in check_params(params)] == [
        "train.momentum",
        "augment.rotation",
        "tries.lenet.epoch",
    ]


def test_combinations_are_judged_beside_unrelated_bad_keys_and_named_once(params):
    params["train"].update(nesterov=True, epochs=0)  # with adam: breaks the three tries that inherit it
    params["tries"]["airbench"].update(widths=[32, 64], flip="maybe")
    problems = check_params(params)
    assert [problem.split(":")[0] for problem in problems] == [
        "train.epochs",
        "tries.airbench.flip",
        "train.nesterov",
        "tries.airbench.widths",
    ]
    assert problems[2].endswith(
        "got optimizer 'adam' and momentum 0.0 for tries lenet, lenet2, lenet2_aug; "
        "set nesterov to false or use sgd with momentum"
    )


@pytest.mark.parametrize("text, expected", [("train: [", "not valid YAML"), ("", "expected a mapping")])
def test_unreadable_params_files_are_refused(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=expected):
        load_params(path)


@pytest.mark.parametrize(
    "text",
    ["yes", "No", "off", "ON", "y", "true", "FALSE", "1e-3", "-1.5E+2", ".5", "5.", "1_000", "010", "0o17", "0x1F",
     "0b101", "-0x_f", ".inf", "~", "null", "2026-12-01", "1:20", "[1e-3, no, 010]"],
)  # fmt: skip
def test_a_value_means_to_the_stages_what_dvc_shows(text):
    """DVC reads params.yaml with ruamel.yaml, in YAML 1.2, for `dvc params diff` and `dvc exp show`; in
    PyYAML's default, YAML 1.1, `yes` and `off` are booleans and `1e-3` is a word."""
    dvcs = YAML(typ="safe").load(f"key: {text}")["key"]
    ours = read_yaml(f"key: {text}")["key"]
    assert (ours, type(ours)) == (dvcs, type(dvcs))


def test_a_float_without_a_digit_is_a_word_that_the_checks_name(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / PARAMS_FILE).read_text().replace("\n  lr: 0.001 ", "\n  lr: ._ ", 1))
    with pytest.raises(ParamsError) as raised:  # "._" matches YAML 1.2's float pattern: float(".") would fail
        load_params(path)
    assert raised.value.problems == ["train.lr: got '._'; expected a number > 0"]


def test_yaml_11_booleans_are_named_as_words_and_an_exponent_is_a_number(tmp_path):
    """What `dvc exp run -S train.augment=yes -S train.tta=off -S train.lr=1e-3` would leave in params.yaml."""
    text = (ROOT / PARAMS_FILE).read_text()
    for key, shipped, typed in [("lr", "0.001", "1e-3"), ("augment", "false", "yes"), ("tta", "none", "off")]:
        text = text.replace(f"\n  {key}: {shipped} ", f"\n  {key}: {typed} ", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert raised.value.problems == [
        "train.augment: got 'yes' (a word, not a boolean, in YAML 1.2, which DVC and the stages read); "
        "expected true or false",
        "train.tta: got 'off'; expected one of 'none', 'flip', 'flip_translate'",
    ]
    path.write_text(text.replace("augment: yes", "augment: true").replace("tta: off", "tta: flip"))
    assert load_params(path)["train"]["lr"] == 0.001


def test_a_try_config_holds_the_posts_recipe_only_when_it_augments(params):
    assert "augment_recipe" not in try_config(params, "lenet2")
    assert try_config(params, "lenet2_aug")["augment_recipe"] == params["augment"]


def test_configure_writes_each_try_config_and_train_reads_it_back(tmp_path, params):
    write_try_configs(params, tmp_path / "configs")
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == sorted(f"{t}.yaml" for t in params["tries"])
    for name in params["tries"]:
        config, recipe = read_try_config(name, tmp_path / "configs")
        assert config == resolve_try(params, name)
        assert recipe == (params["augment"] if config["augment"] else None)


def test_a_missing_or_edited_try_config_is_named(tmp_path, params):
    with pytest.raises(PipelineError, match="configs/lenet.yaml not found; `dvc repro` writes it"):
        read_try_config("lenet", tmp_path / "configs")
    write_try_configs(params, tmp_path / "configs")
    configured = "the tries configured are airbench, lenet, lenet2, lenet2_aug: check the name"
    with pytest.raises(PipelineError, match=f"lenet3.yaml not found; {configured}"):
        read_try_config("lenet3", tmp_path / "configs")  # a mistyped name: dvc repro would not write it
    path = tmp_path / "configs" / "lenet.yaml"
    path.write_text(path.read_text().replace("epochs: 12", "epochs: twelve"))
    with pytest.raises(ParamsError, match="lenet.yaml.epochs: got 'twelve'"):
        read_try_config("lenet", tmp_path / "configs")


@pytest.mark.parametrize(
    "change, named",
    [
        # An option put in train is named there, not again in every try that inherits it.
        (lambda p: p["train"].update(widths=[1, 2, 3]), ["train.widths"]),
        # A bad value is one problem, not also an option the model does not take.
        (lambda p: p["tries"]["x"].update(widths="x"), ["tries.x.widths"]),
        # A try's own valid keys are judged even where train's are missing.
        (
            lambda p: (p["train"].pop("optimizer"), p["tries"]["x"].update(optimizer="sgd", nesterov=True)),
            ["train.optimizer", "tries.x.nesterov"],
        ),
        # A try name that is no string is named, and does not stop the others from being judged.
        (
            lambda p: p["tries"].update({1: {"model": "lenet", "nesterov": True}}),
            ["tries.1", "tries.1.nesterov"],
        ),
    ],
)
def test_each_problem_is_named_once_where_it_is(params, change, named):
    params["tries"] = {"x": {"model": "lenet"}}
    change(params)
    assert [problem.split(":")[0] for problem in check_params(params)] == named


@pytest.mark.e2e
def test_exp_run_set_changes_only_the_lines_of_the_values_it_sets(tmp_path):
    """`dvc exp run -S` rewrites params.yaml: the shipped file is in the form DVC writes (lists in block
    style), so the diff a user sees after an experiment is the values set and nothing else. A toy stage
    that reads params keeps it to DVC's own work."""
    shutil.copy(ROOT / "params.yaml", tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  echo:\n    cmd: echo > out\n    params: [train]\n    outs: [out]\n")
    run(["git", "init", "-q"], cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    run(["git", "add", "-A"], cwd=tmp_path)
    run(["git", "commit", "-qm", "shipped params"], cwd=tmp_path)
    dvc("exp", "run", "-S", "train.lr=0.002", "-S", "tries.airbench.widths=[16,64,128]", cwd=tmp_path)
    diff = run(["git", "diff", "-U0", "params.yaml"], cwd=tmp_path).stdout
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    values = [line[0] + line[1:].split("#")[0].strip() for line in changed]  # the sign, then the value alone
    assert values == ["-lr: 0.001", "+lr: 0.002", "-- 32", "+- 16"]
