"""Hydra token mixer: a bidirectional, quasiseparable matrix mixer built from two SSD scans.

Hwang, Lahoti, Dao & Gu 2024, "Hydra: Bidirectional State Space Models Through Generalized
Matrix Mixers" (NeurIPS 2024). The sequence mixing matrix is quasiseparable: a strictly lower
semiseparable part (a forward SSD scan, shifted by one token), a strictly upper one (a backward
scan, shifted) and an input-dependent diagonal,

    y = shift(SS(x)) + flip(shift(SS'(flip(x)))) + D(x) x,

so the two directions share the input projections, the convolution and A, with their own B, C
and Δ. The scans are the chunked matmul algorithm of ``_ssd.py`` (Dao & Gu 2024, Mamba-2), in
float32 (float64 stays float64) whatever the input or autocast dtype.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.layers._ssd import GatedRMSNorm, SSDMixer, ssd_scan
from search_spaces.layers.common import depthwise_conv_tokens, inverse_softplus_dt
from search_spaces.registry import FusedSlices, token_mixer


@token_mixer("hydra")
class Hydra(SSDMixer):
    """Hydra (Hwang et al. 2024): ``x = x_proj(u)``, ``z = z_proj(u)``, ``(B_f, C_f, B_b, C_b) =
    bc_proj(u)``; a non-causal depthwise conv1d and SiLU over x and the B, C; Δ per head and
    direction, softplus with a shared bias; one A per head for both directions (initialised to -1,
    as Hydra does); a forward and a backward (reverse) scan, each shifted by one token so that the
    diagonal is left to ``x * (fc_D(x) + D)``; gated RMSNorm ``norm(y) * silu(z)``; ``out_proj``.
    Hydra fuses x, z, the B, C and Δ into one input projection and one conv over (x, B, C); separate
    ones are the same maps (the conv is depthwise), and need no fused slicing in the supernet.
    """

    paper: ClassVar[str] = (
        "Hwang, Lahoti, Dao & Gu 2024, Hydra: Bidirectional State Space Models Through Generalized "
        "Matrix Mixers"
    )

    d_conv: ClassVar[int] = 7  # Hydra's non-causal kernel
    fused_slices: ClassVar[FusedSlices] = (("delta_proj", 2),)  # rows: Δ forward | Δ backward, a head each

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__(dim)
        d_inner, s, k = self.d_inner, self.d_state, self.d_conv
        self.x_proj = nn.Linear(dim, d_inner, bias=False)
        self.z_proj = nn.Linear(dim, d_inner, bias=False)
        self.bc_proj = nn.Linear(dim, 4 * s, bias=False)
        self.delta_proj = nn.Linear(dim, 2 * self.nheads, bias=False)
        self.conv_x = nn.Conv1d(d_inner, d_inner, k, groups=d_inner, padding=k // 2)
        self.conv_bc = nn.Conv1d(4 * s, 4 * s, k, groups=4 * s, padding=k // 2)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))  # A = -exp(0) = -1 per head
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.fc_D = nn.Linear(d_inner, self.nheads, bias=False)  # the input-dependent part of the diagonal
        self.norm = GatedRMSNorm(d_inner, norm_before_gate=True)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, u: Tensor, hw: tuple[int, int]) -> Tensor:
        h = self.nheads
        x = F.silu(depthwise_conv_tokens(self.x_proj(u), self.conv_x, "same"))
        bf, cf, bb, cb = F.silu(depthwise_conv_tokens(self.bc_proj(u), self.conv_bc, "same")).chunk(4, dim=-1)
        dt, diag = self.delta_proj(u), self.fc_D(x)  # diag: the input-dependent part of D, per head
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(u.device.type, enabled=False):
            x, dt, diag = x.to(dtype), dt.to(dtype), diag.to(dtype) + self.D.to(dtype)
            dt = F.softplus(dt.unflatten(-1, (2, h)) + self.dt_bias.to(dtype))  # (B, N, 2, heads)
            xh = x.unflatten(-1, (h, self.headdim))
            A = -torch.exp(self.A_log.to(dtype))
            bf, cf, bb, cb = (t.to(dtype) for t in (bf, cf, bb, cb))
            # shifted by one token, the forward scan sees the tokens strictly before t, the backward
            # (reverse) scan those strictly after; the diagonal is x * D(x)
            y = ssd_scan(xh, dt[:, :, 0], A, bf, cf, shift=True, skip=diag)
            y = ssd_scan(xh, dt[:, :, 1], A, bb, cb, shift=True, reverse=True, acc=y)
        return self.norm.project(y.flatten(-2), self.z_proj(u), self.out_proj)
