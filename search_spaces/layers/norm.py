"""Normalization layers that work in either layout (NCHW or NLC) with the same parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("layernorm", "groupnorm1", "batchnorm", "none")


class LayerNormAny(nn.LayerNorm):
    """LayerNorm over channels (Ba et al. 2016); on NCHW it normalizes each pixel's channels."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                self.eps).permute(0, 3, 1, 2)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (Wu & He 2018), as PoolFormer uses: statistics over all tokens and
    channels of a sample, a per-channel affine. Same result on (B, C, H, W) and (B, H*W, C)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(1, dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return F.group_norm(x.transpose(1, 2), 1, self.weight, self.bias, self.eps).transpose(1, 2)
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


class BatchNormAny(nn.BatchNorm2d):
    """BatchNorm over channels (Ioffe & Szegedy 2015) for NCHW or NLC input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return super().forward(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return super().forward(x)


def make_norm(kind: str, dim: int) -> nn.Module:
    """Build a norm by name: layernorm (eps 1e-6), groupnorm1 (eps 1e-5), batchnorm, none."""
    if kind == "layernorm":
        return LayerNormAny(dim)
    if kind == "groupnorm1":
        return GroupNorm1(dim)
    if kind == "batchnorm":
        return BatchNormAny(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")
