"""Where this process computes: its device, how its memory allocator treats freed memory, and denormal floats; how a
stop by a signal ends it."""
from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


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
    # M_ARENA_MAX: every thread in that heap; another thread's arena maps and frees its memory whatever the two
    # settings above say (feature extraction in a new thread: 13 million page faults against 0.3 million)
    libc.mallopt(-8, 1)


def flush_denormals() -> None:
    """Take floats below 2**-126 (denormals) as zero on the CPU, in this thread and in the threads it starts later:
    its OpenMP workers copy the setting when they are made, at the first parallel operation, so call this before any.

    For the meta-test: a trained model's NM shuts gates nearly tight (30% of the shipped model's nonzero gated
    features are below 1e-10), so products in its Adam steps (such a feature times a small gradient, and that squared
    into Adam's second moment) land below 2**-126, and on x86 each costs a microcode assist: a 600-class run of the
    shipped model took 4.6x as long (README, Meta-testing). Flushed, what changes lies 30 orders of magnitude below
    Adam's eps (1e-8): those runs ended bit for bit the same.
    """
    torch.set_flush_denormal(True)


def call_in_new_thread(fn: Callable[[], T], flush: bool) -> T:
    """fn() in a thread made for it, with denormals flushed there or kept: since that thread gets OpenMP workers of
    its own, this is how one process runs the same work both ways."""
    with ThreadPoolExecutor(1, initializer=torch.set_flush_denormal, initargs=(flush,)) as pool:
        return pool.submit(fn).result()


def float32_only() -> None:
    """No TF32 on CUDA (cuDNN's convolutions use it by default on Ampere and later): the numbers stay float32, as on
    a CPU and the pre-Ampere GPUs of the published runs."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def set_up(name: str | None) -> torch.device:
    """The device to compute on (resolve_device), set up as meta-training and meta-testing use it: freed memory kept
    for reuse, and on CUDA float32 convolutions and matmuls."""
    device = resolve_device(name)
    keep_freed_memory()
    if device.type == "cuda":
        float32_only()
    return device


class Stopped(KeyboardInterrupt):
    """A stop by a signal, Ctrl-C's SIGINT or a scheduler's SIGTERM, after the work done was kept."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def raise_stopped(signum: int, _frame) -> None:
    """A signal handler: the signal as a Stopped, which unwinds as Ctrl-C does."""
    raise Stopped(signum=signum)


def stop_status(err: KeyboardInterrupt) -> int:
    """The exit status of a process stopped by a signal, as the shell gives it: 128 + the signal (130 for Ctrl-C, 143
    for SIGTERM), so that a script or a scheduler can tell a stop from a crash (1)."""
    return 128 + getattr(err, "signum", signal.SIGINT)
