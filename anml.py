"""ANML meta-training: a differentiable inner loop with `higher` on RLN + fc, an Adam outer step on everything. The
same meta-training serves the treatments ANML is compared with (RunConfig.treatment): SANML, ANML without its NM, and
OML, whose inner loop changes its PLN; Pretrain & Transfer trains an ANML i.i.d. instead (supervised_step).

Read top to bottom: the run's config, the lobotomy, one meta-training step (a task's meta-gradient, then Adam) and
the plain loop it equals, one iteration (sampling included), the step eager or graphed, the outer rate, the run's
state (fresh, resumed, saved) and the training loop (one run, or several taking turns).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import higher
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoints
import cuda_graph
import workers
from runtime import Stopped
from datasets import Omniglot, sample_meta_train
from model import Network, build_model, kaiming_conv_init, model_sizes

log = logging.getLogger(__name__)


META_ITERATIONS = 30000
# A meta-training iteration shows the network 20 trajectory drawings in the inner loop and 84 in the outer loss:
# Pretrain & Transfer is matched to ANML by these drawings, as many in its i.i.d. batches as in ANML's iterations.
DRAWINGS_PER_META_ITERATION = 20 + 84


@dataclass
class RunConfig:
    """A meta-training run's recipe and bookkeeping; saved in every state file and read back on resume.

    The defaults are the published recipe. Runs saved before treatment, batch_size, outer_lr_schedule and conv_init
    existed used what are still their defaults.
    """
    treatment: str = "anml"  # "sanml", "oml" (meta-trained the same way) or "pretrain" (i.i.d. batches)
    rln: int = 256  # RLN channels
    nm: int = 112  # NM channels
    mask: int | None = None  # gate size: 9 x rln unless given
    epochs: int | None = None  # iterations: 30,000, or for pretrain as many batches as see ANML's drawings
    inner_lr: float = 0.1  # inner-loop SGD on what the inner loop changes
    outer_lr: float = 0.003  # outer Adam on everything (pretrain: its one Adam)
    batch_size: int = 256  # pretrain: drawings per batch
    outer_lr_schedule: str = "constant"  # or "cosine": from outer_lr to 0 over the epochs
    conv_init: str = "default"  # or "kaiming": every conv weight re-drawn Kaiming-normal at the start
    seed: int = 1  # the reference code's default, and the shipped run's
    save_every: int = 1000  # checkpoint every N iterations (and at the end)
    log_every: int = 10
    keep_states: int = 3  # the resumable state (Adam's moments, 48 MB) of the newest N checkpoints only

    def __post_init__(self):
        if self.mask is None:
            self.mask = 9 * self.rln
        if self.epochs is None:
            self.epochs = (META_ITERATIONS if self.treatment != "pretrain"
                           else math.ceil(META_ITERATIONS * DRAWINGS_PER_META_ITERATION / self.batch_size))

    @property
    def sizes(self) -> tuple[int, ...]:
        """The sizes that build the treatment's network and name its checkpoints."""
        return model_sizes(self.treatment, self.rln, self.nm, self.mask)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def lobotomize(model: Network, cls: int) -> None:
    """Re-draw the fc row of one class so the network cannot have memorised it."""
    with torch.no_grad():
        nn.init.kaiming_normal_(model.fc.weight[cls].unsqueeze(0))


def meta_gradient(model: Network, traj_ims: torch.Tensor, traj_labels: torch.Tensor,
                  remember_ims: torch.Tensor, remember_labels: torch.Tensor,
                  inner_lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The meta-gradient of one task (after the lobotomy), added into the .grad of every parameter; returns the outer
    loss and accuracy as device tensors.

    Inner loop (train-train): one SGD step per trajectory drawing on what the inner loop changes (an ANML's RLN + fc,
    all of an SANML, OML's PLN), kept differentiable. Outer loss (train-test): the adapted network's loss on
    trajectory + remember set, back-propagated through the inner loop into every parameter: second order.
    """
    ims = torch.cat([traj_ims, remember_ims])
    labels = torch.cat([traj_labels, remember_labels])
    # What the inner loop reads but does not change (an ANML's gates, OML's RLN features) is the same at every step:
    # computed once, outside the differentiable copy, its gradient still reaches its parameters, while each inner step
    # differentiates only what it changes, not the whole unrolled history.
    fixed, plastic = model.inner_loop(ims)
    inner_opt = torch.optim.SGD(plastic.parameters(), lr=inner_lr)
    with higher.innerloop_ctx(plastic, inner_opt, copy_initial_weights=False) as (fplastic, diffopt):
        for i in range(len(traj_ims)):
            diffopt.step(F.cross_entropy(fplastic(*(t[i:i + 1] for t in fixed)), traj_labels[i:i + 1]))
        logits = fplastic(*fixed)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    return loss.detach(), (logits.argmax(1) == labels).float().mean()


def meta_step(model: Network, outer_opt: torch.optim.Optimizer,
              traj_ims: torch.Tensor, traj_labels: torch.Tensor,
              remember_ims: torch.Tensor, remember_labels: torch.Tensor,
              inner_lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """One meta-training step (after the lobotomy): the task's meta_gradient, then one step of `outer_opt`; returns
    the outer loss and accuracy as device tensors."""
    loss_acc = meta_gradient(model, traj_ims, traj_labels, remember_ims, remember_labels, inner_lr)
    outer_opt.step()
    outer_opt.zero_grad()
    return loss_acc


def plain_meta_step(model: Network, outer_opt: torch.optim.Optimizer,
                    traj_ims: torch.Tensor, traj_labels: torch.Tensor,
                    remember_ims: torch.Tensor, remember_labels: torch.Tensor,
                    inner_lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """meta_step written the obvious way, to check and time it against: the whole network in `higher`'s
    differentiable copy, SGD over what the inner loop changes, the rest (an ANML's NM) recomputed at every step."""
    inner_opt = torch.optim.SGD(model.inner_parameters(), lr=inner_lr)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for i in range(len(traj_ims)):
            diffopt.step(F.cross_entropy(fmodel(traj_ims[i:i + 1]), traj_labels[i:i + 1]))
        ims = torch.cat([traj_ims, remember_ims])
        labels = torch.cat([traj_labels, remember_labels])
        logits = fmodel(ims)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.detach(), (logits.argmax(1) == labels).float().mean()


def meta_iteration(model: Network, data: Omniglot,
                   step: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One meta-training iteration: draw a task from torch's global generator, lobotomize its class (every worker
    receives every worker's re-drawn row under torchrun), then `step` on the task's four tensors: meta_step with its
    model, optimizer and inner rate bound (see `eager_step`), or that replayed as a CUDA graph. Returns its loss and
    accuracy, on the device."""
    traj, remember = sample_meta_train(data)
    cls = int(data.labels[traj[0]])  # the labels stay on the CPU: no wait for the device
    lobotomize(model, cls)
    workers.share_lobotomies(model, cls)
    return step(*data.batch(traj), *data.batch(remember))


def supervised_step(model: Network, optimizer: torch.optim.Optimizer, ims: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Pretrain & Transfer's pre-training: the optimizer on the cross-entropy of a batch, the whole network
    learning; returns the loss and accuracy as device tensors."""
    logits = model(ims)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach(), (logits.argmax(1) == labels).float().mean()


def supervised_iteration(model: Network, data: Omniglot, step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                         batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of Pretrain & Transfer: `step` on a batch drawn uniformly without replacement from the whole
    split (torch's global generator), i.i.d. across iterations; under torchrun each worker draws its own."""
    return step(*data.batch(torch.randperm(len(data.labels))[:batch_size]))


def eager_step(model: Network, outer_opt: torch.optim.Optimizer, inner_lr: float) -> Callable:
    """meta_step of this model, optimizer and inner rate, as a function of the task's four tensors."""
    return functools.partial(meta_step, model, outer_opt, inner_lr=inner_lr)


def graphed_step(model: Network, outer_opt: torch.optim.Optimizer, inner_lr: float) -> Callable:
    """eager_step replayed as a CUDA graph (CUDA only; see cuda_graph.CudaGraphed). In one process the graph holds the
    whole step, Adam included; under torchrun it holds the meta-gradient, and the all-reduce and Adam follow it
    eagerly (cuda_graph.graphed_gradient)."""
    cuda_graph.make_capturable(outer_opt)
    if workers.world_size() == 1:
        return cuda_graph.CudaGraphed(eager_step(model, outer_opt, inner_lr))
    return cuda_graph.graphed_gradient(functools.partial(meta_gradient, model, inner_lr=inner_lr), outer_opt)


def get_lr(it: int, config: RunConfig) -> float:
    """The outer learning rate of iteration `it`: constant, or cosine-decayed from outer_lr to 0 over the epochs.

    A function of the iteration alone, so that a resumed run needs no scheduler state.
    """
    if config.outer_lr_schedule == "constant":
        return config.outer_lr
    return config.outer_lr * 0.5 * (1 + math.cos(math.pi * it / config.epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The rate of every group; in place where it is a device tensor (under a CUDA graph)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def outer_optimizer(model: Network, lr: float) -> torch.optim.Adam:
    """Adam over all of the network; under torchrun it first averages the gradients across workers."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if workers.world_size() > 1:
        opt.register_step_pre_hook(workers.average_gradients)
    return opt


class Diverged(Exception):
    """A run's outer loss or weights became NaN or infinite; nothing from then on was saved."""


@dataclass
class RunState:
    """What a run needs to go on: the model, its outer optimizer, its config, the next iteration to run and the
    random state it draws from."""
    model: Network
    optimizer: torch.optim.Adam
    config: RunConfig
    iteration: int = 0
    # The random state that its next iteration draws from: each iteration starts from it and leaves it updated, so
    # that runs trained together (train_together) draw each from its own.
    rng: dict = dataclasses.field(default_factory=checkpoints.rng_state)

    @classmethod
    def fresh(cls, config: RunConfig, device: torch.device) -> RunState:
        """A freshly initialised network of the config's treatment and its outer optimizer, every generator seeded
        from config.seed.

        Under torchrun every worker starts from the same weights, then draws its tasks from a stream of its own
        (rank 0's is the single-process stream).
        """
        seed_everything(config.seed)
        model = build_model(config.treatment, config.sizes)
        if config.conv_init == "kaiming":
            kaiming_conv_init(model)
        model = model.to(device)
        if workers.rank() > 0:
            seed_everything(int(np.random.SeedSequence([config.seed, workers.rank()]).generate_state(1)[0]))
        return cls(model, outer_optimizer(model, config.outer_lr), config)

    @classmethod
    def resume(cls, checkpoint: Path, device: torch.device) -> RunState:
        """The run that saved `checkpoint`, with every random generator as it was, so that it continues exactly."""
        model, saved = checkpoints.load_run(checkpoint, device)
        if len(saved["rng"]) != workers.world_size():
            raise ValueError(f"{checkpoint} was saved by {len(saved['rng'])} worker(s); resume it with as many "
                             f"(torchrun --nproc_per_node), not {workers.world_size()}")
        unknown = set(saved["settings"]) - {f.name for f in dataclasses.fields(RunConfig)}
        if unknown:
            raise ValueError(f"{checkpoint}'s run has settings this code does not know ({', '.join(sorted(unknown))}): "
                             "it was saved by a newer version of this code; resume it with that version")
        config = RunConfig(**saved["settings"])
        optimizer = outer_optimizer(model, config.outer_lr)
        optimizer.load_state_dict(saved["optimizer"])
        checkpoints.set_rng_state(saved["rng"][workers.rank()])
        return cls(model, optimizer, config, saved["iteration"] + 1)

    def checkpoint(self, out_dir: Path) -> Path:
        """Where save(out_dir) writes the weights of the iterations done so far."""
        c = self.config
        return Path(out_dir) / checkpoints.checkpoint_name(c.treatment, c.sizes, self.iteration - 1)

    def save(self, out_dir: Path) -> Path:
        """Checkpoint the iterations done so far; every worker must call it (it gathers each one's random state)."""
        c, path = self.config, self.checkpoint(out_dir)
        rng = workers.gather(checkpoints.rng_state())
        if workers.rank() == 0:
            checkpoints.save_run(path, self.model, cuda_graph.portable_state(self.optimizer), rng,
                                 dataclasses.asdict(c), self.iteration - 1)
            checkpoints.prune_states(out_dir, c.keep_states)
        return path


def _open_log(path: Path, start: int):
    """The CSV log, opened for appending, without the rows past `start` that a run left when it stopped unsaved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) < start]
    with path.open("w", newline="") as f:
        # "\n" as the rows appended below end, not the csv module's "\r\n": one line ending in the file
        csv.writer(f, lineterminator="\n").writerows([["iteration", "outer_loss", "outer_accuracy"], *rows])
    return path.open("a", newline="")


def train(state: RunState, data: Omniglot, out_dir: Path, graphed: bool = False) -> Path:
    """Meta-train from state.iteration to config.epochs; returns the last checkpoint.

    graphed (CUDA only): each iteration's meta_step, after the lobotomy, is a replay of one CUDA graph (the first
    few run eagerly, then it is captured; under torchrun Adam steps after the replay, see graphed_step): the same
    computation, without the launch of each of its kernels.

    The config goes to out_dir/config.json at the start (a resume rewrites it, as it may change the bookkeeping).
    Every log_every iterations, and at the end, the mean outer loss and accuracy since the last row go to the log.
    Ctrl-C, or SIGTERM (what a batch scheduler sends before it kills), finishes the current iteration, saves, then
    raises runtime.Stopped (a KeyboardInterrupt) with the signal. A NaN or infinite outer loss (read where a log row or
    a checkpoint is due) or weights (read where a checkpoint is due) raise Diverged before anything of it is saved,
    the checkpoints before it kept as they are. Under torchrun each worker runs one task of the meta-batch; rank 0
    logs and writes, and refuses a folder that another process is training into.
    """
    return train_together([state], data, [out_dir], graphed)[0]


def train_together(states: list[RunState], data: Omniglot, out_dirs: list[Path], graphed: bool = False) -> list[Path]:
    """Several runs in one process, each as `train` runs it alone, one iteration of each in turn; returns each run's
    last checkpoint.

    Each run draws from its own random state (RunState.rng), so each gives the results it gives alone. On CUDA each
    run works on a CUDA stream of its own, so that the GPU runs one run's replay while another's is launched: one
    replay fills a fraction of a GPU. Graphs on several streams hang with PyTorch's cuBLAS workspaces
    (benchmarks/README.md), so that needs CUBLAS_WORKSPACE_CONFIG=:0:0 in the environment before CUDA starts. Ctrl-C
    stops every run after its iteration of the round under way, each saved; so does one run's divergence, which is
    then raised. Not under torchrun, whose workers share one run.
    """
    streams = len(states) > 1 and states[0].model.fc.weight.is_cuda
    if len(states) > 1 and workers.world_size() > 1:
        raise ValueError("several runs train together in one process, not under torchrun")
    if streams and os.environ.get("CUBLAS_WORKSPACE_CONFIG") != ":0:0":
        raise ValueError("several runs on one GPU hang with cuBLAS workspaces: set CUBLAS_WORKSPACE_CONFIG=:0:0 "
                         "before CUDA starts (train_omni.py does)")
    with contextlib.ExitStack() as cleanup:
        interrupted = []  # the signals received
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            previous_handler = signal.signal(stop_signal, lambda signum, _: interrupted.append(signum))
            cleanup.callback(signal.signal, stop_signal, previous_handler)
        runs = [_Run(state, data, Path(out_dir), graphed, cleanup, streams,
                     Path(out_dir).name if len(states) > 1 else "meta-train")
                for state, out_dir in zip(states, out_dirs)]
        going = [run for run in runs if run.state.iteration < run.state.config.epochs]
        while going:
            for run in list(going):
                try:
                    if run.iterate(interrupted):
                        going.remove(run)
                except Diverged:
                    for other in going:  # the others keep what they did
                        if other is not run:
                            other.stop()
                    raise
            if interrupted and len(runs) > 1:  # those that took their turn before the signal stop as they are
                for run in going:
                    run.stop()
                going = []
        if any(run.stopped for run in runs):
            raise Stopped("; ".join(f"stopped after iteration {run.state.iteration - 1}, saved as {run.last}"
                                    for run in runs), interrupted[0] if interrupted else signal.SIGINT)
    return [run.last for run in runs]


class _Run:
    """One run of train_together: its step, log, progress bar, the outer loss and accuracy since its last log row,
    and, with other runs, its CUDA stream."""

    def __init__(self, state: RunState, data: Omniglot, out_dir: Path, graphed: bool, cleanup: contextlib.ExitStack,
                 stream: bool, desc: str):
        self.state, self.data, self.out_dir, config = state, data, out_dir, state.config
        self.stream = torch.cuda.Stream(state.model.fc.weight.device) if stream else None
        self.log_file = None
        if workers.rank() == 0:
            cleanup.enter_context(checkpoints.sole_writer(out_dir))
            self.log_file = cleanup.enter_context(_open_log(out_dir / "training_log.csv", state.iteration))
            checkpoints.remove_temporaries(out_dir)
            with checkpoints.atomic_path(out_dir / "config.json") as tmp:  # the recipe, readable beside the run
                tmp.write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
        with self.on_stream():
            if config.treatment == "pretrain":  # a plain supervised step, eager on any device
                self.step = functools.partial(supervised_step, state.model, state.optimizer)
                self.draw = functools.partial(supervised_iteration, batch_size=config.batch_size)
            else:
                self.step = (graphed_step if graphed else eager_step)(state.model, state.optimizer, config.inner_lr)
                self.draw = meta_iteration
        self.window, self.last, self.stopped, self.start = [], None, False, state.iteration
        self.bar = cleanup.enter_context(tqdm(initial=state.iteration, total=config.epochs, desc=desc,
                                              disable=workers.rank() > 0))

    @contextlib.contextmanager
    def on_stream(self):
        """The run's own stream current (where it has one), after all that the default stream has queued so far."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def iterate(self, interrupted: list) -> bool:
        """One iteration, logged and saved as due; returns whether it was the run's last: its end, or a stop
        (`interrupted` not empty once the iteration is done; under torchrun, on any worker)."""
        state, config, it = self.state, self.state.config, self.state.iteration
        checkpoints.set_rng_state(state.rng)
        with self.on_stream():
            set_lr(state.optimizer, get_lr(it, config))
            loss_acc = torch.stack(self.draw(state.model, self.data, self.step))
            # Under torchrun: the meta-batch's mean loss and accuracy, and whether any worker was interrupted.
            loss_acc, self.stopped = workers.mean_and_any(loss_acc, bool(interrupted))
            self.window.append(loss_acc)
            state.iteration = it + 1
            last_one = state.iteration == config.epochs or self.stopped
            self.keep(last_one)
        state.rng = checkpoints.rng_state()
        self.bar.update()
        return last_one

    def stop(self) -> None:
        """Stopped between iterations: the log row and checkpoint of the iterations done, as after a last one."""
        self.stopped = True
        checkpoints.set_rng_state(self.state.rng)
        with self.on_stream():
            self.keep(last_one=True)

    def keep(self, last_one: bool) -> None:
        """The log row and checkpoint due after the iteration just done (both, after a run's last one); Diverged
        instead of a checkpoint of NaN or infinite weights, or after a log row of a NaN or infinite loss."""
        state, config, done = self.state, self.state.config, self.state.iteration
        save = (done % config.save_every == 0 or last_one) and self.last != state.checkpoint(self.out_dir)
        if self.window and (done % config.log_every == 0 or last_one or save):
            window = torch.stack(self.window).double().cpu().numpy()  # read only when a row or checkpoint is due
            if done % config.log_every == 0 or last_one:
                loss, acc = window.mean(axis=0)
                if self.log_file:
                    self.log_file.write(f"{done - 1},{loss:.5f},{acc:.5f}\n")
                    self.log_file.flush()
                self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)
                self.window = []
            bad = np.flatnonzero(~np.isfinite(window[:, 0]))
            if len(bad):
                first = done - len(window) + bad[0]
                raise self.diverged(f"its outer loss was {window[bad[0], 0]} at iteration {first}")
        if save:
            bad = checkpoints.first_non_finite(state.model.state_dict())
            if bad is not None:
                raise self.diverged(f"{bad} held NaN or infinite values after iteration {done - 1}")
            self.last = state.save(self.out_dir)
            log.info("saved %s", self.last)

    def diverged(self, what: str) -> Diverged:
        """The run's divergence, naming its last checkpoint, which stays resumable."""
        if self.last:
            kept = f"nothing from then on was saved: the last checkpoint, {self.last}, stays resumable"
        elif self.start:
            kept = f"nothing from then on was saved: iteration {self.start - 1}'s, resumed from, stays resumable"
        else:
            kept = "no checkpoint was saved: start again with a lower --inner-lr or --outer-lr"
        return Diverged(f"{self.out_dir}: meta-training diverged: {what}; {kept}")
