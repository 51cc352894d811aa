"""The post's training loop, transcribed: its networks as written, its data pipeline, its epoch.

The benchmark times this against the pipeline. Only what the post does goes here,
bugs that cost no time included (no model.eval(), loss and accuracy summed over batches).
For a try the post does not have (the 4th), the same loop stands for what a user would
otherwise write: torchvision's RandomHorizontalFlip and RandomCrop(32, padding, reflect)
in a DataLoader (`training_transforms`), feeding the pipeline's own model and optimizer.
A try of the post's models that asks for more than the post (flip, translate, another
optimizer or a weight decay) gets it the same way, so that both loops augment and step
alike; the post's loop still leaves out lr schedules, weight averaging and label
smoothing, a few small operations a step.
"""

import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import transforms

from stages.models import LeNet, LeNet2


class PostLeNet(LeNet):
    """LeNet with the post's forward: ReLU before each max-pool, view instead of flatten."""

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 5 * 5 * 50)
        x = F.relu(self.fc1(x))
        x = self.dropout1(x)
        return self.fc2(x)


class PostLeNet2(LeNet2):
    """LeNet2 with the post's forward."""

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 4 * 4 * 64)
        x = F.relu(self.fc1(x))
        x = self.dropout1(x)
        return self.fc2(x)


POST_MODELS = {"lenet": PostLeNet, "lenet2": PostLeNet2}


class PostDataset(torch.utils.data.Dataset):
    """What torchvision's datasets.CIFAR10 hands the DataLoader: a PIL image per item, then the transform."""

    def __init__(self, split, transform):
        self.images = split.images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3), as CIFAR10 stores them
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


TO_INPUT = [transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]


def post_augmentation(recipe):
    return [
        transforms.RandomHorizontalFlip(recipe["flip_p"]),
        transforms.RandomRotation(recipe["rotation"]),
        transforms.RandomAffine(0, shear=recipe["shear"], scale=tuple(recipe["scale"])),
        transforms.ColorJitter(recipe["brightness"], recipe["contrast"], recipe["saturation"]),
    ]


def training_transforms(recipe, config):
    """torchvision's transforms for the try's training images, in the pipeline's order: the post's Resize (for its
    models), the post's augmentation where the try augments, then a flip and a padded random crop where the try's
    flip and translate ask for them."""
    chain = [transforms.Resize((32, 32))] if config["model"] in POST_MODELS else []
    if config["augment"]:
        chain += post_augmentation(recipe)
    if config["flip"]:
        chain.append(transforms.RandomHorizontalFlip())
    if config["translate"]:
        chain.append(transforms.RandomCrop(32, padding=config["translate"], padding_mode="reflect"))
    return transforms.Compose([*chain, *TO_INPUT])


def post_loaders(train, test, recipe, config):
    """The post's DataLoaders: shuffled training images through training_transforms, test images as the post
    reads them (resized and normalised)."""
    batch_size = config["batch_size"]
    train_set = PostDataset(train, training_transforms(recipe, config))
    test_set = PostDataset(test, transforms.Compose([transforms.Resize((32, 32)), *TO_INPUT]))
    return (
        torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True),
        torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False),
    )


def post_epoch(model, optimizer, train_loader, val_loader, device):
    """One epoch of the post's loop, as written."""
    running_loss, running_correct = 0.0, 0.0
    for inputs, labels in train_loader:
        inputs, labels = inputs.to(device), labels.to(device)
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _, preds = torch.max(outputs, 1)
        running_correct += torch.sum(preds == labels.data)
        running_loss += loss.item()
    with torch.no_grad():
        for val_input, val_label in val_loader:
            val_input, val_label = val_input.to(device), val_label.to(device)
            val_outputs = model(val_input)
            running_loss += F.cross_entropy(val_outputs, val_label).item()
            running_correct += torch.sum(torch.max(val_outputs, 1)[1] == val_label.data)
