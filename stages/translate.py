"""The fast CIFAR-10 trainers' augmentation: a random horizontal flip and a random translation of a few pixels.

Each image gets its own draw: flipped or not (probability 0.5), and shifted by dx, dy drawn
uniformly from -translate..translate, the pixels it shifts in taken from a reflect-padded
border. That is torchvision's RandomHorizontalFlip then RandomCrop(H, padding=translate,
padding_mode="reflect"). Both are done in a single gather on the whole uint8 batch, on its device.
"""

import torch


class FlipTranslate:
    """Flips and translates uint8 batches (B, C, H, W) with fresh per-image draws from a CPU generator."""

    def __init__(self, flip, translate, generator):
        self.flip, self.translate, self.generator = flip, translate, generator

    def __call__(self, images):
        count = len(images)
        flip = torch.rand(count, generator=self.generator) < 0.5
        if not self.flip:
            flip = torch.zeros_like(flip)
        shift = torch.randint(-self.translate, self.translate + 1, (count, 2), generator=self.generator)
        return flip_translate(images, flip.to(images.device), shift.to(images.device))


def flip_translate(images, flip, shift):
    """images (B, C, H, W) with image i mirrored where flip[i], then moved by shift[i] = (dx, dy) pixels.

    Output pixel (y, x) of a shifted image is input pixel (y - dy, x - dx), reflected into the
    image where that falls outside it (reflect padding, which repeats no edge pixel).
    """
    batch, channels, height, width = images.shape
    rows = reflect(torch.arange(height, device=images.device) - shift[:, 1:], height)  # (B, H)
    columns = torch.arange(width, device=images.device) - shift[:, :1]  # (B, W)
    columns = reflect(columns, width)
    columns = torch.where(flip.view(-1, 1), width - 1 - columns, columns)
    index = (rows.unsqueeze(2) * width + columns.unsqueeze(1)).view(batch, 1, -1).expand(-1, channels, -1)
    return images.reshape(batch, channels, -1).gather(2, index).view(batch, channels, height, width)


def reflect(index, size):
    """Indices outside 0..size-1 mirrored back in about the edge pixels, as reflect padding does."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= size, 2 * (size - 1) - index, index)
