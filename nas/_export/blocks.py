"""The blocks `nas export` writes into a model file, as templates (see nas/_export/writer.py).

Each top-level definition here is copied, with its comments, into the export of an architecture
that uses it (the writer follows name references). A line ending in ``# [flag]`` is kept only
when the architecture needs that feature, ``# [!flag]`` only when it does not; the marker is
removed, and any text after it stays as the line's comment. A line ``#[flag] CODE`` (or
``#[!flag] CODE``) is an alternative: CODE, at the comment's indentation, where it applies.
Flags: ``layouts`` (some block converts between (B, C, H, W) maps and (B, N, C) tokens),
``quant`` (int8 / fp8 precision), ``layer_scale``, ``ssm``.

These are written for a reader of one architecture: no registry, no supernet slicing, no hooks a
fixed model does not need. The library's layers (search_spaces/layers/) stay the single source
of truth: tests/test_export_blocks.py checks that every registered mixer has a template here with
the same state_dict keys and shapes, the same initial weights and the same outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- layout and shared pieces -------------------------------------------------------------------


def to_layout(x: Tensor, layout: str, hw: tuple[int, int]) -> Tensor:
    """``x`` as (B, C, H, W) maps for layout "nchw", as (B, H*W, C) tokens for "nlc"; "any" keeps it."""
    if layout == "nlc" and x.ndim == 4:
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    if layout == "nchw" and x.ndim == 3:
        b, _, c = x.shape
        return x.transpose(1, 2).reshape(b, c, *hw)  # (B, H*W, C) -> (B, C, H, W)
    return x


def channel_linear(fc: nn.Module, x: Tensor) -> Tensor:
    """The linear layer ``fc`` over the channels of (B, N, C) tokens or of (B, C, H, W) maps."""
    if x.ndim == 3:
        return fc(x)
    if not isinstance(fc, nn.Linear):  # [quant] an int8 / fp8 layer (to_precision): channels last and back
        return fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [quant]
    return F.conv2d(x, fc.weight[:, :, None, None], fc.bias)  # the same map as a 1x1 convolution


class ConvBN(nn.Sequential):
    """Conv2d without bias, then BatchNorm2d, as in LeViT (Graham et al. 2021) and EfficientViT."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)


class StarReLU(nn.Module):
    """StarReLU, s * relu(x)^2 + b with learned scalars (Yu et al. 2023, MetaFormer Baselines)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


# --- norms: each takes (B, C, H, W) maps or (B, N, C) tokens, with the same parameters ------------


class LayerNormAny(nn.LayerNorm):
    """LayerNorm over channels (Ba et al. 2016); on (B, C, H, W) maps, pixel by pixel."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:  # channels last for the norm, then back
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (Wu & He 2018), as in PoolFormer: statistics over all of a sample."""

    def __init__(self, dim: int) -> None:
        super().__init__(1, dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:  # (B, N, C) -> (B, C, N) for group_norm, and back
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        return super().forward(x)


class BatchNormAny(nn.BatchNorm2d):
    """BatchNorm over channels (Ioffe & Szegedy 2015)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:  # (B, N, C) -> (B, C, N, 1), and back
            return super().forward(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return super().forward(x)


# --- token mixers: forward(x, hw) with hw the (H, W) token grid ------------------------------------


class Attention(nn.Module):
    """Multi-head softmax self-attention (Vaswani et al. 2017), as in ViT (Dosovitskiy et al. 2021)."""

    layout = "nlc"  # [layouts] works on (B, N, C) tokens

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> 3 x (B, heads, N, head_dim), split as timm's ViT does
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))  # heads back side by side: (B, N, C)


class SingleHeadAttention(nn.Module):
    """Single-head attention on a part of the channels (Yun & Ro 2024, SHViT); the rest pass through."""

    layout = "nchw"  # [layouts] works on (B, C, H, W) maps
    qk_dim = 16

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.pdim = dim, min(dim, max(4, int(dim / 4.67)))  # about 1/4.67 of the channels attend
        self.pre_norm = GroupNorm1(self.pdim)
        self.qkv = ConvBN(self.pdim, 2 * self.qk_dim + self.pdim)
        self.act = nn.ReLU()
        self.proj = ConvBN(dim, dim)  # SHViT starts this BN at 0; 1 keeps training-free proxies alive

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = self.qkv(self.pre_norm(x1)).flatten(2).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # (B, C, N) -> (B, 1, N, C): one head
        x1 = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, self.pdim, h, w)
        return self.proj(self.act(torch.cat([x1.to(x2.dtype), x2], dim=1)))


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention (Liu et al. 2023, EfficientViT: Memory Efficient Vision Transformer
    with Cascaded Group Attention): head i attends over its channel group plus head i-1's output,
    with a learned bias per relative offset (offsets beyond the build grid use its largest)."""

    layout = "nchw"  # [layouts] works on (B, C, H, W) maps
    key_dim = 16

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.d, self.grid = heads, dim // heads, grid
        kd = self.key_dim
        self.qkvs = nn.ModuleList(ConvBN(self.d, 2 * kd + self.d) for _ in range(heads))
        self.dws = nn.ModuleList(ConvBN(kd, kd, 5, 1, 2, groups=kd) for _ in range(heads))  # 5x5 depthwise on q
        self.act = nn.ReLU()
        self.proj = ConvBN(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, grid[0] * grid[1]))  # per head, per (|dy|, |dx|)

    def bias_index(self, h: int, w: int, device: torch.device) -> Tensor:
        """(N, N) indices into the bias table: |dy| * grid_w + |dx|, clamped to the build grid."""
        ys = torch.arange(h, device=device).repeat_interleave(w)
        xs = torch.arange(w, device=device).repeat(h)
        dy = (ys[:, None] - ys[None, :]).abs().clamp(max=self.grid[0] - 1)
        dx = (xs[:, None] - xs[None, :]).abs().clamp(max=self.grid[1] - 1)
        return dy * self.grid[1] + dx

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, _, h, w = x.shape
        bias = self.attention_biases[:, self.bias_index(h, w, x.device)]  # (heads, N, N)
        kd, outs, feat = self.key_dim, [], None
        for i, group in enumerate(x.chunk(self.heads, dim=1)):
            feat = group if feat is None else feat + group  # the cascade: the previous head's output joins in
            q, k, v = self.qkvs[i](feat).split([kd, kd, self.d], dim=1)
            q, k, v = self.dws[i](q).flatten(2), k.flatten(2), v.flatten(2)  # (B, C, N)
            attn = ((q.transpose(-2, -1) @ k) * kd**-0.5 + bias[i]).softmax(dim=-1).to(v.dtype)  # (B, N, N)
            feat = (v @ attn.transpose(-2, -1)).reshape(b, self.d, h, w)
            outs.append(feat)
        return self.proj(self.act(torch.cat(outs, dim=1)))


class LinearAttention(nn.Module):
    """Multi-head ReLU linear attention (Cai et al. 2023, EfficientViT: Multi-Scale Linear Attention
    for High-Resolution Dense Prediction): relu(q) (relu(k)^T v) / (relu(q) sum relu(k)), O(N)."""

    layout = "nlc"  # [layouts] works on (B, N, C) tokens

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        with torch.autocast(device_type=x.device.type, enabled=False):  # in float32 even under autocast
            q, k, v = q.float().relu(), k.float().relu(), v.float()  # (B, heads, N, hd)
            num = q @ (k.transpose(-2, -1) @ v)  # (hd, hd) state per head: no N x N matrix
            den = q @ k.sum(dim=2).unsqueeze(-1)  # (B, heads, N, 1)
            out = num / (den + 1e-15)
        return self.proj(out.to(qkv.dtype).transpose(1, 2).reshape(b, n, c))


def gla_chunked(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, chunk: int = 16) -> Tensor:
    """Causal gated linear attention o_t = q_t S_t, S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, in the
    chunkwise form of Yang et al. 2024 (Sec. 4). q, k, log_alpha: (..., N, d_k); v: (..., N, d_v)."""
    n = q.shape[-2]
    chunks = math.ceil(n / chunk)
    size = math.ceil(n / chunks)
    pad = chunks * size - n  # zero keys and values (alpha = 1) at the end change nothing before them
    q, k, v, log_alpha = (F.pad(t, (0, 0, 0, pad)).unflatten(-2, (chunks, size)) for t in (q, k, v, log_alpha))
    g = log_alpha.cumsum(-2)  # (..., chunks, T, d_k): in-chunk cumulative log gates, decreasing along T
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    first, last = g[..., :1, :], g[..., -1:, :]
    span = math.inf if torch.jit.is_tracing() or not g.numel() else float((first - last).detach().amax())
    if span <= (300.0 if g.dtype == torch.float64 else 30.0):
        # exp(G_i - G_j) = exp(G_i - G_0) exp(G_0 - G_j): one matmul while exp(span) cannot overflow
        scores = ((q * (g - first).exp()) @ (k * (first - g).exp()).transpose(-1, -2)).masked_fill(~causal, 0.0)
    else:  # strong decays: the pairwise form, each factor <= 1
        rel = (g[..., :, None, :] - g[..., None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
        scores = (q[..., :, None, :] * k[..., None, :, :] * rel.exp()).sum(-1)
    out = scores @ v  # within each chunk
    # across chunks: the (d_k, d_v) state at each chunk's end, and what enters each chunk from before
    decay = last.exp().transpose(-1, -2)  # (..., chunks, d_k, 1)
    update = (k * (last - g).exp()).transpose(-1, -2) @ v  # (..., chunks, d_k, d_v)
    state, incoming = torch.zeros_like(update[..., 0, :, :]), []
    for c in range(chunks):
        incoming.append(state)
        state = decay[..., c, :, :] * state + update[..., c, :, :]
    out = out + (q * g.exp()) @ torch.stack(incoming, dim=-3)
    return out.flatten(-3, -2)[..., :n, :]


class HeadRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) over each head's channels, in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-5)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class BidirectionalGLA(nn.Module):
    """ViG's bidirectional gated linear attention with 2D locality (Liao et al. 2024, ViG: Linear-
    complexity Visual Sequence Learning with Gated Linear Attention; Yang et al. 2024, GLA)."""

    layout = "nlc"  # [layouts] works on (B, N, C) tokens

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # data-dependent forget gates, low rank 16 as in GLA, one per direction
        self.gate_fwd = nn.Sequential(nn.Linear(dim, 16, bias=False), nn.Linear(16, dim))
        self.gate_bwd = nn.Sequential(nn.Linear(dim, 16, bias=False), nn.Linear(16, dim))
        self.g_proj = nn.Linear(dim, dim)
        self.o_norm = HeadRMSNorm(self.head_dim)
        self.l_norm = HeadRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        # 3x3 depthwise conv on the token grid: (B, N, C) -> (B, C, H, W) -> (B, N, C)
        xl = F.silu(self.local(x.transpose(1, 2).reshape(b, c, *hw))).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(xl).chunk(3, dim=-1)
        gf, gb = self.gate_fwd(xl), self.gate_bwd(xl)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            # (B, N, C) -> (B, heads, N, head_dim)
            q, k, v, gf, gb = (t.to(dtype).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
                               for t in (q, k, v, gf, gb))
            q = q * self.head_dim**-0.5
            la_f, la_b = F.logsigmoid(gf) / 16, F.logsigmoid(gb) / 16  # log alpha = log sigmoid(.)^(1/16)
            # both directions in one batch; the backward one runs on the reversed sequence
            o = gla_chunked(torch.stack([q, q.flip(-2)]), torch.stack([k, k.flip(-2)]),
                            torch.stack([v, v.flip(-2)]), torch.stack([la_f, la_b.flip(-2)]))
            o = self.o_norm(o[0] + o[1].flip(-2)).transpose(1, 2).flatten(2)  # (B, N, C)
        local = self.l_norm(xl.unflatten(-1, (self.heads, self.head_dim))).flatten(2)
        gate = torch.sigmoid(self.g_proj(xl))  # mixes attention output and local features
        return self.o_proj(gate * o.to(gate.dtype) + (1 - gate) * local.to(gate.dtype))


def conv_tokens(x: Tensor, conv: nn.Conv1d, mode: str) -> Tensor:
    """Depthwise ``conv`` along the tokens of x (B, N, C): "causal" (sees t-k+1 .. t), "anticausal"
    (the causal conv of the reversed sequence) or "same" (centred). A (1, k) conv2d on a
    channels-last view: no transposes."""
    k, n = conv.kernel_size[0], x.shape[1]
    w = conv.weight.flip(-1) if mode == "anticausal" else conv.weight
    y = F.conv2d(x[:, None].permute(0, 3, 1, 2), w[:, :, None], conv.bias,
                 padding=(0, k // 2 if mode == "same" else k - 1), groups=conv.groups).permute(0, 2, 3, 1)[:, 0]
    return y[:, k - 1:k - 1 + n] if mode == "anticausal" else y[:, :n]


def dt_bias_init(n: int) -> Tensor:
    """Mamba's delta bias: softplus^-1(dt), dt log-uniform in [1e-3, 0.1]."""
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Mamba's scan (Gu & Dao 2023, Algorithm 2): h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,
    y_t = C_t . h_t, step by step. u, delta: (B, N, D); A: (D, S); B, C: (B, N, S) -> y (B, N, D)."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # (B, D, S)
    ys = []
    for t in range(u.shape[1]):
        h = (delta[:, t, :, None] * u[:, t, :, None]) * B[:, t, None, :] + torch.exp(delta[:, t, :, None] * A) * h
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


class SelectiveScanBranch(nn.Module):
    """One direction of a Mamba block (Gu & Dao 2023): causal depthwise conv1d, SiLU, input-dependent
    (delta, B, C) and the selective scan, with Mamba's initialisation."""

    def __init__(self, d_inner: int, dt_rank: int, d_state: int = 16, d_conv: int = 4) -> None:
        super().__init__()
        self.dt_rank, self.d_state = dt_rank, d_state
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        with torch.no_grad():
            # delta = softplus(dt_proj(.)) starts log-uniform in [1e-3, 0.1]
            nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
            self.dt_proj.bias.copy_(dt_bias_init(d_inner))
        # S4D-real A = -[1 .. d_state] per channel, kept as log(-A); skip connection D = 1
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: Tensor) -> Tensor:
        u = F.silu(conv_tokens(x, self.conv1d, "causal"))
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # the scan runs in float32 at least
            u, b, c = u.to(dtype), b.to(dtype), c.to(dtype)
            delta = F.softplus(F.linear(dt.to(dtype), self.dt_proj.weight.to(dtype)) + self.dt_proj.bias.to(dtype))
            return selective_scan(u, delta, -torch.exp(self.A_log.to(dtype)), b, c) + self.D.to(dtype) * u


class BidirectionalMamba(nn.Module):
    """Vision Mamba's bidirectional block (Zhu et al. 2024, Vision Mamba; Gu & Dao 2023, Mamba):
    y = (forward scan + flipped backward scan) * silu(z), shared in/out projections."""

    layout = "nlc"  # [layouts] works on (B, N, C) tokens

    def __init__(self, dim: int) -> None:
        super().__init__()
        d_inner, dt_rank = 2 * dim, math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)  # outputs: x, then the gate z
        self.fwd = SelectiveScanBranch(d_inner, dt_rank)
        self.bwd = SelectiveScanBranch(d_inner, dt_rank)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, N, d_inner) each
        y = self.fwd(xi) + self.bwd(xi.flip(1)).flip(1)
        with torch.autocast(x.device.type, enabled=False):
            y = (y * F.silu(z.to(y.dtype))).to(z.dtype)
        return self.out_proj(y)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, shift: bool = False,
             reverse: bool = False, chunk: int = 48) -> Tensor:
    """Mamba-2's scan with one scalar decay per head (Dao & Gu 2024, Transformers are SSMs: state
    space duality), h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t . h_t, as chunks of matmuls.
    x (b, n, heads, p), dt (b, n, heads), A (heads,), B, C (b, n, s) -> (b, n, heads, p). reverse:
    from the last token to the first; shift: y_t is the step before's output (Hydra)."""
    b, n, h, p = x.shape
    chunks = math.ceil(n / chunk)
    q = math.ceil(n / chunks)
    pad = chunks * q - n  # padded tokens (no input, decay 1) go last and change nothing
    if shift:  # the step before's C at each step
        C = F.pad(C[:, 1:], (0, 0, 0, 1)) if reverse else F.pad(C[:, :-1], (0, 0, 1, 0))
    x = F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, chunks, q, h, p)
    dt, la, B, C = (F.pad(t, (0, 0, 0, pad)).view(b, chunks, q, -1) for t in (dt, dt * A, B, C))

    def running(t: Tensor, rev: bool, exclusive: bool = False) -> Tensor:  # sums along the chunk
        if exclusive:  # up to the step before
            t = F.pad(t[:, :, 1:], (0, 0, 0, 1)) if rev else F.pad(t[:, :, :-1], (0, 0, 1, 0))
        return t.flip(2).cumsum(2).flip(2) if rev else t.cumsum(2)

    def per_column(t: Tensor) -> Tensor:  # (..., heads) -> (..., heads * p)
        return t[..., None].expand(*t.shape, p).flatten(-2)

    def entering(local: Tensor, total: Tensor) -> Tensor:  # the state carried into each chunk
        carry, state, out = per_column(total.exp()), torch.zeros_like(local[:, 0]), []
        for i in (range(chunks - 1, -1, -1) if reverse else range(chunks)):
            out.append(state)
            state = carry[:, i] * state + local[:, i]
        return torch.stack(out[::-1] if reverse else out, 1)

    cs = running(la, reverse)  # (b, chunks, q, heads): log decay from the chunk's start
    cs_out = running(la, reverse, exclusive=True) if shift else cs
    total = cs[:, :, :1] if reverse else cs[:, :, -1:]  # each chunk's whole decay
    ones = torch.ones(q, q, dtype=torch.bool, device=x.device)
    mask = ones.triu(int(shift)) if reverse else ones.tril(-int(shift))  # which input j reaches output t
    scores = (C @ B.transpose(-1, -2)).masked_fill(~mask, 0.0)  # C_t . B_j, shared by the heads
    span = math.inf if torch.jit.is_tracing() else float(total.abs().amax())
    if span <= (600.0 if x.dtype == torch.float64 else 60.0):
        # exp(cs_t - cs_j) = exp(cs_t - r) exp(r - cs_j), r half the chunk's decay: all heads in one
        # matmul, every factor <= exp(span / 2)
        r = total / 2
        v = (x * (dt * (r - cs).exp())[..., None]).flatten(-2)
        y = scores @ v
        if chunks > 1:
            state = entering((B.transpose(-1, -2) @ v) * per_column((total - r).exp()), total)
            y = torch.baddbmm(y.flatten(0, 1), C.flatten(0, 1), (state * per_column(r.exp())).flatten(0, 1))
        y = y.view(b, chunks, q, h, p) * (cs_out - r).exp()[..., None]
    else:  # strong decays: a (q, q) decay matrix per head, its sums taken step by step (<= 1)
        xd = x * dt[..., None]
        la_h = (la.flip(2) if reverse else la).transpose(2, 3)  # (b, chunks, heads, q)
        if shift:
            la_h = F.pad(la_h[..., :-1], (1, 0))
        seg = la_h[..., :, None].expand(*la_h.shape, q).masked_fill(~ones.tril(-1 - int(shift)), 0.0).cumsum(-2)
        decay = seg.masked_fill(~ones.tril(-int(shift)), -math.inf).exp()
        decay = decay.flip(-1, -2) if reverse else decay
        y = ((decay * scores[:, :, None]) @ xd.transpose(2, 3)).transpose(2, 3)
        if chunks > 1:
            to_end = running(la, not reverse, exclusive=True)  # log decay from each step to the chunk's end
            state = entering(B.transpose(-1, -2) @ (xd * to_end.exp()[..., None]).flatten(-2), total)
            y = y + (C @ state).unflatten(-1, (h, p)) * cs_out.exp()[..., None]
    return y.reshape(b, chunks * q, h, p)[:, :n]


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate z (Mamba-2: norm(y * silu(z)); Hydra: norm(y) * silu(z)), in float32."""

    def __init__(self, dim: int, norm_before_gate: bool) -> None:
        super().__init__()
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        with torch.autocast(y.device.type, enabled=False):
            dtype = torch.promote_types(y.dtype, torch.float32)
            y, gate = y.to(dtype), F.silu(z.to(dtype))
            y = y if self.norm_before_gate else y * gate
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + 1e-5) * self.weight.to(dtype)
            return (y * gate if self.norm_before_gate else y).to(z.dtype)


class Mamba2Branch(nn.Module):
    """One direction of a Mamba-2 block (Dao & Gu 2024): B, C and delta from the block input, a causal
    depthwise conv and SiLU over x, B, C, the scan with a scalar A per head (A ~ -U[1, 16]), skip D."""

    def __init__(self, dim: int, d_inner: int, reverse: bool, d_state: int = 16, headdim: int = 16) -> None:
        super().__init__()
        self.heads, self.headdim, self.reverse = d_inner // headdim, headdim, reverse
        self.bc_proj = nn.Linear(dim, 2 * d_state, bias=False)
        self.delta_proj = nn.Linear(dim, self.heads, bias=False)
        self.conv_x = nn.Conv1d(d_inner, d_inner, 4, groups=d_inner, padding=3)
        self.conv_bc = nn.Conv1d(2 * d_state, 2 * d_state, 4, groups=2 * d_state, padding=3)
        self.dt_bias = nn.Parameter(dt_bias_init(self.heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(self.heads))

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        mode = "anticausal" if self.reverse else "causal"  # the backward branch reads from the end
        x = F.silu(conv_tokens(x, self.conv_x, mode))
        b, c = F.silu(conv_tokens(self.bc_proj(u), self.conv_bc, mode)).chunk(2, dim=-1)
        dt = self.delta_proj(u)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # the scan runs in float32 at least
            xh = x.to(dtype).unflatten(-1, (self.heads, self.headdim))
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
            y = ssd_scan(xh, dt, -torch.exp(self.A_log.to(dtype)), b.to(dtype), c.to(dtype), reverse=self.reverse)
            return torch.addcmul(y, xh, self.D.to(dtype)[:, None]).flatten(-2)  # skip D


class BidirectionalMamba2(nn.Module):
    """Mamba-2's block (Dao & Gu 2024) run both ways as in Vision Mamba (Zhu et al. 2024):
    y = fwd(x) + bwd(x) (bwd reads the sequence from its end), gated RMSNorm with z, out_proj."""

    layout = "nlc"  # [layouts] works on (B, N, C) tokens

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.z_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.fwd = Mamba2Branch(dim, 2 * dim, reverse=False)
        self.bwd = Mamba2Branch(dim, 2 * dim, reverse=True)
        self.norm = GatedRMSNorm(2 * dim, norm_before_gate=False)
        self.out_proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, u: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.x_proj(u)
        return self.out_proj(self.norm(self.fwd(u, x) + self.bwd(u, x), self.z_proj(u)))


class Hydra(nn.Module):
    """Hydra's quasiseparable mixer (Hwang et al. 2024, Hydra: Bidirectional State Space Models
    Through Generalized Matrix Mixers): y = shift(forward scan) + shift(backward scan) + x D(x), with
    a centred conv, one A per head for both directions (A = -1 at init), gated RMSNorm, out_proj."""

    layout = "nlc"  # [layouts] works on (B, N, C) tokens

    def __init__(self, dim: int, d_state: int = 16, headdim: int = 16) -> None:
        super().__init__()
        d_inner = 2 * dim
        self.heads, self.headdim = d_inner // headdim, headdim
        self.x_proj = nn.Linear(dim, d_inner, bias=False)
        self.z_proj = nn.Linear(dim, d_inner, bias=False)
        self.bc_proj = nn.Linear(dim, 4 * d_state, bias=False)  # B, C forward; B, C backward
        self.delta_proj = nn.Linear(dim, 2 * self.heads, bias=False)  # delta forward; delta backward
        self.conv_x = nn.Conv1d(d_inner, d_inner, 7, groups=d_inner, padding=3)
        self.conv_bc = nn.Conv1d(4 * d_state, 4 * d_state, 7, groups=4 * d_state, padding=3)
        self.dt_bias = nn.Parameter(dt_bias_init(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.fc_D = nn.Linear(d_inner, self.heads, bias=False)  # the diagonal's input-dependent part
        self.norm = GatedRMSNorm(d_inner, norm_before_gate=True)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, u: Tensor, hw: tuple[int, int]) -> Tensor:
        x = F.silu(conv_tokens(self.x_proj(u), self.conv_x, "same"))
        bf, cf, bb, cb = F.silu(conv_tokens(self.bc_proj(u), self.conv_bc, "same")).chunk(4, dim=-1)
        dt, diag = self.delta_proj(u), self.fc_D(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(u.device.type, enabled=False):  # the scans run in float32 at least
            xh = x.to(dtype).unflatten(-1, (self.heads, self.headdim))
            dt = F.softplus(dt.to(dtype).unflatten(-1, (2, self.heads)) + self.dt_bias.to(dtype))
            A = -torch.exp(self.A_log.to(dtype))
            bf, cf, bb, cb = (t.to(dtype) for t in (bf, cf, bb, cb))
            y = ssd_scan(xh, dt[:, :, 0], A, bf, cf, shift=True)  # tokens strictly before t
            y = y + ssd_scan(xh, dt[:, :, 1], A, bb, cb, shift=True, reverse=True)  # strictly after t
            y = torch.addcmul(y, xh, (diag.to(dtype) + self.D.to(dtype))[..., None])  # the diagonal
        return self.out_proj(self.norm(y.flatten(-2), self.z_proj(u)))


class GlobalFilter(nn.Module):
    """GFNet's global filter (Rao et al. 2021, Global Filter Networks for Image Classification):
    irfft2(rfft2(x) * K), a learned complex filter K per channel over the token grid."""

    layout = "nchw"  # [layouts] works on (B, C, H, W) maps

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        h, w = grid
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)  # (real, imaginary)

    def filter_for(self, h: int, w: int) -> Tensor:
        """The complex filter (C, H, W//2+1), bicubically resized when the grid is not the build grid."""
        weight = self.complex_weight.float()
        h0, w0, c, _ = weight.shape
        if (h0, w0) != (h, w // 2 + 1):
            planes = weight.reshape(1, h0, w0, c * 2).permute(0, 3, 1, 2)
            planes = F.interpolate(planes, size=(h, w // 2 + 1), mode="bicubic", align_corners=True)
            weight = planes.permute(0, 2, 3, 1).reshape(h, w // 2 + 1, c, 2)
        return torch.view_as_complex(weight.permute(2, 0, 1, 3).contiguous())

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        h, w = x.shape[-2:]
        with torch.autocast(device_type=x.device.type, enabled=False):  # the FFT runs in float32
            spec = torch.fft.rfft2(x.float(), dim=(-2, -1), norm="ortho") * self.filter_for(h, w)
            y = torch.fft.irfft2(spec, s=(h, w), dim=(-2, -1), norm="ortho")
        return y.to(x.dtype)


class Pooling(nn.Module):
    """PoolFormer's token mixer (Yu et al. 2022, MetaFormer Is Actually What You Need for Vision):
    3x3 average pooling minus the input (the block's residual adds the input back)."""

    layout = "nchw"  # [layouts] works on (B, C, H, W) maps

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.pool(x) - x  # the block's residual adds x back: the 3x3 average remains


class SepConv(nn.Module):
    """ConvFormer's inverted separable convolution (Yu et al. 2023, MetaFormer Baselines for Vision):
    1x1 conv to 2C, StarReLU, 7x7 depthwise conv, 1x1 conv back to C."""

    layout = "nchw"  # [layouts] works on (B, C, H, W) maps

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pwconv1 = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.act = StarReLU()
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 7, padding=3, groups=2 * dim, bias=False)
        self.pwconv2 = nn.Conv2d(2 * dim, dim, 1, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.pwconv2(self.dwconv(self.act(self.pwconv1(x))))


class IdentityMixer(nn.Module):
    """IdentityFormer's token mixer (Yu et al. 2023, MetaFormer Baselines for Vision): no mixing."""

    layout = "any"  # [layouts] takes either layout

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return x


# --- channel mixers: forward(x, hw), on tokens or maps ----------------------------------------------


class Mlp(nn.Module):
    """Transformer FFN (Vaswani et al. 2017), as in ViT and DeiT: fc1, GELU, fc2."""

    layout = "any"  # [layouts] takes either layout

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return channel_linear(self.fc2, self.act(channel_linear(self.fc1, x)))


class SwiGLU(nn.Module):
    """SwiGLU FFN (Shazeer 2020, GLU Variants Improve Transformer): fc2(silu(gate) * value)."""

    layout = "any"  # [layouts] takes either layout

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(8, round(2 * dim * mlp_ratio / 3 / 8) * 8)  # 2/3 of the MLP's width, a multiple of 8
        self.fc1 = nn.Linear(dim, 2 * hidden)  # outputs: the gate, then the value
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        gate, value = channel_linear(self.fc1, x).chunk(2, dim=1 if x.ndim == 4 else -1)
        return channel_linear(self.fc2, F.silu(gate) * value)


class ConvFFN(nn.Module):
    """PVT v2's convolutional FFN (Wang et al. 2022): fc1, 3x3 depthwise conv, GELU, fc2."""

    layout = "nchw"  # [layouts] works on (B, C, H, W) maps

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)  # applied as 1x1 convolutions, as PVT v2 keeps them
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return channel_linear(self.fc2, self.act(self.dwconv(channel_linear(self.fc1, x))))


class NestedMlp(Mlp):
    """MatFormer's nested FFN (Devvrit et al. 2023, MatFormer: Nested Transformer for Elastic
    Inference), at full width: the same fc1, GELU, fc2 as Mlp, trained so that the first m hidden
    units (fc1 rows [:m], fc2 columns [:m]) also form a working, smaller FFN."""


# --- assembly ------------------------------------------------------------------------------------


class Stem(nn.Module):
    """Image to feature map: a strided convolution (or a small conv stack), then a norm."""

    def __init__(self, proj: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.proj, self.norm = proj, norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class Downsample(nn.Module):
    """Between stages: PoolFormer's 3x3 stride-2 convolution (Yu et al. 2022), or a 1x1 one that keeps
    the grid, to the next stage's width."""

    def __init__(self, proj: nn.Conv2d) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PatchMerging(nn.Module):
    """Between stages: 2x2 patch merging (Liu et al. 2021, Swin Transformer) as a 2x2 stride-2
    convolution; an odd grid is zero-padded on the right and bottom first."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.proj(x)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.gamma.view(1, -1, 1, 1) if x.ndim == 4 else self.gamma)  # along the channel dim


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops a residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)  # one draw per sample
        return x * mask / (1.0 - self.p)  # rescaled: the expected output is x


class Block(nn.Module):
    """MetaFormer block (Yu et al. 2022): x + token_mixer(norm1(x)), then x + channel_mixer(norm2(x))."""

    def __init__(self, dim: int, token_mixer: nn.Module, channel_mixer: nn.Module, norm: type[nn.Module],
                 drop_path: float, layer_scale: float | None) -> None:  # [layer_scale]
                 #[!layer_scale] drop_path: float) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.token_mixer = token_mixer
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()  # [layer_scale]
        self.norm2 = norm(dim)
        self.channel_mixer = channel_mixer
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()  # [layer_scale]
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = to_layout(x, self.token_mixer.layout, hw)  # [layouts] each mixer gets its own layout
        x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x), hw)))  # [layer_scale] across positions
        x = x + self.drop_path(self.token_mixer(self.norm1(x), hw))  # [!layer_scale] across positions
        x = to_layout(x, self.channel_mixer.layout, hw)  # [layouts]
        return x + self.drop_path(self.ls2(self.channel_mixer(self.norm2(x), hw)))  # [layer_scale] per position
        return x + self.drop_path(self.channel_mixer(self.norm2(x), hw))  # [!layer_scale] per position


class Stage(nn.Module):
    """A stage: an optional downsampling, then blocks at one width."""

    def __init__(self, downsample: nn.Module | None, blocks: list[Block]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        if self.downsample is not None:
            x = self.downsample(to_layout(x, "nchw", hw))  # [layouts]
            x = self.downsample(x)  # [!layouts]
            hw = (x.shape[-2], x.shape[-1])  # the smaller grid
        for block in self.blocks:
            x = block(x, hw)
        return x, hw


# --- int8 / fp8 layers, for to_precision() ---------------------------------------------------------


class Int8Linear(nn.Module):
    """Dynamically quantized linear layer (Jacob et al. 2018): int8 weights per output channel, int8
    activations per row measured at run time, int32 products (torch._int_mm)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127.0, 127.0).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        xf = x.reshape(-1, x.shape[-1]).float()  # (..., C) -> (rows, C)
        x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        xq = (xf / x_scale).round().clamp(-127.0, 127.0).to(torch.int8)
        y = torch._int_mm(xq, self.qweight.t()).float() * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Fp8Linear(nn.Module):
    """Linear layer in float8 E4M3 (Micikevicius et al. 2022, FP8 Formats for Deep Learning): per-tensor
    scales, torch._scaled_mm with bfloat16 output (fast on NVIDIA GPUs of compute capability >= 8.9)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax().clamp_min(1e-12) / 448.0  # 448: the largest finite E4M3 value
        self.register_buffer("qweight", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone())

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (..., C) -> (rows, C)
        x_scale = x2.abs().amax().float().clamp_min(1e-12) / 448.0
        xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=torch.bfloat16)
        return y.reshape(*x.shape[:-1], -1)
