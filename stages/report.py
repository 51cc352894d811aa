"""Stage `report`: draw every try's figures with matplotlib into plots/report/.

Reads data/cifar10/ (the sample grid and the test images), params.yaml's `tries`, and models/<try>.pt of each
try (its model, its per-epoch history, and its final evaluation's class probabilities of the test images). Writes:
  plots/report/samples.png            20 training images with their labels, as in the post
  plots/report/<try>_curves.png       loss and accuracy per epoch, training vs validation, and how each was taken
  plots/report/val_acc_by_try.png     every try's validation accuracy per epoch
  plots/report/accuracy_by_class.png  every try's accuracy on each class of the test images, side by side
  plots/report/<try>_mistakes.png     the test images the try gets most confidently wrong
  plots/histories.csv                 every try's per-epoch history, a row per try and epoch: the plots page's
                                      overlays read it, so that every try of params.yaml shows up there

    python -m stages.report
"""

import math
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only: the stage runs headless under DVC
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

from stages.data import DATASET_DIR, load_dataset  # noqa: E402
from stages.errors import PipelineError, exits_cleanly  # noqa: E402
from stages.inference import load_checkpoint, test_time_views  # noqa: E402
from stages.outputs import HISTORY_HEADER, atomic_dir, history_rows, outputs_for, write_csv  # noqa: E402
from stages.params import load_params  # noqa: E402

REPORT_DIR = Path("plots/report")
HISTORIES = Path("plots/histories.csv")
SAMPLE_COUNT = 20
MISTAKE_ROWS, MISTAKE_COLUMNS = 4, 6  # the grid of most confidently wrong test images
BAR_SHOWN_FROM = 1.0  # the per-class figure's lowest accuracy (%) whose bar shows (3 pixels): below, it is written
TTA_WORDS = {"flip": "test-time flips", "flip_translate": "test-time flips and shifts"}  # params.py's TTA_MODES
# The plots page's colours (Vega-Lite's default scheme, tableau10), which its overlays give the tries in the order
# of their names: a try then has one colour on the whole page, its charts and these figures.
PAGE_COLOURS = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
                "#bab0ac"]  # fmt: skip
# A try's training curves, beside its validation curves in the try's page colour: matplotlib's own blue and
# orange would read as the first two tries' colours.
TRAINING_COLOUR = "#555555"


def draw_samples(dataset, path):
    """The post's 2 x 10 grid. Pixels are shown as stored (uint8), so no un-normalising can go wrong."""
    fig = plt.figure(figsize=(25, 4))
    for i in range(min(SAMPLE_COUNT, len(dataset.train.labels))):
        ax = fig.add_subplot(2, 10, i + 1, xticks=[], yticks=[])
        ax.imshow(dataset.train.images[i].permute(1, 2, 0).numpy())  # (3, 32, 32) -> (32, 32, 3)
        ax.set_title(dataset.classes[dataset.train.labels[i]])
    save(fig, path)


class Conditions(NamedTuple):
    """How a try's curves were measured, where it sets them apart, for their legends: a reader would
    otherwise take a training loss above the validation loss, or a jump at the last epoch, for the model's."""

    training: tuple = ()  # e.g. ("augmented images", "dropout on"): both training curves
    loss_only: tuple = ()  # e.g. ("label smoothing 0.2",): the training loss only
    final_views: str = "none"  # the test-time views of the last epoch's validation (the try's tta)


def conditions_of(checkpoint):
    """A trained try's Conditions, read off its config and its model."""
    config = checkpoint.config
    training = []
    if config.get("augment") or config.get("flip") or config.get("translate"):
        training.append("augmented images")
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in checkpoint.model.modules()):
        training.append("dropout on")
    smoothing = config.get("label_smoothing", 0)
    loss_only = (f"label smoothing {smoothing:g}",) if smoothing else ()
    return Conditions(tuple(training), loss_only, test_time_views(checkpoint))


def with_notes(label, notes):
    return f"{label} ({', '.join(notes)})" if notes else label


def draw_curves(name, history, path, colour, conditions=None):
    """The try's loss and accuracy per epoch, training and validation; colour: the try's on the plots page."""
    conditions = conditions or Conditions()
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, metric, label in ((loss_ax, "loss", "cross-entropy loss"), (acc_ax, "acc", "accuracy (%)")):
        notes = conditions.training + (conditions.loss_only if metric == "loss" else ())
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], marker="o", color=TRAINING_COLOUR,
                label=with_notes("training", notes))  # fmt: skip
        validation = [row[f"val_{metric}"] for row in history]
        ax.plot(epochs, validation, marker="o", color=colour, label="validation")
        if conditions.final_views != "none":
            ax.plot(epochs[-1:], validation[-1:], marker="*", markersize=15, linestyle="none", color=colour,
                    label=f"last epoch: with {TTA_WORDS[conditions.final_views]}")  # fmt: skip
        ax.set(xlabel="epoch", ylabel=label, title=f"{name}: {label}")
        tick_whole_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)  # below: it never hides a line
    save(fig, path)


def page_colours(names):
    """{try: its colour on the plots page}: the page's overlays colour the tries in the order of their names
    (Vega sorts a colour's values as text, by character code: "lenet" before "lenet-x" before "lenet2")."""
    return {name: PAGE_COLOURS[rank % len(PAGE_COLOURS)] for rank, name in enumerate(sorted(names))}


def draw_comparison(histories, path, final_views=None):
    """Every try's validation accuracy per epoch; final_views: try -> its tta, said beside its final accuracy."""
    fig, ax = plt.subplots(figsize=(10, 5))
    colours = page_colours(histories)
    for name, history in histories.items():
        views = (final_views or {}).get(name, "none")
        note = f", with {TTA_WORDS[views]}" if views != "none" else ""
        ax.plot(
            [row["epoch"] for row in history],
            [row["val_acc"] for row in history],
            marker="o",
            color=colours[name],
            label=f"{name} ({history[-1]['val_acc']:.2f}%{note})",
        )
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy per epoch, by try")
    tick_whole_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: it never hides a line
    save(fig, path)


def tick_whole_epochs(ax):
    """Ticks on whole epochs: a run of one to three epochs would otherwise get them at 1.25, 1.5, ...
    (a locator of its own for each axis, as a locator holds on to the axis it ticks)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def draw_class_accuracy(accuracies, overall, classes, path):
    """Grouped bars: one group per class, one bar per try, so that tries compare class by class."""
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.8 / len(accuracies)
    colours = page_colours(accuracies)
    for k, (name, accuracy) in enumerate(accuracies.items()):
        offsets = torch.arange(len(classes)) + (k - (len(accuracies) - 1) / 2) * width
        ax.bar(offsets.tolist(), accuracy.tolist(), width, color=colours[name],
               label=f"{name} ({overall[name]:.1f}% overall)")  # fmt: skip
        for offset, share in zip(offsets.tolist(), accuracy.tolist(), strict=True):
            if share < BAR_SHOWN_FROM:  # a bar this low does not show: say it, or it looks like a try left out
                ax.text(offset, 0.5, f"{share:.1f}" if share else "0", ha="center", va="bottom", fontsize=8,
                        color=colours[name])  # fmt: skip
    absent = torch.stack(list(accuracies.values())).isnan().all(0).tolist()  # no test images: no bars
    ax.set_xticks(range(len(classes)), [f"{c}\n(no images)" if a else c for c, a in zip(classes, absent, strict=True)])
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="Accuracy per class on the test images, by try")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, path)


def draw_mistakes(name, split, probabilities, classes, path):
    """The test images the try gets most confidently wrong, each titled "true → predicted (probability)"."""
    shown = confident_mistakes(probabilities, split.labels, MISTAKE_ROWS * MISTAKE_COLUMNS)
    fig = plt.figure(figsize=(2.3 * MISTAKE_COLUMNS, 2.5 * MISTAKE_ROWS + 0.5))
    for k, index in enumerate(shown.tolist()):
        ax = fig.add_subplot(MISTAKE_ROWS, MISTAKE_COLUMNS, k + 1, xticks=[], yticks=[])
        ax.imshow(split.images[index].permute(1, 2, 0).numpy(), interpolation="nearest")  # its own 32x32 pixels
        confidence, predicted = probabilities[index].max(0)
        ax.set_title(f"{classes[split.labels[index]]} → {classes[predicted]} ({100 * confidence:.1f}%)", fontsize=9)
    fig.suptitle(f"{name}: the {len(shown)} test images it gets most confidently wrong (true → predicted)")
    save(fig, path)


def class_accuracy(probabilities, labels, num_classes):
    """Accuracy (%) on the images of each class: (num_classes,), nan for a class without test images
    (a small test set may lack one: 0% would say the try gets it all wrong)."""
    right = (probabilities.argmax(1) == labels).float()
    counts = torch.bincount(labels, minlength=num_classes)
    return 100 * torch.bincount(labels, weights=right, minlength=num_classes) / counts  # 0 / 0: nan


def confident_mistakes(probabilities, labels, count):
    """Indices of up to count wrongly classified images, the most confident first."""
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    return wrong[confidence[wrong].argsort(descending=True, stable=True)[:count]]


def write_histories(histories, path=HISTORIES):
    """histories: try -> its per-epoch history. One file, a column naming the try, for dvc.yaml's overlays:
    dvc.yaml cannot list a file per try outside a stage's foreach, and one file takes in a try added later."""
    rows = [[name, *row] for name, history in histories.items() for row in history_rows(history)]
    write_csv(path, ["try", *HISTORY_HEADER], rows)


def save(fig, path):
    fig.tight_layout()
    # From matplotlib 3.8 on, tight_layout leaves a placeholder layout engine behind, and savefig draws a figure
    # that has any engine once more before drawing it for real: without one, a single draw and the same pixels.
    fig.set_layout_engine(None)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def load_try(name, test_count):
    """Try name's checkpoint, which must hold the probabilities of test_count test images."""
    path = outputs_for(name).model
    if not path.exists():
        raise PipelineError(f"{path} is missing; run `dvc repro train@{name}` first")
    checkpoint = load_checkpoint(path)
    probabilities, again = checkpoint.test_probabilities, f"run `dvc repro train@{name}`"
    if probabilities is None:
        raise PipelineError(
            f"{path} holds no probabilities of the test images: an older stages/train.py wrote it; {again}"
        )
    if len(probabilities) != test_count:
        raise PipelineError(
            f"{path} holds the probabilities of {len(probabilities):,} test images, and data/cifar10 has "
            f"{test_count:,}: it was trained on other data; {again}"
        )
    return checkpoint


def report(try_names, dataset, out_dir=REPORT_DIR, histories_path=HISTORIES):
    test, classes = dataset.test, dataset.classes
    checkpoints = {name: load_try(name, len(test.labels)) for name in try_names}
    probabilities = {name: c.test_probabilities for name, c in checkpoints.items()}
    accuracies = {name: class_accuracy(p, test.labels, len(classes)) for name, p in probabilities.items()}
    overall = {name: 100 * (p.argmax(1) == test.labels).float().mean().item() for name, p in probabilities.items()}
    with atomic_dir(out_dir) as partial:
        draw_samples(dataset, partial / "samples.png")
        conditions = {name: conditions_of(c) for name, c in checkpoints.items()}
        colours = page_colours(checkpoints)
        for name, checkpoint in checkpoints.items():
            draw_curves(name, checkpoint.history, partial / f"{name}_curves.png", colours[name], conditions[name])
            draw_mistakes(name, test, probabilities[name], classes, partial / f"{name}_mistakes.png")
        histories = {name: c.history for name, c in checkpoints.items()}
        final_views = {name: c.final_views for name, c in conditions.items()}
        draw_comparison(histories, partial / "val_acc_by_try.png", final_views)
        draw_class_accuracy(accuracies, overall, classes, partial / "accuracy_by_class.png")
    write_histories(histories, histories_path)
    for name, accuracy in accuracies.items():
        shares = zip(classes, accuracy.tolist(), strict=True)  # n/a: the class has no test images
        print(f"{name}: " + ", ".join(f"{c} n/a" if math.isnan(a) else f"{c} {a:.1f}%" for c, a in shares))
    print(f"wrote {out_dir}: {2 * len(checkpoints) + 3} figures; {histories_path}: {len(histories)} tries")


@exits_cleanly
def main():
    params = load_params()
    report(list(params["tries"]), load_dataset(DATASET_DIR))


if __name__ == "__main__":
    main()
