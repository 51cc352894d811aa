"""CIFAR-10 in two forms: the official archive's batches, and the compact dataset training loads.

The archive ("python version") holds cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}, each a pickled dict written by Python 2: images as
an N x 3072 uint8 array (1024 red, then green, then blue values, row-major),
labels as a list of ints. The dataset folder holds the same pixels as
uint8 .npy files, shaped (N, 3, 32, 32), which load in a fraction of a second.
"""

import io
import json
import pickle
import reprlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stages.errors import PipelineError
from stages.outputs import atomic_dir

DATASET_DIR = Path("data/cifar10")
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)

try:  # numpy 2 moved the array pickling helpers to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct


class ArchiveError(PipelineError):
    """The archive is not a readable CIFAR-10 "python version" archive."""


class Split(NamedTuple):
    images: np.ndarray  # (N, 3, 32, 32) uint8
    labels: np.ndarray  # (N,) int64


class Dataset(NamedTuple):
    train: Split
    test: Split
    classes: list


class BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch is made of: containers, scalars and numpy arrays.

    Unpickling can run arbitrary code, and archives come from mirrors we don't control.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes this way at protocol 2; it only turns text into bytes.
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def __init__(self, file, name):
        # latin1 decodes Python 2 strings, and keeps numpy's raw array bytes intact.
        super().__init__(file, encoding="latin1")
        self.name = name

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ArchiveError(
                f"{self.name}: refused to unpickle {module}.{name}; a CIFAR-10 batch holds only arrays and lists"
            )
        return self.ALLOWED[(module, name)]


def unpickle_batch(payload, name):
    try:
        batch = BatchUnpickler(io.BytesIO(payload), name).load()
    except ArchiveError:
        raise
    except Exception as error:
        raise ArchiveError(f"{name}: not a readable pickle ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise ArchiveError(f"{name}: expected a pickled dict, found {type(batch).__name__}")
    # Python 3 pickles written with bytes keys decode them as latin1 text too.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def read_images(batch, name, num_classes):
    """Returns a Split from one unpickled batch, checking shape, dtype and label range."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ArchiveError(f"{name}: 'data' must be an N x 3072 uint8 array, found {found}")
    labels = read_labels(labels, name)
    if len(labels) != len(data):
        raise ArchiveError(f"{name}: expected {len(data)} labels (one per image), found {len(labels)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ArchiveError(f"{name}: labels must be 0-{num_classes - 1}, found {labels.min()}-{labels.max()}")
    return Split(data.reshape(-1, *IMAGE_SHAPE), labels)


def read_labels(labels, name):
    """A batch's 'labels' (a list of integers in the official archive) as an int64 array."""
    try:
        values = np.asarray(labels if labels is not None else [])
    except ValueError:  # lists of unequal lengths
        values = None
    if values is None or values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ArchiveError(f"{name}: 'labels' must be a list of integers, one per image, found {reprlib.repr(labels)}")
    return values.astype(np.int64)


def read_classes(meta, name):
    classes = meta.get("label_names")
    if not isinstance(classes, list) or len(classes) != 10 or not all(isinstance(c, str) for c in classes):
        raise ArchiveError(f"{name}: 'label_names' must be a list of 10 class names, found {classes!r}")
    return classes


def read_archive_batches(members):
    """Builds the Dataset from {member name: bytes} of an archive's batch files."""
    missing = [f"{BATCH_DIR}/{n}" for n in [*TRAIN_BATCHES, TEST_BATCH, META] if n not in members]
    if missing:
        raise ArchiveError(f"the archive lacks {', '.join(missing)}; expected CIFAR-10's 'python version' layout")
    classes = read_classes(unpickle_batch(members[META], META), META)
    train = [read_images(unpickle_batch(members[n], n), n, len(classes)) for n in TRAIN_BATCHES]
    test = read_images(unpickle_batch(members[TEST_BATCH], TEST_BATCH), TEST_BATCH, len(classes))
    train = Split(np.concatenate([s.images for s in train]), np.concatenate([s.labels for s in train]))
    for what, split in (("training batches hold", train), (f"{TEST_BATCH} holds", test)):
        if len(split.labels) == 0:
            raise ArchiveError(f"the archive's {what} no images; training needs some, and so does evaluation")
    return Dataset(train, test, classes)


def save_dataset(dataset, out_dir):
    with atomic_dir(out_dir) as partial:
        for split_name, split in (("train", dataset.train), ("test", dataset.test)):
            np.save(partial / f"{split_name}_images.npy", split.images)
            np.save(partial / f"{split_name}_labels.npy", split.labels)
        (partial / "classes.json").write_text(json.dumps(dataset.classes) + "\n")


def load_dataset(data_dir=DATASET_DIR):
    data_dir = Path(data_dir)
    if not (data_dir / "classes.json").exists():
        raise PipelineError(f"no dataset in {data_dir}; run `dvc repro download` first")

    import torch  # here, not at the top: the download stage, which needs none of torch, starts seconds sooner

    def split(name):
        images = torch.from_numpy(np.load(data_dir / f"{name}_images.npy"))
        return Split(images, torch.from_numpy(np.load(data_dir / f"{name}_labels.npy")))

    return Dataset(split("train"), split("test"), json.loads((data_dir / "classes.json").read_text()))
