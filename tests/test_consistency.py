"""dvc.yaml, params.yaml, the code, the README and CI agree with each other."""

import ast
import re
import subprocess
import sys

import pytest
import yaml

from stages.models import MODELS, model_options
from stages.params import MODEL_OPTIONS, SECTIONS, TAKEN_TRY_NAMES, TRAIN_SCHEMA, WIDTH_COUNTS
from stages.report import HISTORIES
from tests.conftest import ROOT, SLOWEST_FILES

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def stage_definitions():
    """(name, definition) of each stage, with a foreach stage's `do` body."""
    for name, stage in DVC_YAML["stages"].items():
        yield name, stage.get("do", stage)


def imported_stage_modules(module, seen=None, skip=()):
    """stages/*.py files a module imports, directly or through other stage modules other than those in skip."""
    seen = set() if seen is None else seen
    tree = ast.parse((ROOT / "stages" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
            name = node.module.split(".", 1)[1]
            if name not in seen:
                seen.add(name)
                if name not in skip:
                    imported_stage_modules(name, seen, skip)
    return seen


@pytest.mark.parametrize("name, stage", list(stage_definitions()), ids=[n for n, _ in stage_definitions()])
def test_each_stage_lists_all_the_code_it_runs(name, stage):
    module = re.fullmatch(r"python -m stages\.(\w+)( .*)?", stage["cmd"]).group(1)
    # params.py only validates params.yaml, except for configure and train, which resolve each try's config
    # with it; a stage that builds models imports models.py itself.
    validates_only = () if name in ("configure", "train") else ("params",)
    code = {f"stages/{m}.py" for m in {module} | imported_stage_modules(module, skip=validates_only)}
    # How a failure is worded, and when to stop because dvc has gone: DVC records no outputs of a failed stage.
    code -= {"stages/errors.py", "stages/lineage.py"}
    code -= {f"stages/{m}.py" for m in validates_only}
    deps = {d for d in stage["deps"] if d.startswith("stages/")}
    assert deps == code


def test_the_names_a_try_cannot_take_are_the_other_stages_outputs_in_plots():
    """A try writes plots/<try>/...: a name that is another stage's output in plots/ would overlap it."""
    others = {
        out.removeprefix("plots/"): name
        for name, stage in stage_definitions()
        if name != "train"
        for out in stage.get("outs", [])
        if out.startswith("plots/")
    }
    assert TAKEN_TRY_NAMES == others


def test_params_knows_every_model_and_how_many_widths_it_takes():
    assert list(MODEL_OPTIONS) == list(MODELS), "a model of stages.models needs its entry in stages.params"
    takes_widths = {name: len(model.WIDTHS) for name, model in MODELS.items() if hasattr(model, "WIDTHS")}
    assert WIDTH_COUNTS == takes_widths
    assert {name for name, options in MODEL_OPTIONS.items() if "widths" in options} == set(takes_widths)
    # What a model's constructor takes, a try may set; besides, only whiten_bias_epochs, which steers training
    # and needs a whitening layer fit to the data.
    for name, options in MODEL_OPTIONS.items():
        assert set(options) - {"whiten_bias_epochs"} == model_options(name), name
        assert ("whiten_bias_epochs" in options) == hasattr(MODELS[name], "fit_to_data"), name


@pytest.mark.parametrize("stage", ["download", "configure"])
def test_stages_that_only_read_params_start_without_torch(stage):
    """Importing torch takes seconds; each of these stages runs in every experiment."""
    probe = f"import sys, stages.{stage}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0, f"stages.{stage} imports torch"


def test_each_params_section_is_used_by_a_stage_and_exists():
    used = {p.split(".")[0] for _, stage in stage_definitions() for p in stage.get("params", []) if isinstance(p, str)}
    assert used == set(PARAMS) == set(SECTIONS)


def test_each_train_stage_depends_on_its_own_config_file_only():
    train = DVC_YAML["stages"]["train"]["do"]
    assert train["params"] == [{"configs/${key}.yaml": None}]
    assert DVC_YAML["stages"]["configure"]["outs"] == ["configs"]


def test_every_train_key_is_in_params_yaml_with_a_comment():
    assert set(PARAMS["train"]) == set(TRAIN_SCHEMA)
    text = (ROOT / "params.yaml").read_text()
    for key in TRAIN_SCHEMA:
        assert re.search(rf"^  {key}: .+#", text, re.M), f"train.{key} has no comment in params.yaml"


def test_every_key_of_the_shipped_tries_has_a_comment():
    lines = (ROOT / "params.yaml").read_text().split("\ntries:", 1)[1].splitlines()
    for above, line in zip(lines, lines[1:], strict=False):
        if re.match(r"\s+\w+:", line):  # a key; its comment ends the line, or fills the line above
            assert "#" in line or above.lstrip().startswith("#"), f"no comment in params.yaml: {line.strip()}"


def test_the_overlays_read_the_file_of_every_trys_history_that_the_report_writes():
    """So that every try of params.yaml, a try added later too, is overlaid: dvc.yaml lists no try's own file."""
    overlays = [next(iter(plot.values())) for plot in DVC_YAML["plots"] if isinstance(plot, dict)]
    assert len(overlays) == 2 and all(set(overlay["y"]) == {HISTORIES.as_posix()} for overlay in overlays)
    assert HISTORIES.as_posix() in DVC_YAML["stages"]["report"]["outs"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"# install and run the tests\n(.+)\n", readme).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_files_the_suite_starts_first_exist():
    """A renamed file would lose its place at the front without a word (conftest's SLOWEST_FILES)."""
    assert [name for name in SLOWEST_FILES if not (ROOT / "tests" / name).is_file()] == []
