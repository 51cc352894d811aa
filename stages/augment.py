"""The post's augmentation recipe, applied to a whole uint8 batch at once on its own device.

The post runs torchvision's Compose on one PIL image at a time:
RandomHorizontalFlip, RandomRotation, RandomAffine(0, shear, scale), then
ColorJitter(brightness, contrast, saturation) in a random order per image.
Here every image still gets its own random draw from the same distributions,
and given the same draw the result matches PIL's: the warps use PIL's
nearest-neighbour 16.16 fixed-point arithmetic (rotation and shear+scale stay
two separate warps, as in the post), and the colour blends use PIL's float32
arithmetic with truncation. torchvision.transforms.v2 would apply one draw to
the whole batch, which is a different recipe.
"""

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
FIXED_ONE = 65536  # PIL's 16.16 fixed point
BLOCK = 500  # images per step when a chunk's geometry maps are computed


class Draw(NamedTuple):
    """Per-image random parameters of one batch, each of shape (B,) unless noted."""

    flip: torch.Tensor  # bool
    angle: torch.Tensor  # rotation, degrees, counter-clockwise
    scale: torch.Tensor
    shear: torch.Tensor  # x shear, degrees
    factors: torch.Tensor  # (B, 3) float32: brightness, contrast, saturation
    order: torch.Tensor  # (B, 3) long: a permutation of the three colour adjustments


def uniform(count, low, high, generator):
    return low + (high - low) * torch.rand(count, generator=generator)


def draw_params(count, recipe, generator):
    """Draws per-image parameters from the distributions torchvision's transforms use."""
    jitter = [recipe["brightness"], recipe["contrast"], recipe["saturation"]]
    return Draw(
        flip=torch.rand(count, generator=generator) < recipe["flip_p"],
        angle=uniform(count, -recipe["rotation"], recipe["rotation"], generator),
        scale=uniform(count, *recipe["scale"], generator),
        shear=uniform(count, -recipe["shear"], recipe["shear"], generator),
        factors=torch.stack([uniform(count, max(0.0, 1 - j), 1 + j, generator) for j in jitter], dim=1),
        order=torch.rand(count, 3, generator=generator).argsort(dim=1),
    )


def rotation_matrices(angle, height, width):
    """PIL's Image.rotate inverse matrices (B, 6), float64, about the image centre."""
    radians = -np.radians(angle % 360.0)
    cos, sin = np.round(np.cos(radians), 15), np.round(np.sin(radians), 15)
    cx, cy = width / 2, height / 2
    return np.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], axis=1)


def shear_scale_matrices(scale, shear, height, width):
    """torchvision's inverse matrices (B, 6) for RandomAffine(0, shear=(x, 0), scale) on PIL images."""
    m0, m1, m3 = 1 / scale, np.tan(np.radians(shear)) / scale, np.zeros_like(scale)
    cx, cy = width * 0.5, height * 0.5
    return np.stack([m0, m1, m0 * -cx + m1 * -cy + cx, m3, m0, m3 * -cx + m0 * -cy + cy], axis=1)


def fixed_point(matrices):
    """PIL's affine_fixed coefficients (B, 6) int32: 16.16 fixed point, sampling at pixel centres."""
    folded = matrices.copy()
    folded[:, 2] += matrices[:, 0] * 0.5 + matrices[:, 1] * 0.5
    folded[:, 5] += matrices[:, 3] * 0.5 + matrices[:, 4] * 0.5
    return torch.from_numpy(np.floor(folded * FIXED_ONE + 0.5).astype(np.int32))


def warp_coefficients(draw, height, width):
    """Fixed-point coefficients (2, B, 6) of each image's rotation, then its shear+scale."""
    angle, scale, shear = (t.double().cpu().numpy() for t in (draw.angle, draw.scale, draw.shear))
    rotation = fixed_point(rotation_matrices(angle, height, width))
    shear_scale = fixed_point(shear_scale_matrices(scale, shear, height, width))
    return torch.stack([rotation, shear_scale])


def source_coefficients(coefficients, flip, width):
    """Per-image coefficients (2, B, 6) int32 that give source pixels in the zero-padded image.

    coefficients: (2, B, 6) from fixed_point, the rotation's then the shear+scale's. PIL reads
    column (a2 + y*a1 + x*a0) >> 16 (a floor); the padding adds FIXED_ONE. A flipped image is
    read mirrored, at column W + 1 - that in padded coordinates, which is again a floor of a
    fixed-point line: W + 1 - floor(v / 2**16) = floor(((W + 1) * 2**16 - 1 - v') / 2**16),
    with v' the line without the padding. So the flip costs nothing per pixel.
    """
    padded = coefficients.clone()
    padded[:, :, 2::3] += FIXED_ONE  # the x and y offsets, coefficients 2 and 5
    rotation_x = padded[0, :, :3]
    mirrored = torch.cat([-rotation_x[:, :2], (width + 1) * FIXED_ONE - 1 - coefficients[0, :, 2:3]], dim=1)
    rotation_x.copy_(torch.where(flip.view(-1, 1), mirrored, rotation_x))
    return padded


OUTSIDE = -(2**28)  # a fixed-point line part far below zero: its source clamps to the padding's corner


def rotated_sources(rotation, height, width):
    """Flat index into the zero-padded source of each pixel of the rotated image, padded too (B, H + 2, W + 2).

    rotation: (B, 6) from source_coefficients. PIL reads pixel (row, column) from
    floor((row part + column part) / 2**16), each part a fixed-point line in int32.
    """
    device = rotation.device
    rows = torch.arange(-1, height + 1, device=device, dtype=torch.int32).view(1, 1, -1, 1)
    columns = torch.arange(-1, width + 1, device=device, dtype=torch.int32).view(1, 1, 1, -1)
    rotation = rotation.view(-1, 6, 1, 1)
    # Strided slices, not index lists: on a GPU each list would be copied there, waiting for it.
    row_parts = rotation[:, 2::3] + rows * rotation[:, 1::3]  # (B, 2, H + 2, 1): x and y
    column_parts = columns * rotation[:, 0::3]  # (B, 2, 1, W + 2)
    # The shear reads the rotated image's zero border too: there the row or the column part
    # is OUTSIDE, so the line stays far below zero and its source clamps to the padding's corner.
    row_parts[:, :, 0] = row_parts[:, :, -1] = OUTSIDE
    column_parts[..., 0] = column_parts[..., -1] = OUTSIDE
    x, y = (row_parts + column_parts).bitwise_right_shift_(16).unbind(dim=1)
    return y.clamp_(0, height + 1).mul_(width + 2).add_(x.clamp_(0, width + 1))


def geometry_map(coefficients, height, width):
    """One index per output pixel (B, H * W) int32 into the zero-padded source: flip, rotation, shear+scale.

    coefficients: (2, B, 6) from source_coefficients. Source coordinates are clamped into the
    padded image: a source outside the image reads its zero border, as PIL fills with zero.
    Nearest-neighbour warps only move pixels, so chaining their index maps gives exactly what
    applying them one after the other gives, in a single gather.
    """
    rotation, shear = coefficients
    batch = len(shear)
    rows = torch.arange(height, device=shear.device, dtype=torch.int32).view(1, -1, 1)
    columns = torch.arange(width, device=shear.device, dtype=torch.int32).view(1, 1, -1)
    a0, a1, a2, _, a4, a5 = shear.view(batch, 6, 1, 1).unbind(dim=1)  # each (B, 1, 1)
    # The shear is along x only (coefficient 3 is 0), so the source row depends on the output row alone.
    source_rows = (a5 + rows * a4).bitwise_right_shift_(16).clamp_(0, height + 1)  # (B, H, 1)
    x = (a2 + rows * a1 + columns * a0).bitwise_right_shift_(16).clamp_(0, width + 1)  # (B, H, W)
    sheared_from = x.add_(source_rows * (width + 2)).view(batch, -1)  # flat, into the padded rotated image
    return rotated_sources(rotation, height, width).reshape(batch, -1).gather(1, sheared_from.long())


@functools.cache
def luma_constants(device):
    """PIL's RGB -> L weights divided by 2**16 (1, 1, 3), and its rounding half (1, 1, 1), kept on device."""
    weights = torch.tensor([[[19595.0, 38470.0, 7471.0]]], device=device) / FIXED_ONE
    return weights, torch.full((1, 1, 1), 0.5, device=device)


def luma(flat):
    """PIL's RGB -> L, (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, of (B, 3, N) -> (B, 1, N).

    Exact in float32: every product and partial sum is a multiple of 2**-16 below 2**8.
    """
    weights, half = luma_constants(flat.device)
    return torch.baddbmm(half, weights.expand(len(flat), 1, 3), flat).floor_()


def blend_(degenerate, images, factor):
    """PIL's Image.blend(degenerate, images, factor) on integer-valued float32, in place on images.

    PIL computes in float32 and truncates; after clipping to [0, 255] truncation is a floor.
    The multiply and the add stay separate: a fused multiply-add (addcmul) rounds once and
    lands on the other side of an integer for a few pixels in a million.
    """
    return images.sub_(degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).floor_()


def colour_plan(factors, order):
    """(B, 3, 3) float32: for each image and step, the factor and whether it is contrast or saturation."""
    return torch.stack([factors.gather(1, order), (order == CONTRAST).float(), (order == SATURATION).float()], dim=2)


def color_jitter_(images, plan):
    """ImageEnhance's Brightness, Contrast and Color (saturation), in each image's own order.

    images: integer-valued float32 (B, 3, H, W), changed in place; plan: (B, 3, 3) from colour_plan. Each step
    blends every image with the grey image its own adjustment at that step calls for: black,
    the mean luma, or its luma.
    """
    batch = len(images)
    flat = images.view(batch, 3, -1)
    steps = plan.view(batch, 3, 3, 1, 1).unbind(dim=1)
    for factor, is_contrast, is_saturation in (step.unbind(dim=1) for step in steps):  # each (B, 1, 1)
        grey = luma(flat)  # (B, 1, N)
        mean_grey = grey.mean(dim=2, keepdim=True).add_(0.5).floor_().mul_(is_contrast)
        # grey where saturation is adjusted, its mean for contrast, black for brightness (exact: all integers);
        # in place: a broadcasting addcmul takes twice as long
        degenerate = grey.mul_(is_saturation).add_(mean_grey)
        blend_(degenerate, flat, factor)
    return flat.view(images.shape)


def augment_pixels(images, index, plan):
    """The recipe on a uint8 batch (B, 3, H, W), given its geometry_map (B, H * W) and colour_plan.

    Returns integer-valued float32 (0-255): training normalises it next, and a
    round trip through uint8 would only cost time.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (1, 1, 1, 1)).view(batch, channels, -1)  # zero fill, as PIL's
    moved = padded.gather(2, index.long().unsqueeze(1).expand(-1, channels, -1)).float()
    return color_jitter_(moved.view(batch, channels, height, width), plan)


def geometry_maps(coefficients, height, width):
    """geometry_map of every image of source_coefficients (2, B, 6), in the smallest integer type that holds it.

    Done BLOCK images at a time: in one piece, a chunk's intermediates take about 100 MB
    and the work runs several times slower.
    """
    count = coefficients.shape[1]
    dtype = torch.int16 if (height + 2) * (width + 2) <= torch.iinfo(torch.int16).max else torch.int32
    maps = torch.empty(count, height * width, dtype=dtype, device=coefficients.device)
    for start in range(0, count, BLOCK):
        maps[start : start + BLOCK] = geometry_map(coefficients[:, start : start + BLOCK], height, width)
    return maps


def prepare(draw, height, width, device):
    """What augment_pixels needs from a draw, on device: each image's geometry_map and colour plan."""
    coefficients = source_coefficients(warp_coefficients(draw, height, width), draw.flip, width)
    return geometry_maps(coefficients.to(device), height, width), colour_plan(draw.factors, draw.order).to(device)


def apply_draw(images, draw):
    """The post's recipe with the given parameters on a uint8 batch (B, 3, H, W)."""
    _, _, height, width = images.shape
    return augment_pixels(images, *prepare(draw, height, width, images.device))


class Augmentation:
    """Augments uint8 batches with fresh per-image draws from a CPU generator, so runs repeat on any device.

    Parameters are drawn CHUNK images at a time and their geometry maps computed then (an
    int16 per pixel: 20 MB for CIFAR-10's 32x32 images): the per-draw work runs in a few large
    steps and moves to the device once, leaving each batch only the pixel work.
    """

    CHUNK = 10_000

    def __init__(self, recipe, generator):
        self.recipe, self.generator = recipe, generator
        self.maps, self.plan, self.used = None, None, 0

    def __call__(self, images, indices=None):
        """indices: unused (every image gets a fresh draw), as other augmentations take them."""
        count, _, height, width = images.shape
        if self.plan is None or self.used + count > len(self.plan):
            draw = draw_params(max(self.CHUNK, count), self.recipe, self.generator)
            self.maps, self.plan = prepare(draw, height, width, images.device)
            self.used = 0
        batch = slice(self.used, self.used + count)
        self.used += count
        return augment_pixels(images, self.maps[batch], self.plan[batch])
