"""Checkpoints back into models, and models' class probabilities: what predict and the report stage share."""

import csv
import os
import pickle
import re

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from stages.inference import CheckpointError, load_checkpoint, predict_probabilities
from stages.loop import normalise
from stages.models import MODELS, build_model
from tests.cifar_archive import CLASSES


class RunsACommand:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def save_checkpoint(path, model_name="lenet", **changes):
    """A checkpoint as stages/train.py writes it, of an untrained model, with some entries changed."""
    torch.manual_seed(0)
    state = build_model(model_name).state_dict()
    contents = {"state_dict": state, "config": {"model": model_name, "epochs": 1}, "classes": CLASSES, "history": [],
                "test_probabilities": torch.full((3, len(CLASSES)), 1 / len(CLASSES))}  # fmt: skip
    torch.save({**contents, **changes}, path)
    return path


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_loads_and_predicts_what_it_computes(tmp_path, name):
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "try.pt", name))
    assert type(checkpoint.model) is MODELS[name] and not checkpoint.model.training
    assert checkpoint.classes == CLASSES and checkpoint.config["model"] == name
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    probabilities = predict_probabilities(checkpoint.model, images, batch_size=3)  # batches of 3, 3 and 1
    torch.manual_seed(0)
    reference = build_model(name).eval()
    expected = F.softmax(reference(normalise(images)), dim=1)
    assert probabilities.shape == (7, 10) and torch.allclose(probabilities, expected, atol=1e-6)
    assert torch.allclose(probabilities.sum(1), torch.ones(7))


def test_a_checkpoint_from_before_training_kept_test_probabilities_still_loads(tmp_path):
    older = save_checkpoint(tmp_path / "try.pt")
    contents = torch.load(older, weights_only=True)
    del contents["test_probabilities"]
    torch.save(contents, older)
    checkpoint = load_checkpoint(older)
    assert checkpoint.test_probabilities is None and checkpoint.config["model"] == "lenet"


def test_the_top_class_is_the_prediction_training_recorded(trained_try, learnable_dataset):
    checkpoint = load_checkpoint(trained_try.model)
    predicted = predict_probabilities(checkpoint.model, learnable_dataset.test.images).argmax(1)
    with open(trained_try.predictions) as f:
        recorded = [CLASSES.index(row["predicted"]) for row in csv.DictReader(f)]
    assert predicted.tolist() == recorded
    assert len(checkpoint.history) == 2


def hostile(path, marker):
    torch.save({"state_dict": {}, "config": RunsACommand(f"touch {marker}")}, path)


def hostile_plain_pickle(protocol):
    def write(path, marker):
        path.write_bytes(pickle.dumps({"state_dict": RunsACommand(f"touch {marker}")}, protocol=protocol))

    return write


# torch names the global it refuses for protocols 1 to 3 only: the others must be refused all the same.
PLAIN_PICKLES = {f"plain-pickle-{p}": hostile_plain_pickle(p) for p in (0, 2, pickle.DEFAULT_PROTOCOL)}


@pytest.mark.parametrize("write", [hostile, *PLAIN_PICKLES.values()], ids=["torch.save", *PLAIN_PICKLES])
def test_a_checkpoint_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path, write):
    marker = tmp_path / "ran"
    write(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: it .*nothing in it was run") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    if write is hostile:
        assert "posix.system" in str(refused.value) or "nt.system" in str(refused.value)


def truncated(path):
    save_checkpoint(path)
    path.write_bytes(path.read_bytes()[:4000])


def cut_near_its_end(path):
    save_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-100])


BROKEN = {
    "missing": (lambda path: None, r"no such checkpoint; `dvc repro` trains each try into models/<try>.pt"),
    "a-directory": (lambda path: path.mkdir(), r"a folder, not a file"),
    "empty": (lambda path: path.write_bytes(b""), r"not a readable checkpoint, truncated"),
    "truncated": (truncated, r"not a readable checkpoint, truncated"),
    "cut-near-its-end": (cut_near_its_end, r"not a readable checkpoint, truncated"),
    "text": (lambda path: path.write_text("epoch,val_acc\n1,50.0\n"), r"not a checkpoint: .* not one$"),
    # What the command gets when its arguments are swapped: the image where the checkpoint goes.
    "an-image": (lambda path: Image.new("RGB", (8, 8)).save(path, "JPEG"), r"not a checkpoint: .* not one$"),
    "a-json-file": (lambda path: path.write_text('{"model": "lenet"}'), r"not a checkpoint: .* not one$"),
    "a-list": (lambda path: torch.save([1, 2], path), r"holds a list, not a checkpoint of stages/train.py"),
    "lacks-keys": (
        lambda path: torch.save({"state_dict": {}, "config": {"model": "lenet"}}, path),
        r"lacks classes, history; a checkpoint of stages/train.py holds state_dict, config, classes, history",
    ),
    "unknown-model": (
        lambda path: save_checkpoint(path, config={"model": "resnet"}),
        rf"config.model is 'resnet'; models are {', '.join(MODELS)}$",
    ),
    "no-class-names": (lambda path: save_checkpoint(path, classes=[]), r"classes must be a list of class names"),
    # A config or a history that stages/train.py would not write: named, not left to fail where it is read.
    "views-of-no-kind": (
        lambda path: save_checkpoint(path, config={"model": "lenet", "tta": "mirror"}),
        r"config.tta: got 'mirror'; expected one of 'none', 'flip', 'flip_translate'$",
    ),
    "widths-of-one-block": (
        lambda path: save_checkpoint(path, "airbench", config={"model": "airbench", "widths": [32]}),
        r"config.widths: got \[32\]; model 'airbench' takes 3 widths, one per block$",
    ),
    "history-of-no-epochs": (
        lambda path: save_checkpoint(path, history={"val_acc": 50.0}),
        r"history: expected a list of one mapping per epoch, found dict$",
    ),
    "other-models-weights": (
        lambda path: save_checkpoint(path, "lenet2", config={"model": "lenet"}),
        r"its weights do not fit LeNet: it has unknown conv3.weight, conv3.bias; it has wrong shapes for conv1.weight",
    ),
    "wrong-shapes": (
        lambda path: save_checkpoint(path, classes=CLASSES[:5]),
        r"its weights do not fit LeNet: it has wrong shapes for fc2.weight, fc2.bias",
    ),
    "probabilities-of-other-classes": (
        lambda path: save_checkpoint(path, test_probabilities=torch.full((3, 5), 0.2)),
        r"test_probabilities must be a float tensor of one row of 10 class probabilities per test image, "
        r"found torch.float32 of shape \(3, 5\)$",
    ),
    "predictions-for-probabilities": (
        lambda path: save_checkpoint(path, test_probabilities=torch.tensor([3, 1, 4])),
        r"test_probabilities must be a float tensor .* found torch.int64 of shape \(3,\)$",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_checkpoint_says_what_is_wrong(tmp_path, name):
    write, message = BROKEN[name]
    path = tmp_path / "try.pt"
    write(path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {message}"):
        load_checkpoint(path)
