"""Bidirectional selective state-space token mixer (Mamba block as used by Vision Mamba).

Mamba: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces".
Bidirectional ("bimamba v2"): Zhu et al. 2024, "Vision Mamba: Efficient Visual Representation
Learning with Bidirectional State Space Model". Related: Hwang et al. 2024, "Hydra:
Bidirectional State Space Models Through Generalized Matrix Mixers".

The selective scan runs in float32 (float64 stays float64) whatever the input or autocast dtype:
in native code on a CPU in float32 where it could be built (``_native_scan``), else the fused
PyTorch scan (CPU) or the O(N) parallel scan of ``_scan.py`` (other devices, tracing); see
``_selective_scan.py``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.layers._selective_scan import selective_scan
from search_spaces.layers.common import depthwise_conv_tokens, inverse_softplus_dt
from search_spaces.registry import FusedSlices, token_mixer


def _no_reinit(p: nn.Parameter) -> nn.Parameter:
    """Mark a parameter the model assembly must not re-initialise (Mamba's ``_no_reinit``)."""
    p._no_reinit = True
    return p


class SelectiveScanBranch(nn.Module):
    """One direction of the Mamba block: causal depthwise conv1d, SiLU, input-dependent
    (Δ, B, C) projections and the selective scan ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t``,
    ``y_t = C_t · h_t + D x_t`` (Gu & Dao 2023, Algorithm 2), with Mamba's initialisation."""

    def __init__(
        self,
        d_inner: int,
        dt_rank: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_inner, self.dt_rank, self.d_state = d_inner, dt_rank, d_state
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        with torch.no_grad():
            # Δ projection: weight ~ U(±dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in
            # [dt_min, dt_max] so that softplus(bias) starts in that range.
            std = dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            self.dt_proj.bias.copy_(inverse_softplus_dt(d_inner, dt_min, dt_max, dt_init_floor))
        _no_reinit(self.dt_proj.bias)
        self.dt_proj._keep_float = True  # its weight is read directly (in float32): never quantize it
        # S4D-real initialisation A = -[1, ..., d_state] per channel, stored as log(-A); skip D = 1.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = _no_reinit(nn.Parameter(torch.log(a)))
        self.D = _no_reinit(nn.Parameter(torch.ones(d_inner)))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor:
        """(B, N, d_inner) -> y (B, N, d_inner) in the compute dtype (at least float32). ``reverse``:
        the branch reads the tokens from the last to the first, as it would ``x.flip(1)`` (its
        output in the tokens' own order), without flipping anything."""
        u = F.silu(depthwise_conv_tokens(x, self.conv1d, "anticausal" if reverse else "causal"))
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            u, b, c = u.to(dtype), b.to(dtype), c.to(dtype)
            delta = F.softplus(F.linear(dt.to(dtype), self.dt_proj.weight.to(dtype)) + self.dt_proj.bias.to(dtype))
            a = -torch.exp(self.A_log.to(dtype))  # (d_inner, d_state)
            # h_t = exp(delta_t a) h_{t-1} + delta_t u_t b_t, y_t = c_t . h_t, without keeping the
            # (B, N, d_inner, d_state) states in memory (see _selective_scan)
            return selective_scan(u, delta, a, b, c, reverse=reverse) + self.D.to(dtype) * u


@token_mixer("ssm")
class BidirectionalMamba(nn.Module):
    """Vision Mamba's bidirectional Mamba block ("bimamba v2"): shared in/out projections and
    gate z; forward and backward branches each with their own conv1d, x_proj, dt_proj, A, D;
    ``y = (y_fwd + flip(y_bwd(flip(x)))) * silu(z)`` (Zhu et al. 2024; Gu & Dao 2023).

    Sequence-only: works on any token count, class tokens included; ``hw`` is not used.
    """

    layout: ClassVar[str] = "nlc"
    uses_heads: ClassVar[bool] = False
    supports_prefix: ClassVar[bool] = True
    complexity: ClassVar[str] = "linear"
    paper: ClassVar[str] = (
        "Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces; "
        "Zhu et al. 2024, Vision Mamba: Efficient Visual Representation Learning with Bidirectional "
        "State Space Model"
    )

    expand: ClassVar[int] = 2  # d_inner = expand * dim
    d_state: ClassVar[int] = 16
    d_conv: ClassVar[int] = 4
    # in_proj's rows are [x | z] (d_inner each); each branch's x_proj gives [Δ (dt_rank, grows with
    # dim) | B (d_state) | C (d_state)], so Δ keeps its leading rows and B, C stay whole
    fused_slices: ClassVar[FusedSlices] = (
        ("in_proj", 2), ("fwd.x_proj", (None, d_state, d_state)), ("bwd.x_proj", (None, d_state, d_state)))
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.dim = dim
        self.d_inner = self.expand * dim
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.fwd = SelectiveScanBranch(self.d_inner, self.dt_rank, self.d_state, self.d_conv)
        self.bwd = SelectiveScanBranch(self.d_inner, self.dt_rank, self.d_state, self.d_conv)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.fwd(xi) + self.bwd(xi, reverse=True)  # = flip(bwd(flip(xi))), with no copies
        with torch.autocast(x.device.type, enabled=False):
            y = (y * F.silu(z.to(y.dtype))).to(z.dtype)
        return self.out_proj(y)
