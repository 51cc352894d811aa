"""A trained try as a model that predicts: checkpoint in, class probabilities out.

`python -m stages.predict` runs a try's model on a user's images with predict_probabilities,
which batches, normalises and averages test-time views as evaluation in training does, so that
it sees a try's predictions as training did. The report stage reads checkpoints here too, and
takes the test images' probabilities that training saved in them.

    checkpoint = load_checkpoint("models/lenet2.pt")    # written by stages/train.py
    views = test_time_views(checkpoint)               # the try's tta: what its final evaluation averaged
    probabilities = predict_probabilities(checkpoint.model, images, views)  # uint8 (B, 3, 32, 32) -> (B, 10)

A checkpoint is read with torch.load(weights_only=True): tensors, numbers, strings, lists
and dicts only, so a file whose pickle would run code is refused without running it.
"""

import pickle
import pickletools
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn import functional as F

from stages.errors import FILE_ERRORS, PipelineError, file_problem
from stages.loop import EVAL_BATCH, normalise
from stages.models import MODELS, build_model_for
from stages.params import TRY_SCHEMA, check_mapping, widths_problems
from stages.recipe import predict

CHECKPOINT_KEYS = ("state_dict", "config", "classes", "history")
# The pickle opcodes that import or call: what a file that would run code needs.
OBJECT_OPCODES = {
    "GLOBAL",
    "STACK_GLOBAL",
    "INST",
    "OBJ",
    "REDUCE",
    "NEWOBJ",
    "NEWOBJ_EX",
    "BUILD",
    "EXT1",
    "EXT2",
    "EXT4",
}


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, or not one that stages/train.py writes."""


class Checkpoint(NamedTuple):
    model: torch.nn.Module  # on the CPU, in eval mode
    config: dict  # the try's effective config; config["model"] names the model in stages.models.MODELS
    classes: list
    history: list  # one dict per epoch, as in plots/<try>/history.csv
    # (test images, classes) float: the final evaluation's probabilities, behind plots/<try>/predictions.csv;
    # None in a checkpoint written before training kept them
    test_probabilities: torch.Tensor | None = None


def load_checkpoint(path):
    """The model of a checkpoint written by stages/train.py, ready to predict, with what it was saved with."""
    path = Path(path)
    contents = read_checkpoint(path)
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: holds a {type(contents).__name__}, not a checkpoint of stages/train.py")
    missing = [key for key in CHECKPOINT_KEYS if key not in contents]
    if missing:
        raise CheckpointError(
            f"{path}: lacks {', '.join(missing)}; a checkpoint of stages/train.py holds {', '.join(CHECKPOINT_KEYS)}"
        )
    config, classes = contents["config"], contents["classes"]
    if not isinstance(config, dict) or config.get("model") not in MODELS:
        found = config.get("model") if isinstance(config, dict) else config
        raise CheckpointError(f"{path}: config.model is {found!r}; models are {', '.join(MODELS)}")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: classes must be a list of class names, found {classes!r}")
    check_config_and_history(path, config, contents["history"])
    model = build_model_for(config, len(classes))
    load_weights(model, contents["state_dict"], path)
    model.to(memory_format=torch.channels_last).eval()  # the layout training evaluated in: same rounding
    probabilities = contents.get("test_probabilities")
    if probabilities is not None and not is_probability_table(probabilities, len(classes)):
        raise CheckpointError(f"{path}: test_probabilities must be a float tensor of one row of {len(classes)} "
                              f"class probabilities per test image, found {described(probabilities)}")  # fmt: skip
    return Checkpoint(model, config, classes, contents["history"], probabilities)


def check_config_and_history(path, config, history):
    """The config's values that params.yaml's rules know (a checkpoint from an older version lacks later
    keys), and a history of one dict per epoch, as stages/train.py writes them."""
    known = {key: value for key, value in config.items() if key in TRY_SCHEMA}
    problems = check_mapping("config", known, TRY_SCHEMA)
    if not problems and known.get("widths") is not None:
        problems += widths_problems("config", known["model"], known["widths"])
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        problems.append(f"history: expected a list of one mapping per epoch, found {described(history)}")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}")


def is_probability_table(table, num_classes):
    return isinstance(table, torch.Tensor) and table.is_floating_point() and table.shape[1:] == (num_classes,)


def described(value):
    """A tensor's dtype and shape, or another value's type: what a message about a wrong entry shows of it."""
    return f"{value.dtype} of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__


def read_checkpoint(path):
    """torch.load(weights_only=True), its failures turned into messages that say what is wrong with the file."""
    try:
        with warnings.catch_warnings():
            # It warns about pickle protocols before refusing the file anyway; the refusal says more.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint; `dvc repro` trains each try into models/<try>.pt") from None
    except FILE_ERRORS as error:
        raise CheckpointError(file_problem(path, error, "checkpoint")) from None
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise CheckpointError(f"{path}: not a readable checkpoint ({first_sentence(error)})") from None
        culprit = re.search(r"(?:GLOBAL|class) ([\w.]+)", str(error))
        if not culprit and is_foreign(path):
            # An image or a JSON file fails the way a pickle that would run code does: say what it is not.
            raise not_a_checkpoint(path) from None
        what = f"asks for {culprit.group(1)}" if culprit else "holds more than tensors and plain data"
        raise CheckpointError(
            f"{path}: refused: it {what}, which a checkpoint of stages/train.py never does; "
            "loading it could run code, so nothing in it was run"
        ) from None
    except Exception as error:  # a cut-short zip, an empty file, text: torch.load raises many kinds
        if is_foreign(path):
            raise not_a_checkpoint(path) from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or not written by torch.save ({first_sentence(error)})"
        ) from None


def not_a_checkpoint(path):
    return CheckpointError(
        f"{path}: not a checkpoint: stages/train.py writes them with torch.save, as zip archives "
        "(models/<try>.pt), and this file is not one"
    )


def is_foreign(path):
    """Whether the file is neither a torch.save zip archive (perhaps cut short), nor empty, nor a pickle that
    imports or calls something: an image, text, JSON, which no checkpoint ever was."""
    with open(path, "rb") as file:
        start = file.read(4)
    return bool(start) and start != b"PK\x03\x04" and not builds_objects(path)


def builds_objects(path):
    """Whether the file is a pickle that imports or calls something: read opcode by opcode, nothing run."""
    try:
        with open(path, "rb") as file:
            return any(opcode.name in OBJECT_OPCODES for opcode, _, _ in pickletools.genops(file))
    except Exception:  # not a pickle at all (an image, text): genops stops at the first byte that is no opcode
        return False


def first_sentence(error):
    text = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else "no detail"
    return f"{type(error).__name__}: {text}"


def load_weights(model, state_dict, path):
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: state_dict must map parameter names to tensors")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    problems = [
        f"{label} {', '.join(keys)}"
        for label, keys in (("lacks", missing), ("has unknown", unexpected), ("has wrong shapes for", wrong_shape))
        if keys
    ]
    if problems:
        name = type(model).__name__
        raise CheckpointError(f"{path}: its weights do not fit {name}: it {'; it '.join(problems)}")
    model.load_state_dict(state_dict)


def test_time_views(checkpoint):
    """The views the try's final evaluation averaged (checkpoints written before they existed: none)."""
    return checkpoint.config.get("tta", "none")


@torch.no_grad()
def predict_probabilities(model, images, tta="none", batch_size=EVAL_BATCH):
    """uint8 images (B > 0, 3, 32, 32) -> float32 class probabilities (B, classes) on the CPU, in eval mode.

    Batched as evaluation in training is, normalised by the same function and averaged over the same
    test-time views (tta, the try's config["tta"]), so that the class with the highest probability is
    the prediction training recorded in plots/<try>/predictions.csv.
    """
    model.eval()
    device = next(model.parameters()).device
    parts = images.split(batch_size)
    return torch.cat(
        [F.softmax(predict(model, normalise(part.to(device)), tta).float(), dim=1).cpu() for part in parts]
    )
