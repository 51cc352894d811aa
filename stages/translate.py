"""The fast CIFAR-10 trainers' augmentation: a random horizontal flip and a random translation of a few pixels.

Each image gets its own draw: flipped or not (probability 0.5), and shifted by dx, dy drawn
uniformly from -translate..translate, the pixels it shifts in taken from a reflect-padded
border. That is torchvision's RandomHorizontalFlip then RandomCrop(H, padding=translate,
padding_mode="reflect"). Both are done in a single gather on the whole uint8 batch, on its device.

airbench's alternating flip (flip "alternate") draws the flips once: about half of the
training images are flipped in the first epoch, and each later epoch flips exactly the images
the epoch before did not, so that every image is seen both ways every two epochs.
"""

import torch


class FlipTranslate:
    """Flips and translates uint8 batches (B, C, H, W) with fresh per-image draws from a CPU generator.

    flip: False, True, or "alternate" (then count is the number of training images, and each call
    gets the indices of its images among them).
    """

    def __init__(self, flip, translate, generator, count=None):
        self.flip, self.translate, self.generator = flip, translate, generator
        if flip == "alternate":
            self.first_flips = torch.rand(count, generator=generator) < 0.5  # the first epoch's
            self.count, self.seen = count, 0

    def __call__(self, images, indices=None):
        count = len(images)
        if self.flip == "alternate":
            # Every epoch goes through each training image once, so the images seen so far tell the epoch.
            odd_epoch = (self.seen // self.count) % 2 == 1
            self.seen += count
            self.first_flips = self.first_flips.to(indices.device)  # once: then it is there
            flip = self.first_flips[indices] ^ odd_epoch
        else:
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
