"""Flip and translate: torchvision's pixels for a known draw, and the distribution of the draws."""

import pytest
import torch
from torchvision.transforms import functional as F

from stages.translate import FlipTranslate, flip_translate
from tests.devices import GPUS


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def with_torchvision(image, flip, dx, dy, padding):
    """RandomHorizontalFlip, then RandomCrop(32, padding, padding_mode="reflect") at the crop that shifts by dx, dy."""
    if flip:
        image = F.hflip(image)
    padded = F.pad(image, [padding] * 4, padding_mode="reflect")
    return F.crop(padded, padding - dy, padding - dx, 32, 32)


@pytest.mark.parametrize("padding", [2, 4])
def test_a_known_draw_gives_torchvisions_pixels(images, padding):
    flip = torch.tensor([False, True, False, True, True, False])
    shift = torch.tensor([[0, 0], [0, 0], [padding, -padding], [-1, 2], [-padding, -padding], [1, -2]])
    moved = flip_translate(images, flip, shift)
    for i in range(len(images)):
        expected = with_torchvision(images[i], bool(flip[i]), int(shift[i, 0]), int(shift[i, 1]), padding)
        assert torch.equal(moved[i], expected), i
    assert torch.equal(moved[0], images[0]) and torch.equal(moved[1], images[1].flip(-1))


def test_channels_last_and_float_batches_move_the_same_pixels(images):
    flip, shift = torch.tensor([True] * 6), torch.tensor([[2, -1]] * 6)
    expected = flip_translate(images, flip, shift)
    assert torch.equal(flip_translate(images.contiguous(memory_format=torch.channels_last), flip, shift), expected)
    assert torch.equal(flip_translate(images.float(), flip, shift), expected.float())


def test_draws_cover_every_shift_and_flip_half_the_images():
    count = 20_000
    images = torch.arange(32, dtype=torch.uint8).repeat(count, 3, 32, 1)  # each pixel holds its column
    moved = FlipTranslate(flip=True, translate=2, generator=torch.Generator().manual_seed(0))(images)
    middle = moved[:, 0, 16, 14:19].long()  # away from the borders: no reflection
    steps = middle[:, 1] - middle[:, 0]
    assert set(steps.tolist()) == {1, -1}
    flipped = steps == -1
    assert abs(flipped.float().mean().item() - 0.5) < 0.02
    dx = torch.where(flipped, 31 - middle[:, 2], middle[:, 2]) - 16
    counts = torch.bincount(dx + 2, minlength=5).float() / count
    assert counts.shape == (5,) and torch.all((counts - 0.2).abs() < 0.02), counts


def test_draws_cover_every_vertical_shift_too():
    count = 20_000
    images = torch.arange(32, dtype=torch.uint8).view(32, 1).repeat(count, 3, 1, 32)  # each pixel holds its row
    moved = FlipTranslate(flip=True, translate=2, generator=torch.Generator().manual_seed(0))(images)
    dy = 16 - moved[:, 0, 16, 16].long()  # row 16 now shows row 16 - dy; flips leave rows alone
    assert torch.equal(moved[:, 0, 15, 16].long(), moved[:, 0, 16, 16].long() - 1)  # whole rows move
    counts = torch.bincount(dy + 2, minlength=5).float() / count
    assert counts.shape == (5,) and torch.all((counts - 0.2).abs() < 0.02), counts


def test_flip_off_only_translates():
    images = torch.arange(32, dtype=torch.uint8).repeat(1000, 3, 32, 1)
    moved = FlipTranslate(flip=False, translate=1, generator=torch.Generator().manual_seed(0))(images)
    assert torch.all(moved[:, 0, 16, 16].long() - moved[:, 0, 16, 15].long() == 1)


def test_alternating_flips_turn_every_image_the_other_way_each_epoch():
    count = 1000
    images = torch.arange(32, dtype=torch.uint8).repeat(count, 3, 32, 1)  # each pixel holds its column
    augment = FlipTranslate(flip="alternate", translate=0, generator=torch.Generator().manual_seed(0), count=count)
    order = torch.randperm(count)
    epochs = []
    for _ in range(3):  # each epoch in batches of 100, in a shuffled order, as training takes them
        flipped = torch.zeros(count, dtype=torch.bool)
        for indices in order.split(100):
            moved = augment(images[indices], indices)
            flipped[indices] = moved[:, 0, 0, 0] == 31
        epochs.append(flipped)
        order = order[torch.randperm(count)]
    assert abs(epochs[0].float().mean().item() - 0.5) < 0.05
    assert torch.equal(epochs[1], ~epochs[0]) and torch.equal(epochs[2], epochs[0])


@pytest.mark.parametrize("flip", [True, "alternate"])
@pytest.mark.parametrize("device", GPUS)
def test_a_gpu_moves_the_cpus_pixels_for_the_same_seed(images, device, flip):
    indices = torch.tensor([5, 0, 3, 1, 4, 2])
    on_cpu = FlipTranslate(flip, 2, torch.Generator().manual_seed(3), count=6)(images, indices)
    augment = FlipTranslate(flip, 2, torch.Generator().manual_seed(3), count=6)
    on_device = augment(images.to(device), indices.to(device))
    assert on_device.device.type == device and torch.equal(on_device.cpu(), on_cpu)
