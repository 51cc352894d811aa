"""End to end: the real `dvc` CLI on a temporary git copy of the project, data served over loopback HTTP."""

import csv
import json

import pytest
import torch

from stages.data import Dataset, Split, read_archive_batches
from stages.download import read_members
from stages.outputs import TryOutputs, outputs_for
from stages.params import resolve_try
from stages.train import train
from tests.conftest import (
    dvc,
    edit_params,
    exp_show,
    make_project,
    run,
    run_queue,
    stages_run,
    without_time,
)

pytestmark = pytest.mark.e2e
TRIES = ["lenet", "lenet2", "lenet2_aug"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, http_server, small_archive):
    """One project, reproduced once; the tests below read it and build on it in order."""
    path, md5 = small_archive
    project = make_project(tmp_path_factory.mktemp("e2e") / "project", f"{http_server}/{path.name}", md5)
    result = dvc("repro", cwd=project)
    # As a user would before experimenting: commit dvc.lock, so HEAD names the baseline.
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "baseline"], cwd=project)
    return project, result


def test_repro_runs_every_stage_and_writes_outputs(reproduced):
    project, result = reproduced
    assert stages_run(result.stdout) == ["download", *(f"train@{t}" for t in TRIES), "report"]
    for name in TRIES:
        with open(project / "plots" / name / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
        assert [r["epoch"] for r in rows] == ["1", "2"]
        with open(project / "plots" / name / "predictions.csv") as f:
            assert len(list(csv.DictReader(f))) == 300
        assert (project / "models" / f"{name}.pt").stat().st_size > 0
        assert (project / "plots" / "report" / f"{name}_curves.png").exists()
    assert {"samples.png", "val_acc_by_try.png"} <= {p.name for p in (project / "plots" / "report").iterdir()}


def test_metrics_show_lists_every_try_and_training_learns(reproduced):
    project, _ = reproduced
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    metrics = next(iter(shown.values()))["data"]
    for name in TRIES:
        values = metrics[f"metrics/{name}.json"]["data"]
        # Ten classes: chance is 10%; the archive's classes differ by colour, which every try can learn.
        assert values["val"]["acc"] > 50, (name, values)
        assert {"loss", "acc"} <= set(values["train"]) and values["parameters"] > 0


def test_second_repro_runs_nothing(reproduced):
    project, _ = reproduced
    result = dvc("repro", cwd=project)
    assert stages_run(result.stdout) == []
    assert "up to date" in result.stdout


QUEUED = {"seed1": "++tries.lenet.seed=1", "seed2": "++tries.lenet.seed=2", "augment-lenet": "tries.lenet.augment=true"}


def test_queued_experiments_run_two_at_a_time_each_with_its_own_metrics(reproduced, small_archive):
    project, _ = reproduced
    for name, change in QUEUED.items():
        dvc("exp", "run", "--queue", "-n", name, "-S", change, cwd=project)
    run_queue(project, jobs=2)
    experiments = exp_show(project)
    baseline = {t: json.loads((project / "metrics" / f"{t}.json").read_text()) for t in TRIES}
    dataset = read_archive_batches(read_members(small_archive[0]))
    dataset = Dataset(*(Split(*map(torch.from_numpy, split)) for split in dataset[:2]), dataset.classes)
    for name in QUEUED:
        params, metrics = experiments[name]
        # Only lenet changed: the other tries were not retrained (their seconds, too, are the baseline's).
        for other in ("lenet2", "lenet2_aug"):
            assert metrics[f"metrics/{other}.json"] == baseline[other], (name, other)
        # What a run of the same config in this process gives, bit for bit: no run saw another's files.
        config = resolve_try(params, "lenet")
        outputs = TryOutputs(*(project.parent / name / path for path in outputs_for("lenet")))
        expected = train(config, params["augment"], dataset, outputs, name)
        assert without_time(metrics["metrics/lenet.json"]) == without_time(expected), name
        assert without_time(expected) != without_time(baseline["lenet"]), name
    assert experiments["augment-lenet"][0]["tries"]["lenet"]["augment"] is True


def test_exp_run_augment_all_retrains_plain_tries_and_plots_diff(reproduced):
    project, _ = reproduced
    result = dvc("exp", "run", "-n", "augment-all", "-S", "train.augment=true", cwd=project)
    ran = stages_run(result.stdout)
    assert {"train@lenet", "train@lenet2", "report"} <= set(ran) and "download" not in ran
    diff = dvc("plots", "diff", "HEAD", "augment-all", "--json", cwd=project)
    assert "error" not in diff.stderr.lower()
    rendered = json.loads(diff.stdout)
    assert not rendered.get("errors"), rendered.get("errors")
    plots = rendered["data"]
    for title in ("validation accuracy", "validation loss", "plots/lenet/predictions.csv"):
        values = plots[title][0]["content"]["data"]["values"]
        assert {point["rev"] for point in values} == {"HEAD", "augment-all"}, title
    image_revisions = {rev for entry in plots["plots/report/val_acc_by_try.png"] for rev in entry["revisions"]}
    assert image_revisions == {"HEAD", "augment-all"}


def test_added_try_trains_and_is_reported_without_editing_dvc_yaml(reproduced):
    project, _ = reproduced
    result = dvc("exp", "run", "-n", "mine", "-S", "+tries.mine={model: lenet, lr: 0.002}", cwd=project)
    assert stages_run(result.stdout) == ["train@mine", "report"]
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    assert "metrics/mine.json" in next(iter(shown.values()))["data"]
    assert (project / "plots" / "report" / "mine_curves.png").exists()


def test_wrong_md5_fails_cleanly(project):
    edit_params(project, lambda p: p["data"].update(md5="0" * 32))
    result = dvc("repro", cwd=project, check=False)
    assert result.returncode != 0
    assert "md5" in result.stderr and "0" * 32 in result.stderr
    assert not (project / "data" / "cifar10").exists()
    assert not list((project / "data").glob(".*partial*")) and not list((project / "data").glob(".download-*"))


def test_bad_params_fail_before_any_work(project):
    edit_params(project, lambda p: (p["tries"]["lenet"].update(epoch=3), p["train"].update(device="tpu")))
    result = dvc("repro", cwd=project, check=False)
    assert result.returncode != 0
    assert "tries.lenet.epoch" in result.stderr and "train.device" in result.stderr
    assert not (project / "data").exists() and not (project / "models").exists()
