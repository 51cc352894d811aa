"""The benchmark's command line runs end to end on a small archive and prints a row per try; bad arguments are named."""

import re
import sys

import pytest
import torch

from benchmarks.benchmark import load_images, parse_args
from benchmarks.post_loop import training_transforms
from stages.download import download
from stages.params import PARAMS_FILE, load_params
from tests.conftest import ROOT, run

ROW = re.compile(r"^(\w+) +(\d+) +(\d+) +([\d.]+)x +([\d.]+) +([\d.]+) +([+-][\d.]+)%$")


def test_the_benchmark_prints_speed_up_and_floor_for_each_try_asked(small_archive):
    archive, _ = small_archive
    command = [sys.executable, "-m", "benchmarks.benchmark", "--archive", archive, "--train-images", "200",
               "--test-images", "100", "--rounds", "1", "--tries", "lenet", "lenet2_aug", "airbench",
               "--threads", "1", "--device", "cpu"]  # fmt: skip
    # --threads is shown to override torch's default by a default of 2: not 2 threads, which beside the
    # other test process would put three on this machine's two cores and double the test's time.
    lines = run(command, cwd=ROOT, env={"OMP_NUM_THREADS": "2"}).stdout.splitlines()
    assert lines[0].startswith("machine: ") and ", cpu, 1 thread, torch " in lines[0]
    assert "200 training + 100 test" in lines[1]
    rows = {match[1]: match for match in map(ROW.match, lines[3:]) if match}
    assert list(rows) == ["lenet", "lenet2_aug", "airbench"], lines
    for name, row in rows.items():
        pipeline, post, speed_up = int(row[2]), int(row[3]), float(row[4])
        # The ratio of the two throughputs, which are printed rounded to whole images (a slow machine's 65
        # img/s can be 0.8% off) and the ratio to 2 decimals: a check to 0.02 failed there once.
        lowest, highest = (pipeline - 0.5) / (post + 0.5), (pipeline + 0.5) / (post - 0.5)
        assert lowest - 0.005 <= speed_up <= highest + 0.005, (name, row[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "argument --rounds: expected an integer > 0, got '0'"),
        (["--train-images", "many"], "argument --train-images: expected an integer > 0, got 'many'"),
        (["--threads", "0"], "argument --threads: expected an integer > 0, got '0'"),
        (["--tries", "nope", "lenet"], "--tries: nope not in params.yaml; its tries are lenet, lenet2,"),
        (["--archive", "missing.tar.gz"], "--archive: no such file: missing.tar.gz"),
        (["--dataset", "nowhere"], "--dataset: no downloaded images in nowhere; `dvc repro download` puts them in "),
        (["--archive", "a.tar.gz", "--dataset", "data"], "argument --dataset: not allowed with argument --archive"),
    ],
)
def test_a_bad_argument_is_named_before_any_work(capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        parse_args(args, ROOT / PARAMS_FILE)
    assert exited.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_the_downloaded_folder_gives_the_archives_images(tmp_path, small_archive):
    archive, md5 = small_archive
    download(str(archive), md5, tmp_path / "cifar10")
    from_archive = load_images(str(archive), None, 900, 200)
    from_folder = load_images(None, tmp_path / "cifar10", 900, 200)
    for archives, folders in zip(from_archive, from_folder, strict=True):
        assert archives.images.shape == (len(archives.labels), 3, 32, 32)
        assert torch.equal(archives.images, folders.images) and torch.equal(archives.labels, folders.labels)
    assert [len(split.labels) for split in from_folder] == [900, 200]


POST_AUGMENTATION = ["RandomHorizontalFlip", "RandomRotation", "RandomAffine", "ColorJitter"]


def transform_names(config):
    recipe = load_params(ROOT / PARAMS_FILE)["augment"]
    return [type(t).__name__ for t in training_transforms(recipe, config).transforms]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"model": "lenet2"}, ["Resize"]),  # the 2nd try: the post's loop as written
        ({"model": "lenet2", "augment": True}, ["Resize", *POST_AUGMENTATION]),  # the 3rd
        ({"model": "airbench", "flip": "alternate", "translate": 2}, ["RandomHorizontalFlip", "RandomCrop"]),  # 4th
        # Tries of one's own: the post's loop does what the pipeline does for them, in its order.
        ({"model": "lenet2", "flip": True, "translate": 2}, ["Resize", "RandomHorizontalFlip", "RandomCrop"]),
        ({"model": "airbench", "augment": True}, POST_AUGMENTATION),  # the ladder's 2nd rung
    ],
)
def test_the_posts_loop_transforms_what_the_pipeline_augments(changes, expected):
    config = {**load_params(ROOT / PARAMS_FILE)["train"], **changes}
    assert transform_names(config) == [*expected, "ToTensor", "Normalize"]
