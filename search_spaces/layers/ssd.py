"""Bidirectional Mamba-2 token mixer: the SSD (state space duality) block, run both ways.

Mamba-2: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality" (ICML 2024). Bidirectional as in Vision Mamba (Zhu et al.
2024): shared input projection and gate, a forward and a backward branch with their own
parameters, outputs added. A vision backbone on the same scan: EfficientViM (Lee et al., CVPR 2025).

The scan is the chunked matmul algorithm of ``_ssd.py``, in float32 (float64 stays float64)
whatever the input or autocast dtype.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.layers._ssd import GatedRMSNorm, SSDMixer, ssd_scan
from search_spaces.layers.common import depthwise_conv_tokens, inverse_softplus_dt, stacked_linears
from search_spaces.registry import FusedSlices, token_mixer


class SSDBranch(nn.Module):
    """One direction of a Mamba-2 block (Dao & Gu 2024, Sec. 7): B, C and Δ projected from the block
    input in parallel with x; a causal depthwise conv1d and SiLU over x, B and C; Δ = softplus(. + bias);
    the SSD scan with a scalar A per head; skip D per head. Mamba-2's initialisation: A ~ -U[1, 16],
    Δ bias log-uniform in [1e-3, 0.1] through softplus, D = 1. ``reverse``: the branch reads the
    sequence from its end (the same as running it on the flipped sequence and flipping the result
    back, computed without the flips). Mamba-2 convolves x, B and C as one tensor; a depthwise conv
    is per channel, so ``conv_x`` and ``conv_bc`` are the same operation without the concatenation."""

    def __init__(self, dim: int, d_inner: int, d_state: int, headdim: int, d_conv: int, reverse: bool) -> None:
        super().__init__()
        self.headdim, self.nheads, self.reverse = headdim, d_inner // headdim, reverse
        self.bc_proj = nn.Linear(dim, 2 * d_state, bias=False)
        self.delta_proj = nn.Linear(dim, self.nheads, bias=False)
        self.conv_x = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.conv_bc = nn.Conv1d(2 * d_state, 2 * d_state, d_conv, groups=2 * d_state, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def projections(self) -> tuple[nn.Module, nn.Module]:
        """The maps of the block input this branch reads, ``(bc_proj, delta_proj)``: the block runs
        both branches' in one product (``stacked_linears``) and hands the outputs to ``forward``."""
        return self.bc_proj, self.delta_proj

    def forward(self, x: Tensor, bc: Tensor, dt: Tensor, acc: Tensor | None = None) -> Tensor:
        """x (B, N, d_inner), bc (B, N, 2 d_state) and dt (B, N, heads), the block input's projections
        -> y (B, N, d_inner), at least float32, plus ``acc`` (B, N, d_inner) when given (the other
        branch's y: added as the scan writes its output, see ``ssd_chunked``; ``ssd_scan`` takes the
        native scan where it runs, that elsewhere)."""
        mode = "anticausal" if self.reverse else "causal"
        x = F.silu(depthwise_conv_tokens(x, self.conv_x, mode))
        b, c = F.silu(depthwise_conv_tokens(bc, self.conv_bc, mode)).chunk(2, dim=-1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x, b, c = x.to(dtype), b.to(dtype), c.to(dtype)
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))  # (B, N, heads)
            xh = x.unflatten(-1, (self.nheads, self.headdim))
            acc = None if acc is None else acc.unflatten(-1, (self.nheads, self.headdim))
            return ssd_scan(xh, dt, -torch.exp(self.A_log.to(dtype)), b, c, reverse=self.reverse,
                            skip=self.D.to(dtype), acc=acc).flatten(-2)


@token_mixer("ssd")
class BidirectionalMamba2(SSDMixer):
    """Mamba-2's block (Dao & Gu 2024) made bidirectional as Vision Mamba does (Zhu et al. 2024):
    ``x = x_proj(u)``, ``z = z_proj(u)``; ``y = fwd(u, x) + bwd(u, x)`` with ``bwd`` the branch run
    on the time-reversed sequence; Mamba-2's gated RMSNorm ``norm(y * silu(z))``; ``out_proj``. Heads
    of ``headdim`` channels, each with its own scalar A and Δ; B and C are shared by the heads (one
    group). Mamba-2 fuses x, z, B, C and Δ into one input projection; separate ones are the same
    maps, and need no fused slicing in the supernet.
    """

    paper: ClassVar[str] = (
        "Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms Through "
        "Structured State Space Duality (Mamba-2); Zhu et al. 2024, Vision Mamba"
    )

    d_conv: ClassVar[int] = 4
    fused_slices: ClassVar[FusedSlices] = ()  # every projection is its own Linear

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__(dim)
        self.x_proj = nn.Linear(dim, self.d_inner, bias=False)
        self.z_proj = nn.Linear(dim, self.d_inner, bias=False)
        self.fwd = SSDBranch(dim, self.d_inner, self.d_state, self.headdim, self.d_conv, reverse=False)
        self.bwd = SSDBranch(dim, self.d_inner, self.d_state, self.headdim, self.d_conv, reverse=True)
        self.norm = GatedRMSNorm(self.d_inner, norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, u: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.x_proj(u)
        bc_f, dt_f, bc_b, dt_b = stacked_linears(u, (*self.fwd.projections(), *self.bwd.projections()))
        y = self.bwd(x, bc_b, dt_b, acc=self.fwd(x, bc_f, dt_f))  # the two branches' sum
        return self.norm.project(y, self.z_proj(u), self.out_proj)
