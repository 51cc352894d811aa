"""A trained try's top 3 classes for your own images (a command, not a pipeline stage).

Reads a checkpoint that the train stage wrote (models/<try>.pt) and images of any format PIL
reads (PNG, JPEG, GIF, BMP, WebP, TIFF), size and mode but floating-point pixels. Each image is
turned upright (its EXIF orientation), laid on white where it is transparent, converted to RGB
(16-bit grey scaled to 8 bits) and resized to 32x32 as the post's Resize((32, 32)) does (PIL's
bilinear, antialiased), then normalised as in training. Prints a table, or JSON with --json.

    python -m stages.predict models/lenet2.pt cat.jpg dog.png
    python -m stages.predict models/lenet2.pt photos --json

A folder stands for the images in it (by their suffix, in name order). A missing or unreadable
image is named and the others are still classified; the exit status is then 1. A bad checkpoint
stops everything before any image is read.
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.errors import FILE_ERRORS, PipelineError, exits_cleanly, file_problem
from stages.inference import CheckpointError, load_checkpoint, predict_probabilities, test_time_views

IMAGE_SIZE = (32, 32)  # what the models take, and what the post resizes to
FORMATS = "PNG, JPEG, GIF, BMP, WebP or TIFF"
# What a folder's images are named (PIL opens more, videos and scientific data among them: not photos).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
# 16-bit grey, as PIL opens a 16-bit PNG or TIFF ("I" holds it too): PIL's convert("RGB") would clip it to white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
TOP = 3  # classes shown per image
WHITE = (255, 255, 255)


class ImageError(PipelineError):
    """An image that cannot be classified: missing, unreadable, or not an image."""


def images_named(argument):
    """The paths an argument names: a folder's images (files with an image suffix, hidden ones left out, in
    name order; a broken link among them, for load_image to name), or the argument as given: a file, or a
    folder without images or that cannot be read, for predict to name."""
    path = Path(argument)
    if not path.is_dir():
        return [argument]
    try:
        entries = list(path.iterdir())
    except OSError:
        return [argument]
    named = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."]
    images = sorted(p for p in named if p.is_file() or not p.exists())  # not a folder named like an image
    return [str(image) for image in images] or [argument]


def folder_problem(path):
    """Why a folder gave no image: it has none, or it cannot be read."""
    try:
        next(Path(path).iterdir(), None)
    except OSError as error:
        return f"{path}: a folder that cannot be read ({error.strerror})"
    return f"{path}: a folder without images ({FORMATS} files)"


def load_image(path):
    """uint8 (3, 32, 32) of the image at path, as the post's Resize((32, 32)) on a PIL image gives it."""
    try:
        with warnings.catch_warnings():
            # PIL warns of photos over 89 megapixels (some phones take 108): read as asked, they are
            # only big. Over twice that it refuses (below), which protects the memory.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode == "F":
                    raise ImageError(f"{path}: floating-point pixels, of no known range; save it with 8 or 16 bits")
                rgb = to_rgb(ImageOps.exif_transpose(image))
    except FILE_ERRORS as error:
        raise ImageError(file_problem(path, error, "image")) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image ({FORMATS} expected)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"{path}: too large to read safely ({error}); save a smaller copy, the model sees 32x32 pixels"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises on a damaged or cut-short file
        raise ImageError(f"{path}: damaged or truncated image ({error})") from None
    resized = rgb.resize(IMAGE_SIZE, Image.Resampling.BILINEAR)  # torchvision's Resize does exactly this on PIL
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)  # (32, 32, 3) -> (3, 32, 32)


def to_rgb(image):
    """RGB of any mode; transparent parts are laid on white, as a viewer shows them, not on hidden pixels;
    16-bit grey is scaled to 8 bits (65,535 -> 255)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        eight_bit = (values / 257).round().clip(0, 255).astype(np.uint8)
        transparent = image.info.get("transparency")  # the one grey value that stands for transparent, if any
        if isinstance(transparent, int):
            eight_bit[values == transparent] = WHITE[0]
        return Image.fromarray(eight_bit, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def predict(checkpoint, arguments):
    """One entry per image, in the order of arguments (image files, or folders: their images):
    {"image", "top": [{"class", "probability"}, ...]} or {"image", "error"}."""
    results, images = [], []
    for path in [path for argument in arguments for path in images_named(argument)]:
        try:
            if Path(path).is_dir():  # images_named() gives a folder only where it found or could list no image
                raise ImageError(folder_problem(path))
            images.append(load_image(path))
            results.append({"image": str(path)})
        except ImageError as error:
            results.append({"image": str(path), "error": str(error)})
    classified = [result for result in results if "error" not in result]
    if classified:
        probabilities = predict_probabilities(checkpoint.model, torch.stack(images), test_time_views(checkpoint))
        values, indices = probabilities.topk(min(TOP, probabilities.shape[1]), dim=1)
        for result, row_values, row_indices in zip(classified, values.tolist(), indices.tolist(), strict=True):
            result["top"] = [
                {"class": checkpoint.classes[i], "probability": round(p, 6)}
                for p, i in zip(row_values, row_indices, strict=True)
            ]
    return results


def format_table(results):
    shown = [result for result in results if "top" in result]
    width = max(len(c["class"]) for result in shown for c in result["top"])
    rows = [["image", *(f"top {k + 1}" for k in range(len(shown[0]["top"])))]]  # fewer than TOP for fewer classes
    for result in shown:
        cells = [f"{c['class']:<{width}} {100 * c['probability']:5.1f}%" for c in result["top"]]
        rows.append([result["image"], *cells])
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def describe(path, checkpoint):
    """One line on which model answers: its try's model and its last validation accuracy."""
    history = checkpoint.history
    accuracy = f", {history[-1]['val_acc']:.2f}% on the test images" if history and "val_acc" in history[-1] else ""
    return f"{path}: {checkpoint.config['model']}, {len(history)} epoch{'s' * (len(history) != 1)}{accuracy}"


@exits_cleanly
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m stages.predict", description="Top 3 classes of a trained try for each image."
    )
    parser.add_argument("checkpoint", help="a model the train stage wrote, e.g. models/lenet2.pt")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...), any size, or folders of them")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    args = parser.parse_args(argv)
    # A file name that is not valid in the system's encoding (bytes from another system) prints escaped,
    # where a strict UTF-8 stdout would stop the table with a traceback.
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except CheckpointError as error:
        if Path(args.checkpoint).suffix.lower() not in IMAGE_SUFFIXES:
            raise
        raise CheckpointError(f"{error}. Named like an image: the checkpoint comes first, then the images") from None
    results = predict(checkpoint, args.images)
    try:
        if args.json:
            print(json.dumps(results, indent=2))
        elif any("top" in result for result in results):
            print(describe(args.checkpoint, checkpoint))
            print(format_table(results))
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
    except BrokenPipeError:
        # The reader stopped reading (`... | head`): the rest is not wanted, as for any command-line tool.
        # stdout goes to /dev/null, or Python's own flush at exit would fail again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    errors = [result["error"] for result in results if "error" in result]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
