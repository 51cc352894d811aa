"""The post's augmentation recipe, built from params.yaml's `augment` section.

Each image in a batch gets its own random draw, exactly as torchvision applies
the post's Compose to one PIL image at a time: flip, rotation, shear+scale
(a separate warp after the rotation), then colour jitter in random order.
Works on uint8 tensors and draws from torch's global generator, which
train.py seeds, so runs repeat exactly.
"""

import torch
from torchvision import transforms


def build_augmentation(recipe):
    """Returns a function mapping a uint8 batch (B, 3, H, W) to an augmented uint8 batch."""
    per_image = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(recipe["flip_p"]),
            transforms.RandomRotation(recipe["rotation"]),
            transforms.RandomAffine(0, shear=recipe["shear"], scale=tuple(recipe["scale"])),
            transforms.ColorJitter(recipe["brightness"], recipe["contrast"], recipe["saturation"]),
        ]
    )

    def augment(images):
        return torch.stack([per_image(image) for image in images])

    return augment
