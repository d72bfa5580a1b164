"""Small shared pieces used by several blocks: layout conversion, conv+BN, StarReLU, token convs, and
the double-backward path every hand-written mixer backward takes (:func:`plain_grads`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

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


def stacked_linears(x: Tensor, layers: Sequence[nn.Module]) -> tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` for bias-free ``nn.Linear`` maps of the same input, as
    one matmul over their stacked weights (a concatenation of a few small matrices per call): one
    product forward, one for the input's gradient and one for the weights' instead of one of each
    per layer, and no sum of the per-layer input gradients. The outputs are column views of one
    tensor. Parameters stay per layer, so checkpoints and the supernet's slicing see no difference.
    Measured for Mamba-2's B, C and Δ projections (four maps of 128 -> 16 and 32 channels at (64,
    196) tokens, forward+backward, one CPU thread): 0.7x the separate maps. A layer that is not a
    plain bias-free ``nn.Linear`` (swapped for fp8 or int8) makes every layer run on its own."""
    if all(type(m) is nn.Linear and m.bias is None for m in layers):
        weights = [m.weight for m in layers]  # type: ignore[union-attr]
        return F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)
    return tuple(m(x) for m in layers)


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
    conv1d fwd+bwd on CPU here). While a gradient is taken (outside tracing), with the hand-written
    backward of :class:`_DepthwiseConvTokens` on CPU."""
    k = conv.kernel_size[0]
    w = conv.weight.flip(-1) if mode == "anticausal" else conv.weight
    offset = {"causal": k - 1, "anticausal": 0, "same": k // 2}[mode]  # output t reads input t + j - offset by tap j
    bias = conv.bias
    # on CPU only: on a GPU the blocked weight gradient would be a kernel launch per block, and
    # cuDNN's depthwise backward has no such weakness
    if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.jit.is_tracing() and any(
            t is not None and t.requires_grad for t in (x, w, bias)):
        return _DepthwiseConvTokens.apply(x, w, bias, offset)
    return _conv_tokens(x, w, bias, offset)


def plain_grads(fn: Callable[..., Tensor], ins: tuple[Tensor | None, ...], g: Tensor,
                 *args: Any) -> tuple[Tensor | None, ...]:
    """The gradients of ``fn(*ins, *args)`` (differentiable PyTorch) with respect to ``ins``, given
    the output's gradient ``g``, with a graph: a custom backward's double-backward path. Each input
    is taken through a fresh view, so that its gradient counts only its direct uses in ``fn``: the
    inputs may depend on each other outside (SSD's ``scores`` is made from its ``Bc`` and ``Cc``, the
    selective scan's delta, B and C from its u), and the outer graph adds those paths itself;
    ``autograd.grad`` on the inputs themselves would add them twice. Used by every hand-written
    backward of the mixers (``_ssd.py``, ``_selective_scan.py``, :class:`_DepthwiseConvTokens`)."""
    ins = tuple(t.view_as(t) if t is not None and t.requires_grad else t for t in ins)
    need = [t for t in ins if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(fn(*ins, *args), need, g, create_graph=True, allow_unused=True))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in ins)


def _conv_tokens(x: Tensor, w: Tensor, bias: Tensor | None, offset: int) -> Tensor:
    """``y[t] = sum_j w[:, 0, j] x[t + j - offset] + bias``, x zero outside the N tokens: x (B, N, C),
    w (C, 1, k) -> (B, N, C) (a channels-last view), by one (1, k) conv2d padded alike on both sides."""
    k, n = w.shape[-1], x.shape[1]
    pad = max(offset, k - 1 - offset)
    y = F.conv2d(x[:, None].permute(0, 3, 1, 2), w[:, :, None], bias, padding=(0, pad), groups=w.shape[0])
    return y.permute(0, 2, 3, 1)[:, 0, pad - offset:pad - offset + n]  # (B, N, C), in channels-last memory


def _conv_tokens_in(x: Tensor, w: Tensor, bias: Tensor | None, offset: int, dtype: torch.dtype) -> Tensor:
    """:func:`_conv_tokens` computed in ``dtype`` (the conv's dtype under the caller's autocast)."""
    return _conv_tokens(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype), offset)


class _DepthwiseConvTokens(torch.autograd.Function):
    """:func:`_conv_tokens` with a hand-written backward. oneDNN's depthwise backward spent 4/5 of its
    time on the weight's gradient (5.4 of 6.6 ms at (64, 196, 256), k = 4, one CPU thread), and the
    bias gradient was a sum over the NCHW-strided gradient. Here the input's gradient is the
    mirrored conv of the output's (1.3 ms), the bias's a sum over the contiguous (B, N, C) gradient,
    and the weight's ``dw[j] = sum_{b, t} g[t] x[t + j - offset]`` is taken over blocks of a few
    sequences, all taps at once through an overlapping (strided) view of the zero-padded block,
    which stays in cache: one product and one sum per block (2.2 to 4 ms on a loaded machine). The
    conv's fwd+bwd at that size went from 12.7 to 7.6-8.6 ms (k = 7: 13.0 to 9.6-9.9 ms)."""

    BLOCK = 4  # sequences per block: (4, 196, 4, 256) float32 products are 3 MB; blocks of 2 to 8 measured alike

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, offset: int) -> Tensor:
        # the dtype F.conv2d would compute in: autocast's (conv is on its lower-precision lists), else x's
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            y = _conv_tokens_in(x, w, bias, offset, dtype)
        ctx.offset, ctx.dtype = offset, dtype
        ctx.save_for_backward(x, w, bias)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, bias = ctx.saved_tensors
        off, dtype = ctx.offset, ctx.dtype
        if torch.is_grad_enabled():  # create_graph: the plain conv's gradients, with a graph
            return (*plain_grads(_conv_tokens_in, (x, w, bias), g.to(dtype), off, dtype), None)
        g = g.to(dtype)
        (b, n, c), k = x.shape, w.shape[-1]
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:  # the adjoint: tap j mirrored, offset k - 1 - offset
            g_x = _conv_tokens(g, w.to(dtype).flip(-1), None, k - 1 - off).to(x.dtype)
        if ctx.needs_input_grad[1]:
            acc = torch.zeros(k, c, dtype=torch.promote_types(dtype, x.dtype), device=x.device)
            step = _DepthwiseConvTokens.BLOCK
            xp = acc.new_zeros(min(step, b), n + k - 1, c)  # a block of x, zero-padded: xp[t + j] = x[t + j - off]
            for s in range(0, b, step):
                m = min(step, b - s)
                xp[:m, off:off + n] = x[s:s + m]
                win = xp[:m].as_strided((m, n, k, c), (xp.stride(0), c, c, 1))  # [i, t, j] = xp[i, t + j]
                acc += (win * g[s:s + m, :, None]).sum((0, 1))
            g_w = acc.t()[:, None].to(w.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            g_b = g.sum((0, 1)).to(bias.dtype)
        return g_x, g_w, g_b, None


def inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> Tensor:
    """Mamba's Δ bias initialisation (Gu & Dao 2023): ``softplus^-1(dt)`` with dt log-uniform in
    [dt_min, dt_max], so that ``softplus(bias)`` starts in that range."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
