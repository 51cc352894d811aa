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

from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
FIXED_ONE = 65536  # PIL's 16.16 fixed point


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


def padded_source(coefficients, height, width):
    """Where PIL's nearest-neighbour warp (affine_fixed) reads each output pixel from.

    coefficients: (B, 6) from fixed_point. Returns x and y, each (B, H, W), in the coordinates
    of the image padded with one zero pixel on every side: PIL's source pixel plus one, or
    the zero border when PIL's source lies outside the image (PIL fills it with zero).
    PIL steps through the output in 16.16 fixed point and shifts right by 16 (a floor);
    adding FIXED_ONE before the shift adds the padding's one. int32 arithmetic: every term
    stays far below 2**31 for images this size.
    """
    batch = len(coefficients)
    a0, a1, a2, a3, a4, a5 = coefficients.view(batch, 6, 1, 1).unbind(dim=1)
    ys = torch.arange(height, device=coefficients.device, dtype=torch.int32).view(1, height, 1)
    xs = torch.arange(width, device=coefficients.device, dtype=torch.int32).view(1, 1, width)
    x = ((a2 + FIXED_ONE + ys * a1 + xs * a0) >> 16).clamp_(0, width + 1)
    y = ((a5 + FIXED_ONE + ys * a4 + xs * a3) >> 16).clamp_(0, height + 1)
    return x, y


def warp_coefficients(draw, height, width):
    """Fixed-point coefficients (2, B, 6) of each image's rotation, then its shear+scale."""
    angle, scale, shear = (t.double().cpu().numpy() for t in (draw.angle, draw.scale, draw.shear))
    rotation = fixed_point(rotation_matrices(angle, height, width))
    shear_scale = fixed_point(shear_scale_matrices(scale, shear, height, width))
    return torch.stack([rotation, shear_scale])


def geometry_map(coefficients, flip, height, width):
    """One index per output pixel into the zero-padded source, for flip, then rotation, then shear+scale.

    Nearest-neighbour warps only move pixels, so chaining their index maps gives
    exactly what applying them one after the other gives, in a single gather.
    """
    batch = coefficients.shape[1]
    x, y = padded_source(coefficients.reshape(2 * batch, 6), height, width)  # both warps in one pass
    # The flip comes first: the rotation reads the mirrored image (its zero border stays the border).
    x[:batch] = torch.where(flip.view(batch, 1, 1), width + 1 - x[:batch], x[:batch])
    index = (y * (width + 2) + x).view(2 * batch, -1)  # flat, into the padded image
    # The rotated image, padded, still reads zero on its border: index 0 is a corner of the padded source.
    rotated_from = F.pad(index[:batch].view(batch, height, width), (1, 1, 1, 1)).view(batch, -1).long()
    return rotated_from.gather(1, index[batch:].long())


LUMA_WEIGHTS = torch.tensor([[19595.0, 38470.0, 7471.0]])
LUMA_ROUNDING = torch.full((1, 1, 1), float(0x8000))


def luma(images):
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.

    Exact in float32: every product and partial sum is an integer below 2**24.
    """
    batch, channels, height, width = images.shape
    weights = LUMA_WEIGHTS.to(images.device).expand(batch, 1, channels)
    grey = torch.baddbmm(LUMA_ROUNDING.to(images.device), weights, images.view(batch, channels, -1))  # (B, 1, H*W)
    return grey.mul_(1 / FIXED_ONE).floor_().view(batch, 1, height, width)


def blend(degenerate, images, factor):
    """PIL's Image.blend(degenerate, images, factor) on integer-valued float32.

    PIL computes in float32 and truncates; after clipping to [0, 255] truncation is a floor.
    The multiply and the add stay separate: a fused multiply-add (addcmul) rounds once and
    lands on the other side of an integer for a few pixels in a million.
    """
    mixed = images - degenerate
    return mixed.mul_(factor.view(-1, 1, 1, 1)).add_(degenerate).clamp_(0, 255).floor_()


def color_jitter(images, factors, order):
    """ImageEnhance's Brightness, Contrast and Color (saturation), in each image's own order.

    images: integer-valued float32 (B, 3, H, W). Each step blends every image with the
    grey image its own adjustment at that step calls for: black, the mean luma, or its luma.
    """
    per_image = (len(order), 1, 1, 1)
    is_contrast, is_saturation = (order == CONTRAST).float(), (order == SATURATION).float()  # (B, 3) each
    step_factors = factors.gather(1, order)  # (B, 3): each step's factor
    for step in range(3):
        grey = luma(images)
        mean_grey = torch.floor(grey.mean(dim=(2, 3), keepdim=True) + 0.5)
        # grey where saturation is adjusted, its mean for contrast, black for brightness (exact: all integers)
        degenerate = torch.addcmul(
            mean_grey * is_contrast[:, step].view(per_image), grey, is_saturation[:, step].view(per_image)
        )
        images = blend(degenerate, images, step_factors[:, step])
    return images


def apply_draw(images, draw, coefficients=None):
    """The post's recipe with the given parameters on a uint8 batch (B, 3, H, W).

    Returns integer-valued float32 (0-255): training normalises it next, and a
    round trip through uint8 would only cost time.
    """
    batch, channels, height, width = images.shape
    if coefficients is None:
        coefficients = warp_coefficients(draw, height, width)
    draw, coefficients = Draw(*(t.to(images.device) for t in draw)), coefficients.to(images.device)
    index = geometry_map(coefficients, draw.flip, height, width)
    padded = F.pad(images, (1, 1, 1, 1)).view(batch, channels, -1)  # zero fill, as PIL's
    moved = padded.gather(2, index.unsqueeze(1).expand(-1, channels, -1)).float()
    return color_jitter(moved.view(batch, channels, height, width), draw.factors, draw.order)


class Augmentation:
    """Augments uint8 batches with fresh per-image draws from a CPU generator, so runs repeat on any device.

    Parameters are drawn CHUNK images at a time: the per-draw work is vectorised and
    moved to the device once, leaving each batch only the pixel work.
    """

    CHUNK = 10_000

    def __init__(self, recipe, generator):
        self.recipe, self.generator = recipe, generator
        self.draw, self.coefficients, self.used = None, None, 0

    def __call__(self, images):
        count, _, height, width = images.shape
        if self.draw is None or self.used + count > len(self.draw.angle):
            self.draw = draw_params(max(self.CHUNK, count), self.recipe, self.generator)
            self.coefficients = warp_coefficients(self.draw, height, width).to(images.device)
            self.draw = Draw(*(t.to(images.device) for t in self.draw))
            self.used = 0
        batch = slice(self.used, self.used + count)
        self.used += count
        return apply_draw(images, Draw(*(t[batch] for t in self.draw)), self.coefficients[:, batch])
