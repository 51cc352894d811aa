"""The benchmark's command line runs end to end on a small archive and prints a row per try; bad arguments are named."""

import re
import sys

import pytest

from benchmarks.benchmark import parse_args
from stages.params import PARAMS_FILE
from tests.conftest import ROOT, run

ROW = re.compile(r"^(\w+) +(\d+) +(\d+) +([\d.]+)x +([\d.]+) +([\d.]+) +([+-][\d.]+)%$")


def test_the_benchmark_prints_speed_up_and_floor_for_each_try_asked(small_archive):
    archive, _ = small_archive
    command = [sys.executable, "-m", "benchmarks.benchmark", "--archive", archive, "--train-images", "200",
               "--test-images", "100", "--rounds", "1", "--tries", "lenet", "lenet2_aug", "airbench"]  # fmt: skip
    lines = run(command, cwd=ROOT).stdout.splitlines()
    assert lines[0].startswith("machine: ") and "200 training + 100 test" in lines[1]
    rows = {match[1]: match for match in map(ROW.match, lines[3:]) if match}
    assert list(rows) == ["lenet", "lenet2_aug", "airbench"], lines
    for name, row in rows.items():
        pipeline, post, speed_up = int(row[2]), int(row[3]), float(row[4])
        assert abs(speed_up - pipeline / post) < 0.02, (name, row[0])  # the ratio of the two throughputs


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "argument --rounds: expected an integer > 0, got '0'"),
        (["--train-images", "many"], "argument --train-images: expected an integer > 0, got 'many'"),
        (["--tries", "nope", "lenet"], "--tries: nope not in params.yaml; its tries are lenet, lenet2,"),
        (["--archive", "missing.tar.gz"], "--archive: no such file: missing.tar.gz"),
    ],
)
def test_a_bad_argument_is_named_before_any_work(capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        parse_args(args, ROOT / PARAMS_FILE)
    assert exited.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
