"""The post's networks: layer sizes give the expected parameter counts and output shapes."""

import pytest
import torch
from torch.nn import functional as F

from benchmarks.post_loop import POST_MODELS
from stages.models import MODELS, build_model, count_parameters

# Counted by hand from the post's layers: conv weights + biases, then fc weights + biases.
EXPECTED_PARAMETERS = {
    "lenet": (3 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (1250 * 500 + 500) + (500 * 10 + 10),
    "lenet2": (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (1024 * 500 + 500) + (500 * 10 + 10),
}


@pytest.mark.parametrize("name", MODELS)
def test_model_maps_a_batch_of_images_to_ten_logits(name):
    model = build_model(name)
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]


@pytest.mark.parametrize("name", MODELS)
def test_dropout_is_active_in_training_and_off_in_eval(name):
    torch.manual_seed(0)
    model, images = build_model(name), torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    assert torch.equal(model(images), model(images))


def test_an_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid models: lenet, lenet2"):
        build_model("vgg")


@pytest.mark.parametrize("name", MODELS)
def test_pooling_before_relu_learns_exactly_what_the_posts_order_learns(name):
    """Outputs and every gradient equal bit for bit, dropout on, ties and negative windows included."""
    torch.manual_seed(0)
    ours, post = build_model(name), POST_MODELS[name]()
    post.load_state_dict(ours.state_dict())
    # Integer-valued inputs make equal values (ties inside pooling windows) common.
    images = torch.randint(-2, 3, (16, 3, 32, 32)).float()
    labels = torch.randint(0, 10, (16,))
    results = []
    for model in (ours, post):
        torch.manual_seed(1)  # the same dropout mask
        outputs = model(images)
        F.cross_entropy(outputs, labels).backward()
        results.append([outputs, *(p.grad for p in model.parameters())])
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)
