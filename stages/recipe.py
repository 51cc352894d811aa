"""The training recipe's ingredients, each a small piece that the loop in stages/loop.py calls.

Every ingredient has a key in params.yaml's `train` section whose default leaves it out, so the
post's tries train exactly as they always did:
  optimizer, momentum, nesterov, weight_decay, norm_bias_lr   build_optimizer
  muon_lr, muon_momentum                                       Muon (the convolution filters' own optimizer)
  warmup, lr_start, lr_end                                     LrSchedule (a linear warm-up, then a linear decay)
  label_smoothing                                              the loss, in train_one_epoch
  lookahead                                                    Lookahead (weight averaging)
  tta                                                          predict (test-time augmentation)
"""

import torch
from torch.nn import functional as F

LOOKAHEAD_EVERY = 5  # optimizer steps between two averagings: each costs a pass over every weight
# Newton-Schulz steps that orthogonalise a Muon update, and the quintic's coefficients (airbench94_muon):
# chosen to push every singular value towards 1 in few steps, stopping near rather than at it.
ORTHOGONALISE_STEPS = 3
ORTHOGONALISE_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def build_optimizer(config, model):
    """The optimizer of config over model's trainable parameters.

    With muon_lr > 0 the convolution filters (4-D weights) take Muon's steps (see Muon) and every other
    parameter config's optimizer's; otherwise config's optimizer takes them all.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config["muon_lr"] == 0:
        return plain_optimizer(config, model, trainable)
    filters = [p for _, p in trainable if p.ndim == 4]
    rest = [(name, p) for name, p in trainable if p.ndim != 4]
    muon = Muon(filters, lr=config["muon_lr"], momentum=config["muon_momentum"])
    return Optimizers(plain_optimizer(config, model, rest), muon)


def plain_optimizer(config, model, named_parameters):
    """config's optimizer (adam, adamw or sgd) over named_parameters, pairs (name in model, parameter).

    With norm_bias_lr != 1, the biases of the normalisation layers (all that Airbench's norms train)
    get their own group with lr multiplied by it and weight decay divided by it, so that with sgd or
    adamw the decay's pull per step, lr x weight_decay, is the same for every parameter (airbench's
    bias_scaler).
    airbench94_muon also gives its whitening layer's bias that lr; on the 4th try that did not help (README).
    Not fused: on a 2-core CPU fused Adam saves ~5% of the model step but leaves the augmentation
    that follows it 20-30% slower, and it rounds differently from the results recorded so far.
    """
    lr, decay, scale = config["lr"], config["weight_decay"], config["norm_bias_lr"]
    norm_biases = [p for name, p in named_parameters if is_norm_bias(model, name)]
    if scale == 1 or not norm_biases:
        groups = [{"params": [p for _, p in named_parameters]}]
    else:
        others = [p for name, p in named_parameters if not is_norm_bias(model, name)]
        groups = [{"params": norm_biases, "lr": lr * scale, "weight_decay": decay / scale}, {"params": others}]
    if config["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=decay)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    return torch.optim.SGD(groups, lr=lr, momentum=config["momentum"], nesterov=config["nesterov"], weight_decay=decay)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024), as airbench94_muon uses it for the convolution filters.

    Each step takes the filter's Nesterov momentum, reshaped to (out channels, everything else), and
    orthogonalises it (every singular value near 1), so that every direction of the update moves
    about as far, however the gradient's scale is spread. The filter is first scaled back to a norm
    of sqrt(out channels): its size stays put, only its direction learns, and no weight decay is needed.
    """

    def __init__(self, params, lr, momentum):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                momentum.mul_(group["momentum"]).add_(p.grad)
                nesterov = p.grad.add(momentum, alpha=group["momentum"])
                p.mul_(len(p) ** 0.5 / p.norm())
                update = orthogonalise(nesterov.reshape(len(p), -1)).view(p.shape)
                p.add_(update, alpha=-group["lr"])


def orthogonalise(matrix, eps=1e-7):
    """matrix (m, n) with its singular values moved near 1 by Newton-Schulz steps: about U V^T of its SVD.

    Three steps take every singular value above 1/56 of the matrix's Frobenius norm to between 0.68
    and 1.21; smaller ones stay smaller, which costs the update little (airbench94_muon).
    """
    a, b, c = ORTHOGONALISE_COEFFICIENTS
    wide = matrix.size(0) <= matrix.size(1)
    x = matrix if wide else matrix.T  # x @ x.T is the smaller Gram matrix
    x = x / (x.norm() + eps)  # every singular value <= 1, where the iteration converges
    for _ in range(ORTHOGONALISE_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Optimizers:
    """Two optimizers over disjoint parameters, stepped as one: the lr schedule sees both's groups."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.param_groups = [group for optimizer in optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()


def is_norm_bias(model, name):
    module_name, _, kind = name.rpartition(".")
    return kind == "bias" and isinstance(model.get_submodule(module_name), torch.nn.modules.batchnorm._NormBase)


class LrSchedule:
    """lr x a factor per step: from lr_start up to 1 over the first `warmup` share of steps, then down to lr_end.

    Both ramps are linear. With warmup 0 and lr_end 1 the factor is 1 throughout and step() leaves
    the optimizer alone.
    """

    def __init__(self, optimizer, config, total_steps):
        self.optimizer, self.total = optimizer, total_steps
        # At least one step once warmup > 0: a share of a short run that rounds down to none would drop it silently.
        self.warmup_steps = max(int(total_steps * config["warmup"]), 1) if config["warmup"] > 0 else 0
        self.start, self.end = config["lr_start"], config["lr_end"]
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.constant = self.warmup_steps == 0 and self.end == 1
        self.steps = 0

    def factor(self, step):
        """The factor at step (0 = the first optimizer step)."""
        if step < self.warmup_steps:
            fraction = step / self.warmup_steps
            return self.start + (1 - self.start) * fraction
        fraction = (step - self.warmup_steps) / max(self.total - 1 - self.warmup_steps, 1)
        return 1 + (self.end - 1) * fraction

    def step(self):
        """Sets every group's lr for the optimizer's next step."""
        if not self.constant:
            factor = self.factor(self.steps)
            for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
                group["lr"] = base * factor
        self.steps += 1


class Lookahead:
    """Weight averaging: every LOOKAHEAD_EVERY steps the model's weights are pulled back to a running average.

    The average follows the weights with a decay that starts near 0 (it just copies them) and
    rises to decay**LOOKAHEAD_EVERY as the cube of the share of training done (airbench's
    schedule), so the end of training averages over more steps. The model then continues from the
    average. The last step makes the model the average for good.
    """

    def __init__(self, model, decay, total_steps):
        self.model, self.decay, self.total = model, decay, total_steps
        self.average = {k: v.detach().clone() for k, v in self.state().items()}
        self.steps = 0

    def state(self):
        # Weights and BatchNorm's running statistics; not its integer batch count.
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def step(self):
        """Called after each optimizer step."""
        self.steps += 1
        if self.steps % LOOKAHEAD_EVERY == 0:
            self.pull(self.decay**LOOKAHEAD_EVERY * (self.steps / self.total) ** 3)
        if self.steps == self.total:
            self.pull(1.0)

    @torch.no_grad()
    def pull(self, decay):
        """average <- decay x average + (1 - decay) x weights, then weights <- average."""
        for average, current in zip(self.average.values(), self.state().values(), strict=True):
            average.lerp_(current, 1 - decay)
            current.copy_(average)


def predict(model, inputs, tta):
    """Logits of model on normalised inputs (B, 3, H, W), averaged over the test-time views tta names.

    flip: the image and its mirror image. flip_translate: those, averaged half and half with the
    same pair shifted one pixel up-left and one pixel down-right (reflect padding), as airbench does.
    Views are averaged in float32, also where autocast computes them in bfloat16 (8-bit mantissas).
    """
    if tta == "none":
        return model(inputs)
    logits = mirrored_mean(model, inputs)
    if tta == "flip_translate":
        _, _, height, width = inputs.shape
        padded = F.pad(inputs, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :height, :width], padded[:, :, 2:, 2:]]
        logits = 0.5 * logits + 0.25 * sum(mirrored_mean(model, view) for view in shifted)
    return logits


def mirrored_mean(model, inputs):
    return 0.5 * (model(inputs).float() + model(inputs.flip(-1)).float())
