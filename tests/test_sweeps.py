"""End to end: experiments queued with DVC's own sweep syntax, run side by side by its queue, read back."""

import csv
import io
import json

import pytest

from stages.params import resolve_try
from stages.train import train
from tests.conftest import TRAINING_STAGES, dvc, exp_show, make_project, outputs_in, run_queue, without_time

pytestmark = pytest.mark.e2e
# Every point differs from the project's own lr 0.001 and seed 0, so every point trains: none is
# restored from the run-cache, and no two may come out the same. Two points fill the queue's two
# workers; more would test nothing more and cost the suite a minute.
LRS = [0.0005, 0.002]
SEEDS = [1]


@pytest.fixture
def lean_project(tmp_path, http_server, small_archive):
    """One try for one epoch, no figures: each queued experiment runs the whole pipeline in its own copy."""
    path, md5 = small_archive
    url = f"{http_server}/{path.name}"
    return make_project(
        tmp_path / "project", url, md5, train={"epochs": 1, "batch_size": 100}, tries=["lenet"], stages=TRAINING_STAGES
    )


def test_a_queued_sweep_runs_every_point_with_its_own_params_and_metrics(lean_project, learnable_dataset, tmp_path):
    # As the README has it, the first parallel queue follows a `dvc repro`: every point finds the download in
    # DVC's cache. Two workers running it at once can collide in DVC's run-cache (see README's Sweeps).
    dvc("repro", "download", cwd=lean_project)
    sweep = ["-S", f"train.lr={','.join(map(str, LRS))}", "-S", f"train.seed={','.join(map(str, SEEDS))}"]
    queued = dvc("exp", "run", "--queue", *sweep, cwd=lean_project)
    assert queued.stdout.count("Queued experiment") == len(LRS) * len(SEEDS), queued.stdout
    run_queue(lean_project, len(LRS) * len(SEEDS), jobs=2)

    points = {}
    for name, (params, metrics) in exp_show(lean_project).items():
        point = without_time(metrics["metrics/lenet.json"])
        points[params["train"]["lr"], params["train"]["seed"]] = point
        # What a run of the same config in this process gives, bit for bit: no two runs saw each other's files.
        outputs = outputs_in(tmp_path / name, "lenet")
        expected = train(resolve_try(params, "lenet"), params["augment"], learnable_dataset, outputs, name)
        assert point == without_time(expected), name
    assert sorted(points) == [(lr, seed) for lr in LRS for seed in SEEDS]
    assert len({json.dumps(final, sort_keys=True) for final in points.values()}) == len(points), points

    # The README's readable table: the swept params and the accuracy, best first.
    readable = ["--drop", ".*", "--keep", r"Experiment|.*val\.acc|train\.(lr|seed)$"]
    order = ["--sort-by", "metrics/lenet.json:val.acc", "--sort-order", "desc"]
    table = dvc("exp", "show", *readable, *order, "--csv", cwd=lean_project)
    rows = [row for row in csv.DictReader(io.StringIO(table.stdout)) if row["Experiment"]]  # baselines have none
    assert set(rows[0]) == {"Experiment", "val.acc", "train.lr", "train.seed"}
    assert sorted((float(row["train.lr"]), int(row["train.seed"])) for row in rows) == sorted(points)
    accuracies = [float(row["val.acc"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
