"""The recipe's ingredients: the optimizer's groups, the lr schedule, weight averaging, test-time views,
and that each one at its default trains exactly as the code without it."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stages.data import Split
from stages.loop import Updates, build_updates, evaluate, normalise, train_one_epoch
from stages.models import build_model
from stages.params import TRAIN_SCHEMA, load_params
from stages.recipe import Lookahead, LrSchedule, Muon, build_optimizer, orthogonalise, predict
from stages.train import build_augmentation
from tests.conftest import ROOT

DEFAULTS = load_params(ROOT / "params.yaml")["train"]


def sgd_config(**changes):
    return {**DEFAULTS, "optimizer": "sgd", "momentum": 0.9, "lr": 0.1, "weight_decay": 0.01, **changes}


def test_schedule_warms_up_then_decays_linearly():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = LrSchedule(optimizer, sgd_config(warmup=0.25, lr_start=0.2, lr_end=0.1), total_steps=100)
    expected = {0: 0.2, 5: 0.2 + 0.8 * 5 / 25, 25: 1.0, 50: 1 - 0.9 * 25 / 74, 98: 1 - 0.9 * 73 / 74, 99: 0.1}
    for step, factor in expected.items():
        assert schedule.factor(step) == pytest.approx(factor)
    lrs = []
    for _ in range(100):
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.5 * 0.2) and lrs[25] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.5 * 0.1)


def test_a_warm_up_shorter_than_a_step_still_starts_at_lr_start():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = LrSchedule(optimizer, sgd_config(warmup=0.05, lr_start=0.2, lr_end=0.0), total_steps=10)
    assert [schedule.factor(step) for step in (0, 1, 9)] == pytest.approx([0.2, 1.0, 0.0])  # 0.5 of a step: one


def test_the_default_schedule_leaves_the_lr_alone():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.001)
    schedule = LrSchedule(optimizer, DEFAULTS, total_steps=10)
    for _ in range(10):
        schedule.step()
        assert optimizer.param_groups[0]["lr"] == 0.001


def test_norm_biases_get_their_own_lr_and_the_same_decay_per_step():
    model = build_model("airbench")
    optimizer = build_optimizer(sgd_config(norm_bias_lr=64, nesterov=True), model)
    biases, others = optimizer.param_groups
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == norm_biases and len(biases["params"]) == 6
    assert not norm_biases & {id(p) for p in others["params"]}
    assert all(p.requires_grad for p in others["params"]) and id(model.whiten.weight) not in map(id, others["params"])
    assert biases["lr"] == pytest.approx(6.4) and others["lr"] == 0.1 and others["nesterov"]
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])


def test_orthogonalise_moves_every_singular_value_near_1_and_keeps_the_directions():
    generator = torch.Generator().manual_seed(0)
    for shape in [(32, 216), (128, 64)]:  # a filter (out, in x 3 x 3) and a tall matrix
        u, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=generator))
        v, _ = torch.linalg.qr(torch.randn(min(shape), min(shape), generator=generator))
        scales = torch.logspace(0, 1, min(shape))  # singular values from 1 to 10
        matrix = u @ torch.diag(scales) @ v.T
        matrix = matrix if shape[0] > shape[1] else matrix.T
        result = orthogonalise(matrix)
        assert result.shape == matrix.shape
        values = torch.linalg.svdvals(result)
        assert values.min() > 0.6 and values.max() < 1.25, values
        # Same singular vectors: result = U diag(f(s)) V^T with f increasing, so U^T result V is diagonal.
        left, right = (u, v) if shape[0] > shape[1] else (v, u)
        projected = left.T @ result @ right
        assert torch.allclose(projected, torch.diag(torch.diagonal(projected)), atol=1e-4)


def test_muon_renormalises_each_filter_then_steps_along_its_orthogonalised_nesterov_momentum():
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 4, 3, 3, generator=generator))
    optimizer = Muon([weight], lr=0.1, momentum=0.6)
    expected, momentum = weight.detach().clone(), torch.zeros_like(weight)
    for _ in range(3):
        grad = torch.randn(weight.shape, generator=generator)
        weight.grad = grad.clone()
        optimizer.step()
        momentum = 0.6 * momentum + grad
        expected = expected * 8**0.5 / expected.norm()
        expected = expected - 0.1 * orthogonalise((grad + 0.6 * momentum).reshape(8, -1)).view(8, 4, 3, 3)
        assert torch.allclose(weight, expected, atol=1e-6)
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    assert weight.norm().item() == pytest.approx(8**0.5)


def test_with_muon_the_filters_take_muon_steps_and_the_rest_the_optimizer_and_one_schedule_sets_both():
    model = build_model("airbench")
    optimizer = build_optimizer(sgd_config(norm_bias_lr=16, nesterov=True, muon_lr=0.2), model)
    *sgd_groups, muon_group = optimizer.param_groups
    filters = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert [id(p) for p in muon_group["params"]] == [id(p) for p in filters] and len(filters) == 6
    rest = [id(p) for group in sgd_groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(rest + [id(p) for p in filters]) == sorted(trainable) and len(rest) == len(set(rest))
    assert muon_group["lr"] == 0.2 and muon_group["momentum"] == DEFAULTS["muon_momentum"]
    schedule = LrSchedule(optimizer, sgd_config(warmup=0.0, lr_end=0.0), total_steps=5)
    for _ in range(3):
        schedule.step()
    assert muon_group["lr"] == pytest.approx(0.2 * 0.5) and sgd_groups[-1]["lr"] == pytest.approx(0.1 * 0.5)
    inputs = torch.randn(4, 3, 32, 32)
    before = [p.detach().clone() for p in filters]
    F.cross_entropy(model(inputs), torch.arange(4)).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, filters, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_lookahead_pulls_weights_to_their_average_every_5_steps_and_ends_on_it():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    lookahead = Lookahead(model, decay=0.9, total_steps=12)
    weight, average = 0.0, 0.0
    for step in range(1, 13):
        with torch.no_grad():
            model.weight += 1.0  # what an optimizer step might do
        weight += 1.0
        lookahead.step()
        if step % 5 == 0:
            decay = 0.9**5 * (step / 12) ** 3
            average = weight = decay * average + (1 - decay) * weight
        if step == 12:  # the last: the model keeps the average, which has not seen steps 11 and 12
            weight = average
        assert model.weight.item() == pytest.approx(weight), step
    assert 0 < average < 10


class Asymmetric(nn.Module):
    """Logits that tell an image from its mirror image: the left half's mean against the right half's."""

    def forward(self, x):
        left, right = x[..., :16].mean(dim=(1, 2, 3)), x[..., 16:].mean(dim=(1, 2, 3))
        return torch.stack([left, right, x[:, 0, 0, 0]], dim=1)


def test_flip_tta_averages_the_image_and_its_mirror():
    images = torch.randn(4, 3, 32, 32)
    model = Asymmetric()
    assert torch.equal(predict(model, images, "none"), model(images))
    flipped = 0.5 * (model(images) + model(images.flip(-1)))
    assert torch.allclose(predict(model, images, "flip"), flipped)
    assert not torch.allclose(flipped, model(images))
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :32, :32], padded[..., 2:, 2:]]
    views = [images, images.flip(-1)] + [v.flip(-1) if f else v for v in shifted for f in (False, True)]
    weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    expected = sum(w * model(v) for w, v in zip(weights, views, strict=True))
    assert torch.allclose(predict(model, images, "flip_translate"), expected, atol=1e-6)


def test_new_keys_at_their_defaults_train_exactly_as_the_code_without_them():
    """Adam, no label smoothing, a constant schedule, no averaging, no views: the loop as it was, bit for bit."""
    assert build_augmentation(DEFAULTS, None, torch.Generator(), 10) is None
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (130, 3, 32, 32), dtype=torch.uint8, generator=generator)
    split = Split(images, torch.randint(0, 10, (130,), generator=generator))
    results = []
    for with_recipe in (True, False):
        torch.manual_seed(0)
        model = build_model("lenet2")
        if with_recipe:
            updates = build_updates(DEFAULTS, model, total_steps=9)
            extra = {"label_smoothing": DEFAULTS["label_smoothing"]}
        else:
            updates, extra = Updates(torch.optim.Adam(model.parameters(), lr=DEFAULTS["lr"])), {}
        order = torch.Generator().manual_seed(1)
        fit = [train_one_epoch(model, updates, split, 50, order, **extra) for _ in range(3)]
        if with_recipe:
            predictions = evaluate(model, split, tta=DEFAULTS["tta"])["predictions"]
        else:
            model.eval()
            with torch.no_grad():
                predictions = model(normalise(images)).argmax(1)
        results.append((fit, predictions, [p.detach().clone() for p in model.parameters()]))
    (fit_a, predictions_a, weights_a), (fit_b, predictions_b, weights_b) = results
    assert fit_a == fit_b and torch.equal(predictions_a, predictions_b)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))


def test_every_new_train_key_defaults_to_leaving_its_ingredient_out():
    new = {"nesterov": False, "norm_bias_lr": 1.0, "muon_lr": 0.0, "warmup": 0.0, "lr_start": 1.0, "lr_end": 1.0,
           "label_smoothing": 0.0, "lookahead": 0.0, "flip": False, "translate": 0, "tta": "none"}  # fmt: skip
    assert {key: DEFAULTS[key] for key in new} == new and set(new) <= set(TRAIN_SCHEMA)
