"""Channel mixers (the FFN half of a block): MLP, SwiGLU, conv-FFN (PVT v2), nested FFN (MatFormer).

Every mixer is ``cls(dim, *, mlp_ratio)`` with ``forward(x, hw)``. The ``"any"``-layout ones keep
their weights in ``nn.Linear`` modules and apply them with :func:`apply_fc`, i.e. as a linear map
on (B, N, C) and as the equivalent 1x1 convolution on (B, C, H, W), with the same parameters.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.layers.common import linear_any
from search_spaces.registry import FusedSlices, channel_mixer


def _hidden(dim: int, mlp_ratio: float, kind: str) -> int:
    """``int(dim * mlp_ratio)`` (timm / DeiT / PoolFormer convention), checked to be >= 1."""
    if dim < 1 or not mlp_ratio > 0:
        raise ValueError(f"{kind}: dim and mlp_ratio must be positive, got dim={dim}, mlp_ratio={mlp_ratio}")
    hidden = int(dim * mlp_ratio)
    if hidden < 1:
        raise ValueError(f"{kind}: dim * mlp_ratio = {dim * mlp_ratio} gives no hidden units; raise mlp_ratio")
    return hidden


def apply_fc(layer: nn.Module, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
    """``layer`` (an ``nn.Linear``) over the channels of ``x`` in either layout, using its first ``rows``
    outputs / ``cols`` inputs (MatFormer slices). A low-precision stand-in for ``nn.Linear`` (see
    ``predictors.precision``) provides ``channel_forward(x, rows, cols)`` and is called through it."""
    channel_forward = getattr(layer, "channel_forward", None)
    if channel_forward is not None:
        return channel_forward(x, rows, cols)
    weight, bias = layer.weight, layer.bias
    if rows is not None:
        weight, bias = weight[:rows], None if bias is None else bias[:rows]
    if cols is not None:
        weight = weight[:, :cols]
    return linear_any(x, weight, bias)


def _channel_dim(x: Tensor) -> int:
    return 1 if x.ndim == 4 else -1


@channel_mixer("mlp")
class Mlp(nn.Module):
    """Transformer FFN (Vaswani et al. 2017; as in ViT / DeiT): fc1 -> GELU -> fc2, with biases.

    hidden = ``int(dim * mlp_ratio)``; parameters: 2*dim*hidden + hidden + dim.
    """

    layout: ClassVar[str] = "any"
    supports_prefix: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, Polosukhin 2017, Attention Is All "
        "You Need (NeurIPS); as in ViT (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021)"
    )
    fused_slices: ClassVar[FusedSlices] = ()
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden = _hidden(dim, mlp_ratio, "mlp")
        self.fc1 = nn.Linear(dim, self.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.act(apply_fc(self.fc1, x))
        return apply_fc(self.fc2, x)


def glu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: 2/3 of the MLP's, rounded to a multiple of 8 (at least 8).

    ``max(8, int(round(2 * dim * mlp_ratio / 3 / 8)) * 8)``. SwiGLU has three dim x hidden
    matrices instead of two, so 2/3 of the width keeps the parameter count close to ``mlp`` at the
    same ratio (the LLaMA / Shazeer 2020 convention); the multiple of 8 suits tensor cores.
    """
    if dim < 1 or not mlp_ratio > 0:
        raise ValueError(f"glu: dim and mlp_ratio must be positive, got dim={dim}, mlp_ratio={mlp_ratio}")
    # int(): round() of a numpy scalar is not an int
    return max(8, int(round(2 * dim * mlp_ratio / 3 / 8)) * 8)  # noqa: RUF046


@channel_mixer("glu")
class SwiGLU(nn.Module):
    """SwiGLU FFN (Shazeer 2020, GLU Variants Improve Transformer), as the ViT channel mixer of
    Activator (Abdullah & Aydin 2024): ``fc2(silu(gate) * value)`` with ``gate, value = fc1(x)``.

    fc1 maps dim -> 2*hidden; its first ``hidden`` outputs are the gate, the last ``hidden`` the
    value. hidden = :func:`glu_hidden`; parameters: 3*dim*hidden + 2*hidden + dim.
    """

    layout: ClassVar[str] = "any"
    supports_prefix: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Shazeer 2020, GLU Variants Improve Transformer; Abdullah & Aydin 2024, Activator: GLU "
        "Activation Function as the Core Component of a Vision Transformer"
    )
    fused_slices: ClassVar[FusedSlices] = (("fc1", 2),)  # fc1's rows are [gate | value], hidden each
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden = glu_hidden(dim, mlp_ratio)
        self.fc1 = nn.Linear(dim, 2 * self.hidden)
        self.fc2 = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        gate, value = apply_fc(self.fc1, x).chunk(2, dim=_channel_dim(x))
        return apply_fc(self.fc2, F.silu(gate) * value)


@channel_mixer("conv_ffn")
class ConvFFN(nn.Module):
    """PVT v2 convolutional FFN (Wang et al. 2022): fc1 (1x1) -> depthwise 3x3 -> GELU -> fc2 (1x1).

    hidden = ``int(dim * mlp_ratio)``; the depthwise conv (padding 1, bias) gives the FFN a local
    receptive field (and implicit position information). fc1/fc2 are ``nn.Linear`` applied as 1x1
    convs, as PVT v2 keeps them. Parameters: 2*dim*hidden + hidden + dim + 10*hidden.
    """

    layout: ClassVar[str] = "nchw"
    supports_prefix: ClassVar[bool] = False
    paper: ClassVar[str] = (
        "Wang, Xie, Li, Fan, Song, Liang, Lu, Luo, Shao 2022, PVT v2: Improved Baselines with "
        "Pyramid Vision Transformer (Computational Visual Media)"
    )
    fused_slices: ClassVar[FusedSlices] = ()
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden = _hidden(dim, mlp_ratio, "conv_ffn")
        self.fc1 = nn.Linear(dim, self.hidden)
        self.dwconv = nn.Conv2d(self.hidden, self.hidden, kernel_size=3, padding=1, groups=self.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.act(self.dwconv(apply_fc(self.fc1, x)))
        return apply_fc(self.fc2, x)


@channel_mixer("nested")
class NestedMlp(nn.Module):
    """MatFormer nested FFN (Devvrit et al. 2023, MatFormer: Nested Transformer for Elastic Inference).

    Same parameters as ``mlp`` (fc1, fc2; hidden = ``int(dim * mlp_ratio)``), but only the first
    m = ``max(1, round(hidden * width))`` hidden units run: rows ``[:m]`` of fc1 and columns ``[:m]``
    of fc2 (views of the full weights, no copies), so every smaller FFN is a prefix of the larger
    ones. ``width`` is set with :meth:`set_width`, default 1.0; MatFormer trains and extracts the
    granularities in :attr:`GRANULARITIES` (1/8, 1/4, 1/2, 1), but any width in (0, 1] is allowed.
    """

    layout: ClassVar[str] = "any"
    supports_prefix: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Devvrit, Kudugunta, Kusupati, Dettmers, Chen, Dhillon, Tsvetkov, Hajishirzi, Kakade, Farhadi, "
        "Jain 2023, MatFormer: Nested Transformer for Elastic Inference"
    )
    fused_slices: ClassVar[FusedSlices] = ()  # hidden units are nested prefixes: a plain leading slice
    onnx_blocker: ClassVar[str | None] = None
    GRANULARITIES: ClassVar[tuple[float, ...]] = (0.125, 0.25, 0.5, 1.0)

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden = _hidden(dim, mlp_ratio, "nested")
        self.fc1 = nn.Linear(dim, self.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.hidden, dim)
        self.width = 1.0

    def set_width(self, width: float) -> None:
        """Use the first ``round(hidden * width)`` hidden units (at least one); width in (0, 1]."""
        # "not 0 < width <= 1" also rejects NaN
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < width <= 1:
            raise ValueError(f"nested: width must be a number in (0, 1] (e.g. 1/8, 1/4, 1/2, 1), got {width!r}")
        self.width = float(width)

    @property
    def active_hidden(self) -> int:
        """Number of hidden units used at the current width."""
        return max(1, round(self.hidden * self.width))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        m = self.active_hidden
        x = self.act(apply_fc(self.fc1, x, rows=m))
        return apply_fc(self.fc2, x, cols=m)

    def extra_repr(self) -> str:
        return f"width={self.width}, active_hidden={self.active_hidden}"


__all__ = ["ConvFFN", "Mlp", "NestedMlp", "SwiGLU", "apply_fc", "glu_hidden"]
