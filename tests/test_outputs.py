"""Outputs are written whole or not at all: a write stopped part-way leaves what was there before, and
nothing beside it that looks like an output."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages import outputs as outputs_module
from stages.outputs import atomic_dir, atomic_path, write_csv, write_json
from tests.conftest import ROOT


class Interrupted(Exception):
    """Stands for whatever stops a write part-way: a full disk, Ctrl-C, a bug."""


def contents(folder):
    """{name: text} of every file under folder, hidden ones included, by path relative to it."""
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_file_written_whole_takes_its_place(tmp_path):
    write_csv(tmp_path / "plots" / "history.csv", ["epoch", "val_acc"], [[1, "40.5"], [2, "45.0"]])
    assert contents(tmp_path) == {"plots/history.csv": "epoch,val_acc\n1,40.5\n2,45.0\n"}


def test_a_file_write_stopped_part_way_leaves_the_earlier_file_alone(tmp_path):
    path = tmp_path / "metrics" / "lenet.json"
    write_json(path, {"acc": 1})
    with pytest.raises(Interrupted), atomic_path(path) as partial:
        partial.write_text('{"acc": ')
        raise Interrupted
    assert contents(tmp_path) == {"metrics/lenet.json": '{\n  "acc": 1\n}\n'}


def test_a_killed_write_leaves_the_earlier_file_and_the_next_write_clears_what_it_left(tmp_path):
    # SIGKILL runs no clean-up: the half-written file stays, under a hidden name that no stage reads.
    path = tmp_path / "lenet.json"
    write_json(path, {"acc": 1})
    killed_mid_write = f"""
        import os, signal
        from stages.outputs import atomic_path
        with atomic_path({str(path)!r}) as partial:
            partial.write_text('{{"acc": ')
            os.kill(os.getpid(), signal.SIGKILL)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(killed_mid_write)], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL
    left = contents(tmp_path)
    assert left.pop("lenet.json") == '{\n  "acc": 1\n}\n'
    assert [name.startswith(".lenet.json.partial-") for name in left] == [True]
    write_json(path, {"acc": 2})
    assert contents(tmp_path) == {"lenet.json": '{\n  "acc": 2\n}\n'}


def test_a_folder_written_whole_replaces_the_earlier_one_entirely(tmp_path):
    folder = tmp_path / "configs"
    for names in (["lenet.yaml", "mine.yaml"], ["lenet.yaml"]):
        with atomic_dir(folder) as partial:
            for name in names:
                (partial / name).write_text(f"{len(names)}\n")
    assert contents(tmp_path) == {"configs/lenet.yaml": "1\n"}  # mine.yaml went with the folder it was in


def test_a_folder_write_stopped_part_way_leaves_the_earlier_folder_alone(tmp_path):
    folder = tmp_path / "configs"
    with atomic_dir(folder) as partial:
        (partial / "lenet.yaml").write_text("old\n")
    with pytest.raises(Interrupted), atomic_dir(folder) as partial:
        (partial / "lenet.yaml").write_text("new\n")
        raise Interrupted
    assert contents(tmp_path) == {"configs/lenet.yaml": "old\n"}


def test_a_folder_replaced_while_its_predecessor_is_being_removed_is_whole(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    with atomic_dir(folder) as partial:
        for name in ("classes.json", "train_images.npy"):
            (partial / name).write_text("old\n")

    def stopped_part_way(path, ignore_errors=False):
        """Removes one file of path, if it has any, then stops: as a kill would, in the middle."""
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
            raise Interrupted

    monkeypatch.setattr(outputs_module.shutil, "rmtree", stopped_part_way)
    with pytest.raises(Interrupted), atomic_dir(folder) as partial:
        for name in ("classes.json", "train_images.npy"):
            (partial / name).write_text("new\n")
    assert contents(folder) == {"classes.json": "new\n", "train_images.npy": "new\n"}
    monkeypatch.undo()
    with atomic_dir(folder) as partial:  # the next write clears what the stopped one left beside it
        (partial / "classes.json").write_text("next\n")
    assert contents(tmp_path) == {"cifar10/classes.json": "next\n"}
