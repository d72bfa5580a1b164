"""Softmax-attention token mixers: multi-head (ViT), single-head (SHViT), cascaded group (EfficientViT)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.layers.common import ConvBN
from search_spaces.layers.norm import GroupNorm1
from search_spaces.registry import FusedSlices, token_mixer


def _check_heads(name: str, dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{name}: dim {dim} must be a multiple of heads {heads} (>= 1); change dim or heads")


@token_mixer("attention")
class Attention(nn.Module):
    """Multi-head softmax self-attention (Vaswani et al. 2017), as in ViT/DeiT (Dosovitskiy et al. 2021).

    Parameters: ``qkv`` Linear(dim, 3*dim) and ``proj`` Linear(dim, dim), both with bias:
    4*dim^2 + 4*dim, the same names and count as timm's ``Attention``. Works with class tokens
    in front of the grid tokens (``hw`` is not used).
    """

    layout: ClassVar[str] = "nlc"
    uses_heads: ClassVar[bool] = True
    supports_prefix: ClassVar[bool] = True
    complexity: ClassVar[str] = "quadratic"
    paper: ClassVar[str] = (
        "Vaswani et al. 2017, Attention Is All You Need; Dosovitskiy et al. 2021, "
        "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
    )
    # qkv's output rows are [q | k | v], dim each; each is sliced on its own (AutoFormer)
    fused_slices: ClassVar[FusedSlices] = (("qkv", 3),)
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        _check_heads("attention", dim, heads)
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        # Same split order as timm: (B, N, 3, heads, head_dim) -> (3, B, heads, N, head_dim).
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


@token_mixer("single_head")
class SingleHeadAttention(nn.Module):
    """Single-head self-attention on a partial set of channels (Yun & Ro, CVPR 2024, SHViT).

    ``pdim = min(dim, max(4, int(dim / 4.67)))`` channels go through GroupNorm(1), a 1x1 ConvBN
    to q, k (16 channels each) and v (pdim channels) and one softmax attention over the H*W
    tokens; the other ``dim - pdim`` channels are passed through untouched, concatenated, and
    both parts go through ReLU and a 1x1 ConvBN projection.

    Parameters: 2*pdim (norm) + pdim*(32+pdim) + 2*(32+pdim) (qkv ConvBN) + dim^2 + 2*dim (proj).

    Departure from SHViT: the projection BN weight starts at 1, not 0. The model assembly adds
    its own residual/layer scale; a zero init would make this block's output identically zero
    at init, which makes training-free proxies (gradients, Jacobians) degenerate.
    """

    layout: ClassVar[str] = "nchw"
    uses_heads: ClassVar[bool] = False
    supports_prefix: ClassVar[bool] = False
    complexity: ClassVar[str] = "quadratic"
    paper: ClassVar[str] = "Yun & Ro 2024, SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design"

    qk_dim: ClassVar[int] = 16
    # qkv's output channels are [q (qk_dim) | k (qk_dim) | v (pdim)]. With the one width-dependent
    # segment last this is the same as a plain leading slice; declared so the layout is explicit.
    fused_slices: ClassVar[FusedSlices] = (("qkv", (qk_dim, qk_dim, None)),)
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.dim = dim
        self.pdim = min(dim, max(4, int(dim / 4.67)))
        self.pre_norm = GroupNorm1(self.pdim)
        self.qkv = ConvBN(self.pdim, 2 * self.qk_dim + self.pdim)
        self.act = nn.ReLU()
        self.proj = ConvBN(dim, dim, bn_weight_init=1.0)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = self.qkv(self.pre_norm(x1)).flatten(2).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        # (B, C, N) -> (B, 1, N, C): one head; default scale is qk_dim ** -0.5 as in SHViT.
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        x1 = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, self.pdim, h, w)
        return self.proj(self.act(torch.cat([x1.to(x2.dtype), x2], dim=1)))


@token_mixer("cascaded_group")
class CascadedGroupAttention(nn.Module):
    """Cascaded group attention (Liu et al., CVPR 2023, EfficientViT: Memory Efficient Vision
    Transformer with Cascaded Group Attention).

    The channels are split into ``heads`` groups of d = dim // heads. Head i gets its group plus
    the output of head i-1 (the cascade), a 1x1 ConvBN to q, k (key_dim 16 each) and v (d), a
    depthwise 5x5 ConvBN on q, and softmax attention with a relative-position bias. The head
    outputs are concatenated and go through ReLU and a 1x1 ConvBN projection to dim.

    Position bias: EfficientViT learns one bias per head and per (|dy|, |dx|) offset of a fixed
    resolution. Here the table covers the offsets of the build ``grid`` (heads * gh * gw values,
    zero at init as in EfficientViT); on any other token grid an offset larger than the build
    grid's largest is clamped to it, so the block runs at any resolution. Attention is global
    over the grid (EfficientViT's local-window wrapper is left to the space, not this block);
    the projection BN starts at weight 1 (EfficientViT uses 0), for the same reason as
    ``single_head``.

    Parameters: heads * [d*(32+d) + 2*(32+d) + 16*25 + 32] + dim^2 + 2*dim + heads*gh*gw.
    """

    layout: ClassVar[str] = "nchw"
    uses_heads: ClassVar[bool] = True
    supports_prefix: ClassVar[bool] = False
    complexity: ClassVar[str] = "quadratic"
    paper: ClassVar[str] = (
        "Liu et al. 2023, EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention"
    )

    key_dim: ClassVar[int] = 16
    dw_kernel: ClassVar[int] = 5
    # every head's qkv ConvBN (qkvs.0, qkvs.1, ...) gives [q (key_dim) | k (key_dim) | v (d)]; as in
    # single_head, the same as a plain leading slice while v comes last
    fused_slices: ClassVar[FusedSlices] = (("qkvs", (key_dim, key_dim, None)),)
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        _check_heads("cascaded_group", dim, heads)
        gh, gw = int(grid[0]), int(grid[1])
        if gh < 1 or gw < 1:
            raise ValueError(f"cascaded_group: grid must be positive, got {grid}")
        self.heads = heads
        self.d = dim // heads
        self.scale = self.key_dim**-0.5
        self.grid = (gh, gw)
        kd, pad = self.key_dim, self.dw_kernel // 2
        self.qkvs = nn.ModuleList(ConvBN(self.d, 2 * kd + self.d) for _ in range(heads))
        self.dws = nn.ModuleList(ConvBN(kd, kd, self.dw_kernel, 1, pad, groups=kd) for _ in range(heads))
        self.act = nn.ReLU()
        self.proj = ConvBN(dim, dim, bn_weight_init=1.0)
        self.attention_biases = nn.Parameter(torch.zeros(heads, gh * gw))

    def bias_index(self, hw: tuple[int, int], device: torch.device | None = None) -> Tensor:
        """(N, N) indices into the bias table for an H x W grid; offsets clamped to the build grid."""
        h, w = hw
        gh, gw = self.grid
        ys = torch.arange(h, device=device).repeat_interleave(w)
        xs = torch.arange(w, device=device).repeat(h)
        dy = (ys[:, None] - ys[None, :]).abs().clamp(max=gh - 1)
        dx = (xs[:, None] - xs[None, :]).abs().clamp(max=gw - 1)
        return dy * gw + dx

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, _, h, w = x.shape
        bias = self.attention_biases[:, self.bias_index((h, w), x.device)]  # (heads, N, N)
        kd = self.key_dim
        outs: list[Tensor] = []
        feat: Tensor | None = None
        for i, group in enumerate(x.chunk(self.heads, dim=1)):
            feat = group if feat is None else feat + group  # cascade: previous head's output joins in
            q, k, v = self.qkvs[i](feat).split([kd, kd, self.d], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, C, N)
            attn = (q.transpose(-2, -1) @ k) * self.scale + bias[i]
            attn = attn.softmax(dim=-1).to(v.dtype)
            feat = (v @ attn.transpose(-2, -1)).reshape(b, self.d, h, w)
            outs.append(feat)
        return self.proj(self.act(torch.cat(outs, dim=1)))
