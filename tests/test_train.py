"""Training one try on a small learnable dataset: outputs, true percentages, eval mode, reproducibility."""

import csv
import json
import math
import platform

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import transforms

from stages import loop as loop_module
from stages import train as train_stage
from stages.data import Split
from stages.inference import load_checkpoint
from stages.loop import (
    NonFiniteLoss,
    Updates,
    evaluate,
    keep_freed_memory,
    normalise,
    raise_if_not_finite,
    take,
    train_one_epoch,
)
from stages.models import build_model
from stages.params import load_params, resolve_try
from stages.train import augmentation_words, fit_first_layer, freeze_whitening_bias, summarise, train
from tests.conftest import (
    ON_CPU,
    ROOT,
    SHIPPED_TRIES,
    SMALL_DATA_TRIES,
    outputs_in,
    same_weights,
    without_time,
)
from tests.devices import DEVICES, GPUS

QUICK = {"epochs": 2, "batch_size": 64, **ON_CPU}  # 64 does not divide 1,000: the last batch is partial


@pytest.fixture(scope="module")
def dataset(learnable_dataset):
    return learnable_dataset


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def run_try(params, dataset, directory, name, **overrides):
    config = {**resolve_try(params, name), **QUICK, **SMALL_DATA_TRIES.get(name, {}), **overrides}
    outputs = outputs_in(directory, name)
    return train(config, params["augment"], dataset, outputs, name), outputs


# Each try on each device this machine has (see DEVICES), and on CUDA with bfloat16 mixed precision too.
SETUPS = [(device, False) for device in DEVICES] + [("cuda", True)] * ("cuda" in DEVICES)


@pytest.mark.parametrize("device, amp", SETUPS, ids=[f"{d}{'-amp' * amp}" for d, amp in SETUPS])
@pytest.mark.parametrize("name", SHIPPED_TRIES)
def test_a_try_learns_and_writes_every_output(tmp_path, params, dataset, name, device, amp, capsys):
    threads = torch.get_num_threads()
    metrics, outputs = run_try(params, dataset, tmp_path, name, device=device, amp=amp)
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{name}: "))
    assert first.endswith(f", augmentation: {augmentation_words(resolve_try(params, name))}"), first
    assert metrics["val"]["acc"] > 50  # chance is 10%
    assert json.loads(outputs.metrics.read_text()) == metrics
    assert metrics["device"] == device and metrics["threads"] == torch.get_num_threads() == threads  # threads: 0
    with open(outputs.history) as f:
        history = list(csv.DictReader(f))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert float(history[-1]["val_acc"]) == pytest.approx(metrics["val"]["acc"], abs=1e-4)
    with open(outputs.predictions) as f:
        predictions = list(csv.DictReader(f))
    # Accuracy is a share of images, so it must agree with the predictions file row by row.
    correct = sum(row["actual"] == row["predicted"] for row in predictions)
    assert len(predictions) == 300 and metrics["val"]["acc"] == pytest.approx(100 * correct / 300, abs=1e-4)
    checkpoint = torch.load(outputs.model, weights_only=True)
    assert checkpoint["config"]["model"] == params["tries"][name]["model"]
    assert checkpoint["classes"] == dataset.classes and len(checkpoint["history"]) == 2
    # The report's probabilities: one row per test image, behind each prediction of the file.
    probabilities = checkpoint["test_probabilities"]
    assert probabilities.dtype == torch.float32 and torch.allclose(probabilities.sum(1), torch.ones(300))
    assert [dataset.classes[i] for i in probabilities.argmax(1).tolist()] == [row["predicted"] for row in predictions]
    assert not [p for p in tmp_path.rglob("*partial*")]
    # Saved for the CPU wherever it trained: the checkpoint's model answers there as training recorded.
    model = load_checkpoint(outputs.model)
    answers = evaluate(model.model, dataset.test, tta=model.config["tta"])["predictions"]
    agree = sum(dataset.classes[a] == row["predicted"] for a, row in zip(answers.tolist(), predictions, strict=True))
    assert agree >= (300 if device == "cpu" and not amp else 290), agree  # a GPU's rounding may flip a close call


def test_the_first_line_names_what_augments_each_try(params):
    # airbench's augment is false, yet it trains on augmented images: its line says which.
    named = {name: augmentation_words(resolve_try(params, name)) for name in SHIPPED_TRIES}
    assert named == {"lenet": "none", "lenet2": "none", "lenet2_aug": "the post's recipe",
                     "airbench": "alternating flip, translate by up to 2 px"}  # fmt: skip
    every = {**resolve_try(params, "lenet"), "augment": True, "flip": True, "translate": 1}
    assert augmentation_words(every) == "the post's recipe, random flip, translate by up to 1 px"


def test_the_threads_param_sets_the_cpu_threads_and_the_metrics_name_them(tmp_path, params, dataset):
    default = torch.get_num_threads()
    other = 1 if default > 1 else 2
    try:
        metrics, _ = run_try(params, dataset, tmp_path, "lenet", epochs=1, device="cpu", threads=other)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(default)
    assert metrics["threads"] == other


# On a GPU the 4th try too: its Muon steps and BatchNorm take kernels of their own there.
SAME_SEED = [("cpu", "lenet2_aug")] + [(gpu, name) for gpu in GPUS for name in ("lenet2_aug", "airbench")]


@pytest.mark.parametrize("device, name", SAME_SEED)
def test_same_seed_gives_identical_results_and_another_seed_does_not(tmp_path, params, dataset, device, name):
    first, first_out = run_try(params, dataset, tmp_path / "a", name, device=device)
    again, again_out = run_try(params, dataset, tmp_path / "b", name, device=device)
    other, _ = run_try(params, dataset, tmp_path / "c", name, device=device, seed=1)
    assert without_time(first) == without_time(again) and without_time(first) != without_time(other)
    assert same_weights(first_out, again_out)


def test_the_seed_seeds_torchs_generator_and_the_trys_whose_first_draw_is_the_first_epochs_order(
    tmp_path, params, dataset, monkeypatch
):
    # torch's global generator: weight init and dropout; the try's: the order of each epoch, then the
    # augmentations' draws. Another seed for either would repeat per seed and still change every number.
    seeds = []

    def noting_the_seeds(model, updates, split, batch_size, generator, *args, **kwargs):
        seeds.append((torch.initial_seed(), generator.get_state()))
        return train_one_epoch(model, updates, split, batch_size, generator, *args, **kwargs)

    monkeypatch.setattr(train_stage, "train_one_epoch", noting_the_seeds)
    run_try(params, dataset, tmp_path, "lenet", epochs=1, seed=3)
    [(global_seed, generator_state)] = seeds
    assert global_seed == 3 and torch.equal(generator_state, torch.Generator().manual_seed(3).get_state())


def test_preparing_batches_ahead_changes_nothing(tmp_path, params, dataset, monkeypatch):
    ahead, ahead_out = run_try(params, dataset, tmp_path / "ahead", "lenet2_aug")  # 16 batches: 10, then 6
    monkeypatch.setattr(loop_module, "AHEAD", 1)
    one_by_one, one_by_one_out = run_try(params, dataset, tmp_path / "one", "lenet2_aug")
    assert without_time(ahead) == without_time(one_by_one) and same_weights(ahead_out, one_by_one_out)


def test_a_non_finite_loss_is_reported_at_its_own_batch():
    losses = [torch.tensor(1.0)] * 7 + [torch.tensor(math.nan)] + [torch.tensor(math.inf)] * 3
    raise_if_not_finite(losses[:7], start=0)  # all finite: nothing to say
    with pytest.raises(NonFiniteLoss) as raised:
        raise_if_not_finite(losses, start=5)
    assert raised.value.batch == 8 and math.isnan(raised.value.value)


def test_evaluate_counts_every_image_and_switches_dropout_off(dataset):
    torch.manual_seed(0)
    model = build_model("lenet")
    model.train()
    first, second = evaluate(model, dataset.test), evaluate(model, dataset.test)
    assert not model.training
    assert first["loss"] == second["loss"] and torch.equal(first["predictions"], second["predictions"])
    assert len(first["predictions"]) == 300


class FirstPixels(torch.nn.Module):
    """Ten logits per image that are its first ten input values, whatever the batch: exact by construction."""

    def forward(self, images):
        return images.flatten(1)[:, :10] * 3


def test_evaluations_loss_does_not_depend_on_how_images_are_batched(dataset, monkeypatch):
    whole = evaluate(FirstPixels(), dataset.test)  # 300 images: one batch
    monkeypatch.setattr(loop_module, "EVAL_BATCH", 1)  # summed batch by batch, the total would differ here
    pieces = evaluate(FirstPixels(), dataset.test)
    assert whole["loss"] == pieces["loss"] and torch.equal(whole["predictions"], pieces["predictions"])


class NearestRed(torch.nn.Module):
    """Logits that grow as an image's mean red nears each class's: right on most of the learnable images, not all."""

    def __init__(self, split):
        super().__init__()
        red = self.mean_red(normalise(split.images))
        self.register_buffer("class_red", torch.stack([red[split.labels == c].mean() for c in range(10)]))
        self.scale = torch.nn.Parameter(torch.tensor(50.0))  # for the optimizer to hold (at lr 0: it stays)

    @staticmethod
    def mean_red(images):
        return images[:, 0].mean(dim=(1, 2))

    def forward(self, images):
        return -self.scale * (self.mean_red(images).unsqueeze(1) - self.class_red) ** 2


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_an_epochs_loss_and_accuracy_are_over_every_image_with_its_own_label(dataset, label_smoothing):
    model = NearestRed(dataset.train)
    updates = Updates(torch.optim.SGD(model.parameters(), lr=0.0))
    generator = torch.Generator().manual_seed(0)  # a shuffled order, batches of 64 with a partial last one
    fit = train_one_epoch(model, updates, dataset.train, 64, generator, label_smoothing=label_smoothing)
    with torch.no_grad():
        logits = model(normalise(dataset.train.images))
    loss = F.cross_entropy(logits, dataset.train.labels, label_smoothing=label_smoothing).item()
    accuracy = 100 * (logits.argmax(1) == dataset.train.labels).sum().item() / len(logits)
    assert 50 < accuracy < 95  # right on most images, not all: a mix-up of images and labels would show
    assert fit["loss"] == pytest.approx(loss, rel=1e-5) and fit["acc"] == pytest.approx(accuracy, abs=1e-9)


class Recorder(torch.nn.Module):
    """Logits of 0 for every image; keeps each batch it is given."""

    def __init__(self):
        super().__init__()
        self.bias, self.batches = torch.nn.Parameter(torch.zeros(10)), []

    def forward(self, images):
        self.batches.append(images.clone())
        return self.bias.expand(len(images), 10)


def test_an_epochs_batches_follow_the_trys_generator_and_leave_torchs_global_one_alone(dataset):
    # The order is drawn from the try's generator, which the augmentations share: another draw, or a draw
    # from the global generator (seeded with the same seed, for weight init and dropout), would train
    # every try on another order, and none would give the numbers it gave before.
    model = Recorder()
    updates = Updates(torch.optim.SGD(model.parameters(), lr=0.0))
    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    train_one_epoch(model, updates, dataset.train, 64, torch.Generator().manual_seed(0))
    expected = torch.randperm(len(dataset.train.labels), generator=torch.Generator().manual_seed(0)).split(64)
    assert len(expected) == 16
    for batch, indices in zip(model.batches, expected, strict=True):
        assert torch.equal(batch, normalise(take(dataset.train.images, indices)))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_the_metrics_name_the_best_epoch_as_well_as_the_last():
    history = [{"epoch": e, "train_loss": 1.0, "train_acc": 50.0, "val_loss": 1.0, "val_acc": acc}
               for e, acc in [(1, 60.0), (2, 71.5), (3, 70.25)]]  # fmt: skip
    metrics = summarise(history, parameters=1234, seconds=5.04, device=torch.device("cuda"), threads=3)
    assert metrics["val"]["acc"] == 70.25 and metrics["best"] == {"epoch": 2, "val_acc": 71.5}
    assert (metrics["epochs"], metrics["parameters"], metrics["seconds"]) == (3, 1234, 5.0)
    assert (metrics["device"], metrics["threads"]) == ("cuda", 3)


def test_the_predictions_file_holds_the_models_own_answers(tmp_path, params, dataset):
    # One epoch at a small lr: a model wrong on many images, so its answers differ from the labels.
    _, outputs = run_try(params, dataset, tmp_path, "lenet", epochs=1, lr=0.0002)
    predicted = evaluate(load_checkpoint(outputs.model).model, dataset.test)["predictions"]
    with open(outputs.predictions) as f:
        rows = list(csv.DictReader(f))
    classes = dataset.classes
    assert [row["predicted"] for row in rows] == [classes[i] for i in predicted.tolist()]
    assert [row["actual"] for row in rows] == [classes[i] for i in dataset.test.labels.tolist()]
    assert sum(row["actual"] != row["predicted"] for row in rows) > 30


class NanFrom(torch.nn.Module):
    """A model whose loss becomes nan at a given batch (counted from 1) and stays so."""

    def __init__(self, batch):
        super().__init__()
        self.weight, self.calls, self.batch = torch.nn.Parameter(torch.ones(10)), 0, batch

    def forward(self, images):
        self.calls += 1
        logits = images.flatten(1)[:, :10] * self.weight
        return logits * math.nan if self.calls >= self.batch else logits


def test_training_names_the_first_batch_whose_loss_is_not_finite(dataset, monkeypatch):
    monkeypatch.setattr(loop_module, "CHECK_EVERY", 3)  # 7 batches: looks after 3, 6 and 7
    model = NanFrom(batch=5)
    updates = Updates(torch.optim.SGD(model.parameters(), lr=0.01))  # torch 2.1's SGD has no default lr
    with pytest.raises(NonFiniteLoss) as raised:
        train_one_epoch(model, updates, dataset.test, 43, torch.Generator())
    assert raised.value.batch == 5 and model.calls == 6


def test_normalise_gives_bit_for_bit_what_totensor_and_normalize_give():
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    post = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    expected = torch.stack([post(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in every_value])
    for images in (every_value, every_value.float()):  # uint8 batches, and augmented integer-valued floats
        ours = normalise(images)
        assert torch.equal(ours, expected) and ours.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_take_selects_images_and_keeps_their_layout(memory_format):
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=memory_format)
    indices = torch.tensor([7, 0, 49, 7])
    taken = take(images, indices)
    assert torch.equal(taken, images[indices]) and taken.is_contiguous(memory_format=memory_format)


def test_the_c_library_takes_the_setting_wherever_it_is_glibc():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_freed_memory_is_kept_by_raising_glibcs_mmap_and_trim_thresholds(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1  # glibc's "done"

    monkeypatch.setattr(loop_module.ctypes, "CDLL", lambda name: FakeLibc())
    assert keep_freed_memory()
    # M_MMAP_THRESHOLD (-3) to its 32 MiB maximum; M_TRIM_THRESHOLD (-1) to 1 GiB.
    assert calls == [(-3, 32 * 2**20), (-1, 2**30)]


@pytest.mark.parametrize("frozen_after, trained", [(0, False), (QUICK["epochs"], True)])
def test_the_whitening_bias_trains_its_epochs_then_stays(tmp_path, params, dataset, frozen_after, trained):
    small = {"widths": [16, 16, 32], "whiten_bias_epochs": frozen_after}
    _, outputs = run_try(params, dataset, tmp_path, "airbench", **small)
    torch.manual_seed(params["tries"]["airbench"].get("seed", params["train"]["seed"]))  # as train() builds it
    initial = build_model("airbench", widths=small["widths"]).whiten.bias
    checkpoint = load_checkpoint(outputs.model)  # rebuilt at the widths its config names
    assert checkpoint.config["widths"] == small["widths"]
    assert torch.equal(checkpoint.model.whiten.bias, initial) is not trained


@pytest.mark.parametrize("epochs, trains_in", [(1, [1]), (2, [1, 2]), (None, [1, 2, 3])])
def test_the_whitening_bias_freezes_right_after_its_last_epoch(epochs, trains_in):
    model = build_model("airbench")
    training = []
    for epoch in (1, 2, 3):
        freeze_whitening_bias(model, {"whiten_bias_epochs": epochs}, epoch)
        training += [epoch] if model.whiten.bias.requires_grad else []
    assert training == trains_in


@pytest.mark.parametrize("device", GPUS)
def test_the_whitening_fit_gives_the_cpus_filters_on_a_gpu(dataset, device):
    filters = {}
    for where in ("cpu", device):
        model = build_model("airbench").to(where)
        fit_first_layer(model, Split(dataset.train.images.to(where), dataset.train.labels.to(where)))
        filters[where] = model.whiten.weight.cpu()
    assert torch.equal(filters[device], filters["cpu"])
