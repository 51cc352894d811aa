"""The post's two networks and the 4th try's, registered by the names params.yaml uses.

In the post's networks each convolution is followed by max-pooling, then ReLU: the post applies ReLU first,
but ReLU keeps the order of values, so both give the same outputs and the same
gradients bit for bit (tests/test_models.py checks it), and ReLU on the pooled
map touches a quarter of the values.
"""

import inspect

import torch
from torch import nn
from torch.nn import functional as F


class LeNet(nn.Module):
    """1st try: two 5x5 convolutions, as the post used for handwritten digits."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(5 * 5 * 50, 500)
        self.dropout1 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):  # (B, 3, 32, 32)
        x = F.relu(F.max_pool2d(self.conv1(x), 2, 2))  # (B, 20, 14, 14)
        x = F.relu(F.max_pool2d(self.conv2(x), 2, 2))  # (B, 50, 5, 5)
        x = x.flatten(1)  # (B, 1250)
        x = self.dropout1(F.relu(self.fc1(x)))  # (B, 500)
        return self.fc2(x)  # (B, 10)


class LeNet2(nn.Module):
    """2nd and 3rd tries: three padded 3x3 convolutions, each halving the image."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, 1, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 64, 500)
        self.dropout1 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):  # (B, 3, 32, 32)
        x = F.relu(F.max_pool2d(self.conv1(x), 2, 2))  # (B, 16, 16, 16)
        x = F.relu(F.max_pool2d(self.conv2(x), 2, 2))  # (B, 32, 8, 8)
        x = F.relu(F.max_pool2d(self.conv3(x), 2, 2))  # (B, 64, 4, 4)
        x = x.flatten(1)  # (B, 1024)
        x = self.dropout1(F.relu(self.fc1(x)))  # (B, 500)
        return self.fc2(x)  # (B, 10)


class LeNet2BN(LeNet2):
    """LeNet_2 with BatchNorm after each pooled convolution: the first rung from the 3rd try to the 4th."""

    def __init__(self, num_classes=10):
        super().__init__(num_classes)
        self.norm1, self.norm2, self.norm3 = nn.BatchNorm2d(16), nn.BatchNorm2d(32), nn.BatchNorm2d(64)

    def forward(self, x):  # (B, 3, 32, 32)
        x = F.relu(self.norm1(F.max_pool2d(self.conv1(x), 2, 2)))  # (B, 16, 16, 16)
        x = F.relu(self.norm2(F.max_pool2d(self.conv2(x), 2, 2)))  # (B, 32, 8, 8)
        x = F.relu(self.norm3(F.max_pool2d(self.conv3(x), 2, 2)))  # (B, 64, 4, 4)
        x = self.dropout1(F.relu(self.fc1(x.flatten(1))))  # (B, 500)
        return self.fc2(x)  # (B, 10)


class ConvGroup(nn.Module):
    """airbench's block: conv, 2x2 max-pool, BatchNorm, GELU, then conv, BatchNorm, GELU at the pooled size."""

    def __init__(self, channels_in, channels_out, batchnorm_momentum):
        super().__init__()
        self.conv1 = dirac_conv(channels_in, channels_out)
        self.norm1 = shift_only_norm(channels_out, batchnorm_momentum)
        self.conv2 = dirac_conv(channels_out, channels_out)
        self.norm2 = shift_only_norm(channels_out, batchnorm_momentum)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


def dirac_conv(channels_in, channels_out):
    """A bias-free 3x3 convolution whose first filters start as the identity: the block starts near a pass-through."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
    nn.init.dirac_(conv.weight.data[:channels_in])
    return conv


def shift_only_norm(channels, momentum):
    """BatchNorm that learns a shift only (the following convolution can scale); eps as airbench's."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


class Airbench(nn.Module):
    """4th try: the layout of airbench (Keller Jordan, 2024), the fastest CIFAR-10 trainer, at widths a CPU affords.

    A frozen 2x2 whitening convolution (fit_to_data sets it from the training images), then three
    blocks of two convolutions each, global max-pooling and a linear layer whose outputs are scaled down.
    """

    # When a try sets none of them (params.yaml's 4th try sets each): airbench94's widths scaled down to what a
    # CPU affords, and airbench94's BatchNorm momentum (its 0.6 is the running statistics' share: torch counts
    # the new batch's) and scaling of the logits (1/9).
    WIDTHS = (32, 64, 128)
    BATCHNORM_MOMENTUM = 0.4
    LOGIT_DIVISOR = 9
    WHITENING_EPS = 5e-4  # added to the patch covariance's eigenvalues: keeps near-constant directions finite

    def __init__(self, num_classes=10, widths=WIDTHS, batchnorm_momentum=BATCHNORM_MOMENTUM,
                 logit_divisor=LOGIT_DIVISOR):  # fmt: skip
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2)  # 2 x (3 channels x 2 x 2): each whitened direction and its opposite
        self.whiten.weight.requires_grad_(False)
        self.block1 = ConvGroup(24, widths[0], batchnorm_momentum)
        self.block2 = ConvGroup(widths[0], widths[1], batchnorm_momentum)
        self.block3 = ConvGroup(widths[1], widths[2], batchnorm_momentum)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_divisor = logit_divisor

    def forward(self, x):  # (B, 3, 32, 32)
        x = F.gelu(self.whiten(x))  # (B, 24, 31, 31)
        x = self.block1(x)  # (B, w1, 15, 15)
        x = self.block2(x)  # (B, w2, 7, 7)
        x = self.block3(x)  # (B, w3, 3, 3)
        x = F.max_pool2d(x, x.shape[-1]).flatten(1)  # (B, w3)
        return self.head(x) / self.logit_divisor  # smaller logits at the start train better with a high lr

    @torch.no_grad()
    def fit_to_data(self, images):
        """Sets the whitening filters from normalised training images (N, 3, H, W): the covariance's eigenvectors.

        Each 2x2 patch is projected on the eigenvectors of the patch covariance, scaled by one over
        the square root of their eigenvalue, so the first layer's outputs are decorrelated, unit-variance.
        The images must be on the CPU (stages.train.fit_first_layer puts them there): the fit runs in
        float64, which Apple's MPS lacks (as it lacks eigh), and so gives the same filters whatever
        device trains.
        """
        channels, (height, width) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.unfold(2, height, 1).unfold(3, width, 1).transpose(1, 3)
        patches = patches.reshape(-1, channels * height * width).double()
        values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (vectors.T / torch.sqrt(values + self.WHITENING_EPS).view(-1, 1)).flip(0)
        filters = filters.reshape(-1, channels, height, width).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))


# Names as params.yaml gives them; stages.params.MODEL_OPTIONS lists the same (a test keeps them in step).
MODELS = {"lenet": LeNet, "lenet2": LeNet2, "lenet2_bn": LeNet2BN, "airbench": Airbench}


def build_model(name, num_classes=10, **options):
    """A fresh model of MODELS; options (widths, ...) only those the model takes, and None means its default."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    options = {key: value for key, value in options.items() if value is not None}
    refused = sorted(options.keys() - model_options(name))
    if refused:
        taking = ", ".join(other for other in MODELS if refused[0] in model_options(other))
        raise ValueError(
            f"model {name!r} does not take {refused[0]}; " + (f"only {taking} does" if taking else "no model does")
        )
    return MODELS[name](num_classes, **options)


def build_model_for(config, num_classes=10):
    """The model a try's config names, built with the keys of the config that the model takes."""
    name = config["model"]
    return build_model(name, num_classes, **{key: config.get(key) for key in model_options(name)})


def model_options(name):
    """The keys that model name's constructor takes besides num_classes (widths, ...)."""
    return inspect.signature(MODELS[name]).parameters.keys() - {"num_classes"}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
