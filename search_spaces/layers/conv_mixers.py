"""Convolutional / trivial token mixers of the MetaFormer family: pooling, separable conv, identity.

Yu et al. 2022, "MetaFormer Is Actually What You Need for Vision" (CVPR 2022): PoolFormer.
Yu et al. 2023, "MetaFormer Baselines for Vision" (TPAMI): ConvFormer and IdentityFormer.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from search_spaces.layers.common import StarReLU
from search_spaces.registry import FusedSlices, token_mixer

_METAFORMER_BASELINES = "Yu, Si, Zhou, Luo, Zhou, Feng, Yan, Wang 2023, MetaFormer Baselines for Vision (TPAMI)"


@token_mixer("pool")
class Pooling(nn.Module):
    """PoolFormer token mixer (Yu et al. 2022): ``AvgPool2d(3, 1, 1, count_include_pad=False)(x) - x``.

    No parameters; the ``- x`` cancels the block's residual identity so only the neighbourhood
    average remains. Border pixels average over the in-image neighbours only.
    """

    layout: ClassVar[str] = "nchw"
    supports_prefix: ClassVar[bool] = False
    uses_heads: ClassVar[bool] = False
    complexity: ClassVar[str] = "linear"
    paper: ClassVar[str] = (
        "Yu, Luo, Zhou, Si, Zhou, Wang, Feng, Yan 2022, MetaFormer Is Actually What You Need for Vision (CVPR)"
    )
    fused_slices: ClassVar[FusedSlices] = ()
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.pool(x) - x


@token_mixer("sepconv")
class SepConv(nn.Module):
    """ConvFormer's inverted separable convolution (Yu et al. 2023, MetaFormer Baselines).

    1x1 conv dim -> 2*dim (no bias), StarReLU, depthwise 7x7 (padding 3, no bias),
    1x1 conv 2*dim -> dim (no bias). Parameters: 4*dim^2 + 98*dim + 2.
    """

    layout: ClassVar[str] = "nchw"
    supports_prefix: ClassVar[bool] = False
    uses_heads: ClassVar[bool] = False
    complexity: ClassVar[str] = "linear"
    paper: ClassVar[str] = _METAFORMER_BASELINES
    fused_slices: ClassVar[FusedSlices] = ()
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        mid = 2 * dim
        self.pwconv1 = nn.Conv2d(dim, mid, kernel_size=1, bias=False)
        self.act = StarReLU()
        self.dwconv = nn.Conv2d(mid, mid, kernel_size=7, padding=3, groups=mid, bias=False)
        self.pwconv2 = nn.Conv2d(mid, dim, kernel_size=1, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.pwconv2(self.dwconv(self.act(self.pwconv1(x))))


@token_mixer("identity")
class IdentityMixer(nn.Module):
    """IdentityFormer's token mixer (Yu et al. 2023, MetaFormer Baselines): returns ``x`` unchanged."""

    layout: ClassVar[str] = "any"
    supports_prefix: ClassVar[bool] = True
    uses_heads: ClassVar[bool] = False
    complexity: ClassVar[str] = "linear"
    paper: ClassVar[str] = _METAFORMER_BASELINES
    fused_slices: ClassVar[FusedSlices] = ()
    onnx_blocker: ClassVar[str | None] = None

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return x
