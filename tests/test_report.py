"""The report stage: the post's figures, one set per try, from the checkpoints' histories."""

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data import Dataset, Split
from stages.errors import PipelineError
from stages.outputs import outputs_for
from stages.report import report

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture
def dataset():
    images = np.zeros((20, 3, 32, 32), np.uint8)
    images[:, 0] = 255  # pure red: the grid must show them red, not un-normalised into something else
    split = Split(torch.from_numpy(images), torch.arange(20) % 10)
    return Dataset(split, split, CLASSES)


def write_checkpoint(name, epochs):
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 10.0 * e, "val_loss": 2.1 / e, "val_acc": 9.0 * e}
               for e in range(1, epochs + 1)]  # fmt: skip
    path = outputs_for(name).model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "config": {}, "classes": CLASSES, "history": history}, path)


def test_report_draws_the_grid_each_try_and_the_comparison(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    write_checkpoint("lenet", 3)
    write_checkpoint("mine", 2)
    report(["lenet", "mine"], dataset, tmp_path / "plots" / "report")
    figures = {p.name: Image.open(p) for p in (tmp_path / "plots" / "report").iterdir()}
    assert set(figures) == {"samples.png", "lenet_curves.png", "mine_curves.png", "val_acc_by_try.png"}
    assert all(f.format == "PNG" and f.width > 300 for f in figures.values())
    pixels = np.asarray(figures["samples.png"].convert("RGB")).reshape(-1, 3)
    assert (pixels == [255, 0, 0]).all(axis=1).sum() > 1000  # the images' own red, exactly


def test_a_missing_checkpoint_names_the_stage_to_run(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"models/lenet.pt is missing; run `dvc repro train@lenet` first"):
        report(["lenet"], dataset, tmp_path / "plots" / "report")
    assert not (tmp_path / "plots" / "report").exists()
