"""End to end: results move between clones through a bare Git repository and a DVC remote, as between machines.

Clone "a" trains, commits and pushes; every test starts a fresh clone of the Git remote and gets what
"a" made without training it again.
"""

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from tests.conftest import (
    S3_BUCKET,
    S3_KEYS,
    S3_REGION,
    TRAINING_STAGES,
    dvc,
    edit_params,
    exp_show,
    make_project,
    readme_command,
    run,
    stages_run,
)

pytestmark = pytest.mark.e2e
LEAN = {"epochs": 1, "batch_size": 100}
TRY = "lenet"
EXPERIMENT = ("lr-0.002", "train.lr=0.002")


class Machines(NamedTuple):
    root: Path  # the folder holding the Git remote, the DVC remote and the clones
    a: Path  # the clone that trained
    metrics: dict  # a's metrics: what every other clone must get
    experiment_metrics: dict  # those of a's experiment (EXPERIMENT)


@pytest.fixture(scope="module")
def machines(tmp_path_factory, http_server, small_archive):
    """Machines: a trained, committed and pushed, with one experiment pushed too."""
    root = tmp_path_factory.mktemp("sharing")
    run(["git", "init", "-q", "--bare", str(root / "origin.git")], cwd=root)
    path, md5 = small_archive
    # No figures: they would move as every other output does, and drawing them costs each run seconds.
    a = make_project(root / "a", f"{http_server}/{path.name}", md5, train=LEAN, tries=[TRY], stages=TRAINING_STAGES)
    run(["git", "remote", "add", "origin", str(root / "origin.git")], cwd=a)
    # Committed before any experiment: `dvc exp push` reads the DVC remote from the experiment's commit.
    dvc("remote", "add", "-d", "shared", str(root / "dvc-storage"), cwd=a)
    dvc("repro", cwd=a)
    run(["git", "add", ".dvc/config"], cwd=a)  # the README's two commits in one
    run(readme_command("git add dvc.lock"), cwd=a)
    run(["git", "commit", "-qm", "baseline and shared remote"], cwd=a)
    dvc("push", "--run-cache", cwd=a)
    run(["git", "push", "-q", "-u", "origin", "HEAD"], cwd=a)

    name, change = EXPERIMENT
    dvc("exp", "run", "-n", name, "-S", change, cwd=a)
    dvc("exp", "push", "--run-cache", "origin", name, cwd=a)
    run(["git", "checkout", "-q", "--", "."], cwd=a)  # back to the baseline in the workspace
    dvc("checkout", "--force", cwd=a)
    return Machines(root, a, metrics(a), exp_show(a)[name][1])


def clone(root, name):
    run(["git", "clone", "-q", str(root / "origin.git"), name], cwd=root)
    return root / name


def metrics(project):
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    return {path: value["data"] for path, value in next(iter(shown.values()))["data"].items()}


def test_a_fresh_clone_pulls_every_output_and_repro_runs_nothing(machines):
    root, a = machines.root, machines.a
    b = clone(root, "b")
    dvc("pull", cwd=b)
    result = dvc("repro", cwd=b)
    assert stages_run(result.stdout) == [] and "up to date" in result.stdout, result.stdout
    assert metrics(b) == machines.metrics
    assert (b / "models" / f"{TRY}.pt").read_bytes() == (a / "models" / f"{TRY}.pt").read_bytes()


def test_an_experiment_pushed_from_one_clone_is_pulled_and_applied_in_another(machines):
    name, _ = EXPERIMENT
    b = clone(machines.root, "b-exp")
    assert name in dvc("exp", "list", "origin", cwd=b).stdout
    dvc("exp", "pull", "origin", name, cwd=b)
    dvc("exp", "apply", name, cwd=b)
    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["lr"] == 0.002
    assert metrics(b) == machines.experiment_metrics
    # Every output is there, as the experiment's dvc.lock records it: nothing left to run.
    assert "up to date" in dvc("status", cwd=b).stdout


def test_repro_pull_restores_the_train_stage_from_the_run_cache(machines):
    c = clone(machines.root, "c")
    edit_params(c, lambda p: p["train"].update(lr=0.002))  # the experiment's params, typed by hand
    result = dvc("repro", "--pull", cwd=c)
    assert stages_run(result.stdout) == [], result.stdout
    assert f"Stage 'train@{TRY}' is cached - skipping run" in result.stdout
    assert metrics(c) == machines.experiment_metrics


def test_push_and_pull_through_an_s3_endpoint(machines, s3_endpoint):
    root, a = machines.root, machines.a
    options = {"url": f"s3://{S3_BUCKET}/cifar10-tries", "endpointurl": s3_endpoint, "region": S3_REGION, **S3_KEYS}
    # What `dvc remote add --local s3 <url>` and `dvc remote modify --local s3 <option> <value>` write:
    # .dvc/config.local, never committed, where keys belong.
    remote = "['remote \"s3\"']\n" + "".join(f"    {option} = {value}\n" for option, value in options.items())
    d = clone(root, "d")
    for project in (a, d):
        (project / ".dvc" / "config.local").write_text(remote)
    dvc("push", "-r", "s3", cwd=a)
    dvc("pull", "-r", "s3", cwd=d)
    assert stages_run(dvc("repro", cwd=d).stdout) == []
    assert metrics(d) == machines.metrics
