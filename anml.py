"""ANML: meta-training (a differentiable inner loop with `higher`, an Adam outer step) and meta-testing."""
from __future__ import annotations

import csv
import ctypes
import hashlib
import logging
import os
import random
import signal
from typing import NamedTuple
from pathlib import Path

import higher
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datasets import Omniglot, sample_meta_test, sample_meta_train
from datasets.omniglot import cache_dir
from model import ANML, Plastic, checkpoint_name, load_anml, parse_checkpoint_name

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """cuda where available unless told otherwise; asking for a missing CUDA is an error, not a fallback."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("-d cuda was asked for, but PyTorch sees no CUDA device here; use -d cpu")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing large blocks back to the OS.

    A meta-step, or a batch of feature extraction, allocates and frees activations of tens of MB; by default
    glibc maps each afresh, and the page faults cost about a sixth of a meta-step and a third of feature
    extraction on a CPU. Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed blocks
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def lobotomize(model: ANML, cls: int) -> None:
    """Re-draw the fc row of one class so the network cannot have memorised it."""
    with torch.no_grad():
        nn.init.kaiming_normal_(model.fc.weight[cls].unsqueeze(0))


def meta_step(model: ANML, outer_opt: torch.optim.Optimizer,
              traj_ims: torch.Tensor, traj_labels: torch.Tensor,
              remember_ims: torch.Tensor, remember_labels: torch.Tensor,
              inner_lr: float = 0.1) -> tuple[float, float]:
    """One meta-training iteration (after the lobotomy); returns the outer loss and accuracy.

    Inner loop: one SGD step on RLN + fc per trajectory drawing, kept differentiable. Outer step: the
    adapted network's loss on trajectory + remember set, back-propagated through the inner loop into
    NM, RLN and fc, then one step of `outer_opt`.
    """
    ims = torch.cat([traj_ims, remember_ims])
    labels = torch.cat([traj_labels, remember_labels])
    # The inner loop does not update the NM, so each image's gate is the same at every step: compute it
    # once, outside the differentiable copy. Its gradient still reaches the NM through the gates, while
    # each inner step differentiates only RLN + fc, not the whole unrolled history.
    gates = model.nm(ims)
    plastic = Plastic(model)
    inner_opt = torch.optim.SGD(plastic.parameters(), lr=inner_lr)
    with higher.innerloop_ctx(plastic, inner_opt, copy_initial_weights=False) as (fplastic, diffopt):
        for i in range(len(traj_ims)):
            step = slice(i, i + 1)
            diffopt.step(F.cross_entropy(fplastic(traj_ims[step], gates[step]), traj_labels[step]))
        logits = fplastic(ims, gates)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()


# Meta-batches across workers: under torchrun each worker runs its own task; the meta-gradients are averaged
# before one identical Adam step, and every re-drawn fc row is shared, so all workers hold the same weights.

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def share_lobotomies(model: ANML, cls: int) -> None:
    """Give every worker the fc row each worker re-drew for its own class (in rank order where classes repeat)."""
    if world_size() == 1:
        return
    weight = model.fc.weight
    classes = [torch.empty(1, dtype=torch.long, device=weight.device) for _ in range(world_size())]
    rows = [torch.empty_like(weight[0]) for _ in range(world_size())]
    dist.all_gather(classes, torch.tensor([cls], device=weight.device))
    dist.all_gather(rows, weight[cls].detach().clone())
    with torch.no_grad():
        for c, row in zip(classes, rows):
            weight[int(c)] = row


def _average_gradients(optimizer: torch.optim.Optimizer, *_) -> None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def outer_optimizer(model: ANML, lr: float) -> torch.optim.Adam:
    """Adam over all of the ANML; under torch.distributed it first averages the gradients across workers."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if world_size() > 1:
        opt.register_step_pre_hook(_average_gradients)
    return opt


def state_path(checkpoint: Path) -> Path:
    """The optimizer/iteration/RNG file that sits beside a checkpoint."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".pth") + ".state.pth")


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)), "numpy_pos": int(numpy_state[2]),
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate(state["python"])


def save_checkpoint(model: ANML, outer_opt: torch.optim.Optimizer, out_dir: Path, iteration: int,
                    settings: dict) -> Path:
    """The weights as a plain state_dict, and beside them what --resume needs; both written atomically.

    Under torch.distributed every worker must call it (it gathers each worker's random state); rank 0 writes.
    """
    path = Path(out_dir) / checkpoint_name(settings["rln"], settings["nm"], settings["mask"], iteration)
    rng = [_rng_state()]
    if world_size() > 1:
        rng = [None] * world_size()
        dist.all_gather_object(rng, _rng_state())
    if rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        # State first: weights without their state file cannot be resumed; a state file without weights is inert.
        _save_atomic({"iteration": iteration, "optimizer": outer_opt.state_dict(), "rng": rng,
                      "settings": settings}, state_path(path))
        _save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def new_run(settings: dict, device: torch.device) -> tuple[ANML, torch.optim.Optimizer]:
    """A freshly initialised ANML and its outer optimizer, every generator seeded from settings["seed"].

    Under torch.distributed every worker starts from the same weights, then draws its tasks from a stream of
    its own (rank 0's is the single-process stream).
    """
    seed_everything(settings["seed"])
    model = ANML(settings["rln"], settings["nm"], settings["mask"]).to(device)
    if rank() > 0:
        seed_everything(int(np.random.SeedSequence([settings["seed"], rank()]).generate_state(1)[0]))
    return model, outer_optimizer(model, settings["outer_lr"])


def load_resume(checkpoint: Path, device: torch.device) -> tuple[ANML, torch.optim.Optimizer, int, dict]:
    """The model, outer optimizer, next iteration and settings of a run saved by save_checkpoint.

    Restores the random-number generators too, so the run continues exactly as if it had not stopped.
    """
    checkpoint = Path(checkpoint)
    model = load_anml(checkpoint, device)
    if not state_path(checkpoint).is_file():
        raise FileNotFoundError(f"{state_path(checkpoint)} is missing: --resume needs the state file saved beside "
                                "the checkpoint; start a fresh run instead")
    state = torch.load(state_path(checkpoint), map_location="cpu", weights_only=True)
    if state["iteration"] != parse_checkpoint_name(checkpoint)[3]:
        raise ValueError(f"{state_path(checkpoint)} belongs to iteration {state['iteration']}, not to {checkpoint.name}")
    if len(state["rng"]) != world_size():
        raise ValueError(f"{checkpoint} was saved by {len(state['rng'])} worker(s); resume it with as many "
                         f"(torchrun --nproc_per_node), not {world_size()}")
    outer_opt = outer_optimizer(model, state["settings"]["outer_lr"])
    outer_opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"][rank()])
    return model, outer_opt, state["iteration"] + 1, state["settings"]


def _open_log(path: Path, start: int):
    """The CSV log, opened for appending, without the rows past `start` that a run left when it stopped unsaved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) < start]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["iteration", "outer_loss", "outer_accuracy"], *rows])
    return path.open("a", newline="")


def train(model: ANML, outer_opt: torch.optim.Optimizer, data: Omniglot, out_dir: Path, settings: dict,
          start: int = 0) -> Path:
    """Meta-train from iteration `start` to settings["epochs"]; returns the last checkpoint.

    settings: rln, nm, mask, epochs, inner_lr, outer_lr, save_every, log_every (and seed, kept for the
    record). Ctrl-C finishes the current iteration, saves, then raises KeyboardInterrupt. Under
    torch.distributed each worker runs one task of the meta-batch; rank 0 logs and writes.
    """
    out_dir = Path(out_dir)
    log_file = _open_log(out_dir / "training_log.csv", start) if rank() == 0 else None
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    device = next(model.parameters()).device
    window, last = [], None
    try:
        bar = tqdm(range(start, settings["epochs"]), initial=start, total=settings["epochs"], desc="meta-train",
                   disable=rank() > 0)
        for it in bar:
            traj, remember = sample_meta_train(data)
            traj_ims, traj_labels = data.batch(traj)
            remember_ims, remember_labels = data.batch(remember)
            lobotomize(model, int(traj_labels[0]))
            share_lobotomies(model, int(traj_labels[0]))
            loss, acc = meta_step(model, outer_opt, traj_ims, traj_labels, remember_ims, remember_labels,
                                  settings["inner_lr"])
            # One small all-reduce: the meta-batch's mean loss and accuracy, and whether any worker was interrupted.
            stats = torch.tensor([loss, acc, float(bool(interrupted))], dtype=torch.float64, device=device)
            if world_size() > 1:
                dist.all_reduce(stats)
                stats[:2] /= world_size()
            window.append(stats[:2].tolist())
            stop = bool(stats[2] > 0)
            if (it + 1) % settings["log_every"] == 0:
                loss, acc = np.mean(window, axis=0)
                if log_file:
                    log_file.write(f"{it},{loss:.5f},{acc:.5f}\n")
                    log_file.flush()
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
                window = []
            if (it + 1) % settings["save_every"] == 0 or it + 1 == settings["epochs"] or stop:
                last = save_checkpoint(model, outer_opt, out_dir, it, settings)
                log.info("saved %s", last)
            if stop:
                raise KeyboardInterrupt(f"stopped after iteration {it}; resume with --resume {last}")
    finally:
        if log_file:
            log_file.close()
        signal.signal(signal.SIGINT, previous_handler)
    return last


# Meta-testing. NM and RLN are frozen, so each drawing's gated features RLN(x) * NM(x) are fixed for a given
# model: compute them once, and the test-train sequence is Adam on the fc layer alone.

@torch.no_grad()
def gated_features(model: ANML, data: Omniglot, batch_size: int = 500) -> torch.Tensor:
    """RLN(x) * NM(x) of every drawing of `data`, [N, mask_size], on the model's device."""
    device = next(model.parameters()).device
    chunks = torch.arange(len(data.labels)).split(batch_size)
    return torch.cat([model.features(data.batch(c)[0].to(device))
                      for c in tqdm(chunks, desc="features", leave=False)])


def cached_features(checkpoint: Path, model: ANML, data: Omniglot) -> torch.Tensor:
    """gated_features, kept on disk under a key of the checkpoint's bytes and the data set's."""
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:20]
    path = cache_dir() / f"features-{digest}-{data.key}.pt"
    device = next(model.parameters()).device
    if path.is_file():
        return torch.load(path, weights_only=True).to(device)
    features = gated_features(model, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(features.cpu(), path)
    return features


class MetaTestRuns(NamedTuple):
    """Independent meta-test runs: per run the test and train accuracy, and the trained fc layer."""
    test_accuracy: torch.Tensor  # [runs]
    train_accuracy: torch.Tensor  # [runs]
    weight: torch.Tensor  # [runs, 1000, mask_size]
    bias: torch.Tensor  # [runs, 1000]


def fresh_fc_weight(model: ANML, generator: torch.Generator) -> torch.Tensor:
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
def test_train(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
               lr: float) -> None:
    """Adam on fc layers, one step per drawing (batch of 1) on the cross-entropy, class after class.

    Independent runs advance together, each strictly in its own order: weight [runs, 1000, mask_size] and
    bias [runs, 1000] are trained in place; features [runs, classes, drawings, mask_size] in training
    order; labels [runs, classes].
    """
    moments = tuple(torch.zeros_like(t) for t in (weight, weight, bias, bias))
    # Contiguous per step: compiled code is specialised to its inputs' strides, and a run-major slice's stride
    # depends on the class count, which made every class count of a sweep compile anew (past dynamo's limit of 8).
    xs = features.flatten(1, 2).transpose(0, 1).contiguous().unbind()
    ys = labels.repeat_interleave(features.shape[2], 1).t().contiguous().unbind()
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


@torch.no_grad()
def test_test(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of each run's fc layer on its [classes, drawings, mask_size] features: per class, then averaged
    over classes. Shapes as in test_train; returns [runs]."""
    logits = torch.baddbmm(bias.unsqueeze(1), features.flatten(1, 2), weight.transpose(1, 2))
    correct = logits.argmax(-1).view(features.shape[:3]) == labels.unsqueeze(2)
    return correct.float().mean(2).mean(1)


def meta_test_runs(model: ANML, features: torch.Tensor, data: Omniglot, n_classes: int, lr: float,
                   seeds: list[int], n_train: int = 15) -> MetaTestRuns:
    """Meta-test runs on precomputed features, one per seed.

    A run's seed fixes its classes, their order, the splits, the drawing order and the fc initialisation, so
    a run's numbers do not depend on which runs go with it.
    """
    train_idx, test_idx, weights = [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        train, test = sample_meta_test(data, n_classes, n_train, generator)
        train_idx.append(train)
        test_idx.append(test)
        weights.append(fresh_fc_weight(model, generator))
    train_idx, test_idx = torch.stack(train_idx).to(features.device), torch.stack(test_idx).to(features.device)
    weight, bias = torch.stack(weights), model.fc.bias.detach().expand(len(seeds), -1).clone()
    labels = data.labels.to(features.device)[train_idx[:, :, 0]]
    test, train = torch.empty(len(seeds)), torch.empty(len(seeds))
    # On a GPU a step of one run is too small to fill the device: the runs advance together and share each
    # step's kernel launches; on a CPU one run at a time was faster (measured 1.1-1.5x, with the eager step before
    # fc_adam_step was compiled): more of its 37 MB of weights, gradient and moments stays in cache between steps.
    batch = len(seeds) if features.device.type == "cuda" else 1
    for start in range(0, len(seeds), batch):
        runs = slice(start, start + batch)
        train_features = features[train_idx[runs]]
        test_train(weight[runs], bias[runs], train_features, labels[runs], lr)
        test[runs] = test_test(weight[runs], bias[runs], features[test_idx[runs]], labels[runs]).cpu()
        train[runs] = test_test(weight[runs], bias[runs], train_features, labels[runs]).cpu()
    return MetaTestRuns(test, train, weight, bias)
