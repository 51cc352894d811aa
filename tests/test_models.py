"""The networks: layer sizes give the expected parameter counts and output shapes; the 4th try's whitening."""

import pytest
import torch
from torch.nn import functional as F

from benchmarks.post_loop import POST_MODELS
from stages.models import MODELS, Airbench, build_model, count_parameters

# Counted by hand from the post's layers: conv weights + biases, then fc weights + biases.
EXPECTED_PARAMETERS = {
    "lenet": (3 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (1250 * 500 + 500) + (500 * 10 + 10),
    "lenet2": (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (1024 * 500 + 500) + (500 * 10 + 10),
}
EXPECTED_PARAMETERS["lenet2_bn"] = EXPECTED_PARAMETERS["lenet2"] + 2 * (16 + 32 + 64)  # BatchNorm's scale and shift


def airbench_parameters(widths):
    """Whitening 2x2 conv and bias; per block, two bias-free 3x3 convs with a BatchNorm (scale, shift) each; the head"""
    blocks = zip((24, *widths[:-1]), widths, strict=True)
    return (
        (24 * 3 * 4 + 24)
        + sum(9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out for c_in, c_out in blocks)
        + 10 * widths[-1]
    )


EXPECTED_PARAMETERS["airbench"] = airbench_parameters(Airbench.WIDTHS)
WITH_DROPOUT = ["lenet", "lenet2", "lenet2_bn"]


@pytest.mark.parametrize("name", MODELS)
def test_model_maps_a_batch_of_images_to_ten_logits(name):
    model = build_model(name)
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]


@pytest.mark.parametrize("name", WITH_DROPOUT)
def test_dropout_is_active_in_training_and_off_in_eval(name):
    torch.manual_seed(0)
    model, images = build_model(name), torch.randn(8, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    assert torch.equal(model(images), model(images))


def test_an_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid models: lenet, lenet2, lenet2_bn, airbench"):
        build_model("vgg")


@pytest.mark.parametrize("name", POST_MODELS)
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


def test_airbench_shapes_and_what_it_trains():
    model = build_model("airbench")
    x = torch.zeros(2, 3, 32, 32)
    assert model.whiten(x).shape == (2, 24, 31, 31)
    assert model.block1(model.whiten(x)).shape == (2, Airbench.WIDTHS[0], 15, 15)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "whiten.weight" not in trainable and "block1.norm1.weight" not in trainable
    assert {"whiten.bias", "block1.norm1.bias", "block3.conv2.weight", "head.weight"} <= trainable


def test_airbench_takes_the_widths_a_try_sets_and_other_models_refuse_them():
    model = build_model("airbench", widths=[16, 32, 48])
    assert count_parameters(model) == airbench_parameters((16, 32, 48))
    assert model.block3(model.block2(model.block1(model.whiten(torch.zeros(2, 3, 32, 32))))).shape == (2, 48, 3, 3)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="model 'lenet2' does not take widths; only airbench does"):
        build_model("lenet2", widths=[16, 32, 64])


def test_airbench_takes_its_batchnorm_momentum_and_logit_divisor():
    images = torch.randn(4, 3, 32, 32)
    outputs = []
    for divisor in (9, 3):
        torch.manual_seed(0)
        model = build_model("airbench", batchnorm_momentum=0.1, logit_divisor=divisor)
        outputs.append(model(images))
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(norms) == 6 and {norm.momentum for norm in norms} == {0.1}
    assert torch.allclose(outputs[1], outputs[0] * 3)
    with pytest.raises(ValueError, match="model 'lenet' does not take logit_divisor; only airbench does"):
        build_model("lenet", logit_divisor=9)


def test_whitening_decorrelates_the_training_patches():
    torch.manual_seed(0)
    mixing = torch.randn(3, 3)
    noise = torch.einsum("ij,njhw->nihw", mixing, torch.randn(200, 3, 32, 32))  # channels correlated
    images = noise + 0.7 * noise.roll(1, dims=-1)  # and neighbouring pixels
    model = build_model("airbench")
    model.fit_to_data(images)
    with torch.no_grad():
        outputs = F.conv2d(images, model.whiten.weight[:12])  # the second 12 filters are the first negated
    flat = outputs.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])
