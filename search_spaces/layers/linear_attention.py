"""ReLU-kernel linear attention (EfficientViT, Cai et al. 2023)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from search_spaces.registry import FusedSlices, token_mixer


@token_mixer("linear")
class LinearAttention(nn.Module):
    """Multi-head ReLU linear attention (Cai et al., ICCV 2023, EfficientViT: Multi-Scale Linear
    Attention for High-Resolution Dense Prediction), without the multi-scale (depthwise
    conv) token aggregation of the paper's LiteMLA block.

    Per head: ``out = relu(q) (relu(k)^T v) / (relu(q) (relu(k)^T 1) + eps)`` with eps = 1e-15 as
    in EfficientViT, computed in float32 even under autocast and in O(N * head_dim^2): the
    N x N matrix is never formed. Parameters: ``qkv`` Linear(dim, 3*dim) and ``proj``
    Linear(dim, dim), 4*dim^2 + 4*dim. Class tokens in front of the grid tokens are fine.
    """

    layout: ClassVar[str] = "nlc"
    uses_heads: ClassVar[bool] = True
    supports_prefix: ClassVar[bool] = True
    complexity: ClassVar[str] = "linear"
    paper: ClassVar[str] = (
        "Cai et al. 2023, EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense Prediction"
    )

    fused_slices: ClassVar[FusedSlices] = (("qkv", 3),)  # rows [q | k | v], dim each
    onnx_blocker: ClassVar[str | None] = None

    eps: ClassVar[float] = 1e-15

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"linear: dim {dim} must be a multiple of heads {heads}; change dim or heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x)
        dtype = qkv.dtype
        q, k, v = qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.float().relu(), k.float().relu(), v.float()  # (B, heads, N, hd)
            kv = k.transpose(-2, -1) @ v  # (B, heads, hd, hd)
            num = q @ kv  # (B, heads, N, hd)
            den = q @ k.sum(dim=2).unsqueeze(-1)  # (B, heads, N, 1)
            out = num / (den + self.eps)
        out = out.to(dtype).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)
