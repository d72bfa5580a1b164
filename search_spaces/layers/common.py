"""Small shared pieces used by several blocks: layout conversion, conv+BN, StarReLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_nlc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a (B, N, C) tensor is returned unchanged."""
    if x.ndim == 3:
        return x
    return x.flatten(2).transpose(1, 2)


def to_nchw(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W); a 4-d tensor is returned unchanged."""
    if x.ndim == 4:
        return x
    b, n, c = x.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"cannot view {n} tokens as a {h}x{w} grid (prefix tokens need an 'nlc' block)")
    return x.transpose(1, 2).reshape(b, c, h, w)


def to_layout(x: torch.Tensor, layout: str, hw: tuple[int, int]) -> torch.Tensor:
    """Convert ``x`` to ``layout`` ("nchw", "nlc"; "any" keeps it as it is)."""
    if layout == "nlc":
        return to_nlc(x)
    if layout == "nchw":
        return to_nchw(x, hw)
    return x


def linear_any(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear map over channels for either layout: F.linear on (B, N, C), a 1x1 conv on NCHW."""
    if x.ndim == 4:
        return F.conv2d(x, weight[:, :, None, None], bias)
    return F.linear(x, weight, bias)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d, as in LeViT / EfficientViT / SHViT."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class StarReLU(nn.Module):
    """StarReLU: s * relu(x)^2 + b with learnable scalars (Yu et al. 2023, MetaFormer Baselines)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]))
        self.bias = nn.Parameter(torch.tensor([bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


def depthwise_conv_tokens(x: Tensor, conv: nn.Conv1d, mode: str) -> Tensor:
    """The depthwise ``conv`` along the tokens of x (B, N, C) -> (B, N, C). ``mode``: "causal" (Mamba:
    token t sees t-k+1 .. t), "anticausal" (the causal conv of the time-reversed sequence: t sees
    t .. t+k-1, kernel mirrored) or "same" (centred, odd k: Hydra). Run as a (1, k) conv2d on a
    channels-last view: no transposes, and oneDNN's NHWC depthwise kernel (about 2x faster than
    conv1d fwd+bwd on CPU here). While the bias takes a gradient, the conv's own bias gradient (a
    sum over the NCHW-strided gradient, about 2/3 of the conv's backward on CPU) is replaced by a
    sum over the contiguous (B, N, C) gradient: the conv adds a detached bias (the same rounding as
    before, in every dtype) and ``bias - bias.detach()``, exact zeros, carries the gradient."""
    k, n = conv.kernel_size[0], x.shape[1]
    w = conv.weight.flip(-1) if mode == "anticausal" else conv.weight
    pad = k // 2 if mode == "same" else k - 1
    bias = conv.bias
    grad_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing()
    y = F.conv2d(x[:, None].permute(0, 3, 1, 2), w[:, :, None], bias.detach() if grad_bias else bias,
                 padding=(0, pad), groups=conv.groups)
    y = y.permute(0, 2, 3, 1)[:, 0]  # (B, N + padding, C), in channels-last memory
    y = y[:, k - 1:k - 1 + n] if mode == "anticausal" else y[:, :n]
    return y + (bias - bias.detach()).to(y.dtype) if grad_bias else y


def inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> Tensor:
    """Mamba's Δ bias initialisation (Gu & Dao 2023): ``softplus^-1(dt)`` with dt log-uniform in
    [dt_min, dt_max], so that ``softplus(bias)`` starts in that range."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
