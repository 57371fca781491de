"""Where this process computes: its device, and how its memory allocator treats freed memory."""
from __future__ import annotations

import ctypes

import torch


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
