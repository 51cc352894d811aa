"""The report stage: the post's figures, one set per try, from the checkpoints' histories, and what each try
gets wrong: accuracy per class and its most confident mistakes."""

import csv
import math
import zlib

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from stages import inference
from stages.data import Dataset, Split
from stages.errors import PipelineError
from stages.models import build_model
from stages.outputs import outputs_for
from stages.params import TTA_MODES
from stages.report import (
    PAGE_COLOURS,
    TRAINING_COLOUR,
    TTA_WORDS,
    class_accuracy,
    conditions_of,
    confident_mistakes,
    draw_class_accuracy,
    draw_comparison,
    draw_curves,
    report,
    write_histories,
)

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture
def dataset():
    images = np.zeros((20, 3, 32, 32), np.uint8)
    images[:, 0] = 255  # pure red: the grid must show them red, not un-normalised into something else
    split = Split(torch.from_numpy(images), torch.arange(20) % 10)
    return Dataset(split, split, CLASSES)


def write_checkpoint(name, epochs, test_count=20):
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 10.0 * e, "val_loss": 2.1 / e, "val_acc": 9.0 * e}
               for e in range(1, epochs + 1)]  # fmt: skip
    path = outputs_for(name).model
    path.parent.mkdir(parents=True, exist_ok=True)
    state = build_model("lenet").state_dict()
    # Random answers, a different set for each try (seeded by its name): most of them wrong.
    logits = torch.randn(test_count, len(CLASSES), generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    checkpoint = {"state_dict": state, "config": {"model": "lenet"}, "classes": CLASSES, "history": history,
                  "test_probabilities": logits.softmax(1)}  # fmt: skip
    torch.save(checkpoint, path)


def test_report_draws_the_grid_each_try_and_the_comparison(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    write_checkpoint("lenet", 3)
    write_checkpoint("mine", 2)
    report(["lenet", "mine"], dataset, tmp_path / "plots" / "report")
    figures = {p.name: Image.open(p) for p in (tmp_path / "plots" / "report").iterdir()}
    per_try = {f"{name}_{figure}.png" for name in ("lenet", "mine") for figure in ("curves", "mistakes")}
    assert set(figures) == {"samples.png", "val_acc_by_try.png", "accuracy_by_class.png", *per_try}
    assert all(f.format == "PNG" and f.width > 300 for f in figures.values())
    for name in ("samples.png", "lenet_mistakes.png"):
        pixels = np.asarray(figures[name].convert("RGB")).reshape(-1, 3)
        assert (pixels == [255, 0, 0]).all(axis=1).sum() > 1000, name  # the images' own red, exactly
    with open(tmp_path / "plots" / "histories.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["try"], row["epoch"]) for row in rows] == [("lenet", "1"), ("lenet", "2"), ("lenet", "3"),
                                                            ("mine", "1"), ("mine", "2")]  # fmt: skip
    assert rows[4]["val_acc"] == f"{9.0 * 2:.4f}" and rows[4]["train_loss"] == f"{2.0 / 2:.5f}"


def test_the_histories_file_holds_each_trys_history_csv_with_its_name(tmp_path, trained_try):
    """The overlays' file: a try's lines are its own history.csv's, as training wrote them, with its name first."""
    history = inference.load_checkpoint(trained_try.model).history
    write_histories({"lenet": history, "mine": history[:1]}, tmp_path / "histories.csv")
    header, *rows = trained_try.history.read_text().splitlines()
    expected = [f"try,{header}", *(f"lenet,{row}" for row in rows), f"mine,{rows[0]}"]
    assert (tmp_path / "histories.csv").read_text().splitlines() == expected


def test_the_figures_plot_each_trys_own_numbers(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    write_checkpoint("lenet", 3)
    write_checkpoint("mine", 2)
    drawn = {}
    monkeypatch.setattr("stages.report.save", lambda fig, path: drawn.update({path.name: fig}))
    report(["lenet", "mine"], dataset, tmp_path / "plots" / "report")
    checkpoints = {name: inference.load_checkpoint(outputs_for(name).model) for name in ("lenet", "mine")}
    series = lambda name, key: [row[key] for row in checkpoints[name].history]  # noqa: E731
    comparison = drawn["val_acc_by_try.png"].axes[0].get_lines()
    assert [line.get_label().split()[0] for line in comparison] == ["lenet", "mine"]
    assert [list(line.get_ydata()) for line in comparison] == [series("lenet", "val_acc"), series("mine", "val_acc")]
    for name in checkpoints:
        loss_ax, acc_ax = drawn[f"{name}_curves.png"].axes
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
            # LeNet's dropout is on while it trains; nothing else sets these tries' training numbers apart.
            training, validation = series(name, f"train_{metric}"), series(name, f"val_{metric}")
            assert lines == {"training (dropout on)": training, "validation": validation}
    bars = drawn["accuracy_by_class.png"].axes[0].containers
    for container, (name, checkpoint) in zip(bars, checkpoints.items(), strict=True):
        expected = class_accuracy(checkpoint.test_probabilities, dataset.test.labels, len(CLASSES)).tolist()
        assert container.get_label().startswith(name)
        assert [bar.get_height() for bar in container] == pytest.approx(expected)
    assert bars[0].datavalues.tolist() != bars[1].datavalues.tolist()
    plt.close("all")


def test_the_legends_say_how_training_and_the_last_validation_were_measured(monkeypatch):
    drawn = []
    monkeypatch.setattr("stages.report.save", lambda fig, path: drawn.append(fig))
    config = {"model": "airbench", "flip": "alternate", "translate": 2, "label_smoothing": 0.2, "tta": "flip_translate"}
    conditions = conditions_of(inference.Checkpoint(build_model("airbench"), config, CLASSES, []))
    history = [{"epoch": e, "train_loss": 1.5, "train_acc": 80.0, "val_loss": 0.6, "val_acc": 85.0 + e} for e in (1, 2)]
    draw_curves("airbench", history, None, PAGE_COLOURS[3], conditions)
    draw_comparison({"airbench": history}, None, {"airbench": conditions.final_views})
    (loss_ax, acc_ax), (comparison,) = drawn[0].axes, drawn[1].axes
    labels = lambda ax: [line.get_label() for line in ax.get_lines()]  # noqa: E731
    star = "last epoch: with test-time flips and shifts"
    assert labels(loss_ax) == ["training (augmented images, label smoothing 0.2)", "validation", star]
    assert labels(acc_ax) == ["training (augmented images)", "validation", star]
    assert list(acc_ax.get_lines()[2].get_xydata()[0]) == [2, 87.0]  # on the last validation point
    # Validation in the colour given (the try's on the plots page), training apart from every try's.
    assert line_colours(acc_ax.get_lines()) == [TRAINING_COLOUR, PAGE_COLOURS[3], PAGE_COLOURS[3]]
    assert TRAINING_COLOUR not in PAGE_COLOURS
    assert labels(comparison) == ["airbench (87.00%, with test-time flips and shifts)"]
    augmented = {"model": "lenet2", "augment": True}
    plain = conditions_of(inference.Checkpoint(build_model("lenet2"), augmented, CLASSES, []))
    assert plain == (("augmented images", "dropout on"), (), "none")
    assert set(TTA_WORDS) == set(TTA_MODES) - {"none"}
    plt.close("all")


@pytest.mark.parametrize("epochs", [1, 3])
def test_the_epoch_axes_tick_whole_epochs_only(monkeypatch, epochs):
    drawn = []
    monkeypatch.setattr("stages.report.save", lambda fig, path: drawn.append(fig))
    history = [{f"{split}_{metric}": 1.0 for split in ("train", "val") for metric in ("loss", "acc")} | {"epoch": e}
               for e in range(1, epochs + 1)]  # fmt: skip
    draw_curves("lenet", history, None, PAGE_COLOURS[0])
    draw_comparison({"lenet": history, "mine": history}, None)
    axes = [ax for fig in drawn for ax in fig.axes]
    assert len(axes) == 3
    for ax in axes:
        low, high = ax.get_xlim()
        assert [tick for tick in ax.get_xticks() if low <= tick <= high] == list(range(1, epochs + 1))


def test_accuracy_per_class_counts_each_classs_own_images():
    probabilities = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.3, 0.3, 0.4], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])  # class 0: 2 of 2 right (a tie goes to the first); class 1: 1 of 3
    # class 2 has no images: not a class it gets all wrong
    assert class_accuracy(probabilities, labels, 3).tolist() == pytest.approx([100.0, 100 / 3, math.nan], nan_ok=True)


def test_a_small_data_set_without_some_classes_is_reported_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = torch.zeros((6, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1, 2, 0, 1, 2]))  # 6 images (the grid shows 20), classes 3-9 absent
    write_checkpoint("lenet", 2, test_count=6)
    drawn = {}
    monkeypatch.setattr("stages.report.save", lambda fig, path: drawn.update({path.name: fig}))
    report(["lenet"], Dataset(split, split, CLASSES), tmp_path / "plots" / "report")
    assert len(drawn["samples.png"].axes) == 6
    ax = drawn["accuracy_by_class.png"].axes[0]
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == CLASSES[:3] + [f"{c}\n(no images)" for c in CLASSES[3:]]
    assert [math.isnan(bar.get_height()) for bar in ax.containers[0]] == [False] * 3 + [True] * 7
    assert "class3 n/a" in capsys.readouterr().out
    plt.close("all")


def test_a_class_a_try_gets_all_or_nearly_all_wrong_is_marked_and_each_try_keeps_its_page_colour(monkeypatch):
    drawn = []
    monkeypatch.setattr("stages.report.save", lambda fig, path: drawn.append(fig))
    accuracies = {"lenet": [0.0, 1.0, 100.0, math.nan], "airbench": [90.0, 0.3, 95.0, math.nan]}
    accuracies = {name: torch.tensor(shares) for name, shares in accuracies.items()}
    draw_class_accuracy(accuracies, {"lenet": 33.7, "airbench": 61.8}, CLASSES[:4], None)
    ax = drawn[0].axes[0]
    lenet, airbench = ax.containers
    marks = [(text.get_text(), text.get_position()[0]) for text in ax.texts]
    # 1% shows as a bar; a class without images (nan) is said on the axis, not marked.
    assert marks == [("0", lenet[0].get_x() + lenet[0].get_width() / 2),
                     ("0.3", airbench[1].get_x() + airbench[1].get_width() / 2)]  # fmt: skip
    # The plots page colours airbench first (its history file's path sorts first): so do the figures.
    colours = [matplotlib.colors.to_hex(bars[0].get_facecolor()) for bars in (airbench, lenet)]
    assert colours == PAGE_COLOURS[:2]
    plt.close("all")


def test_each_trys_validation_curves_take_its_colour_on_the_plots_page(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    for name in ("mine", "lenet"):
        write_checkpoint(name, 2)
    drawn = {}
    monkeypatch.setattr("stages.report.save", lambda fig, path: drawn.update({path.name: fig}))
    report(["mine", "lenet"], dataset, tmp_path / "plots" / "report")
    # The page ranks the tries by their history files' paths: lenet first, though listed second.
    for name, colour in (("lenet", PAGE_COLOURS[0]), ("mine", PAGE_COLOURS[1])):
        assert line_colours(drawn[f"{name}_curves.png"].axes[1].get_lines()) == [TRAINING_COLOUR, colour], name
    plt.close("all")


def line_colours(lines):
    return [matplotlib.colors.to_hex(line.get_color()) for line in lines]


def test_confident_mistakes_are_the_wrong_answers_most_confident_first():
    probabilities = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.95, 0.05], [0.4, 0.6], [0.2, 0.8], [0.99, 0.01]])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])  # wrong: 0 (0.7), 2 (0.95), 3 (0.6), 4 (0.8); 1 and 5 are right
    assert confident_mistakes(probabilities, labels, 3).tolist() == [2, 4, 0]
    assert confident_mistakes(probabilities, labels, 10).tolist() == [2, 4, 0, 3]


def test_a_missing_checkpoint_names_the_stage_to_run(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"models/lenet.pt is missing; run `dvc repro train@lenet` first"):
        report(["lenet"], dataset, tmp_path / "plots" / "report")
    assert not (tmp_path / "plots" / "report").exists() and not (tmp_path / "plots" / "histories.csv").exists()


def test_a_checkpoint_without_the_test_sets_probabilities_names_the_stage_to_rerun(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    write_checkpoint("lenet", 2)
    write_checkpoint("mine", 2, test_count=30)  # trained while data/cifar10 held other test images
    with pytest.raises(PipelineError, match=r"models/mine.pt holds the probabilities of 30 test images, and "
                                            r"data/cifar10 has 20: .*; run `dvc repro train@mine`"):  # fmt: skip
        report(["lenet", "mine"], dataset, tmp_path / "plots" / "report")
    older = torch.load(outputs_for("lenet").model, weights_only=True)
    del older["test_probabilities"]  # as stages/train.py wrote checkpoints before it kept them
    torch.save(older, outputs_for("lenet").model)
    with pytest.raises(PipelineError, match=r"models/lenet.pt holds no probabilities of the test images: an older "
                                            r"stages/train.py wrote it; run `dvc repro train@lenet`"):  # fmt: skip
        report(["lenet"], dataset, tmp_path / "plots" / "report")
    assert not (tmp_path / "plots" / "report").exists()
