"""Spectral token mixer: the GFNet global filter.

Rao, Zhao, Zhu, Lu, Zhou 2021, "Global Filter Networks for Image Classification" (NeurIPS 2021).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.registry import FusedSlices, token_mixer


@token_mixer("spectral")
class GlobalFilter(nn.Module):
    """GFNet global filter (Rao et al. 2021): ``irfft2(rfft2(x) * K)`` with a learned complex filter K.

    ``complex_weight`` has shape (H, W//2+1, dim, 2) (real, imaginary) for the build ``grid``
    (H, W) and is initialised N(0, 0.02^2) as in GFNet. The transform uses ``norm="ortho"`` on
    both sides, so the layer is a per-channel circular convolution over the H x W token grid with
    the kernel k whose unnormalised FFT is K (``K = rfft2(k)``). The FFT runs in float32 whatever the input dtype
    (also under autocast) and the result is cast back to the input dtype.

    At a token grid other than the build grid, the filter is resized to (H, W//2+1) by bicubic
    interpolation of its real and imaginary planes (``align_corners=True``), the way GFNet's
    fine-tuning script adapts its filters to another resolution; the parameter itself keeps its
    build shape.
    """

    layout: ClassVar[str] = "nchw"
    supports_prefix: ClassVar[bool] = False
    uses_heads: ClassVar[bool] = False
    complexity: ClassVar[str] = "nlogn"
    paper: ClassVar[str] = "Rao, Zhao, Zhu, Lu, Zhou 2021, Global Filter Networks for Image Classification (NeurIPS)"
    fused_slices: ClassVar[FusedSlices] = ()
    # checked with opset 17, TorchScript exporter (tests/test_export.py tries it)
    onnx_blocker: ClassVar[str | None] = "torch.fft.rfft2/irfft2 have no ONNX operator"

    def __init__(self, dim: int, *, heads: int = 1, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        h, w = int(grid[0]), int(grid[1])
        if dim < 1 or h < 1 or w < 1:
            raise ValueError(f"spectral: dim and grid must be positive, got dim={dim}, grid={grid}")
        self.dim = dim
        self.grid = (h, w)
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def filter_for(self, hw: tuple[int, int]) -> Tensor:
        """The complex filter (dim, H, W//2+1) for token grid ``hw`` (float32, resized if needed)."""
        h, w = hw
        weight = self.complex_weight.float()
        size = (h, w // 2 + 1)
        if tuple(weight.shape[:2]) != size:
            h0, w0 = weight.shape[:2]
            planes = weight.reshape(1, h0, w0, self.dim * 2).permute(0, 3, 1, 2)
            planes = F.interpolate(planes, size=size, mode="bicubic", align_corners=True)
            weight = planes.permute(0, 2, 3, 1).reshape(size[0], size[1], self.dim, 2)
        return torch.view_as_complex(weight.permute(2, 0, 1, 3).contiguous())

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        h, w = x.shape[-2:]
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.fft.rfft2(x.float(), dim=(-2, -1), norm="ortho")
            spec = spec * self.filter_for((h, w))
            y = torch.fft.irfft2(spec, s=(h, w), dim=(-2, -1), norm="ortho")
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}"
