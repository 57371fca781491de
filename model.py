"""The ANML network: a representation network (RLN) gated element-wise by a neuromodulatory network (NM)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

N_OUTPUTS = 1000
CHECKPOINT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_ANML-(\d+)\.pth$")


class ConvBlock(nn.Module):
    """3x3 conv -> instance norm (affine, no running statistics) -> ReLU -> optional 2x2 max-pool."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3)
        # Instance norm, computed as a group norm with one channel per group: the same function and the same
        # parameters (norm.weight, norm.bias), but PyTorch's CPU kernel for it is several times faster.
        self.norm = nn.GroupNorm(out_chs, out_chs)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        # ReLU commutes with max-pooling, values and gradients alike; after the pool it touches 4x less memory.
        return F.relu(max_pool(x) if self.pool else x)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2, odd edges dropped: F.max_pool2d(x, 2)."""
    if x.requires_grad:
        return F.max_pool2d(x, 2)
    # Without autograd (feature extraction), maxima of strided slices give the same values and made feature
    # extraction 1.5-1.9x faster on a CPU; under autograd their backward costs more than max_pool2d's.
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = torch.maximum(x[..., :h, 0:w:2], x[..., :h, 1:w:2])
    return torch.maximum(x[..., 0::2, :], x[..., 1::2, :])


class ConvStack(nn.Module):
    """Three conv blocks, 1 x 28 x 28 -> chs x 3 x 3, flattened."""

    def __init__(self, chs: int):
        super().__init__()
        self.convBlock1 = ConvBlock(1, chs)
        self.convBlock2 = ConvBlock(chs, chs)
        self.convBlock3 = ConvBlock(chs, chs, pool=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convBlock3(self.convBlock2(self.convBlock1(x))).flatten(1)


class NM(ConvStack):
    """The neuromodulatory network: a conv stack and a linear layer to a sigmoid gate."""

    def __init__(self, chs: int, mask_size: int):
        super().__init__(chs)
        self.fc = nn.Linear(chs * 9, mask_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(super().forward(x)))


class ANML(nn.Module):
    def __init__(self, rln_chs: int = 256, nm_chs: int = 112, mask_size: int = 2304):
        super().__init__()
        if mask_size != rln_chs * 9:
            raise ValueError(f"mask size {mask_size} must equal 9 x RLN channels ({rln_chs * 9}) to gate the RLN's features")
        self.rln = ConvStack(rln_chs)
        self.nm = NM(nm_chs, mask_size)
        self.fc = nn.Linear(mask_size, N_OUTPUTS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The gated representation RLN(x) * NM(x) that the fc layer reads."""
        return self.rln(x) * self.nm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Plastic(nn.Module):
    """The RLN and fc of an ANML (shared, not copied), applied to inputs whose NM gate is already known.

    The inner loop updates only these, so only these go into its differentiable copy.
    """

    def __init__(self, model: ANML):
        super().__init__()
        self.rln = model.rln
        self.fc = model.fc

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rln(x) * gate)


def checkpoint_name(rln_chs: int, nm_chs: int, mask_size: int, iteration: int) -> str:
    return f"{rln_chs}_{nm_chs}_{mask_size}_ANML-{iteration}.pth"


def parse_checkpoint_name(path: Path) -> tuple[int, int, int, int]:
    """(rln_chs, nm_chs, mask_size, iteration) from a name such as 256_112_2304_ANML-29999.pth."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: checkpoint name must look like 256_112_2304_ANML-29999.pth (RLN_NM_MASK_ANML-ITER.pth); rename it")
    rln, nm, mask, iteration = map(int, match.groups())
    return rln, nm, mask, iteration


def load_anml(path: Path, device: torch.device | str = "cpu") -> ANML:
    """An ANML of the sizes in the checkpoint's name, with the checkpoint's weights."""
    path = Path(path)
    rln, nm, mask, _ = parse_checkpoint_name(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; check the path, or train one with train_omni.py")
    model = ANML(rln, nm, mask)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match an ANML({rln}, {nm}, {mask}) as its name says: "
                         f"{str(err).splitlines()[0]}") from None
    return model.to(device)
