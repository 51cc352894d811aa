"""The ladder: its first rung is the 3rd try, its last the 4th, and the table reads `dvc exp show --json`."""

import json

import pytest

from experiments import ladder
from experiments.ladder import (
    RUNGS,
    experiment_name,
    format_table,
    ladder_rows,
    overrides,
    read_experiments,
    rung_config,
)
from stages.models import build_model, count_parameters
from stages.params import load_params, resolve_try
from tests.conftest import ROOT, TRAINING_STAGES, exp_show, make_project, run, run_queue, tool_env

PARAMS = load_params(ROOT / "params.yaml")


# Keys of how a run is made, not of what the ladder compares: each rung leaves them as params.yaml has them.
RUN_KEYS = ("seed", "epochs", "device", "threads", "amp")


def effective(name):
    return {key: value for key, value in resolve_try(PARAMS, name).items() if key not in RUN_KEYS}


def test_the_ladder_climbs_from_the_third_try_to_the_fourth():
    first = {key: value for key, value in rung_config(0).items() if value is not None}  # null: the key unset
    assert {**effective("lenet2_aug"), **first} == effective("lenet2_aug")
    assert {**effective("airbench"), **rung_config(len(RUNGS) - 1)} == effective("airbench")
    assert set(rung_config(0)) == set(effective("airbench"))  # every rung sets every key it could change


def test_each_rung_changes_keys_of_the_try_and_its_seed():
    arguments = overrides(3, seed=2)
    assert arguments[::2] == ["-S"] * (len(arguments) // 2)
    assert "++tries.airbench.seed=2" in arguments and '++tries.airbench.optimizer="sgd"' in arguments
    assert "++tries.airbench.nesterov=true" in arguments
    assert "++tries.airbench.widths=[32,64,128]" in arguments and "++tries.airbench.widths=null" in overrides(1, 0)


def shown_json(results):
    """What `dvc exp show --json` gives for experiments with these airbench metrics."""
    revs = [
        {"name": name, "data": {"metrics": {"metrics/airbench.json": {"data": data}}}} for name, data in results.items()
    ]
    return [{"rev": "workspace"}, {"rev": "abc", "experiments": [{"name": rev["name"], "revs": [rev]} for rev in revs]}]


def test_the_table_shows_mean_and_std_of_rungs_whose_seeds_all_finished():
    results = {
        experiment_name(0, 0): {"val": {"acc": 71.0}, "seconds": 110.0},
        experiment_name(0, 1): {"val": {"acc": 72.0}, "seconds": 100.0},  # the fastest: the one shown
        experiment_name(0, 2): {"val": {"acc": 73.0}, "seconds": 120.0},
        experiment_name(1, 0): {"val": {"acc": 75.0}, "seconds": 100.0},  # seeds 1 and 2 still queued
    }
    shown = shown_json(results)
    rows = ladder_rows(read_experiments(shown))
    assert [row[0] for row in rows] == [0]
    # A running experiment shows the baseline's metrics under its name until it finishes: not counted.
    shown[1]["experiments"][0]["executor"] = {"state": "running"}
    assert experiment_name(0, 0) not in read_experiments(shown) and not ladder_rows(read_experiments(shown))
    shown[1]["experiments"][0]["executor"] = {"state": "success"}
    assert [row[0] for row in ladder_rows(read_experiments(shown))] == [0]
    table = format_table(rows)
    assert "| 0 | the 3rd try" in table and "| 72.00 ± 1.00 | 71.00, 72.00, 73.00 | 100 |" in table


def test_a_name_on_two_commits_is_named_and_the_first_listed_taken(monkeypatch, capsys):
    name = experiment_name(0, 0)
    newer = shown_json({name: {"val": {"acc": 71.0}, "seconds": 1.0}})
    older = shown_json({name: {"val": {"acc": 60.0}, "seconds": 1.0}})
    monkeypatch.setattr(ladder, "exp_show_json", lambda all_commits: json.dumps(newer + older[1:]))
    assert ladder.main(["table", "--seeds", "0", "--all-commits"]) == 0
    out, err = capsys.readouterr()
    assert f"on more than one commit: {name};" in err and "| 71.00 ± 0.00 | 71.00 |" in out


def test_queue_skips_what_dvc_has_and_table_says_where_it_looked(monkeypatch, capsys):
    shown = shown_json({experiment_name(0, 0): {"val": {"acc": 71.0}, "seconds": 1.0}})
    shown[1]["experiments"][0]["executor"] = {"state": "success"}  # as DVC shows a finished queued one
    monkeypatch.setattr(ladder, "exp_show_json", lambda all_commits=False: json.dumps(shown))
    monkeypatch.setattr(ladder.subprocess, "run", lambda *args, **kwargs: pytest.fail("nothing to queue"))
    assert ladder.main(["queue", "--rungs", "0", "--seeds", "0"]) == 0
    assert capsys.readouterr().out == f"skipped {experiment_name(0, 0)}: finished in DVC's experiments " \
        f"(`dvc exp remove {experiment_name(0, 0)}` to queue it again)\n"  # fmt: skip
    assert ladder.main(["table", "--seeds", "1"]) == 1  # a seed not run
    assert "of this commit (--all-commits looks at every commit's)" in capsys.readouterr().err


@pytest.mark.e2e
def test_the_ladder_queues_rungs_that_the_real_dvc_runs_and_tabulates(tmp_path, http_server, small_archive,
                                                                      monkeypatch, capsys):  # fmt: skip
    path, md5 = small_archive
    url, lean = f"{http_server}/{path.name}", {"epochs": 1, "batch_size": 100}
    project = make_project(tmp_path / "project", url, md5, train=lean, tries=["airbench"], stages=TRAINING_STAGES)
    monkeypatch.chdir(project)  # the ladder runs `dvc` where it is started, as a user would
    monkeypatch.setenv("PATH", tool_env()["PATH"])
    assert ladder.main(["queue", "--rungs", "0", "2", "--seeds", "0"]) == 0  # a null and a list among the keys
    assert ladder.main(["queue", "--rungs", "0", "--seeds", "0"]) == 0  # DVC itself would queue it twice
    assert f"skipped {experiment_name(0, 0)}: queued in DVC's experiments" in capsys.readouterr().out
    run_queue(project, 2, jobs=1)  # as the README runs the ladder: one worker, `dvc queue start`
    trained = {name: metrics["metrics/airbench.json"]["parameters"] for name, (_, metrics) in exp_show(project).items()}
    assert trained == {
        experiment_name(0, 0): count_parameters(build_model("lenet2")),
        experiment_name(2, 0): count_parameters(build_model("airbench", widths=[32, 64, 128])),
    }
    capsys.readouterr()
    assert ladder.main(["table", "--seeds", "0"]) == 0
    table = capsys.readouterr().out
    assert "| 0 | the 3rd try" in table and "| 2 | + airbench's net" in table
    # A commit made while the ladder runs leaves its experiments on the commit before.
    run(["git", "commit", "-q", "--allow-empty", "-m", "Meanwhile"], cwd=project)
    assert ladder.main(["table", "--seeds", "0", "--all-commits"]) == 0
    assert "| 2 | + airbench's net" in capsys.readouterr().out
