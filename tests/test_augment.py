"""Batched augmentation: torchvision's PIL results for the same draws, and torchvision's distributions."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from stages import augment
from stages.augment import Augmentation, Draw, apply_draw, draw_params
from stages.params import load_params
from tests.cifar_archive import learnable_images
from tests.conftest import ROOT
from tests.devices import GPUS

RECIPE = load_params(ROOT / "params.yaml")["augment"]
ADJUSTMENTS = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]


@pytest.fixture(scope="module")
def images():
    """Varied images: random pixels over class colours, so contrast and saturation have work to do."""
    pixels, _ = learnable_images(200, seed=3, noise=0.7)
    return torch.from_numpy(pixels).view(-1, 3, 32, 32)


def with_pil(image, draw, i, geometry=True, colour=True):
    """The post's transforms, one PIL image at a time, with draw's parameters for image i."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if geometry:
        pil = F.hflip(pil) if draw.flip[i] else pil
        pil = F.rotate(pil, float(draw.angle[i]), InterpolationMode.NEAREST, fill=0)
        pil = F.affine(pil, angle=0.0, translate=[0, 0], scale=float(draw.scale[i]),
                       shear=[float(draw.shear[i]), 0.0], interpolation=InterpolationMode.NEAREST, fill=0)  # fmt: skip
    if colour:
        for kind in draw.order[i].tolist():
            pil = ADJUSTMENTS[kind](pil, float(draw.factors[i, kind]))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()  # apply_draw returns integer-valued floats


def no_colour(draw):
    return draw._replace(factors=torch.ones_like(draw.factors))


def no_geometry(draw):
    zeros = torch.zeros_like(draw.angle)
    return draw._replace(flip=zeros.bool(), angle=zeros, shear=zeros, scale=torch.ones_like(zeros))


def test_geometry_matches_pil_on_at_least_999_of_1000_pixels(images):
    draw = no_colour(draw_params(len(images), RECIPE, torch.Generator().manual_seed(0)))
    ours = apply_draw(images, draw)
    theirs = torch.stack([with_pil(image, draw, i, colour=False) for i, image in enumerate(images)])
    same_pixels = (ours == theirs).all(dim=1).float().mean().item()
    assert same_pixels >= 0.999, same_pixels


def test_colour_jitter_matches_pil_exactly_in_every_order(images):
    draw = no_geometry(draw_params(len(images), RECIPE, torch.Generator().manual_seed(1)))
    assert len({tuple(o) for o in draw.order.tolist()}) == 6  # every order of the three adjustments is tested
    theirs = torch.stack([with_pil(image, draw, i, geometry=False) for i, image in enumerate(images)])
    assert torch.equal(apply_draw(images, draw), theirs)


def test_whole_recipe_matches_pil(images):
    draw = draw_params(len(images), RECIPE, torch.Generator().manual_seed(2))
    theirs = torch.stack([with_pil(image, draw, i) for i, image in enumerate(images)])
    assert (apply_draw(images, draw) == theirs).all(dim=1).float().mean().item() >= 0.999


def torchvision_draws(count):
    """Parameters drawn by the post's own transforms' get_params."""
    torch.manual_seed(0)
    angles = [transforms.RandomRotation.get_params([-RECIPE["rotation"], RECIPE["rotation"]]) for _ in range(count)]
    affine = [transforms.RandomAffine.get_params([0.0, 0.0], None, RECIPE["scale"], [-RECIPE["shear"], RECIPE["shear"]],
                                                 [32, 32]) for _ in range(count)]  # fmt: skip
    jitter = transforms.ColorJitter(RECIPE["brightness"], RECIPE["contrast"], RECIPE["saturation"])
    colour = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, None) for _ in range(count)]
    return {
        "angle": torch.tensor(angles),
        "scale": torch.tensor([a[2] for a in affine]),
        "shear": torch.tensor([a[3][0] for a in affine]),
        "brightness": torch.tensor([c[1] for c in colour]),
        "contrast": torch.tensor([c[2] for c in colour]),
        "saturation": torch.tensor([c[3] for c in colour]),
        "order": [tuple(i for i in c[0].tolist() if i != 3) for c in colour],
    }


def test_draws_follow_torchvisions_distributions():
    count = 20000
    ours = draw_params(count, RECIPE, torch.Generator().manual_seed(0))
    theirs = torchvision_draws(count)
    mine = {"angle": ours.angle, "scale": ours.scale, "shear": ours.shear, "brightness": ours.factors[:, 0],
            "contrast": ours.factors[:, 1], "saturation": ours.factors[:, 2]}  # fmt: skip
    for name, values in mine.items():
        reference = theirs[name]
        # Same support, and the same deciles to within sampling noise (uniforms: spacing ~1/10 of the range).
        span = float(reference.max() - reference.min())
        assert abs(float(values.min() - reference.min())) < 0.01 * span, name
        assert abs(float(values.max() - reference.max())) < 0.01 * span, name
        deciles = torch.linspace(0.1, 0.9, 9)
        assert torch.allclose(values.quantile(deciles), reference.quantile(deciles), atol=0.02 * span), name
    assert abs(ours.flip.float().mean().item() - RECIPE["flip_p"]) < 0.015
    order_share = {order: ours.order.tolist().count(list(order)) / count for order in set(theirs["order"])}
    assert len(order_share) == 6 and all(abs(share - 1 / 6) < 0.015 for share in order_share.values())


def test_each_image_gets_its_own_draw():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augmented = Augmentation(RECIPE, torch.Generator().manual_seed(0))(image.expand(16, -1, -1, -1))
    assert augmented.shape == (16, 3, 32, 32) and augmented.dtype == torch.float32
    assert torch.equal(augmented, augmented.floor()) and 0 <= augmented.min() and augmented.max() <= 255
    assert len({bytes(a.to(torch.uint8).flatten().tolist()) for a in augmented}) == 16


def test_the_same_generator_seed_gives_the_same_batch(images):
    first = Augmentation(RECIPE, torch.Generator().manual_seed(5))(images)
    again = Augmentation(RECIPE, torch.Generator().manual_seed(5))(images)
    assert torch.equal(first, again)


def test_a_recipe_of_zeros_leaves_images_unchanged(images):
    identity = {
        "flip_p": 0,
        "rotation": 0,
        "shear": 0,
        "scale": [1, 1],
        "brightness": 0,
        "contrast": 0,
        "saturation": 0,
    }
    assert torch.equal(Augmentation(identity, torch.Generator())(images), images.float())


def test_batches_across_chunks_and_blocks_get_the_pixels_of_their_own_draws(images, monkeypatch):
    batches = [images[start : start + 20] for start in (0, 20, 40)]  # the third needs a second chunk
    monkeypatch.setattr(Augmentation, "CHUNK", 50)
    with monkeypatch.context() as small_blocks:
        small_blocks.setattr(augment, "BLOCK", 7)  # a chunk's maps are computed in 8 blocks, the last one short
        augmentation = Augmentation(RECIPE, torch.Generator().manual_seed(4))
        ours = [augmentation(batch) for batch in batches]
    generator = torch.Generator().manual_seed(4)
    first, second = draw_params(50, RECIPE, generator), draw_params(50, RECIPE, generator)
    part = lambda draw, start: Draw(*(t[start : start + 20] for t in draw))  # noqa: E731
    expected = [apply_draw(batches[0], part(first, 0)), apply_draw(batches[1], part(first, 20)),
                apply_draw(batches[2], part(second, 0))]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))


def test_a_batch_larger_than_a_chunk_gets_its_own_draw_and_the_next_a_fresh_one(images, monkeypatch):
    monkeypatch.setattr(Augmentation, "CHUNK", 50)
    augmentation = Augmentation(RECIPE, torch.Generator().manual_seed(6))
    ours = augmentation(images[:60]), augmentation(images[60:80])
    generator = torch.Generator().manual_seed(6)
    first, second = draw_params(60, RECIPE, generator), draw_params(50, RECIPE, generator)
    expected = apply_draw(images[:60], first), apply_draw(images[60:80], Draw(*(t[:20] for t in second)))
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))


def test_images_too_large_for_16_bit_maps_still_match_pil():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 190, 190), dtype=torch.uint8, generator=generator)  # 192 * 192 > 2**15
    draw = no_colour(draw_params(1, RECIPE, generator))
    same_pixels = (apply_draw(image, draw)[0] == with_pil(image[0], draw, 0, colour=False)).all(dim=0)
    assert same_pixels.float().mean().item() >= 0.999


@pytest.mark.parametrize("device", GPUS)
def test_a_gpu_gets_the_cpus_pixels_for_the_same_seed(images, device):
    """Draws come from a CPU generator and the pixel work is integer-exact: any device gives the same batch."""
    on_cpu = Augmentation(RECIPE, torch.Generator().manual_seed(7))(images)
    on_device = Augmentation(RECIPE, torch.Generator().manual_seed(7))(images.to(device))
    assert on_device.device.type == device and torch.equal(on_device.cpu(), on_cpu)
