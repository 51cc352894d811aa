"""The download stage: fetch, check, read the official batch format, and refuse anything else cleanly."""

import hashlib
import pickle
import re

import numpy as np
import pytest

from stages import download as download_module
from stages.data import ArchiveError, load_dataset
from stages.download import DownloadError, download
from tests.cifar_archive import CLASSES, batch_files, learnable_images, py2_pickle, write_archive


def archive(tmp_path, files, name="cifar.tar.gz"):
    path = tmp_path / name
    return path, write_archive(path, files)


def leftovers(out_dir):
    """Anything the stage may have left beside its output: partial folders, downloads (after a failure, the
    folder it made for them: it goes too)."""
    if not out_dir.parent.exists():
        return []
    return [p.name for p in out_dir.parent.iterdir() if p != out_dir]


@pytest.mark.parametrize("py3", [False, True], ids=["python2-pickles", "python3-pickles"])
def test_reads_the_official_layout_into_uint8_arrays(tmp_path, py3):
    path, md5 = archive(tmp_path, batch_files(py3=py3))
    out = tmp_path / "data" / "cifar10"
    download(str(path), md5, out)
    dataset = load_dataset(out)
    train_pixels, train_labels = learnable_images(1000, seed=0)
    assert dataset.classes == CLASSES
    assert dataset.train.images.shape == (1000, 3, 32, 32) and dataset.test.images.shape == (300, 3, 32, 32)
    assert str(dataset.train.images.dtype) == "torch.uint8"
    # Batch order and the channel-first pixel layout survive: image 0's red plane is its first 1024 values.
    assert np.array_equal(dataset.train.images.reshape(1000, -1).numpy(), train_pixels)
    assert dataset.train.labels.tolist() == train_labels


def test_fetches_over_http_and_from_file_urls(tmp_path, http_server, small_archive):
    path, md5 = small_archive
    for url in (f"{http_server}/{path.name}", path.as_uri()):
        out = tmp_path / url.split(":")[0] / "cifar10"
        download(url, md5, out)
        assert len(load_dataset(out).train.labels) == 1000
        assert leftovers(out) == []


def test_a_wrong_md5_names_both_checksums_and_leaves_nothing(tmp_path, http_server, small_archive):
    path, md5 = small_archive
    out = tmp_path / "data" / "cifar10"
    with pytest.raises(DownloadError, match=f"has md5 {md5}, but params.yaml's data.md5 is {'f' * 32}"):
        download(f"{http_server}/{path.name}", "f" * 32, out)
    assert not out.parent.exists()  # data/, made for the download, went with it
    out.parent.mkdir()
    with pytest.raises(DownloadError):
        download(f"{http_server}/{path.name}", "f" * 32, out)
    assert leftovers(out) == [] and out.parent.exists()  # a folder that was there stays


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://127.0.0.1:9/cifar.tar.gz", "could not download http://127.0.0.1:9/cifar.tar.gz"),
        ("/no/such/cifar.tar.gz", "no such file /no/such/cifar.tar.gz"),
        ("ftp://example.org/cifar.tar.gz", "unsupported scheme 'ftp'"),
    ],
)
def test_unreachable_sources_say_what_to_fix(tmp_path, url, expected):
    out = tmp_path / "data" / "cifar10"
    with pytest.raises(DownloadError, match=expected):
        download(url, "0" * 32, out)
    assert not out.exists()


def test_local_paths_are_expanded_and_a_wrong_one_says_why(tmp_path, small_archive, monkeypatch):
    path, md5 = small_archive
    monkeypatch.setenv("HOME", str(path.parent))
    download(f"~/{path.name}", md5, tmp_path / "data" / "cifar10")  # as the shell would expand it
    with pytest.raises(DownloadError, match=f"{path.parent} is a folder; point data.url at the archive file in it"):
        download(str(path.parent), md5, tmp_path / "data" / "cifar10")
    monkeypatch.chdir(tmp_path)
    absolute = re.escape(str(tmp_path / "copies" / "c.tar.gz"))
    with pytest.raises(DownloadError, match=f"no such file {absolute}; .* a queued experiment runs in a copy"):
        download("copies/c.tar.gz", md5, tmp_path / "data" / "cifar10")
    with pytest.raises(DownloadError, match="no home folder for ~no-such-user-here; give the full path"):
        download("~no-such-user-here/c.tar.gz", md5, tmp_path / "data" / "cifar10")


def test_an_archive_that_cannot_be_read_says_so(tmp_path, small_archive, monkeypatch):
    def refused(path, *args, **kwargs):  # what a file without read permission gives a user other than root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(download_module, "open", refused, raising=False)  # the module's open, ahead of builtins'
    path, md5 = small_archive
    with pytest.raises(DownloadError, match=f"cannot read {re.escape(str(path))} \\(Permission denied\\); check its"):
        download(str(path), md5, tmp_path / "data" / "cifar10")
    assert not (tmp_path / "data").exists()


def test_a_missing_file_on_the_server_reports_the_http_status(tmp_path, http_server):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{http_server}/missing.tar.gz", "0" * 32, tmp_path / "data" / "cifar10")


def test_a_truncated_archive_is_refused(tmp_path, small_archive):
    full, _ = small_archive
    path = tmp_path / "truncated.tar.gz"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out = tmp_path / "data" / "cifar10"
    with pytest.raises(ArchiveError, match="not a complete .tar.gz archive"):
        download(str(path), hashlib.md5(path.read_bytes()).hexdigest(), out)
    assert not out.exists() and leftovers(out) == []


def test_missing_members_are_listed(tmp_path):
    files = batch_files()
    del files["data_batch_3"], files["batches.meta"]
    path, md5 = archive(tmp_path, files)
    with pytest.raises(ArchiveError, match="lacks cifar-10-batches-py/data_batch_3, cifar-10-batches-py/batches.meta"):
        download(str(path), md5, tmp_path / "data" / "cifar10")


@pytest.mark.parametrize(
    "batch, expected",
    [
        (
            {"data": np.zeros((10, 3000), np.uint8), "labels": [0] * 10},
            "data_batch_2: 'data' must be an N x 3072 uint8 array, found uint8 array of shape (10, 3000)",
        ),
        ({"data": np.zeros((10, 3072), np.float32), "labels": [0] * 10}, "found float32 array"),
        ({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 9}, "data_batch_2: expected 10 labels"),
        (
            {"data": np.zeros((10, 3072), np.uint8), "labels": [12] * 10},
            "data_batch_2: labels must be 0-9, found 12-12",
        ),
        # Labels that are not integers: refused, not cut down to integers or left to fail later.
        (
            {"data": np.zeros((2, 3072), np.uint8), "labels": [1.7, 2.9]},
            "data_batch_2: 'labels' must be a list of integers, one per image, found [1.7, 2.9]",
        ),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]}, "found ['cat', 'dog']"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [[1], [2, 3]]}, "found [[1], [2, 3]]"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": {"cat": 1}}, "found {'cat': 1}"),
    ],
)
def test_batches_of_the_wrong_shape_or_range_are_refused(tmp_path, batch, expected):
    files = batch_files()
    files["data_batch_2"] = pickle.dumps(batch, protocol=2)
    path, md5 = archive(tmp_path, files)
    with pytest.raises(ArchiveError, match=re.escape(expected)):
        download(str(path), md5, tmp_path / "data" / "cifar10")


@pytest.mark.parametrize("emptied", [["test_batch"], [f"data_batch_{b}" for b in range(1, 6)]])
def test_an_archive_without_test_or_training_images_is_refused(tmp_path, emptied):
    files = batch_files()
    for name in emptied:
        files[name] = py2_pickle({"data": np.zeros((0, 3072), np.uint8), "labels": []})  # as the official batches
    path, md5 = archive(tmp_path, files)
    what = "test_batch holds" if emptied == ["test_batch"] else "training batches hold"
    with pytest.raises(ArchiveError, match=f"the archive's {what} no images"):
        download(str(path), md5, tmp_path / "data" / "cifar10")
    assert not (tmp_path / "data" / "cifar10").exists()


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    files = batch_files()
    files["test_batch"] = pickle.dumps({"data": RunsACommand(marker), "labels": []}, protocol=2)
    path, md5 = archive(tmp_path, files)
    with pytest.raises(ArchiveError, match=r"test_batch: refused to unpickle (posix|os)\.system"):
        download(str(path), md5, tmp_path / "data" / "cifar10")
    assert not marker.exists()
