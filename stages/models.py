"""The post's two networks, registered by the names params.yaml uses.

Each convolution is followed by max-pooling, then ReLU: the post applies ReLU first,
but ReLU keeps the order of values, so both give the same outputs and the same
gradients bit for bit (tests/test_models.py checks it), and ReLU on the pooled
map touches a quarter of the values.
"""

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


MODELS = {"lenet": LeNet, "lenet2": LeNet2}


def build_model(name, num_classes=10):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](num_classes)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
