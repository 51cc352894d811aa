"""Stage `report`: draw every try's figures with matplotlib into plots/report/.

Reads data/cifar10/ (for the sample grid), params.yaml's `tries`, and
models/<try>.pt of each try (its per-epoch history). Writes:
  plots/report/samples.png          20 training images with their labels, as in the post
  plots/report/<try>_curves.png     loss and accuracy per epoch, training vs validation
  plots/report/val_acc_by_try.png   every try's validation accuracy per epoch

    python -m stages.report
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the stage runs headless under DVC
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from stages.data import DATASET_DIR, load_dataset  # noqa: E402
from stages.errors import PipelineError, exits_cleanly  # noqa: E402
from stages.outputs import atomic_dir, outputs_for  # noqa: E402
from stages.params import load_params  # noqa: E402

REPORT_DIR = Path("plots/report")
SAMPLE_COUNT = 20


def draw_samples(dataset, path):
    """The post's 2 x 10 grid. Pixels are shown as stored (uint8), so no un-normalising can go wrong."""
    fig = plt.figure(figsize=(25, 4))
    for i in range(SAMPLE_COUNT):
        ax = fig.add_subplot(2, 10, i + 1, xticks=[], yticks=[])
        ax.imshow(dataset.train.images[i].permute(1, 2, 0).numpy())  # (3, 32, 32) -> (32, 32, 3)
        ax.set_title(dataset.classes[dataset.train.labels[i]])
    save(fig, path)


def draw_curves(name, history, path):
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((loss_ax, "loss", "cross-entropy loss"), (acc_ax, "acc", "accuracy (%)")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], marker="o", label="training")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel=label, title=f"{name}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, path)


def draw_comparison(histories, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, history in histories.items():
        ax.plot(
            [row["epoch"] for row in history],
            [row["val_acc"] for row in history],
            marker="o",
            label=f"{name} ({history[-1]['val_acc']:.2f}%)",
        )
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy per epoch, by try")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def load_history(name):
    path = outputs_for(name).model
    if not path.exists():
        raise PipelineError(f"{path} is missing; run `dvc repro train@{name}` first")
    return torch.load(path, map_location="cpu", weights_only=True)["history"]


def report(try_names, dataset, out_dir=REPORT_DIR):
    histories = {name: load_history(name) for name in try_names}
    with atomic_dir(out_dir) as partial:
        draw_samples(dataset, partial / "samples.png")
        for name, history in histories.items():
            draw_curves(name, history, partial / f"{name}_curves.png")
        draw_comparison(histories, partial / "val_acc_by_try.png")
    print(f"wrote {out_dir}: {len(histories) + 2} figures")


@exits_cleanly
def main():
    params = load_params()
    report(list(params["tries"]), load_dataset(DATASET_DIR))


if __name__ == "__main__":
    main()
