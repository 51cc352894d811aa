"""Where each try's outputs live, and writing them so that a killed stage leaves nothing that looks complete."""

import csv
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple


class TryOutputs(NamedTuple):
    model: Path
    metrics: Path
    history: Path
    predictions: Path


HISTORY_HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]


def history_rows(history):
    """A try's history (one dict per epoch) as history.csv holds it: losses to 5 decimals, accuracies (%) to 4."""
    return [[row["epoch"], f"{row['train_loss']:.5f}", f"{row['train_acc']:.4f}", f"{row['val_loss']:.5f}",
             f"{row['val_acc']:.4f}"] for row in history]  # fmt: skip


def outputs_for(name):
    return TryOutputs(
        model=Path("models") / f"{name}.pt",
        metrics=Path("metrics") / f"{name}.json",
        history=Path("plots") / name / "history.csv",
        predictions=Path("plots") / name / "predictions.csv",
    )


def fresh_partial(path):
    """A temporary name beside path, after removing those that killed runs left there."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def atomic_path(path):
    """Yields a temporary sibling of path to write to; renames it to path only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = fresh_partial(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path, data):
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(path, header, rows):
    with atomic_path(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@contextmanager
def atomic_dir(path):
    """Yields an empty temporary sibling folder; on success it replaces path as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = fresh_partial(path)
    replaced = partial.with_name(f"{partial.name}-replaced")  # a name fresh_partial clears, should a kill leave it
    partial.mkdir()
    try:
        yield partial
        if path.exists():
            # Out of the way in one step: a removal stopped part-way would leave some of its files at path.
            path.rename(replaced)
        partial.rename(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
