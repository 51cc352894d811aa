"""Stage `train@<try>`: train one try of params.yaml and write what it learned.

Reads data/cifar10/ and configs/<try>.yaml, the try's effective config that the configure
stage writes (`train` overlaid with `tries.<try>`, plus `augment` when the try augments). Writes:
  models/<try>.pt                 state dict, effective config, class names, history, and the final
                                  evaluation's class probabilities of the test images (for the report)
  metrics/<try>.json              last epoch's train/val loss and accuracy, best epoch, size, time, device and threads
  plots/<try>/history.csv         epoch,train_loss,train_acc,val_loss,val_acc
  plots/<try>/predictions.csv     actual,predicted class of every test image

    python -m stages.train lenet2_aug
"""

import argparse
import math
import sys
import time

import torch
from torch.nn import functional as F

from stages.augment import Augmentation
from stages.data import DATASET_DIR, Dataset, load_dataset
from stages.errors import PipelineError, exits_cleanly
from stages.lineage import stop_when_dvc_exits
from stages.loop import (
    NonFiniteLoss,
    build_updates,
    evaluate,
    keep_freed_memory,
    normalise,
    on_device,
    pick_device,
    train_one_epoch,
)
from stages.models import build_model_for, count_parameters
from stages.outputs import HISTORY_HEADER, atomic_path, history_rows, outputs_for, write_csv, write_json
from stages.params import read_try_config
from stages.translate import FlipTranslate

FIT_IMAGES = 5000  # training images a model whose first layer is set from the data (Airbench) looks at


def train(config, recipe, dataset, outputs, name="try", stop_if_abandoned=lambda: None):
    """Trains one try on dataset and writes its outputs; returns its metrics.

    config: the try's effective config (train's keys and its model); recipe: the post's augmentation
    recipe (params.yaml's augment section), used when config["augment"] is true. stop_if_abandoned is
    called before each epoch and before writing, to raise when nothing wants the outputs any more.
    """
    started = time.perf_counter()
    if config["threads"]:
        torch.set_num_threads(config["threads"])  # for the rest of this process: a stage trains one try
    device = pick_device(config["device"])
    keep_freed_memory()
    torch.manual_seed(config["seed"])  # weight init and dropout
    generator = torch.Generator().manual_seed(config["seed"])  # data order and augmentation draws
    augment = build_augmentation(config, recipe, generator, len(dataset.train.labels))
    # Augmentation reads and writes (N, C, H, W); everything else feeds the model channels_last directly.
    train_split = on_device(dataset.train, device, channels_last=augment is None)
    data = Dataset(train_split, on_device(dataset.test, device, channels_last=True), dataset.classes)
    model = build_model_for(config, len(dataset.classes))
    model.to(device, memory_format=torch.channels_last)
    fit_first_layer(model, train_split)
    total_steps = config["epochs"] * math.ceil(len(data.train.labels) / config["batch_size"])
    updates = build_updates(config, model, total_steps)
    if config["amp"] and device.type != "cuda":
        print(f"train.amp: mixed precision applies on CUDA only; training in float32 on {device}")
    print(
        f"{name}: {config['model']} ({count_parameters(model):,} parameters) on {device}, "
        f"{config['epochs']} epoch{'s' * (config['epochs'] != 1)} of {len(data.train.labels)} images, "
        f"augmentation: {augmentation_words(config)}",
        flush=True,
    )
    history = []
    for epoch in range(1, config["epochs"] + 1):
        stop_if_abandoned()
        freeze_whitening_bias(model, config, epoch)
        row, final = run_epoch(epoch, model, updates, data, config, generator, augment, name)
        history.append(row)
    seconds = time.perf_counter() - started
    metrics = summarise(history, count_parameters(model), seconds, device, torch.get_num_threads())
    stop_if_abandoned()
    write_outputs(outputs, model, config, dataset.classes, history, final, dataset.test.labels, metrics)
    return metrics


def fit_first_layer(model, split):
    """Lets a model whose first layer is set from the data (Airbench) see split's first FIT_IMAGES images.

    They are normalised on the CPU, like the fit itself: a GPU divides by multiplying with the reciprocal,
    which rounds differently, and the filters would then depend on the device.
    """
    if hasattr(model, "fit_to_data"):
        model.fit_to_data(normalise(split.images[:FIT_IMAGES].cpu()))


def freeze_whitening_bias(model, config, epoch):
    """Stops training the whitening layer's bias once its whiten_bias_epochs have passed, as airbench does.

    With nothing to train before the first block, backpropagation stops there: the first block's input
    gradient and the GELU's at the largest resolution are no longer computed (about a sixth of a step on a CPU).
    """
    epochs = config.get("whiten_bias_epochs")
    if epochs is not None and epoch > epochs:
        model.whiten.bias.requires_grad_(False)


def build_augmentation(config, recipe, generator, count):
    """The try's augmentation of uint8 batches (called with the batch and its indices among the count
    training images): the post's recipe, then flip and translate; None for neither."""
    steps = []
    if config["augment"]:
        steps.append(Augmentation(recipe, generator))
    if config["flip"] or config["translate"] > 0:
        steps.append(FlipTranslate(config["flip"], config["translate"], generator, count))
    if len(steps) <= 1:
        return steps[0] if steps else None
    return lambda images, indices: steps[1](steps[0](images, indices), indices)


def augmentation_words(config):
    """What build_augmentation does to the try's training images, for its first line of output."""
    words = ["the post's recipe"] if config["augment"] else []
    if config["flip"]:
        words.append("alternating flip" if config["flip"] == "alternate" else "random flip")
    if config["translate"] > 0:
        words.append(f"translate by up to {config['translate']} px")
    return ", ".join(words) or "none"


def run_epoch(epoch, model, updates, data, config, generator, augment, name):
    """Trains and evaluates one epoch, prints it like the post does; returns its history row and its evaluation."""
    started = time.perf_counter()
    epochs = config["epochs"]
    try:
        fit = train_one_epoch(model, updates, data.train, config["batch_size"], generator, augment, config["amp"],
                              config["label_smoothing"], desc=f"epoch {epoch}/{epochs}")  # fmt: skip
        # Test-time views cost a pass each: only the final evaluation, the try's result, takes them.
        val = evaluate(model, data.test, config["amp"], config["tta"] if epoch == epochs else "none")
    except NonFiniteLoss as bad:
        keys = ["lr", "muon_lr"] if config["muon_lr"] > 0 else ["lr"]  # Muon's lr steps the filters
        raise PipelineError(
            f"{name}: the training loss became {bad.value} at epoch {epoch}, batch {bad.batch}, "
            f"with {' and '.join(f'{key} {config[key]}' for key in keys)}; training diverged, so nothing was "
            f"written. Lower its {' or '.join(keys)} ({', '.join(f'tries.{name}.{key}' for key in keys)}, or "
            f"{' / '.join(f'train.{key}' for key in keys)} where the try takes train's) and rerun"
        ) from None
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        raise PipelineError(
            f"{name}: out of GPU memory with batch_size {config['batch_size']}; "
            f"set a smaller batch_size (tries.{name}.batch_size, or train.batch_size where the try takes train's)"
        ) from None
    print(
        f"epoch {epoch:>2}/{epochs}  training loss: {fit['loss']:.5f}, acc: {fit['acc']:.2f}%  "
        f"validation loss: {val['loss']:.5f}, acc: {val['acc']:.2f}%  ({time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    row = {
        "epoch": epoch,
        "train_loss": fit["loss"],
        "train_acc": fit["acc"],
        "val_loss": val["loss"],
        "val_acc": val["acc"],
    }
    return row, val


def is_out_of_memory(error):
    """Whether error is a GPU running out of memory: CUDA's has a class of its own, Apple's MPS only a message."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or str(error).startswith("MPS backend out of memory")


def summarise(history, parameters, seconds, device, threads):
    """The metrics file's contents. Where the try computed goes with them: the device and the CPU threads decide
    the order in which sums add up, so a run repeats another bit for bit only on the same of both."""
    last = history[-1]
    best = max(history, key=lambda row: row["val_acc"])
    return {
        "val": {"acc": round(last["val_acc"], 4), "loss": round(last["val_loss"], 5)},
        "train": {"acc": round(last["train_acc"], 4), "loss": round(last["train_loss"], 5)},
        "best": {"epoch": best["epoch"], "val_acc": round(best["val_acc"], 4)},
        "epochs": len(history),
        "parameters": parameters,
        "seconds": round(seconds, 1),
        "device": device.type,
        "threads": threads,
    }


def write_outputs(outputs, model, config, classes, history, final, labels, metrics):
    """final: the last epoch's evaluation. An earlier run's metrics go first and the new ones last, so a metrics
    file means every other output is of the same run and complete (DVC removes outputs before a stage runs;
    `python -m stages.train` alone does not)."""
    outputs.metrics.unlink(missing_ok=True)
    with atomic_path(outputs.model) as partial:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        # The test probabilities spare the report a pass over the test images with each try's views (a minute
        # on a CPU for the full set) and give it the probabilities behind predictions.csv on any device.
        checkpoint = {"state_dict": state, "config": config, "classes": classes, "history": history,
                      "test_probabilities": F.softmax(final["logits"], dim=1)}  # fmt: skip
        torch.save(checkpoint, partial)
    write_csv(outputs.history, HISTORY_HEADER, history_rows(history))
    write_csv(
        outputs.predictions,
        ["actual", "predicted"],
        [[classes[a], classes[p]] for a, p in zip(labels.tolist(), final["predictions"].tolist(), strict=True)],
    )
    write_json(outputs.metrics, metrics)


@exits_cleanly
def main(argv=None):
    parser = argparse.ArgumentParser(description="Train one try of params.yaml.")
    parser.add_argument("name", help="a key of params.yaml's tries section")
    name = parser.parse_args(argv).name
    stop_if_abandoned = stop_when_dvc_exits()
    config, recipe = read_try_config(name)
    train(config, recipe, load_dataset(DATASET_DIR), outputs_for(name), name, stop_if_abandoned)


if __name__ == "__main__":
    sys.exit(main())
