"""A meta-training step replayed as one CUDA graph.

On a GPU the eager step is bound by launches, not arithmetic: thousands of small kernels (batch-1 convolutions,
`higher`'s bookkeeping) with the device mostly idle. Captured once, an iteration is one replay of the same kernels.
What a graph cannot do, it must not need: no host synchronisation inside the step (the loss and accuracy stay on the
device), inputs in fixed buffers, and an optimizer whose rate and step count live on the device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP = 3  # eager calls before the capture, as PyTorch asks: lazy initialisations must not happen inside it


class CudaGraphed:
    """`step(*tensors) -> tuple of tensors`, the first WARMUP calls run eagerly on a side stream, then captured
    once (with that call's inputs) and replayed for every later call with its inputs copied into the captured ones.

    Each call is the same computation as `step` itself; returned tensors are copies that the next replay leaves alone.
    """

    def __init__(self, step: Callable[..., tuple[torch.Tensor, ...]]):
        self.step = step
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        if self.calls <= WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(*tensors)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None:
            self.inputs = tuple(t.clone() for t in tensors)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels; the replay below runs them
                self.outputs = self.step(*self.inputs)
        else:
            for captured, t in zip(self.inputs, tensors):
                captured.copy_(t)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


def graphed_gradient(gradient: Callable[..., tuple[torch.Tensor, ...]],
                     optimizer: torch.optim.Optimizer) -> Callable[..., tuple[torch.Tensor, ...]]:
    """`gradient(*tensors)`, which adds into the .grad of the optimizer's parameters, as a CudaGraphed, followed by
    `optimizer.step()` and the gradients zeroed, eagerly: for a step whose optimizer must not be captured (under
    torchrun its pre-hook all-reduces the gradients, a collective that only NCCL can capture, and that no one-GPU
    machine can test).

    The gradients are fixed buffers, allocated here and zeroed in place, never set to None: the replays add into
    the tensors that the capture saw.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    graphed = CudaGraphed(gradient)

    def step(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = graphed(*tensors)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return outputs
    return step


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let Adam step inside a graph: `capturable` (its step counts on the device) and its rate a device tensor, which
    a schedule changes with fill_ between replays (a float would be frozen into the graph)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for p in group["params"]:
            if "step" in optimizer.state.get(p, {}):
                optimizer.state[p]["step"] = optimizer.state[p]["step"].to(device, torch.float32)


def portable_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict as the eager path writes it (a float rate, not capturable), so that a checkpoint
    saved under a graph resumes without one, on a CPU too, and the reverse."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state
