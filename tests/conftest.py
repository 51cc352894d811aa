"""Shared fixtures: small archives in the official layout, a loopback HTTP server, a temporary project,
a small trained try.

torch is imported only where it is used: pytest's controller process loads this file too, runs no test, and
would hold up the start of the test processes by the five seconds torch takes to load."""

import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from stages.data import Dataset, Split, read_archive_batches
from stages.outputs import TryOutputs, outputs_for
from stages.params import load_params, resolve_try
from tests.cifar_archive import batch_files, write_archive

ROOT = Path(__file__).resolve().parent.parent
# What a clone of the project holds that the pipeline needs.
PROJECT_FILES = [
    "dvc.yaml",
    "params.yaml",
    "stages",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots",
    ".dvcignore",
    ".gitignore",
]
# params.yaml's tries, as shipped: the post's three and the 4th.
SHIPPED_TRIES = ["lenet", "lenet2", "lenet2_aug", "airbench"]
# Small enough for seconds per stage, large enough that accuracy means something.
E2E_TRAIN = {"epochs": 2, "batch_size": 50}
# dvc.yaml's stages up to the metrics: for a project whose tests read no figure (make_project's stages).
TRAINING_STAGES = ["download", "configure", "train"]
# Tests compare runs bit for bit and with CPU inference, which a GPU's kernels do not promise: they train
# on the CPU even where train.device: auto would take a GPU, unless a test asks for one (tests/devices.py).
ON_CPU = {"device": "cpu"}
# The 4th try's own batch of 500 would make 2 steps an epoch of the small archives' 1,000 images; and at half
# its widths a step costs about a third as much, where the tests ask it to learn and run, not to score.
SMALL_DATA_TRIES = {"airbench": {"widths": [16, 32, 64], "batch_size": 100, "lr": 0.15}}
# The loopback S3 endpoint's bucket and the made-up keys it accepts.
S3_BUCKET = "cifar10-tries"
S3_REGION = "us-east-1"
S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing"}  # as DVC's remote options
# `git commit` and `dvc exp run` need an identity, which a fresh CI machine lacks.
GIT_IDENTITY = {
    f"GIT_{role}_{field}": value
    for role in ("AUTHOR", "COMMITTER")
    for field, value in (("NAME", "test"), ("EMAIL", "test@example.com"))
}


# The files that take longest, longest first (about 200, 100, 65, 65, 45, 40 and 35 s beside another test
# process). Each test process takes whole files (pyproject.toml), so the suite lasts at least as long as its
# longest file from the time it starts: handed out 11th, as xdist would by test count, test_pipeline.py ran on
# alone at the end; and the files left for last are the short ones, which even out the two processes' ends.
SLOWEST_FILES = ["test_pipeline.py", "test_faults.py", "test_sharing.py", "test_ladder.py", "test_sweeps.py",
                 "test_ingredients.py", "test_train.py"]  # fmt: skip


def pytest_configure(config):
    # pytest-xdist hands out the files with the most tests first; from 3.8 on it can be told to keep ours
    # (pytest_collection_modifyitems), and a --loadscope-reorder on the command line cannot undo that.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The slowest files first (SLOWEST_FILES). And a test parametrised over GPUs on a machine without one
    has no case: pytest would count it as skipped, as if something had not run that could; it is deselected
    instead, and reported so."""
    order = {name: rank for rank, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: each file keeps its order
    without_cases = [item for item in items if has_no_cases(item)]
    if without_cases:
        config.hook.pytest_deselected(items=without_cases)
        items[:] = [item for item in items if item not in without_cases]


def has_no_cases(item):
    """Whether item stands for a test parametrised over an empty list, which pytest marks to skip."""
    return any(
        mark.name == "skip" and "empty parameter set" in str(mark.kwargs.get("reason")) for mark in item.iter_markers()
    )


@pytest.fixture(scope="session")
def archive_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("archives")


@pytest.fixture(scope="session")
def small_archive(archive_dir):
    """(path, md5) of a 1,000 + 300 image archive, pickled as the official one is."""
    path = archive_dir / "cifar-10-python.tar.gz"
    return path, write_archive(path, batch_files())


@pytest.fixture(scope="session")
def http_server(archive_dir):
    """Serves archive_dir on 127.0.0.1; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(archive_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint on 127.0.0.1 (moto's server, in this process) holding an empty bucket S3_BUCKET;
    yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    keys = {f"aws_{name}": value for name, value in S3_KEYS.items()}
    client = boto3.client("s3", endpoint_url=url, region_name=S3_REGION, **keys)
    client.create_bucket(Bucket=S3_BUCKET)
    yield url
    server.stop()


def tool_env():
    """The environment for the commands tests run: this interpreter's bin/ first on PATH (so DVC's
    `python` is ours), unbuffered output, no analytics, a git identity, and no AWS instance-metadata
    look-up (botocore's fallback for missing keys, which would leave 127.0.0.1)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    quiet = {"DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "AWS_EC2_METADATA_DISABLED": "true"}
    return {**os.environ, "PATH": path, **quiet, **GIT_IDENTITY}


# A command that takes longer has hung (DVC's queue can: treeverse/dvc#10398), and fails instead of
# holding up the suite.
COMMAND_TIMEOUT = 900


def run(args, cwd, check=True, env=None):
    """Runs args in tool_env(), with env's variables on top; fails with its output if it fails."""
    try:
        result = subprocess.run(args, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired as hung:  # its output so far comes as bytes
        output = "\n".join((part or b"").decode(errors="replace") for part in (hung.stdout, hung.stderr))
        raise AssertionError(f"{' '.join(map(str, args))} did not finish in {COMMAND_TIMEOUT} s:\n{output}") from None
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


DVC = [sys.executable, "-m", "dvc"]  # this interpreter's DVC


def dvc(*args, cwd, check=True):
    return run([*DVC, *args], cwd=cwd, check=check)


def make_project(dest, url, md5, train=E2E_TRAIN, tries=None, stages=None):
    """A git repo holding a copy of the project, its params pointing at url; tries, if given, names
    the entries of params.yaml's tries to keep, and stages those of dvc.yaml's stages (a test that reads
    no figure leaves out the report and the plots page, which would cost each experiment 20 s)."""
    for name in PROJECT_FILES:
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)

    def for_small_data(params):
        params["data"].update(url=url, md5=md5)
        params["train"].update(ON_CPU, **train)
        for name, settings in SMALL_DATA_TRIES.items():
            params["tries"][name].update(settings)

    edit_params(dest, for_small_data)
    if tries is not None:
        edit_params(dest, lambda p: p.update(tries={name: p["tries"][name] for name in tries}))
    if stages is not None:
        edit_yaml(dest / "dvc.yaml", lambda p: p.update(stages={name: p["stages"][name] for name in stages}))
    run(["git", "init", "-q"], cwd=dest)
    run(["git", "add", "-A"], cwd=dest)
    run(["git", "commit", "-qm", "project"], cwd=dest)
    return dest


def readme_command(start):
    """The arguments of the README's command line that starts with start, its comment left out."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return shlex.split(next(line for line in lines if line.startswith(start)), comments=True)


def stages_run(output):
    return re.findall(r"Running stage '([^']+)'", output)


def exp_show(project):
    """{experiment name: (params, metrics)} from `dvc exp show --json`."""
    experiments = {}
    for commit in json.loads(dvc("exp", "show", "--json", cwd=project).stdout):
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                metrics = {path: value["data"] for path, value in data["metrics"].items()}
                experiments[rev["name"]] = (data["params"]["params.yaml"]["data"], metrics)
    return experiments


def without_time(metrics):
    return {key: value for key, value in metrics.items() if key != "seconds"}


def outputs_in(directory, name):
    """The paths try name's train stage writes, under directory instead of the project's root."""
    return TryOutputs(*(directory / path for path in outputs_for(name)))


def same_weights(*outputs):
    """Whether the checkpoints of two TryOutputs hold equal weights, bit for bit."""
    import torch

    first, second = (torch.load(o.model, weights_only=True)["state_dict"] for o in outputs)
    return all(torch.equal(first[k], second[k]) for k in first)


def run_queue(project, experiments, jobs=2, timeout=600):
    """`dvc queue start -j jobs`, waits until the experiments queued (how many: experiments) are done, then
    stops the workers, killing what still runs when time is up.

    `queue start` writes to a file, not to pipes: its workers inherit its stdout and stderr, so reading
    them would wait for the last worker to exit, which a known DVC bug can keep from ever happening (a
    worker whose monitor died on a half-written message stays idle for good: treeverse/dvc#10398).

    Each `dvc queue status` costs one and a half seconds of CPU that the experiments need, so the wait
    watches for their Git refs instead (a few milliseconds: DVC writes one when an experiment finishes) and
    asks DVC only every QUEUE_CHECK_S, for one that failed (it writes none), and at the end."""
    log = project / ".dvc" / "tmp" / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    before = experiment_refs(project)
    try:
        with log.open("w") as out:
            command = [*DVC, "queue", "start", "-j", str(jobs)]
            started = subprocess.run(command, cwd=project, env=tool_env(), stdout=out, stderr=subprocess.STDOUT,
                                     timeout=COMMAND_TIMEOUT)  # fmt: skip
        assert started.returncode == 0, log.read_text()
        deadline, checked = time.monotonic() + timeout, time.monotonic()
        while True:
            # Once every ref is there, asked until DVC marks the last one done (a moment after its ref).
            all_refs = len(experiment_refs(project) - before) >= experiments
            if all_refs or time.monotonic() - checked > QUEUE_CHECK_S:
                status = dvc("queue", "status", cwd=project).stdout
                if not queue_busy(status, deadline, timeout):
                    break
                checked = time.monotonic()
            time.sleep(0.5)
        assert_none_failed(project, status)
    finally:
        dvc("queue", "stop", "--kill", cwd=project, check=False)


QUEUE_CHECK_S = 15


def experiment_refs(project):
    """The Git refs of the project's experiments: refs/exps/<baseline commit, split after 2 digits>/<name>
    (refs/exps/celery and refs/exps/exec hold DVC's queue and workspaces)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project).stdout.split()
    return {ref for ref in refs if re.match(r"refs/exps/[0-9a-f]{2}/", ref)}


def queue_busy(status, deadline, timeout):
    """Whether `dvc queue status` (its output: status) lists an experiment queued or running; fails once
    deadline has passed."""
    busy = re.search(r"\b(Queued|Running)\b", status) is not None
    assert not busy or time.monotonic() < deadline, f"queued experiments did not finish in {timeout} s:\n{status}"
    return busy


def assert_none_failed(project, status):
    """Fails with their logs if `dvc queue status` (its output: status) lists experiments that failed: a
    test that reads the experiments would otherwise fail later, on a metric that is not there."""
    failed = re.findall(r"^(\w+)\s.*\bFailed\s*$", status, re.M)  # a row: task id, name, created, status
    logs = {task: dvc("queue", "logs", task, cwd=project, check=False).stdout for task in failed}
    assert not failed, "\n".join(f"experiment {task} failed:\n{log[-3000:]}" for task, log in logs.items())


def edit_params(project, change):
    edit_yaml(project / "params.yaml", change)


def edit_yaml(path, change):
    contents = yaml.safe_load(path.read_text())
    change(contents)
    path.write_text(yaml.safe_dump(contents, sort_keys=False))


@pytest.fixture
def project(tmp_path, http_server, small_archive):
    """A fresh project whose data.url is the small archive on the loopback server."""
    path, md5 = small_archive
    return make_project(tmp_path / "project", f"{http_server}/{path.name}", md5)


@pytest.fixture(scope="session")
def learnable_dataset():
    """The small archive's 1,000 + 300 images as training loads them (uint8 tensors)."""
    import torch

    arrays = read_archive_batches(batch_files())
    as_split = lambda split: Split(torch.from_numpy(split.images), torch.from_numpy(split.labels))  # noqa: E731
    return Dataset(as_split(arrays.train), as_split(arrays.test), arrays.classes)


@pytest.fixture(scope="session")
def trained_try(tmp_path_factory, learnable_dataset):
    """The outputs of try lenet trained for 2 epochs on learnable_dataset, as the train stage writes them."""
    from stages.train import train

    directory = tmp_path_factory.mktemp("trained")
    params = load_params(ROOT / "params.yaml")
    config = {**resolve_try(params, "lenet"), **E2E_TRAIN, **ON_CPU}
    outputs = outputs_in(directory, "lenet")
    train(config, params["augment"], learnable_dataset, outputs, "lenet")
    return outputs
