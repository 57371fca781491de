"""The ANML network: a representation network (RLN) gated element-wise by a neuromodulatory network (NM)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

N_OUTPUTS = 1000


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
            raise ValueError(f"mask size {mask_size} must equal 9 x RLN channels ({rln_chs * 9}) "
                             "to gate the RLN's features")
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


def kaiming_conv_init(model: ANML) -> None:
    """Re-draw every conv weight of RLN and NM Kaiming-normal (biases untouched), as the authors' later code does."""
    for module in (*model.rln.modules(), *model.nm.modules()):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
