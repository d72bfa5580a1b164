"""Bidirectional gated linear attention token mixer (ViG).

ViG: Liao et al. 2024, "ViG: Linear-complexity Visual Sequence Learning with Gated Linear
Attention". Gated linear attention (GLA): Yang et al. 2024, "Gated Linear Attention Transformers
with Hardware-Efficient Training".

Pure PyTorch, O(N): GLA's chunkwise form (exact; intra-chunk pairwise decays, chunk-to-chunk
states one chunk at a time), in float32 (float64 stays float64) whatever the input or autocast
dtype.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.registry import FusedSlices, token_mixer

GLA_CHUNK = 16
# Largest in-chunk decay (sum of -log alpha over a chunk) for which the matmul form of the intra-chunk
# scores is used: exp(span) times |q| |k| must stay far below the dtype's largest value.
_MATMUL_SPAN = {torch.float32: 30.0, torch.float64: 300.0}


def gla_chunked(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, chunk: int = GLA_CHUNK) -> Tensor:
    """Causal GLA outputs ``o_t = q_t S_t`` with ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t``.

    q, k, log_alpha: (..., N, d_k); v: (..., N, d_v); ``log_alpha <= 0``. Chunkwise form of Yang et
    al. 2024 (Sec. 4): inside a chunk the decays enter as exp(G_i - G_j) <= 1 per key channel (G the
    in-chunk cumulative log gate), so nothing overflows; across chunks the (d_k, d_v) states follow
    a linear recurrence over N / chunk steps, run one chunk at a time (a few steps over large
    tensors: cheaper than a parallel scan, and what the export template does). Work
    O(N (chunk d_k + d_k d_v)). Forward and backward about 2x faster than the form with a cumsum
    of the gates, four exps and the parallel scan of ``_scan.py`` (batch 64, 196 tokens, 4 heads
    of 32, one CPU thread), equal to it within float rounding.
    """
    n = q.shape[-2]
    chunks = math.ceil(n / chunk)
    size = math.ceil(n / chunks)
    pad = chunks * size - n
    if pad:  # zero keys/values and alpha = 1 at the end change nothing before them
        q, k, v, log_alpha = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_alpha))
    q, k, v, log_alpha = (t.unflatten(-2, (chunks, size)) for t in (q, k, v, log_alpha))
    # G_i = sum_{j <= i} log alpha_j within each chunk, decreasing along it. Everything below needs
    # only R_i = G_i - G_last = -sum_{j > i} log alpha_j >= 0, one product with a triangular matrix
    # (cheaper than cumsum and its backward of flips), and G_last = the chunk's sum.
    after = torch.ones(size, size, dtype=log_alpha.dtype, device=q.device).triu(1).neg_()
    r = torch.matmul(after, log_alpha)  # (..., C, T, d_k)
    last = log_alpha.sum(-2, keepdim=True)  # G_last, (..., C, 1, d_k)
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # the check reads a value: not while a graph is traced (ONNX) or a CUDA graph captured
    capturing = r.is_cuda and torch.cuda.is_current_stream_capturing()
    span = math.inf if torch.jit.is_tracing() or capturing or not r.numel() else \
        float(r[..., 0, :].detach().amax())  # R_0 = G_0 - G_last, the largest in-chunk decay
    if span <= _MATMUL_SPAN.get(r.dtype, 0.0):
        # Intra-chunk P_ij = sum_c q_ic k_jc exp(G_ic - G_jc) for j <= i, split as exp(R_i) exp(-R_j):
        # one matmul, no (T, T, d_k) tensor. exp(R_i) <= exp(span) stays finite (GLA paper, Sec. 4.2,
        # uses such a split with secondary chunks for stronger decays; those take the path below).
        # The key factor k_j exp(-R_j) = k_j exp(G_last - G_j) is also what chunk j adds to the state,
        # and q_i exp(G_i) = q_i exp(R_i) exp(G_last): one exp of a full-size tensor serves all.
        er = r.exp()
        q_r, k_last = q * er, k / er
        scores = (q_r @ k_last.transpose(-1, -2)).masked_fill_(~causal, 0.0)
        q_g = q_r * last.exp()
    else:
        # G_i - G_j = R_i - R_j <= 0 for j <= i, per key channel
        rel = (r[..., :, None, :] - r[..., None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
        scores = (q[..., :, None, :] * k[..., None, :, :] * rel.exp()).sum(-1)
        k_last, q_g = k * r.neg().exp(), q * (r + last).exp()
    # Inter-chunk: what each chunk adds to the state by its end, and the state entering each chunk.
    update = (k_last.transpose(-1, -2) @ v).unbind(-3)  # C x (..., d_k, d_v)
    decay = last.exp().transpose(-1, -2).unbind(-3)  # C x (..., d_k, 1)
    # unbind once, not update[..., c, :, :] per chunk: the backward pass of each such index would
    # write a zero-filled tensor of update's whole size
    state, incoming = torch.zeros_like(update[0]), []
    for c in range(chunks):
        incoming.append(state)
        if c + 1 < chunks:
            state = torch.addcmul(update[c], decay[c], state)
    # out = scores @ v + (q exp(G)) @ incoming, the sum fused into one batched product
    lead, dk, dv = scores.shape[:-2], q.shape[-1], v.shape[-1]
    rows = math.prod(lead)  # not -1: an empty batch would leave it undetermined
    out = torch.baddbmm((scores @ v).reshape(rows, size, dv), q_g.reshape(rows, size, dk),
                        torch.stack(incoming, dim=-3).reshape(rows, dk, dv))
    return out.view(*lead, size, dv).flatten(-3, -2)[..., :n, :]


class HeadRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) over the last (per-head) dimension, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


@token_mixer("gated_linear")
class BidirectionalGLA(nn.Module):
    """ViG's bidirectional gated linear attention with 2D gating locality injection.

    ``x' = silu(dwconv3x3(x))`` on the token grid; q, k, v = shared projections of x'; per
    direction a data-dependent gate ``alpha = sigmoid(x' W1 W2 + b)^(1/16)`` (low rank 16, as GLA);
    ``o = GLA_fwd + flip(GLA_bwd(flip))``; ``G = sigmoid(x' W_g + b_g)``;
    ``out = W_o (G * RMSNorm_head(o) + (1 - G) * RMSNorm_head(x'))`` (Liao et al. 2024; Yang et al. 2024).
    Key and value width are both ``dim`` (a head_dim x head_dim state per head).
    """

    layout: ClassVar[str] = "nlc"
    uses_heads: ClassVar[bool] = True
    supports_prefix: ClassVar[bool] = False
    complexity: ClassVar[str] = "linear"
    paper: ClassVar[str] = (
        "Liao et al. 2024, ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention; "
        "Yang et al. 2024, Gated Linear Attention Transformers with Hardware-Efficient Training"
    )
    gate_rank: ClassVar[int] = 16
    gate_logit_normalizer: ClassVar[int] = 16
    fused_slices: ClassVar[FusedSlices] = (("qkv", 3),)  # rows [q | k | v], dim each
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"gated_linear: dim {dim} is not divisible by heads {heads}; pick heads dividing dim")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.gate_fwd = nn.Sequential(nn.Linear(dim, self.gate_rank, bias=False), nn.Linear(self.gate_rank, dim))
        self.gate_bwd = nn.Sequential(nn.Linear(dim, self.gate_rank, bias=False), nn.Linear(self.gate_rank, dim))
        self.g_proj = nn.Linear(dim, dim)
        self.o_norm = HeadRMSNorm(self.head_dim)
        self.l_norm = HeadRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, head_dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        h, w = hw
        if n != h * w:
            raise ValueError(f"gated_linear: got {n} tokens for a {h}x{w} grid; it takes no class tokens")
        xl = F.silu(self.local(x.transpose(1, 2).reshape(b, c, h, w))).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(xl).chunk(3, dim=-1)
        gf, gb = self.gate_fwd(xl), self.gate_bwd(xl)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v, gf, gb = (self._heads(t.to(dtype)) for t in (q, k, v, gf, gb))
            q = q * self.head_dim**-0.5
            la_f = F.logsigmoid(gf) / self.gate_logit_normalizer
            la_b = F.logsigmoid(gb) / self.gate_logit_normalizer
            # Both directions in one batch: the backward one runs on the reversed sequence.
            o = gla_chunked(torch.stack([q, q.flip(-2)]), torch.stack([k, k.flip(-2)]),
                            torch.stack([v, v.flip(-2)]), torch.stack([la_f, la_b.flip(-2)]))
            o = o[0] + o[1].flip(-2)
            o = self.o_norm(o).transpose(1, 2).flatten(2)  # (B, N, dim)
        local = self.l_norm(xl.unflatten(-1, (self.heads, self.head_dim))).flatten(2)
        gate = torch.sigmoid(self.g_proj(xl))
        y = gate * o.to(gate.dtype) + (1 - gate) * local.to(gate.dtype)
        return self.o_proj(y)
