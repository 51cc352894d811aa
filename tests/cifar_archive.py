"""Builds small CIFAR-10 archives in the official "python version" layout, for tests.

The official batches were pickled by Python 2: strings are Python 2 `str`
(read back with encoding="latin1") and arrays are numpy.core.multiarray
reconstructions. `py2_pickle` writes that shape, so the reader is tested on
the format it meets in the real archive; `py3=True` writes ordinary Python 3
pickles instead, as a re-packed mirror might.
"""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOP = "cifar-10-batches-py"


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings and arrays the way numpy 1.x under Python 2 did."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_ndarray(self, arr):
        write = self.write
        write(b"cnumpy.core.multiarray\n_reconstruct\n")
        write(b"cnumpy\nndarray\n")
        self.save((0,))
        self.save(b"b")
        write(pickle.TUPLE3 + pickle.REDUCE + pickle.MARK)
        self.save(1)
        self.save(tuple(arr.shape))
        write(b"cnumpy\ndtype\n")
        self.save(arr.dtype.str.lstrip("<>|="))
        self.save(0)
        self.save(1)
        write(pickle.TUPLE3 + pickle.REDUCE + pickle.MARK)
        for field in (3, "|", None, None, None, -1, -1, 0):
            self.save(field)
        write(pickle.TUPLE + pickle.BUILD)
        self.save(False)
        self.save(arr.tobytes())
        write(pickle.TUPLE + pickle.BUILD)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str
    dispatch[np.ndarray] = save_ndarray


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def learnable_images(count, seed, noise=0.6):
    """Images whose class shows as its own colour under heavy pixel noise.

    Colour survives flips, rotations and jitter, so augmented tries can learn it too.
    """
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).uniform(0, 255, size=(10, 3, 1))
    labels = rng.integers(0, 10, size=count)
    pixels = (1 - noise) * colours[labels] + noise * rng.uniform(0, 255, size=(count, 3, 1024))
    return pixels.reshape(count, 3072).round().astype(np.uint8), labels.tolist()


def batch_files(train_count=1000, test_count=300, py3=False, seed=0):
    """{member name: bytes} of a complete archive."""
    dump = (lambda obj: pickle.dumps(obj, protocol=2)) if py3 else py2_pickle
    train_data, train_labels = learnable_images(train_count, seed)
    test_data, test_labels = learnable_images(test_count, seed + 1)
    per = -(-train_count // 5)
    files = {}
    for b in range(5):
        part = slice(b * per, (b + 1) * per)
        files[f"data_batch_{b + 1}"] = dump(
            {"batch_label": f"training batch {b + 1} of 5", "labels": train_labels[part], "data": train_data[part]}
        )
    files["test_batch"] = dump({"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data})
    files["batches.meta"] = dump({"num_cases_per_batch": per, "label_names": CLASSES, "num_vis": 3072})
    return files


def write_archive(path, files, top=TOP):
    """Writes {name: bytes} as a .tar.gz under top/ and returns its md5."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()
