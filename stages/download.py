"""Stage `download`: fetch the CIFAR-10 archive, check its md5, write the compact dataset.

Reads params.yaml's `data.url` (http(s)://, file:// or a local path) and
`data.md5`; writes data/cifar10/ (see stages/data.py). The archive itself is
not kept: only the uint8 arrays training needs.

    python -m stages.download
"""

import hashlib
import http.client
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tqdm import tqdm

from stages.data import (
    BATCH_DIR,
    DATASET_DIR,
    META,
    TEST_BATCH,
    TRAIN_BATCHES,
    ArchiveError,
    read_archive_batches,
    save_dataset,
)
from stages.errors import PipelineError, exits_cleanly
from stages.params import load_params

CHUNK = 1 << 20
TIMEOUT_S = 60  # per socket operation, so a dead server fails instead of hanging
ATTEMPTS = 4  # a dropped connection, a timeout or a 5xx is retried, after 1, 2, then 4 s
BACKOFF_S = 1.0


class DownloadError(PipelineError):
    """The archive could not be fetched, or is not the one params.yaml names."""


def download(url, md5, out_dir=DATASET_DIR):
    """Fetches url, checks md5, and writes the dataset to out_dir; nothing is left on failure."""
    out_dir = Path(out_dir)
    created = not out_dir.parent.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with local_copy(url, out_dir.parent) as archive:
            check_md5(archive, md5, url)
            dataset = read_archive_batches(read_members(archive))
        save_dataset(dataset, out_dir)
    except BaseException:
        if created:
            with suppress(OSError):  # only if nothing else is in it
                out_dir.parent.rmdir()
        raise
    print(f"wrote {out_dir}: {len(dataset.train.labels)} training and {len(dataset.test.labels)} test images")


@contextmanager
def local_copy(url, scratch_dir):
    """Yields a local path to the archive: the file itself for local URLs, else a temporary download."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        for stale in Path(scratch_dir).glob(".download-*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=scratch_dir, prefix=".download-") as tmp:
            path = Path(tmp) / "archive.tar.gz"
            fetch_http(url, path)
            yield path
        return
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path, or a Windows drive letter
        try:
            path = Path(url).expanduser()
        except RuntimeError:  # ~name of a user this machine does not have
            user = url.split("/")[0]
            raise DownloadError(f"data.url {url!r}: no home folder for {user}; give the full path") from None
    else:
        raise DownloadError(
            f"data.url {url!r}: unsupported scheme {parsed.scheme!r}; use http(s)://, file:// or a local path"
        )
    check_local_archive(url, path)
    yield path


def check_local_archive(url, path):
    if path.is_dir():
        raise DownloadError(f"data.url {url!r}: {path} is a folder; point data.url at the archive file in it")
    if not path.is_file():
        # A queued experiment runs in a copy of the workspace (.dvc/tmp/exps/...), where a relative path
        # that works in the workspace leads nowhere.
        relative = (
            ""
            if path.is_absolute()
            else "; a queued experiment runs in a copy of the workspace, so use an absolute path"
        )
        raise DownloadError(
            f"data.url {url!r}: no such file {path.absolute()}; point data.url at a copy of "
            f"cifar-10-python.tar.gz{relative}"
        )


class TransientError(Exception):
    """A failure worth retrying: the server or the connection may do better next time."""


def fetch_http(url, path, attempts=ATTEMPTS):
    """Downloads url to path, starting over after transient failures, with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fetch_once(url, path)
        except TransientError as error:
            if attempt == attempts:
                raise DownloadError(f"could not download {url} after {attempts} attempts: {error}") from None
            wait = BACKOFF_S * 2 ** (attempt - 1)
            print(f"download: {error}; retrying in {wait:g} s (attempt {attempt + 1} of {attempts})", file=sys.stderr)
            time.sleep(wait)


def fetch_once(url, path):
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, writing(path) as write:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=None) as bar:
                while chunk := response.read(CHUNK):
                    write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise TransientError(f"the transfer ended after {received} of {total} bytes")
    except urllib.error.HTTPError as error:
        if error.code >= 500 or error.code == 429:
            raise TransientError(f"HTTP {error.code} {error.reason}") from None
        raise DownloadError(
            f"could not download {url}: HTTP {error.code} {error.reason}; check data.url in params.yaml"
        ) from None
    except (http.client.IncompleteRead, ConnectionResetError, TimeoutError) as error:
        raise TransientError(f"{type(error).__name__}: {error}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (ConnectionResetError, TimeoutError)):
            raise TransientError(f"{type(reason).__name__}: {reason}") from None
        raise DownloadError(
            f"could not download {url}: {reason}; check data.url in params.yaml, "
            "or point it at a local copy (file:///path/to/cifar-10-python.tar.gz)"
        ) from None


def disk_error(path, error):
    return DownloadError(
        f"could not write the download to {path.parent}: {error.strerror or error}; check that the folder "
        "exists, can be written to and has space"
    )


@contextmanager
def writing(path):
    """Yields a function that appends bytes to path, and closes path after. The local disk's errors (full,
    read-only; at a write, or at the close that writes the last buffered bytes) raise a DownloadError that
    says so, where fetch_once would take any OSError for the network's."""
    try:
        out = open(path, "wb")
    except OSError as error:
        raise disk_error(path, error) from None

    def write(chunk):
        try:
            out.write(chunk)
        except OSError as error:
            raise disk_error(path, error) from None

    try:
        yield write
    except BaseException:
        with suppress(OSError):  # the error on its way out says more than a failed close
            out.close()
        raise
    try:
        out.close()
    except OSError as error:
        raise disk_error(path, error) from None


def check_md5(path, expected, url):
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as error:  # the archive's first read: a local file may lack read permission
        raise DownloadError(f"data.url {url!r}: cannot read {path} ({error.strerror}); check its permissions") from None
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise DownloadError(
            f"the archive from {url} has md5 {actual}, but params.yaml's data.md5 is {expected}; "
            f"the file is corrupt or not the one expected. If you trust it, set data.md5: {actual}"
        )


def read_members(archive):
    """Reads the batch files straight out of the tar: nothing is extracted to disk."""
    wanted = {f"{BATCH_DIR}/{name}" for name in [*TRAIN_BATCHES, TEST_BATCH, META]}
    members = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    members[name.split("/", 1)[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise ArchiveError(f"{archive} is not a complete .tar.gz archive ({error}); download it again") from None
    return members


@exits_cleanly
def main():
    params = load_params()
    download(params["data"]["url"], params["data"]["md5"])


if __name__ == "__main__":
    main()
