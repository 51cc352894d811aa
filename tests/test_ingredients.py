"""Each ingredient of the 4th try's recipe reaches training: a try that sets it trains differently, its lr
schedule sets each step's lr before the step, its whitening is fit to the training images, and its
final evaluation and the report take the same test-time views."""

import csv

import pytest
import torch

from stages import inference
from stages import train as train_module
from stages.loop import evaluate, normalise
from stages.models import build_model
from stages.params import load_params, resolve_try
from stages.recipe import LrSchedule
from stages.train import FIT_IMAGES, train
from tests.conftest import ROOT, outputs_in, same_weights

PARAMS = load_params(ROOT / "params.yaml")
SMALL = {"widths": [16, 16, 32], "epochs": 1, "batch_size": 100, "lr": 0.15, "device": "cpu"}
OFF = {"nesterov": False, "norm_bias_lr": 1.0, "muon_lr": 0.0, "warmup": 0.0, "lr_end": 1.0, "label_smoothing": 0.0,
       "lookahead": 0.0, "flip": False, "translate": 0, "tta": "none"}  # fmt: skip
# The 4th try, small and short, with every ingredient off: each case below turns one back on.
PLAIN = {**resolve_try(PARAMS, "airbench"), **SMALL, **OFF}
# (what the baseline adds to PLAIN, the ingredient added on top of it)
INGREDIENTS = {
    "nesterov": ({}, {"nesterov": True}),
    "norm_bias_lr": ({}, {"norm_bias_lr": 4.0}),
    "muon_lr": ({}, {"muon_lr": 0.12}),
    "warmup": ({}, {"warmup": 0.5, "lr_start": 0.1}),
    "lr_end": ({}, {"lr_end": 0.0}),
    "label_smoothing": ({}, {"label_smoothing": 0.2}),
    "lookahead": ({}, {"lookahead": 0.95}),
    "flip": ({}, {"flip": True}),
    "flip alternate": ({}, {"flip": "alternate"}),
    "translate": ({}, {"translate": 2}),
    "translate after the post's augmentation": ({"augment": True}, {"translate": 2}),
    "batchnorm_momentum": ({}, {"batchnorm_momentum": 0.1}),  # the running statistics only
    "logit_divisor": ({}, {"logit_divisor": 3}),
}


def train_small(dataset, directory, **changes):
    """(metrics, outputs) of PLAIN with changes, trained on dataset."""
    outputs = outputs_in(directory, "airbench")
    metrics = train({**PLAIN, **changes}, PARAMS["augment"], dataset, outputs, "airbench")
    return metrics, outputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, learnable_dataset):
    """train_small on learnable_dataset, each set of changes trained once for the whole module."""
    done = {}

    def once(**changes):
        key = repr(sorted(changes.items()))
        if key not in done:
            done[key] = train_small(learnable_dataset, tmp_path_factory.mktemp("trained"), **changes)
        return done[key]

    return once


@pytest.mark.parametrize("baseline, ingredient", INGREDIENTS.values(), ids=INGREDIENTS)
def test_each_ingredient_changes_the_trained_weights(trained, baseline, ingredient):
    _, without = trained(**baseline)
    _, with_it = trained(**baseline, **ingredient)
    assert not same_weights(without, with_it)


@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
def test_the_final_evaluation_and_the_report_take_the_trys_test_time_views(trained, learnable_dataset, tta):
    plain, plain_outputs = trained()
    viewed, outputs = trained(tta=tta)
    # The views change what is evaluated, not what is trained.
    assert same_weights(plain_outputs, outputs)
    assert viewed["val"]["loss"] != plain["val"]["loss"]
    checkpoint = inference.load_checkpoint(outputs.model)
    assert inference.test_time_views(checkpoint) == tta
    test = learnable_dataset.test
    again = evaluate(checkpoint.model, test, tta=tta)  # the metrics file rounds: 5 decimals, 2 for percentages
    assert again["loss"] == pytest.approx(viewed["val"]["loss"], abs=1e-5)
    assert again["acc"] == pytest.approx(viewed["val"]["acc"], abs=1e-2)
    # The probabilities the report reads are the views' average, as the prediction command's are.
    views = inference.predict_probabilities(checkpoint.model, test.images, tta)
    assert torch.allclose(checkpoint.test_probabilities, views, atol=1e-6)
    plain_view = inference.predict_probabilities(checkpoint.model, test.images)
    assert not torch.allclose(checkpoint.test_probabilities, plain_view, atol=1e-3)
    with open(outputs.predictions) as f:
        recorded = [learnable_dataset.classes.index(row["predicted"]) for row in csv.DictReader(f)]
    assert views.argmax(1).tolist() == checkpoint.test_probabilities.argmax(1).tolist() == recorded


def test_a_checkpoint_rebuilds_the_model_with_the_trys_options(trained, learnable_dataset):
    metrics, outputs = trained(batchnorm_momentum=0.1, logit_divisor=3)
    model = inference.load_checkpoint(outputs.model).model
    assert model.logit_divisor == 3
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    # The divisor scales the logits, so the loss tells whether the rebuilt model uses it.
    assert evaluate(model, learnable_dataset.test)["loss"] == pytest.approx(metrics["val"]["loss"], abs=1e-5)


def test_the_schedule_sets_each_steps_lr_before_the_step(tmp_path, learnable_dataset, monkeypatch):
    build_updates, seen = train_module.build_updates, []

    def recording(config, model, total_steps):
        updates = build_updates(config, model, total_steps)
        step = updates.optimizer.step

        def recorded_step():
            seen.append([group["lr"] for group in updates.optimizer.param_groups])
            step()

        updates.optimizer.step = recorded_step
        return updates

    monkeypatch.setattr(train_module, "build_updates", recording)
    changes = {"epochs": 2, "warmup": 0.3, "lr_start": 0.1, "lr_end": 0.0, "norm_bias_lr": 4.0}
    train_small(learnable_dataset, tmp_path, **changes)
    schedule = LrSchedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), {**PLAIN, **changes}, total_steps=20)
    bases = [PLAIN["lr"] * 4.0, PLAIN["lr"]]  # the BatchNorm biases' group, then the rest
    assert len(seen) == 20
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([base * schedule.factor(step) for base in bases]), step
    assert seen[0][1] == pytest.approx(0.1 * PLAIN["lr"]) and seen[-1] == [0.0, 0.0]


def test_the_whitening_filters_are_fit_to_the_first_training_images(trained, learnable_dataset):
    _, outputs = trained()
    whitening = inference.load_checkpoint(outputs.model).model.whiten.weight
    fitted = build_model("airbench", widths=PLAIN["widths"])
    fitted.fit_to_data(normalise(learnable_dataset.train.images[:FIT_IMAGES]))
    assert torch.allclose(whitening, fitted.whiten.weight, atol=1e-6)
    assert not torch.allclose(whitening, build_model("airbench", widths=PLAIN["widths"]).whiten.weight)
