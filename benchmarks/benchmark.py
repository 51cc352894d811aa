"""Benchmark: the pipeline's training against a faithful transcription of the post's loop.

For each try in params.yaml, in this one process and alternating round by round,
on the same images, with the same model, batch size and transforms:
  - pipeline: stages.loop's train_one_epoch + evaluate (uint8 tensors in memory,
    batched augmentation, channels_last);
  - post: benchmarks/post_loop.py, the post's code: torchvision DataLoader over PIL
    images (ToTensor, Normalize and, for augmented tries, the post's transform chain),
    the post's networks as written and its training loop; for the 4th try, which the
    post does not have, the same loop over torchvision's RandomHorizontalFlip and
    RandomCrop(32, padding) with the pipeline's model and optimizer;
  - floor: the pipeline's bare model step (forward, backward, optimizer) on ready float
    tensors.
Prints, per try, training images per second of whole epochs (training plus evaluation)
for both loops and their ratio (medians over rounds), and the pipeline's training time
per batch against the floor's: slice by slice of the training images, the pipeline's
training between two floor runs, "over floor" comparing their totals over all rounds.
The process keeps freed memory as the train stage does, and on CUDA trains with its deterministic
float32 kernels (stages.loop.pick_device sets them), or with bfloat16 autocast where the try's amp
is on (train.amp: true in params.yaml).

    python -m benchmarks.benchmark                         # synthetic images
    python -m benchmarks.benchmark --archive cifar-10-python.tar.gz --train-images 10000
    python -m benchmarks.benchmark --dataset data/cifar10   # the images `dvc repro` downloaded
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.post_loop import POST_MODELS, post_epoch, post_loaders
from stages.data import DATASET_DIR, Split, load_dataset, read_archive_batches
from stages.download import read_members
from stages.errors import PipelineError, exits_cleanly
from stages.loop import (
    build_updates,
    evaluate,
    keep_freed_memory,
    mixed_precision,
    normalise,
    on_device,
    pick_device,
    train_one_epoch,
)
from stages.models import build_model_for
from stages.params import PARAMS_FILE, load_params, resolve_try
from stages.recipe import build_optimizer
from stages.train import build_augmentation, fit_first_layer

SLICE_BATCHES = 20  # batches per slice when the pipeline's training is compared with its floor


def load_images(archive, dataset_dir, train_count, test_count):
    """(train Split, test Split) of uint8 tensors: real images from an archive or from the folder the
    download stage writes, else random ones."""
    if archive or dataset_dir:
        dataset = read_archive_batches(read_members(archive)) if archive else load_dataset(dataset_dir)
        train, test = dataset.train, dataset.test
    else:
        rng = np.random.default_rng(0)
        make = lambda n: Split(rng.integers(0, 256, (n, 3, 32, 32), np.uint8), rng.integers(0, 10, n))  # noqa: E731
        train, test = make(train_count), make(test_count)
    split = lambda s, n: Split(torch.as_tensor(s.images[:n]).clone(), torch.as_tensor(s.labels[:n]).clone())  # noqa: E731
    return split(train, train_count), split(test, test_count)


def timed(device, function, *args):
    """Seconds that function(*args) takes, waiting for the GPU's queued work at both ends."""
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    start = time.perf_counter()
    function(*args)
    sync()
    return time.perf_counter() - start


def fresh_model(config, train_split, device, rounds=1):
    """The pipeline's network and what updates it, as stages.train builds them, for rounds epochs of train_split."""
    torch.manual_seed(config["seed"])
    model = build_model_for(config).to(device, memory_format=torch.channels_last)
    fit_first_layer(model, train_split)
    steps = rounds * -(-len(train_split.labels) // config["batch_size"])
    return model, build_updates(config, model, steps)


def fresh_post_model(config, device):
    """The post's network as written, in NCHW, and its optimizer, Adam(lr), where the try keeps the post's;
    for the 4th try, the pipeline's network and optimizer."""
    torch.manual_seed(config["seed"])
    if config["model"] not in POST_MODELS:
        model = build_model_for(config).to(device)
        return model, build_optimizer(config, model)
    model = POST_MODELS[config["model"]]().to(device)
    if config["optimizer"] != "adam" or config["muon_lr"] > 0 or config["weight_decay"] > 0:  # another step's cost
        return model, build_optimizer(config, model)
    return model, torch.optim.Adam(model.parameters(), lr=config["lr"])


def pipeline_epoch(config, model, updates, split, generator, augment):
    """stages.loop's training epoch with every ingredient of the try's recipe, amp included."""
    train_one_epoch(model, updates, split, config["batch_size"], generator, augment, config["amp"],
                    config["label_smoothing"])  # fmt: skip


def measure_try(config, recipe, train, test, device, rounds):
    """Seconds per whole epoch for pipeline and post; per training batch for pipeline and floor."""
    # As the train stage lays them out: channels_last unless augmentation reads them first.
    augmented = build_augmentation(config, recipe, torch.Generator(), len(train.labels)) is not None
    train_split = on_device(train, device, channels_last=not augmented)
    test_split = on_device(test, device, channels_last=True)
    loaders = post_loaders(train, test, recipe, config)
    times = {"pipeline_epoch": [], "post_epoch": []}
    for _ in range(rounds):
        model, updates = fresh_model(config, train_split, device)
        generator = torch.Generator().manual_seed(config["seed"])
        augment = build_augmentation(config, recipe, generator, len(train.labels))
        fit = timed(device, pipeline_epoch, config, model, updates, train_split, generator, augment)
        times["pipeline_epoch"].append(fit + timed(device, evaluate, model, test_split, config["amp"]))
        model, optimizer = fresh_post_model(config, device)
        times["post_epoch"].append(timed(device, post_epoch, model, optimizer, *loaders, device))
    epochs = {key: statistics.median(values) for key, values in times.items()}
    return epochs | measure_floor(config, recipe, train_split, device, rounds)


def measure_floor(config, recipe, train_split, device, rounds):
    """The pipeline's training against its bare model step, slice by slice of SLICE_BATCHES batches.

    Each slice of the training images is trained on by the pipeline between two floor runs
    on the same slice, so that both see the same machine load: a shared machine drifts by
    10-20% within seconds, more than the difference being measured. The totals over every
    slice of every round are compared, so that work done once per many batches (drawing a
    chunk of augmentation parameters) counts as often as it does in training.
    """
    batch = config["batch_size"]
    size = batch * SLICE_BATCHES
    slices = [Split(*(t[i : i + size] for t in train_split)) for i in range(0, len(train_split.labels), size)]
    ready = [[(normalise(s.images[i : i + batch]), s.labels[i : i + batch]) for i in range(0, len(s.labels), batch)]
             for s in slices]  # fmt: skip
    model, updates = fresh_model(config, train_split, device, rounds)
    floor_model, floor_updates = fresh_model(config, train_split, device, rounds)
    generator = torch.Generator().manual_seed(config["seed"])
    augment = build_augmentation(config, recipe, generator, len(train_split.labels))
    pipeline = floor = 0.0
    for _ in range(rounds):
        for part, ready_part in zip(slices, ready, strict=True):
            before = timed(device, floor_steps, config, floor_model, floor_updates.optimizer, ready_part)
            pipeline += timed(device, pipeline_epoch, config, model, updates, part, generator, augment)
            after = timed(device, floor_steps, config, floor_model, floor_updates.optimizer, ready_part)
            floor += (before + after) / 2
    batches = rounds * sum(len(r) for r in ready)
    return {"pipeline_batch": pipeline / batches, "floor_batch": floor / batches, "over_floor": pipeline / floor - 1}


def floor_steps(config, model, optimizer, ready):
    model.train()
    for images, labels in ready:
        with mixed_precision(images.device, config["amp"]):
            loss = F.cross_entropy(model(images), labels, label_smoothing=config["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def positive_int(text):
    """An argparse type: a count of images, rounds or threads."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def parse_args(argv, params_path=PARAMS_FILE):
    """(arguments, params) of the command line, checked against the machine and params.yaml, which is read
    after --help has had its chance: a bad argument is named as such."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__.splitlines()[0])
    images = parser.add_mutually_exclusive_group()  # where the images come from; neither: random ones
    images.add_argument("--archive", help="cifar-10-python.tar.gz to take real images from (default: random ones)")
    images.add_argument("--dataset", help="a folder the pipeline downloaded to take real images from: "
                        f"{DATASET_DIR} after `dvc repro download` (default: random ones)")  # fmt: skip
    parser.add_argument("--train-images", type=positive_int, default=10000)
    parser.add_argument("--test-images", type=positive_int, default=2000)
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds; the median is printed")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--tries", nargs="+", help="tries of params.yaml to run (default: all)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads torch computes on, as train.threads sets "
                        "them for training (default: torch's own, one per core or OMP_NUM_THREADS)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.archive and not Path(args.archive).is_file():
        parser.error(f"--archive: no such file: {args.archive}")
    if args.dataset and not (Path(args.dataset) / "classes.json").is_file():
        parser.error(
            f"--dataset: no downloaded images in {args.dataset}; `dvc repro download` puts them in {DATASET_DIR}"
        )
    params = load_params(params_path)
    unknown = [name for name in args.tries or [] if name not in params["tries"]]
    if unknown:
        parser.error(f"--tries: {', '.join(unknown)} not in params.yaml; its tries are {', '.join(params['tries'])}")
    try:
        args.device = pick_device(args.device)
    except PipelineError:
        parser.error(f"--device {args.device}: not available on this machine; use auto or cpu")
    return args, params


@exits_cleanly
def main(argv=None):
    args, params = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as stages.train does; the post's loop gets it too, which can only flatter the post
    train, test = load_images(args.archive, args.dataset, args.train_images, args.test_images)
    print(f"machine: {platform.processor() or platform.machine()}, {describe(device)}, torch {torch.__version__}")
    origin = Path(args.archive).name if args.archive else args.dataset  # None: random images
    source = f"images from {origin}" if origin else "random images"
    print(f"data: {source}, {len(train.labels)} training + {len(test.labels)} test per epoch, "
          f"median of {args.rounds} round{'s' * (args.rounds != 1)}")  # fmt: skip
    print(f"{'try':<12}{'pipeline img/s':>16}{'post img/s':>12}{'speed-up':>10}"
          f"{'pipeline ms/batch':>19}{'floor ms/batch':>16}{'over floor':>12}")  # fmt: skip
    for name in args.tries or params["tries"]:
        config = resolve_try(params, name)
        t = measure_try(config, params["augment"], train, test, device, args.rounds)
        images = len(train.labels)
        print(f"{name:<12}{images / t['pipeline_epoch']:>16.0f}{images / t['post_epoch']:>12.0f}"
              f"{t['post_epoch'] / t['pipeline_epoch']:>9.2f}x{1000 * t['pipeline_batch']:>19.1f}"
              f"{1000 * t['floor_batch']:>16.1f}{100 * t['over_floor']:>+11.1f}%",
              flush=True)  # fmt: skip


def describe(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"{device.type}, {threads} thread{'s' * (threads != 1)}"


if __name__ == "__main__":
    main()
