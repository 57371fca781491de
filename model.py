"""The networks: ANML, a representation network (RLN) gated element-wise by a neuromodulatory network (NM), and the
treatments it is compared with: SANML (the RLN and fc alone) and OML (a conv RLN and a two-layer PLN).

Each says how meta-training's inner loop splits it (`inner_loop`): what the inner loop reads but never changes,
computed once for a task's drawings, and the module that it changes, which maps those to logits."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

N_OUTPUTS = 1000
aten = torch.ops.aten


class ConvBlock(nn.Module):
    """3x3 conv -> instance norm (affine, no running statistics) -> ReLU -> optional 2x2 max-pool."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3)
        # Instance norm's parameters, named norm.weight and norm.bias as in the published checkpoints; forward
        # computes it with instance_norm below.
        self.norm = nn.GroupNorm(out_chs, out_chs)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = instance_norm(self.conv(x), self.norm.weight, self.norm.bias, self.norm.eps)
        # ReLU commutes with max-pooling, values and gradients alike; after the pool it touches 4x less memory.
        return F.relu(max_pool(x) if self.pool else x)


class _NormBackward(torch.autograd.Function):
    """Instance norm's backward, (g, x, w) -> (dx, dw, db), with its own backward written out (norm_double_backward)."""

    @staticmethod
    def forward(ctx, g, x, w, mean, rstd):
        n, c = x.shape[:2]
        g = g.contiguous(memory_format=_norm_layout(x))
        ctx.save_for_backward(g, x, w, mean, rstd)
        return aten.native_group_norm_backward(g, x, mean, rstd, w, n, c, x[0, 0].numel(), c, [True] * 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a, alpha, beta):  # autograd passes zeros, never None, for an output it needs no gradient of
        return *norm_double_backward(*ctx.saved_tensors, a, alpha, beta), None, None


def norm_double_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         a: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of (g, x, w) -> (dx, dw, db), instance norm's backward, given the gradients (a, alpha, beta) of
    its outputs.

    Per image and channel, with x̂ = (x - mean) r, r = 1 / sqrt(var + eps), P = mean(g x̂):
    dx = w r (g - mean(g) - x̂ P), dw = sum(g x̂), db = sum(g).
    """
    n, c = x.shape[:2]
    m, hw = x[0, 0].numel(), (2, 3)
    r, w, alpha, beta = rstd.view(n, c, 1, 1), w.view(1, c, 1, 1), alpha.view(1, c, 1, 1), beta.view(1, c, 1, 1)
    xh = (x - mean.view(n, c, 1, 1)) * r
    g_c, a_c = g - g.mean(hw, keepdim=True), a - a.mean(hw, keepdim=True)
    p = (g * xh).mean(hw, keepdim=True)
    q = (a * xh).sum(hw, keepdim=True)
    s = (a * g_c).sum(hw, keepdim=True)
    d_g = w * r * (a_c - xh * q / m) + alpha * xh + beta
    d_x = -w * r * r * (q / m * g_c + p * a_c + xh * (s - 3 * p * q) / m) + alpha * r * (g_c - xh * p)
    d_w = (r * a * (g_c - xh * p)).sum((0, 2, 3))
    return d_g, d_x, d_w


def _norm_layout(x: torch.Tensor) -> torch.memory_format:
    """The memory layout PyTorch's group norm kernels take their input and its gradient in, as F.group_norm and its
    autograd formula pass them: channels-last on a CPU only. The kernels called directly, as here, do not all convert
    them themselves: PyTorch 2.11's CPU backward, given a gradient in another layout than the input's, silently
    returns wrong gradients."""
    channels_last = x.is_cpu and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps):
        n, c = x.shape[:2]
        x = x.contiguous(memory_format=_norm_layout(x))
        out, mean, rstd = aten.native_group_norm(x, w, b, n, c, x[0, 0].numel(), c, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        return *_NormBackward.apply(g, *ctx.saved_tensors), None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm(x, channels, weight, bias, eps): the affine instance norm, as a group norm of one channel a group
    (PyTorch's CPU kernel for it is several times faster than instance norm's).

    Its backward is PyTorch's one fused kernel, and that backward's own backward, which the outer step takes through
    every inner step, is written out in a dozen operations where autograd composes several dozen: on a GPU, where a
    graphed iteration is bound by its thousands of small kernels, that made it 1.17x faster (benchmarks/README.md).
    """
    return _InstanceNorm.apply(x, weight, bias, eps)


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

    def inner_loop(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        # The inner loop does not update the NM, so each drawing's gate is the same at every step: computed once,
        # outside the differentiable copy, its gradient still reaches the NM through the gates.
        return (x, self.nm(x)), Plastic(self)

    def inner_parameters(self) -> list[nn.Parameter]:
        return [*self.rln.parameters(), *self.fc.parameters()]


class SANML(nn.Module):
    """ANML without its neuromodulation: the RLN read by the fc layer, the NM gone entirely (the authors' later code,
    higherANML's models/anml.py, defines it so)."""

    def __init__(self, rln_chs: int = 256):
        super().__init__()
        self.rln = ConvStack(rln_chs)
        self.fc = nn.Linear(rln_chs * 9, N_OUTPUTS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation RLN(x) that the fc layer reads."""
        return self.rln(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def inner_loop(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        return (x,), self  # the inner loop changes all of it

    def inner_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


class PLN(nn.Module):
    """OML's prediction learning network: a hidden linear layer and ReLU, then the fc layer to the outputs."""

    def __init__(self, in_features: int, hidden: int = 1024):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.fc = nn.Linear(hidden, N_OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.hidden(x)))


class OML(nn.Module):
    """OML (Javed & White 2019) as the ANML paper ran it, the original ANML code's OML treatment: an RLN of six 3x3
    convs with ReLU, no norm and no pool, strides 1, 1, 1, 2, 1, 2 (28x28 -> chs x 3 x 3), and a PLN of two linear
    layers (2304 -> 1024 -> 1000). Weights Kaiming-normal and biases zero, as both that code and OML's own initialise
    them. The inner loop changes the PLN only."""

    STRIDES = (1, 1, 1, 2, 1, 2)

    def __init__(self, rln_chs: int = 256):
        super().__init__()
        layers, chs = [], 1
        for stride in self.STRIDES:
            layers += [nn.Conv2d(chs, rln_chs, kernel_size=3, stride=stride), nn.ReLU()]
            chs = rln_chs
        self.rln = nn.Sequential(*layers, nn.Flatten())
        self.pln = PLN(rln_chs * 9)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def fc(self) -> nn.Linear:
        """The last layer, which the lobotomy re-draws rows of, and which meta-testing OML-OLFT trains."""
        return self.pln.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the last layer reads: the PLN's hidden layer after its ReLU."""
        return F.relu(self.pln.hidden(self.rln(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pln(self.rln(x))

    def inner_loop(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
        # The inner loop does not change the RLN: its features are computed once, outside the differentiable copy.
        return (self.rln(x),), self.pln

    def inner_parameters(self) -> list[nn.Parameter]:
        return list(self.pln.parameters())


Network = ANML | SANML | OML

# Each treatment's network, built from its sizes (model_sizes below). Pretrain & Transfer trains an ANML i.i.d.
MODELS = {"anml": ANML, "sanml": SANML, "oml": OML, "pretrain": ANML}


def model_sizes(treatment: str, rln: int, nm: int, mask: int) -> tuple[int, ...]:
    """The sizes that build a treatment's network and name its checkpoints: SANML and OML have no NM and no gate."""
    return (rln, nm, mask) if MODELS[treatment] is ANML else (rln,)


def build_model(treatment: str, sizes: tuple[int, ...]) -> Network:
    return MODELS[treatment](*sizes)


class Plastic(nn.Module):
    """An ANML's RLN and fc (shared, not copied), applied to inputs whose NM gate is already known: what the inner
    loop updates, and so all that goes into its differentiable copy."""

    def __init__(self, model: ANML):
        super().__init__()
        self.rln = model.rln
        self.fc = model.fc

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rln(x) * gate)


def kaiming_conv_init(model: nn.Module) -> None:
    """Re-draw every conv weight (RLN and NM) Kaiming-normal, biases untouched, as the authors' later code does."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
