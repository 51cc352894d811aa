"""End to end: the real `dvc` CLI on a temporary git copy of the project, data served over loopback HTTP."""

import csv
import io
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import (
    SHIPPED_TRIES,
    dvc,
    edit_params,
    make_project,
    readme_command,
    run,
    stages_run,
)
from tests.test_plots_page import browser, external_scripts

pytestmark = pytest.mark.e2e
# The Vega charts on the plots page: dvc.yaml's two overlays and each try's confusion matrix.
PAGE_PLOTS = ["validation accuracy", "validation loss", *(f"{t} confusion matrix" for t in SHIPPED_TRIES)]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, http_server, small_archive):
    """One project, reproduced once; the tests below read it and build on it in order."""
    path, md5 = small_archive
    project = make_project(tmp_path_factory.mktemp("e2e") / "project", f"{http_server}/{path.name}", md5)
    result = dvc("repro", cwd=project)
    # As the README has a user do before experimenting: commit dvc.lock, so HEAD names the baseline.
    run(readme_command("git add dvc.lock"), cwd=project)
    run(["git", "commit", "-qm", "baseline"], cwd=project)
    # The README's `git add` took all that Git should hold of the run: nothing is left to add.
    assert run(["git", "status", "--porcelain"], cwd=project).stdout == ""
    return project, result


def test_repro_runs_every_stage_and_writes_outputs(reproduced):
    project, result = reproduced
    assert set(stages_run(result.stdout)) == {
        "download",
        "configure",
        *(f"train@{t}" for t in SHIPPED_TRIES),
        "report",
        "plots_page",
    }
    for name in SHIPPED_TRIES:
        with open(project / "plots" / name / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
        assert [r["epoch"] for r in rows] == ["1", "2"]
        with open(project / "plots" / name / "predictions.csv") as f:
            assert len(list(csv.DictReader(f))) == 300
        assert (project / "models" / f"{name}.pt").stat().st_size > 0
        assert (project / "plots" / "report" / f"{name}_curves.png").exists()
        assert (project / "plots" / "report" / f"{name}_mistakes.png").exists()
    figures = {p.name for p in (project / "plots" / "report").iterdir()}
    assert {"samples.png", "val_acc_by_try.png", "accuracy_by_class.png"} <= figures
    with open(project / "plots" / "histories.csv") as f:  # what the overlays read
        gathered = [(row["try"], row["epoch"]) for row in csv.DictReader(f)]
    assert gathered == [(name, epoch) for name in SHIPPED_TRIES for epoch in ("1", "2")]
    assert (project / "plots" / "page_template.html").stat().st_size > 500_000  # Vega, Vega-Lite, vega-embed


def test_metrics_show_lists_every_try_and_training_learns(reproduced):
    project, _ = reproduced
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    metrics = next(iter(shown.values()))["data"]
    for name in SHIPPED_TRIES:
        values = metrics[f"metrics/{name}.json"]["data"]
        # Ten classes: chance is 10%; the archive's classes differ by colour, which every try can learn.
        assert values["val"]["acc"] > 50, (name, values)
        assert {"loss", "acc"} <= set(values["train"]) and values["parameters"] > 0


def test_the_readmes_exp_show_table_has_every_params_key_and_each_trys_accuracy_and_seconds(reproduced):
    project, _ = reproduced
    command = readme_command("dvc exp show --drop '.*' --keep 'Experiment|Created|")
    columns = next(csv.reader(io.StringIO(dvc(*command[1:], "--csv", cwd=project).stdout)))
    shown = [f"metrics/{name}.json:{metric}" for name in SHIPPED_TRIES for metric in ("val.acc", "seconds")]
    params_keys = flat_keys(yaml.safe_load((project / "params.yaml").read_text()))
    assert sorted(columns) == sorted(["Experiment", "Created", *shown, *params_keys])


def flat_keys(mapping, prefix=""):
    """Dotted names of a nested mapping's leaves, as `dvc exp show` names params."""
    return [
        name
        for key, value in mapping.items()
        for name in (flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def test_second_repro_runs_nothing(reproduced):
    project, _ = reproduced
    result = dvc("repro", cwd=project)
    assert stages_run(result.stdout) == []
    assert "up to date" in result.stdout


def test_the_plots_page_needs_no_network(reproduced):
    project, _ = reproduced
    for command in ("show", "diff"):
        page = project / f"page-{command}"
        dvc("plots", command, "-o", str(page), cwd=project)
        html = (page / "index.html").read_text()
        assert not external_scripts(html), command
        bundle = re.search(r"<script[^>]*>(.*?)</script>", html, re.S).group(1)  # the page's first script
        assert all(f"window.{name}=" in bundle for name in ("vega", "vegaLite", "vegaEmbed")), command
        plots = re.findall(r"vegaEmbed\('#(\w+)'", html)
        assert len(plots) == len(PAGE_PLOTS) and html.index(bundle) < html.index("vegaEmbed('#"), command


def test_the_plots_page_draws_every_chart_in_a_browser_without_a_network(reproduced):
    project, _ = reproduced
    dvc("plots", "show", cwd=project)
    page = (project / "dvc_plots" / "index.html").as_uri()
    # A proxy that does not exist: a page that still fetched Vega from the network would stay blank.
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
               "--virtual-time-budget=10000", "--dump-dom", page]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    drawn = re.findall(r'<(?:svg|canvas)[^>]*class="marks"', dom)
    assert len(drawn) == len(PAGE_PLOTS), dom[-2000:]


# A shared key's change: the tries it puts out of date, each with what changes in its config.
SHARED_CHANGES = {
    "train.lr=0.002": {t: {"lr": "modified"} for t in ("lenet", "lenet2", "lenet2_aug")},  # airbench sets its own
    # lenet2_aug augments already and airbench sets augment itself: the plain tries take the post's recipe too.
    "train.augment=true": {t: {"augment": "modified", "augment_recipe": "new"} for t in ("lenet", "lenet2")},
}


@pytest.mark.parametrize("change", SHARED_CHANGES)
def test_a_shared_key_puts_out_of_date_only_the_tries_that_take_it(reproduced, change):
    project = back_to_baseline(reproduced)
    # configure alone, then DVC's own view of what a run would retrain: the test below sees an experiment
    # retrain exactly the tries whose configs changed, and training each change's tries would add only time.
    dvc("exp", "run", "-S", change, "configure", cwd=project)
    changed = json.loads(dvc("status", "--json", cwd=project).stdout)
    takes_it = SHARED_CHANGES[change]
    assert changed == {f"train@{t}": [{"changed deps": {f"configs/{t}.yaml": keys}}] for t, keys in takes_it.items()}


def test_an_added_try_and_a_change_retrain_only_the_tries_they_reach_and_plots_diff_shows_both(reproduced):
    project = back_to_baseline(reproduced)
    changes = ["augment.rotation=5", "++tries.lenet.lr=0.0005", "+tries.mine={model: lenet, lr: 0.002}"]
    result = dvc("exp", "run", "-n", "mine", *(part for change in changes for part in ("-S", change)), cwd=project)
    # The post's recipe: not airbench, which sets augment itself. A try's own key: that try alone. And no
    # line of dvc.yaml was written for mine.
    retrained = ["train@lenet2_aug", "train@lenet", "train@mine"]
    assert sorted(stages_run(result.stdout)) == sorted(["configure", *retrained, "report"])
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    assert "metrics/mine.json" in next(iter(shown.values()))["data"]
    assert (project / "plots" / "report" / "mine_curves.png").exists()
    plots = assert_plots_diff_shows(project, ["HEAD", "mine"])
    overlaid = {(point["try"], point["rev"]) for point in plots["validation accuracy"][0]["content"]["data"]["values"]}
    assert overlaid == {(t, rev) for t in SHIPPED_TRIES for rev in ("HEAD", "mine")} | {("mine", "mine")}
    # Back to the commit as the README says: nothing looks out of date, though DVC's models/.gitignore kept
    # the line it added for mine.pt.
    run(["git", "checkout", "params.yaml", "dvc.lock"], cwd=project)
    dvc("checkout", cwd=project)
    assert "/mine.pt" in (project / "models" / ".gitignore").read_text()
    assert dvc("status", cwd=project).stdout.strip() == "Data and pipelines are up to date."


def assert_plots_diff_shows(project, revisions):
    """`dvc plots diff` of revisions renders, without errors, the overlays, a try's confusion matrix and a
    report figure, each with every revision's data; returns what it rendered (title -> its plots)."""
    diff = dvc("plots", "diff", *revisions, "--json", cwd=project)
    assert "error" not in diff.stderr.lower()
    rendered = json.loads(diff.stdout)
    assert not rendered.get("errors"), rendered.get("errors")
    plots = rendered["data"]
    for title in ("validation accuracy", "validation loss", "plots/lenet/predictions.csv"):
        values = plots[title][0]["content"]["data"]["values"]
        assert {point["rev"] for point in values} == set(revisions), title
    image_revisions = {rev for entry in plots["plots/report/val_acc_by_try.png"] for rev in entry["revisions"]}
    assert image_revisions == set(revisions)
    return plots


def back_to_baseline(reproduced):
    """The reproduced project as committed, whatever earlier tests ran in it."""
    project, _ = reproduced
    run(["git", "checkout", "--", "."], cwd=project)
    dvc("checkout", "--force", cwd=project)
    return project


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
