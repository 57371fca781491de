"""Meta-testing: a trained ANML (or a treatment) learns N unseen classes in sequence with Adam on its fc layer alone,
then is tested.

NM and RLN are frozen, so each drawing's gated features RLN(x) * NM(x) (for a treatment, whatever its fc layer reads:
model.features) are fixed for a given model: they are computed once, and the training phase (test-train, in the
paper's code) is Adam on the fc layer over those features; the test phase (test-test) classifies held-out drawings
with the trained fc layer.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoints import read_cache, save_atomic
from datasets import Omniglot, sample_meta_test
from datasets.omniglot import cache_dir
from model import Network

@torch.no_grad()
def gated_features(model: Network, data: Omniglot, batch_size: int = 500) -> torch.Tensor:
    """model.features of every drawing of `data` (an ANML's RLN(x) * NM(x)), [N, fc inputs], on the model's device."""
    device = next(model.parameters()).device
    chunks = torch.arange(len(data.labels)).split(batch_size)
    return torch.cat([model.features(data.batch(c)[0].to(device))
                      for c in tqdm(chunks, desc="features", leave=False)])


def cached_features(checkpoint: Path, model: Network, data: Omniglot) -> torch.Tensor:
    """gated_features, kept on disk under a key of the checkpoint's bytes and the data set's."""
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:20]
    path = cache_dir() / f"features-{digest}-{data.key}.pt"
    device = next(model.parameters()).device
    features = read_cache(path)
    if isinstance(features, torch.Tensor) and features.shape == (len(data.labels), model.fc.in_features):
        return features.to(device)
    features = gated_features(model, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(features.cpu(), path)
    return features


class MetaTestRuns(NamedTuple):
    """Independent meta-test runs: per run the test and train accuracy (each the mean over its classes, and per class
    in the order the classes came), and the trained fc layer."""
    test_accuracy: torch.Tensor  # [runs]
    train_accuracy: torch.Tensor  # [runs]
    weight: torch.Tensor  # [runs, 1000, mask_size]
    bias: torch.Tensor  # [runs, 1000]
    test_by_class: torch.Tensor  # [runs, classes]
    train_by_class: torch.Tensor  # [runs, classes]
    so_far: torch.Tensor  # [runs, points]: with record_every K, test accuracy on the classes learned so far


ORDERS = ("sequential", "iid")


def training_order(n_classes: int, n_train: int, order: str = "sequential", epochs: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The test-train steps of one run, as indices into its training drawings taken class after class
    ([classes * n_train]): "sequential", class after class, the whole sequence again each epoch (as the original ANML
    code's --epoch repeats it); "iid", the i.i.d. oracle, the same drawings in a fresh random order each epoch (as
    its --iid shuffles them). Only "iid" draws from `generator`."""
    drawings = n_classes * n_train
    if order == "sequential":
        return torch.arange(drawings).repeat(epochs)
    return torch.cat([torch.randperm(drawings, generator=generator) for _ in range(epochs)])


def fresh_fc_weight(model: Network, generator: torch.Generator) -> torch.Tensor:
    """The fc weight re-drawn Kaiming-normal, on the model's device (the bias stays as loaded)."""
    weight = torch.empty(model.fc.weight.shape)
    nn.init.kaiming_normal_(weight, generator=generator)
    return weight.to(model.fc.weight.device)


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the reference's Adam(lr=lr) uses


def fc_adam_step(weight: torch.Tensor, bias: torch.Tensor, moments: tuple[torch.Tensor, ...], logits: torch.Tensor,
                 x: torch.Tensor, label: torch.Tensor, x_next: torch.Tensor, step_size: torch.Tensor,
                 bias_correction2_sqrt: torch.Tensor) -> torch.Tensor:
    """One Adam step of fc layers on the cross-entropy of one drawing each; returns the logits of the next drawing.

    weight [runs, 1000, mask_size], bias [runs, 1000] and moments (Adam's exp_avg and exp_avg_sq of the weight,
    then of the bias) are updated in place as torch.optim.Adam updates them; logits [runs, 1000] are the fc
    layers' outputs for x [runs, mask_size], whose classes are label [runs]; step_size is lr / (1 - beta1**step).
    """
    beta1, beta2 = ADAM_BETAS
    grad_bias = torch.softmax(logits, -1) - F.one_hot(label, logits.shape[-1])
    grad_weight = grad_bias.unsqueeze(-1) * x.unsqueeze(-2)
    for param, grad, exp_avg, exp_avg_sq in ((weight, grad_weight, *moments[:2]), (bias, grad_bias, *moments[2:])):
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + ADAM_EPS))
    return (weight * x_next.unsqueeze(-2)).sum(-1) + bias


# Each step is bound by memory traffic over the fc weights and Adam's moments (37 MB a run). Compiled, the step is
# one loop that reads each of weight, exp_avg and exp_avg_sq once and writes it once, the gradient made on the fly
# and the next logits summed from the new weights on the way: 6 passes, against 9 for eager PyTorch (the logits,
# the gradient written out, then fused Adam's reads and writes).
_compiled_fc_adam_step = torch.compile(fc_adam_step, fullgraph=True, dynamic=False)


@torch.no_grad()
def train_fc(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
             lr: float, order: torch.Tensor | None = None, every: int = 0,
             record: Callable[[int], None] | None = None) -> None:
    """The training phase (test-train): Adam on fc layers, one step per drawing (batch of 1) on the
    cross-entropy, in each run's order: class after class, unless `order` says otherwise.

    Independent runs advance together, each strictly in its own order: weight [runs, 1000, mask_size] and
    bias [runs, 1000] are trained in place; features [runs, classes, drawings, mask_size], class by class; labels
    [runs, classes]; order [runs, steps], each step's drawing as an index into the run's drawings taken class after
    class (training_order), by default each drawing once, class after class. With `every`, record(steps done) is
    called after every `every` steps, the weights as they then are.
    """
    moments = tuple(torch.zeros_like(t) for t in (weight, weight, bias, bias))
    flat_features = features.flatten(1, 2)
    flat_labels = labels.repeat_interleave(features.shape[2], 1)
    if order is not None:
        order = order.to(features.device)
        flat_features = flat_features.gather(1, order.unsqueeze(2).expand(-1, -1, features.shape[3]))
        flat_labels = flat_labels.gather(1, order)
    # Contiguous per step: compiled code is specialised to its inputs' strides, and a run-major slice's stride
    # depends on the class count, which made every class count of a sweep compile anew (past dynamo's limit of 8).
    xs = flat_features.transpose(0, 1).contiguous().unbind()
    ys = flat_labels.t().contiguous().unbind()
    # Adam's bias corrections, in float64 as torch.optim.Adam computes them; here rather than in the step, where the
    # compiled loop recomputed them for every element (2-4x slower); on the device, so that no step waits for a copy.
    steps = torch.arange(1, len(xs) + 1, dtype=torch.float64)
    beta1, beta2 = ADAM_BETAS
    step_sizes = (lr / (1 - beta1 ** steps)).float().to(weight.device).unbind()
    corrections = ((1 - beta2 ** steps).sqrt()).float().to(weight.device).unbind()
    next_xs = (*xs[1:], torch.zeros_like(xs[0]))  # the last step's next logits go unused
    logits = torch.baddbmm(bias.unsqueeze(2), weight, xs[0].unsqueeze(2)).squeeze(2)
    for t in tqdm(range(len(xs)), desc="test-train steps", leave=False, mininterval=1):
        logits = _compiled_fc_adam_step(weight, bias, moments, logits, xs[t], ys[t], next_xs[t], step_sizes[t],
                                        corrections[t])
        if every and (t + 1) % every == 0:
            record(t + 1)


@torch.no_grad()
def fc_accuracy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The test phase (test-test): accuracy of each run's fc layer on its [classes, drawings, mask_size] features,
    per class (the run's mean is their mean). Shapes as in train_fc; returns [runs, classes]."""
    logits = torch.baddbmm(bias.unsqueeze(1), features.flatten(1, 2), weight.transpose(1, 2))
    correct = logits.argmax(-1).view(features.shape[:3]) == labels.unsqueeze(2)
    return correct.float().mean(2)


def meta_test_runs(model: Network, features: torch.Tensor, data: Omniglot, n_classes: int, lr: float,
                   seeds: list[int], n_train: int = 15, order: str = "sequential", epochs: int = 1,
                   record_every: int = 0) -> MetaTestRuns:
    """Meta-test runs on precomputed features, one per seed, in the given order (training_order) for `epochs`; with
    record_every K (sequential, one epoch), also the test accuracy on the classes learned so far after every K classes.

    A run's seed fixes its classes, their order, the splits, the drawing order, the fc initialisation and an i.i.d.
    run's shuffles, so a run's numbers do not depend on which runs go with it; a sequential run draws nothing more
    than it did before orders and epochs existed.
    """
    train_idx, test_idx, weights, orders = [], [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        train, test = sample_meta_test(data, n_classes, n_train, generator)
        train_idx.append(train)
        test_idx.append(test)
        weights.append(fresh_fc_weight(model, generator))
        orders.append(training_order(n_classes, n_train, order, epochs, generator))
    train_idx, test_idx = torch.stack(train_idx).to(features.device), torch.stack(test_idx).to(features.device)
    weight, bias = torch.stack(weights), model.fc.bias.detach().expand(len(seeds), -1).clone()
    labels = data.labels.to(features.device)[train_idx[:, :, 0]]
    orders = torch.stack(orders)
    test, train = torch.empty(len(seeds), n_classes), torch.empty(len(seeds), n_classes)
    so_far = torch.empty(len(seeds), n_classes // record_every if record_every else 0)
    # On a GPU a step of one run is too small to fill the device: the runs advance together and share each
    # step's kernel launches; on a CPU one run at a time was faster (measured 1.1-1.5x, with the eager step before
    # fc_adam_step was compiled): more of its 37 MB of weights, gradient and moments stays in cache between steps.
    batch = len(seeds) if features.device.type == "cuda" else 1
    for start in range(0, len(seeds), batch):
        runs = slice(start, start + batch)
        train_features, test_features = features[train_idx[runs]], features[test_idx[runs]]

        def record(steps: int) -> None:
            learned = steps // n_train
            so_far[runs, learned // record_every - 1] = fc_accuracy(
                weight[runs], bias[runs], test_features[:, :learned], labels[runs, :learned]).mean(1).cpu()
        train_fc(weight[runs], bias[runs], train_features, labels[runs], lr, orders[runs], record_every * n_train,
                 record)
        test[runs] = fc_accuracy(weight[runs], bias[runs], test_features, labels[runs]).cpu()
        train[runs] = fc_accuracy(weight[runs], bias[runs], train_features, labels[runs]).cpu()
    return MetaTestRuns(test.mean(1), train.mean(1), weight, bias, test, train, so_far)


LEARN = ("fc", "inner", "all")


def learned_parameters(model: Network, learn: str) -> list[nn.Parameter]:
    """What learns at meta-test: "fc" (the paper's ANML protocol, OML-OLFT), "inner" (what meta-training's inner loop
    adapts: an ANML's RLN + fc, all of an SANML, OML's PLN) or "all" (everything, NM included: Scratch's)."""
    if learn == "fc":
        return list(model.fc.parameters())
    return model.inner_parameters() if learn == "inner" else list(model.parameters())


class PlainRun(NamedTuple):
    test_accuracy: float
    train_accuracy: float
    fc: nn.Linear
    test_by_class: list[float]
    train_by_class: list[float]
    so_far: list[float]  # with record_every K: the test accuracy on the classes learned so far, every K classes


def plain_meta_test_run(model: Network, data: Omniglot, n_classes: int, lr: float, n_train: int = 15,
                        seed: int = 0, order: str = "sequential", epochs: int = 1, record_every: int = 0,
                        learn: str = "fc") -> PlainRun:
    """A meta-test run written as the spec states it: the whole model, one torch.optim.Adam step per drawing on what
    `learn` says (the rest frozen; the fc weight re-drawn first), in the order given. Modifies `model`.

    With learn "fc" it is what meta_test_runs computes faster, and the tests check one against the other; the other
    sets of parameters run this way, a plain PyTorch step each. Draws its randomness in the order of meta_test_runs:
    the splits, the fc weight, then an i.i.d. run's shuffles.
    """
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = sample_meta_test(data, n_classes, n_train, generator)
    weight = torch.empty(model.fc.weight.shape)
    nn.init.kaiming_normal_(weight, generator=generator)
    steps = train_idx.flatten()[training_order(n_classes, n_train, order, epochs, generator)]
    device = model.fc.weight.device
    with torch.no_grad():
        model.fc.weight.copy_(weight)
    learned = learned_parameters(model, learn)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in learned:
        p.requires_grad_(True)

    def accuracy(indices) -> list[float]:
        with torch.no_grad():
            return [(model(data.batch(c)[0].to(device)).argmax(1).cpu() == data.labels[c]).float().mean().item()
                    for c in indices]

    opt, so_far = torch.optim.Adam(learned, lr=lr), []
    for done, i in enumerate(tqdm(steps, desc="test-train steps", leave=False, mininterval=1), 1):
        x, y = data.batch(i.view(1))
        opt.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        if record_every and done % (record_every * n_train) == 0:
            so_far.append(float(np.mean(accuracy(test_idx[:done // n_train]))))
    test, train = accuracy(test_idx), accuracy(train_idx)
    return PlainRun(float(np.mean(test)), float(np.mean(train)), model.fc, test, train, so_far)
