"""`python -m stages.predict`: known images through a small trained try, image handling, and every error."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from stages.inference import load_checkpoint, predict_probabilities
from stages.predict import ImageError, format_table, load_image, main
from tests.conftest import ROOT, tool_env
from tests.test_inference import hostile

POST_RESIZE = transforms.Resize((32, 32))  # the post's, applied to a PIL image


@pytest.fixture(scope="module")
def test_images(tmp_path_factory, learnable_dataset):
    """Ten test images of the learnable dataset as PNG files (lossless, 32x32), with their indices."""
    directory = tmp_path_factory.mktemp("images")
    paths = {}
    for index in range(10):
        path = directory / f"test-{index}.png"
        Image.fromarray(learnable_dataset.test.images[index].permute(1, 2, 0).numpy()).save(path)
        paths[path] = index
    return paths


def run_main(capsys, *args):
    """(exit status, stdout, stderr) of main(args) as the command line would give them."""
    with pytest.raises(SystemExit) as exited:
        sys.exit(main([str(arg) for arg in args]))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_known_images_get_the_trained_models_own_probabilities(capsys, trained_try, learnable_dataset, test_images):
    status, out, err = run_main(capsys, trained_try.model, *test_images, "--json")
    assert status == 0 and err == ""
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(path) for path in test_images]
    model = load_checkpoint(trained_try.model).model
    expected = predict_probabilities(model, learnable_dataset.test.images[: len(test_images)])
    classes = learnable_dataset.classes
    for result, row in zip(results, expected, strict=True):
        top = row.topk(3)
        assert [c["class"] for c in result["top"]] == [classes[i] for i in top.indices]
        assert [c["probability"] for c in result["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    right = sum(r["top"][0]["class"] == classes[learnable_dataset.test.labels[i]] for i, r in enumerate(results))
    assert right >= 6  # the try learned the classes' colours (chance: 1 in 10)


def test_the_table_shows_each_image_with_three_classes(capsys, trained_try, test_images):
    status, out, err = run_main(capsys, trained_try.model, *list(test_images)[:2])
    lines = out.splitlines()
    assert status == 0 and err == ""
    assert lines[0].startswith(f"{trained_try.model}: lenet, 2 epochs, ") and lines[0].endswith("% on the test images")
    assert lines[1].split() == ["image", "top", "1", "top", "2", "top", "3"]
    for line, path in zip(lines[2:], test_images, strict=False):
        assert line.startswith(str(path)) and line.count("%") == 3
    assert len(lines) == 4


def test_a_model_of_two_classes_gets_a_table_of_two_columns():
    top = [{"class": "cat", "probability": 0.75}, {"class": "dog", "probability": 0.25}]
    results = [{"image": "a.png", "top": top}, {"image": "b.png", "error": "b.png: no such image"}]
    assert format_table(results).splitlines() == ["image   top 1        top 2", "a.png   cat  75.0%   dog  25.0%"]


def save(image, path, **options):
    image.save(path, **options)
    return path


def photo(size, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "make",
    [
        lambda d: save(photo((200, 150)), d / "big.jpg", quality=90),
        lambda d: save(photo((20, 45)), d / "small.png"),
        lambda d: save(photo((64, 64)).convert("L"), d / "grey.png"),
        lambda d: save(photo((50, 40)).convert("P", palette=Image.Palette.ADAPTIVE), d / "palette.png"),
        lambda d: save(photo((33, 31)).convert("CMYK"), d / "cmyk.jpg"),
    ],
    ids=["big-jpeg", "small-png", "grey", "palette", "cmyk"],
)
def test_any_image_becomes_what_the_posts_resize_gives(tmp_path, make):
    path = make(tmp_path)
    with Image.open(path) as image:
        expected = np.asarray(POST_RESIZE(image.convert("RGB")))
    loaded = load_image(path)
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, 32, 32)
    assert np.array_equal(loaded.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, suffix):
    levels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64  # 0 .. 65,472
    loaded = load_image(save(Image.fromarray(levels), tmp_path / f"deep.{suffix}"))
    expected = torch.from_numpy(np.round(levels / 257).astype(np.uint8))
    assert all(torch.equal(channel, expected) for channel in loaded)


def test_floating_point_pixels_are_refused_with_what_to_do(tmp_path):
    path = save(Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)), tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point pixels, of no known range; save it with 8 or 16 bits"):
        load_image(path)


def test_transparent_parts_are_white_not_the_pixels_hidden_under_them(tmp_path):
    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[..., 0] = 255  # red everywhere, but the left half is fully transparent
    pixels[:, 16:, 3] = 255
    loaded = load_image(save(Image.fromarray(pixels, "RGBA"), tmp_path / "cutout.png"))
    assert (loaded[:, :, :16] == 255).all()  # white
    assert (loaded[0, :, 16:] == 255).all() and (loaded[1:, :, 16:] == 0).all()  # red


@pytest.mark.parametrize("bits", [8, 16])
def test_the_grey_that_a_png_names_transparent_is_white(tmp_path, bits):
    levels = np.full((32, 32), 100 * 257 if bits == 16 else 100, np.uint16 if bits == 16 else np.uint8)
    levels[:, :16] = 0  # the left half: the grey named transparent
    image = Image.fromarray(levels)
    path = tmp_path / f"grey{bits}.png"
    image.save(path, transparency=0)
    assert Image.open(path).info["transparency"] == 0  # as PIL reads it back, 8 bits or 16
    loaded = load_image(path)
    assert (loaded[:, :, :16] == 255).all() and (loaded[:, :, 16:] == 100).all()


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255  # stored: red left, blue right
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top
    loaded = load_image(save(Image.fromarray(pixels), tmp_path / "phone.jpg", exif=exif, quality=95)).int()
    assert (loaded[0, :12] > 200).all() and (loaded[2, :12] < 60).all()
    assert (loaded[2, 20:] > 200).all() and (loaded[0, 20:] < 60).all()


def test_a_big_photo_is_read_without_a_warning_and_a_huge_one_refused_with_what_to_do(tmp_path, monkeypatch):
    # PIL warns above MAX_IMAGE_PIXELS (89 megapixels) and refuses above twice that: scaled down here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = save(photo((40, 40)), tmp_path / "big.png")  # 1,600 pixels: over the limit, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(big).shape == (3, 32, 32)
    huge = save(photo((50, 50)), tmp_path / "huge.png")
    with pytest.raises(ImageError, match=r"too large to read safely \(.*\); save a smaller copy"):
        load_image(huge)


def truncated_jpeg(directory, _):
    path = save(photo((64, 64)), directory / "cut.jpg")
    path.write_bytes(path.read_bytes()[:300])
    return path


def unreadable_folder(directory, monkeypatch):
    """A folder that lists as chmod 000 makes it list for a user other than root (the tests may run as root)."""
    locked = directory / "locked"
    locked.mkdir()
    listing = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        yield from listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    return locked


BAD_IMAGES = {  # name: (make(folder, monkeypatch) -> the bad path, the start of its message)
    "missing": (lambda d, _: d / "nothing.png", "no such image"),
    "not-an-image": (lambda d, _: (d / "notes.png").write_text("hello") and d / "notes.png", "not an image"),
    "truncated": (truncated_jpeg, "damaged or truncated image"),
    "a-folder-without-images": (lambda d, _: (d / "folder").mkdir() or d / "folder", "a folder without images"),
    "an-unreadable-folder": (unreadable_folder, "a folder that cannot be read (Permission denied)"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_a_bad_image_is_named_and_the_others_still_classified(capsys, tmp_path, trained_try, test_images, name,
                                                               monkeypatch):  # fmt: skip
    make, message = BAD_IMAGES[name]
    bad = make(tmp_path, monkeypatch)
    good = list(test_images)[:2]
    status, out, err = run_main(capsys, trained_try.model, good[0], bad, good[1], "--json")
    results = json.loads(out)
    assert status == 1
    assert [r["image"] for r in results] == [str(good[0]), str(bad), str(good[1])]
    assert "top" in results[0] and "top" in results[2] and results[1]["error"].startswith(f"{bad}: {message}")
    assert err.splitlines() == [f"error: {results[1]['error']}"]


def test_a_bad_checkpoint_stops_before_any_image(capsys, tmp_path, test_images):
    status, out, err = run_main(capsys, tmp_path / "models" / "nothing.pt", *test_images)
    assert status == 1 and out == ""
    assert err.startswith(f"error: {tmp_path / 'models' / 'nothing.pt'}: no such checkpoint; `dvc repro` trains")


@pytest.mark.parametrize("suffix", ["png", "webp"])  # a WebP file passes for a pickle that fails to unpickle
def test_an_image_given_as_the_checkpoint_is_called_not_a_checkpoint(capsys, tmp_path, test_images, suffix):
    image, *others = test_images
    named = tmp_path / f"image.{suffix}"
    Image.open(image).save(named)
    status, out, err = run_main(capsys, named, *others)
    assert status == 1 and out == ""
    assert err.startswith(f"error: {named}: not a") and "refused" not in err
    assert err.endswith("Named like an image: the checkpoint comes first, then the images\n")


def test_a_folder_stands_for_the_images_in_it_in_name_order(capsys, tmp_path, trained_try, test_images):
    first, second = list(test_images)[:2]
    folder = tmp_path / "photos"
    (folder / "inner").mkdir(parents=True)
    for name, image in [("b.PNG", first), ("a.jpg", second), (".hidden.png", first), ("inner/c.png", first)]:
        Image.open(image).save(folder / name, format="JPEG" if name.endswith("jpg") else "PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "clip.mpg").write_bytes(b"\x00\x00\x01\xba" + bytes(100))  # a format PIL opens, but no photo
    (folder / "album.png").mkdir()  # a folder named like an image
    status, out, err = run_main(capsys, trained_try.model, folder, first, "--json")
    assert status == 0 and err == ""
    assert [r["image"] for r in json.loads(out)] == [str(folder / "a.jpg"), str(folder / "b.PNG"), str(first)]
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")  # a broken link is named, not passed over
    status, out, err = run_main(capsys, trained_try.model, folder)
    assert status == 1 and err == f"error: {folder / 'gone.png'}: no such image\n"


def test_the_command_refuses_a_hostile_checkpoint_without_running_it_or_a_traceback(tmp_path, test_images):
    marker = tmp_path / "ran"
    hostile(tmp_path / "evil.pt", marker)
    command = [sys.executable, "-m", "stages.predict", str(tmp_path / "evil.pt"), str(next(iter(test_images)))]
    result = subprocess.run(command, cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path / 'evil.pt'}: refused: it asks for ")
    assert "Traceback" not in result.stderr and not marker.exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS's file systems refuse names that are not UTF-8")
def test_a_file_name_the_encoding_cannot_print_is_shown_escaped(tmp_path, trained_try, test_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, not UTF-8: the name holds an escaped byte
    Image.open(next(iter(test_images))).save(folder / name)
    command = [sys.executable, "-m", "stages.predict", str(trained_try.model), str(folder)]
    strict = {**tool_env(), "PYTHONIOENCODING": "utf-8"}  # as under en_US.UTF-8: no escapes of its own
    result = subprocess.run(command, cwd=ROOT, env=strict, capture_output=True, text=True, errors="replace")
    assert result.returncode == 0, result.stderr
    assert f"{folder}/caf\\udce9.png" in result.stdout


def test_a_reader_that_stops_reading_ends_the_command_without_a_traceback(trained_try, test_images):
    """`python -m stages.predict ... | head`: head leaves once it has its lines, and the rest of the table
    meets a closed pipe."""
    command = [sys.executable, "-m", "stages.predict", str(trained_try.model), *map(str, test_images)]
    predicting = subprocess.Popen(command, cwd=ROOT, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    predicting.stdout.close()  # before it prints anything: loading torch alone takes a second
    stderr = predicting.stderr.read().decode()
    assert predicting.wait() == 0 and stderr == ""
