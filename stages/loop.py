"""The training loop's machinery, which the train stage (stages/train.py) drives and the benchmark times:
the device and its set-up, batches taken and normalised on the device, one epoch of training, and evaluation.

The checkpoints' inference (stages/inference.py) normalises and batches images as evaluation here does, so
that a checkpoint answers as training measured it.
"""

import ctypes
from typing import NamedTuple

import torch
from torch.nn import functional as F
from tqdm import tqdm

from stages.data import Split
from stages.errors import PipelineError
from stages.recipe import Lookahead, LrSchedule, Optimizers, build_optimizer, predict

MEAN, STD = 0.5, 0.5  # the post's Normalize((0.5,)*3, (0.5,)*3)
EVAL_BATCH = 500  # images per evaluation batch; on a CPU, 1,000 ran up to twice as slow per image
# Batches prepared back to back: after a model step the augmentation's code and data are out of the
# CPU's caches (~0.3 ms a batch to bring back). 20 and 50 measured slower: 12 MB of ready batches is enough.
AHEAD = 10
CHECK_EVERY = 50  # batches between looks at the loss: each costs a few small ops, and on a GPU a wait for it
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest glibc accepts on 64-bit systems


def pick_device(name):
    """The device train.device names (auto: CUDA if present, then MPS, then the CPU); CUDA set up to train
    reproducibly, for whatever trains there: the train stage and the benchmark alike."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise PipelineError(
            f"device {name!r} is not available on this machine; set device to auto or cpu "
            "(train.device, or the try's own where it sets one)"
        )
    if name == "cuda":
        make_cuda_reproducible()
    return torch.device(name)


def make_cuda_reproducible():
    """Has CUDA train in true float32 with deterministic kernels, so that a seed gives the same run twice.

    By default cuDNN picks the fastest convolution algorithm by timing them (the pick, and so the rounding,
    can change from run to run), some of those add in a nondeterministic order, and on Ampere and later
    GPUs convolutions run in TF32 (10-bit mantissas). train.amp is the switch for speed over exactness.
    """
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def keep_freed_memory():
    """Asks glibc to keep freed memory for the next batch instead of handing it back to the system.

    Every batch allocates the same few megabytes of tensors. By default glibc may return large
    freed blocks to the system, and the next batch then pays a page fault for every 4 KiB page
    it touches again (measured: up to 58,000 faults and 15% of the time of one evaluation of
    10,000 images). Returns whether the C library took it (it is not glibc on macOS or Windows,
    where nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # glibc's own threshold grows only up to the size of the blocks freed so far, and trimming undoes it.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def normalise(images):
    """uint8 or integer-valued float (B, 3, H, W) -> float32 in [-1, 1], in channels_last.

    On the CPU, x / 127.5 - 1 gives bit for bit what ToTensor's x / 255 then Normalize(0.5, 0.5) give
    (halving and doubling are exact in floating point), in two passes instead of three.
    channels_last: the convolutions run faster on CPU in that layout, results equal up to rounding.
    """
    return images.contiguous(memory_format=torch.channels_last).div(255 * STD).sub_(MEAN / STD)


def take(images, indices):
    """images[indices] for (N, C, H, W) images in either layout, without changing it.

    index_select copies whole images at once only from a contiguous tensor, so channels_last
    images are selected through their (N, H, W, C) view: ten times faster than byte by byte.
    """
    if images.is_contiguous():
        return images.index_select(0, indices)
    return images.permute(0, 2, 3, 1).index_select(0, indices).permute(0, 3, 1, 2)


def on_device(split, device, channels_last):
    """The split on device; its images in channels_last when they go to the model as they are."""
    images = split.images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Split(images, split.labels.to(device))


def mixed_precision(device, enabled):
    """bfloat16 autocast on CUDA when train.amp is on; elsewhere plain float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


class NonFiniteLoss(Exception):
    def __init__(self, batch, value):
        super().__init__(f"loss {value} at batch {batch}")
        self.batch, self.value = batch, value


def train_one_epoch(model, updates, split, batch_size, generator, augment=None, amp=False, label_smoothing=0.0,
                    desc="train"):  # fmt: skip
    """One pass over split in a seeded random order; returns mean loss and accuracy (%) over images.

    The loss is cross-entropy against labels smoothed by label_smoothing. updates (an Updates) steps
    its optimizer after each batch; its schedule, when given, sets the lr before the step, its
    lookahead, when given, averages the weights after it.
    Raises NonFiniteLoss, naming the first batch whose loss is nan or infinite, fewer than CHECK_EVERY
    batches after it.
    """
    model.train()
    device = split.images.device
    order = torch.randperm(len(split.labels), generator=generator).to(device)
    batches = order.split(batch_size)
    # Per batch, kept on the device and summed up once the epoch is over: fewer small ops per step.
    losses, predictions = [], []
    for step in tqdm(range(len(batches)), desc=desc, unit="batch", leave=False, disable=None):
        if step % AHEAD == 0:
            ready = [prepare_batch(split, indices, augment) for indices in batches[step : step + AHEAD]]
        inputs, labels = ready[step % AHEAD]
        with mixed_precision(device, amp):
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)
        updates.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if updates.schedule is not None:
            updates.schedule.step()
        updates.optimizer.step()
        if updates.lookahead is not None:
            updates.lookahead.step()
        losses.append(loss.detach())
        predictions.append(outputs.argmax(1))
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(batches):
            raise_if_not_finite(losses, start=max(step + 1 - CHECK_EVERY, 0))
    sizes = torch.tensor([len(indices) for indices in batches], device=device)
    correct = (torch.cat(predictions) == split.labels[order]).sum()
    count = len(order)
    return {"loss": (torch.stack(losses) * sizes).sum().item() / count, "acc": 100 * correct.item() / count}


def prepare_batch(split, indices, augment=None):
    """The model's input and labels for the images of split at indices, augmented when augment is given."""
    images = take(split.images, indices)
    if augment is not None:
        images = augment(images, indices)
    return normalise(images), split.labels.index_select(0, indices)


def raise_if_not_finite(losses, start):
    """Raises NonFiniteLoss for the first of losses[start:] (0-d tensors, one per batch) that is nan or infinite."""
    window = torch.stack(losses[start:])
    if not torch.isfinite(window).all():
        first = start + int((~torch.isfinite(window)).nonzero()[0])
        raise NonFiniteLoss(batch=first + 1, value=losses[first].item())


@torch.no_grad()
def evaluate(model, split, amp=False, tta="none"):
    """Loss and accuracy (%) over every image of split, in eval mode (dropout off, BatchNorm's running statistics),
    with each image's predicted class and logits (float32, on the CPU).

    tta names the test-time views whose logits are averaged (see stages.recipe.predict).
    """
    model.eval()
    device = split.images.device
    losses, logits = [], []  # per image, so that the sum does not depend on how images are batched
    for start in range(0, len(split.labels), EVAL_BATCH):
        images = split.images[start : start + EVAL_BATCH]
        labels = split.labels[start : start + EVAL_BATCH]
        with mixed_precision(device, amp):
            outputs = predict(model, normalise(images), tta)
        logits.append(outputs.float())  # exact for bfloat16 (amp): the same argmax
        losses.append(F.cross_entropy(logits[-1], labels, reduction="none"))
    logits = torch.cat(logits)
    predictions = logits.argmax(1)
    count = len(split.labels)
    accuracy = 100 * (predictions == split.labels).sum().item() / count
    loss = torch.cat(losses).sum().item() / count
    return {"loss": loss, "acc": accuracy, "predictions": predictions.cpu(), "logits": logits.cpu()}


class Updates(NamedTuple):
    """What changes the weights at each step: the optimizer, the lr schedule it follows, the weight averaging."""

    optimizer: torch.optim.Optimizer | Optimizers  # Optimizers: Muon for the filters beside another
    schedule: LrSchedule | None = None
    lookahead: Lookahead | None = None


def build_updates(config, model, total_steps):
    optimizer = build_optimizer(config, model)
    lookahead = Lookahead(model, config["lookahead"], total_steps) if config["lookahead"] > 0 else None
    return Updates(optimizer, LrSchedule(optimizer, config, total_steps), lookahead)
