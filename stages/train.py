"""Stage `train@<try>`: train one try from params.yaml and write what it learned.

Reads data/cifar10/ and the try's effective config (`train` overlaid with
`tries.<try>`, plus `augment` when the try augments). Writes:
  models/<try>.pt                 state dict, effective config, class names, history
  metrics/<try>.json              last epoch's train/val loss and accuracy, best epoch, size, time
  plots/<try>/history.csv         epoch,train_loss,train_acc,val_loss,val_acc
  plots/<try>/predictions.csv     actual,predicted class of every test image

    python -m stages.train lenet2_aug
"""

import argparse
import sys
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

from stages.augment import build_augmentation
from stages.data import DATASET_DIR, Split, load_dataset
from stages.errors import PipelineError, exits_cleanly
from stages.models import build_model, count_parameters
from stages.outputs import atomic_path, outputs_for, write_csv, write_json
from stages.params import load_params, resolve_try

MEAN, STD = 0.5, 0.5  # the post's Normalize((0.5,)*3, (0.5,)*3)
EVAL_BATCH = 1000  # evaluation holds no gradients, so larger batches are cheap
HISTORY_HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise PipelineError(f"device {name!r} is not available on this machine; set train.device to auto or cpu")
    return torch.device(name)


def build_optimizer(config, parameters):
    lr, decay = config["lr"], config["weight_decay"]
    if config["optimizer"] == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=config["momentum"], weight_decay=decay)


def normalise(images):
    """uint8 (B, 3, H, W) -> float in [-1, 1], as ToTensor + Normalize(0.5, 0.5) give."""
    return images.float().div_(255).sub_(MEAN).div_(STD)


def train_one_epoch(model, optimizer, split, batch_size, generator, augment=None, desc="train"):
    """One pass over split in a seeded random order; returns mean loss and accuracy (%) over images."""
    model.train()
    device = split.images.device
    count = len(split.labels)
    order = torch.randperm(count, generator=generator).to(device)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for indices in tqdm(order.split(batch_size), desc=desc, unit="batch", leave=False, disable=None):
        images, labels = split.images[indices], split.labels[indices]
        if augment is not None:
            images = augment(images)
        outputs = model(normalise(images))
        loss = F.cross_entropy(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device: .item() here would stall a GPU every step.
        total_loss += loss.detach() * len(indices)
        correct += (outputs.argmax(1) == labels).sum()
    return {"loss": total_loss.item() / count, "acc": 100 * correct.item() / count}


@torch.no_grad()
def evaluate(model, split):
    """Loss and accuracy (%) over every image of split, in eval mode (dropout off)."""
    model.eval()
    total_loss, predictions = 0.0, []
    for start in range(0, len(split.labels), EVAL_BATCH):
        images = split.images[start : start + EVAL_BATCH]
        labels = split.labels[start : start + EVAL_BATCH]
        outputs = model(normalise(images))
        total_loss += F.cross_entropy(outputs, labels, reduction="sum").item()
        predictions.append(outputs.argmax(1))
    predictions = torch.cat(predictions)
    count = len(split.labels)
    accuracy = 100 * (predictions == split.labels).sum().item() / count
    return {"loss": total_loss / count, "acc": accuracy, "predictions": predictions.cpu()}


def train(config, recipe, dataset, outputs, name="try"):
    """Trains one try on dataset and writes its outputs; returns its metrics."""
    started = time.perf_counter()
    device = pick_device(config["device"])
    torch.manual_seed(config["seed"])  # weight init, dropout and augmentation
    shuffle = torch.Generator().manual_seed(config["seed"])
    train_split = Split(*(t.to(device) for t in dataset.train))
    test_split = Split(*(t.to(device) for t in dataset.test))
    model = build_model(config["model"], len(dataset.classes)).to(device)
    optimizer = build_optimizer(config, model.parameters())
    augment = build_augmentation(recipe) if config["augment"] else None
    print(
        f"{name}: {config['model']} ({count_parameters(model):,} parameters) on {device}, "
        f"{config['epochs']} epochs of {len(train_split.labels)} images, augment={config['augment']}",
        flush=True,
    )

    history = []
    for epoch in range(1, config["epochs"] + 1):
        epoch_start = time.perf_counter()
        fit = train_one_epoch(
            model,
            optimizer,
            train_split,
            config["batch_size"],
            shuffle,
            augment,
            desc=f"epoch {epoch}/{config['epochs']}",
        )
        val = evaluate(model, test_split)
        history.append(
            {
                "epoch": epoch,
                "train_loss": fit["loss"],
                "train_acc": fit["acc"],
                "val_loss": val["loss"],
                "val_acc": val["acc"],
            }
        )
        print(
            f"epoch {epoch:>2}/{config['epochs']}  training loss: {fit['loss']:.5f}, acc: {fit['acc']:.2f}%  "
            f"validation loss: {val['loss']:.5f}, acc: {val['acc']:.2f}%  ({time.perf_counter() - epoch_start:.1f} s)",
            flush=True,
        )

    metrics = summarise(history, count_parameters(model), time.perf_counter() - started)
    write_outputs(
        outputs, model, config, dataset.classes, history, val["predictions"], test_split.labels.cpu(), metrics
    )
    return metrics


def summarise(history, parameters, seconds):
    last = history[-1]
    best = max(history, key=lambda row: row["val_acc"])
    return {
        "val": {"acc": round(last["val_acc"], 4), "loss": round(last["val_loss"], 5)},
        "train": {"acc": round(last["train_acc"], 4), "loss": round(last["train_loss"], 5)},
        "best": {"epoch": best["epoch"], "val_acc": round(best["val_acc"], 4)},
        "epochs": len(history),
        "parameters": parameters,
        "seconds": round(seconds, 1),
    }


def write_outputs(outputs, model, config, classes, history, predictions, labels, metrics):
    """Metrics go last, so a complete metrics file means every other output is complete too."""
    with atomic_path(outputs.model) as partial:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "config": config, "classes": classes, "history": history}, partial)
    write_csv(
        outputs.history,
        HISTORY_HEADER,
        [
            [
                row["epoch"],
                f"{row['train_loss']:.5f}",
                f"{row['train_acc']:.4f}",
                f"{row['val_loss']:.5f}",
                f"{row['val_acc']:.4f}",
            ]
            for row in history
        ],
    )
    write_csv(
        outputs.predictions,
        ["actual", "predicted"],
        [[classes[a], classes[p]] for a, p in zip(labels.tolist(), predictions.tolist(), strict=True)],
    )
    write_json(outputs.metrics, metrics)


@exits_cleanly
def main(argv=None):
    parser = argparse.ArgumentParser(description="Train one try of params.yaml.")
    parser.add_argument("name", help="a key of params.yaml's tries section")
    name = parser.parse_args(argv).name
    params = load_params()
    config = resolve_try(params, name)
    train(config, params["augment"], load_dataset(DATASET_DIR), outputs_for(name), name)


if __name__ == "__main__":
    sys.exit(main())
