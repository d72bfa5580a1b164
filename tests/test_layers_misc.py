"""Reference checks for the spectral, pooling/conv/identity token mixers and the channel mixers.

The registry-wide shape / gradient / bf16 / resolution suite lives elsewhere; these tests compare
each block with an explicit hand computation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.layers.channel_mixers import ConvFFN, Mlp, NestedMlp, SwiGLU, glu_hidden
from search_spaces.layers.conv_mixers import IdentityMixer, Pooling, SepConv
from search_spaces.layers.spectral import GlobalFilter
from search_spaces.registry import get_channel_mixer, get_token_mixer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _nlc(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- registry / metadata


@pytest.mark.parametrize(
    ("name", "cls", "layout", "prefix", "complexity"),
    [
        ("spectral", GlobalFilter, "nchw", False, "nlogn"),
        ("pool", Pooling, "nchw", False, "linear"),
        ("sepconv", SepConv, "nchw", False, "linear"),
        ("identity", IdentityMixer, "any", True, "linear"),
    ],
)
def test_token_mixer_metadata(name: str, cls: type, layout: str, prefix: bool, complexity: str) -> None:
    assert get_token_mixer(name) is cls
    assert (cls.layout, cls.supports_prefix, cls.complexity, cls.uses_heads) == (layout, prefix, complexity, False)


@pytest.mark.parametrize(
    ("name", "cls", "layout", "prefix"),
    [
        ("mlp", Mlp, "any", True),
        ("glu", SwiGLU, "any", True),
        ("conv_ffn", ConvFFN, "nchw", False),
        ("nested", NestedMlp, "any", True),
    ],
)
def test_channel_mixer_metadata(name: str, cls: type, layout: str, prefix: bool) -> None:
    assert get_channel_mixer(name) is cls
    assert (cls.layout, cls.supports_prefix) == (layout, prefix)


# --------------------------------------------------------------------------- spectral


def _set_filter(m: GlobalFilter, spectrum: torch.Tensor) -> None:
    """Load a complex spectrum of shape (C, H, W//2+1) into ``complex_weight``."""
    with torch.no_grad():
        m.complex_weight.copy_(torch.view_as_real(spectrum.permute(1, 2, 0).contiguous()))


def test_spectral_param_shape_and_init() -> None:
    m = GlobalFilter(16, grid=(14, 9))
    assert m.complex_weight.shape == (14, 5, 16, 2)
    assert sum(p.numel() for p in m.parameters()) == 14 * 5 * 16 * 2
    assert 0.015 < m.complex_weight.std().item() < 0.025


@pytest.mark.parametrize("grid", [(8, 8), (5, 7)])
def test_spectral_all_ones_filter_is_identity(grid: tuple[int, int]) -> None:
    m = GlobalFilter(4, grid=grid)
    _set_filter(m, torch.ones(4, grid[0], grid[1] // 2 + 1, dtype=torch.complex64))
    x = torch.randn(2, 4, *grid)
    torch.testing.assert_close(m(x, grid), x, atol=1e-5, rtol=1e-5)


def _circular_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[b, c, i, j] = sum_{a, d} k[c, a, d] * x[b, c, (i - a) % H, (j - d) % W], computed directly."""
    y = torch.zeros_like(x)
    for a in range(kernel.shape[1]):
        for d in range(kernel.shape[2]):
            y += kernel[None, :, a, d, None, None] * torch.roll(x, shifts=(a, d), dims=(2, 3))
    return y


@pytest.mark.parametrize("grid", [(6, 6), (5, 8), (7, 5)])
def test_spectral_equals_circular_convolution(grid: tuple[int, int]) -> None:
    h, w = grid
    c = 3
    kernel = torch.randn(c, 3, 2)
    padded = torch.zeros(c, h, w)
    padded[:, :3, :2] = kernel
    m = GlobalFilter(c, grid=grid)
    # with norm="ortho" on both transforms, the filter is the unnormalised FFT of the kernel
    _set_filter(m, torch.fft.rfft2(padded))
    x = torch.randn(2, c, h, w)
    torch.testing.assert_close(m(x, grid), _circular_conv(x, kernel), atol=1e-5, rtol=1e-4)


def test_spectral_other_grid_interpolates_filter() -> None:
    m = GlobalFilter(3, grid=(8, 8))
    h, w = 6, 11
    x = torch.randn(2, 3, h, w)
    y = m(x, (h, w))
    assert y.shape == x.shape
    # reference: bicubic (align_corners=True) resize of the real and imaginary planes separately
    weight = m.complex_weight.detach()
    planes = []
    for part in range(2):
        plane = weight[..., part].permute(2, 0, 1)[None]  # (1, C, 8, 5)
        planes.append(F.interpolate(plane, size=(h, w // 2 + 1), mode="bicubic", align_corners=True)[0])
    spectrum = torch.complex(planes[0], planes[1])
    expected = torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * spectrum, s=(h, w), norm="ortho")
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    # a constant filter stays constant when resized: all ones is the identity at any grid
    _set_filter(m, torch.ones(3, 8, 5, dtype=torch.complex64))
    torch.testing.assert_close(m(x, (h, w)), x, atol=1e-5, rtol=1e-5)
    assert m.complex_weight.shape == (8, 5, 3, 2)  # the parameter keeps its build shape


def test_spectral_bf16_computes_in_float32() -> None:
    m = GlobalFilter(4, grid=(6, 6))
    x = torch.randn(2, 4, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, (6, 6))
    assert y.dtype == torch.bfloat16
    expected = m(x.float(), (6, 6)).bfloat16()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


# --------------------------------------------------------------------------- pool / sepconv / identity


def test_pool_hand_computed_3x3() -> None:
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    # neighbourhood means over in-image pixels only (count_include_pad=False), minus x
    means = torch.tensor([[3.0, 3.5, 4.0], [4.5, 5.0, 5.5], [6.0, 6.5, 7.0]])
    expected = (means - x[0, 0]).reshape(1, 1, 3, 3)
    torch.testing.assert_close(expected[0, 0], torch.tensor([[2.0, 1.5, 1.0], [0.5, 0.0, -0.5], [-1.0, -1.5, -2.0]]))
    m = Pooling(1)
    torch.testing.assert_close(m(x, (3, 3)), expected)
    assert sum(p.numel() for p in m.parameters()) == 0


def test_sepconv_structure_and_params() -> None:
    dim = 8
    m = SepConv(dim)
    assert sum(p.numel() for p in m.parameters()) == 4 * dim * dim + 98 * dim + 2
    assert m.dwconv.groups == 2 * dim and m.dwconv.kernel_size == (7, 7) and m.dwconv.padding == (3, 3)
    assert all(conv.bias is None for conv in (m.pwconv1, m.dwconv, m.pwconv2))
    x = torch.randn(2, dim, 5, 6)
    h = F.conv2d(x, m.pwconv1.weight)
    h = m.act.scale * F.relu(h) ** 2 + m.act.bias
    h = F.conv2d(h, m.dwconv.weight, padding=3, groups=2 * dim)
    torch.testing.assert_close(m(x, (5, 6)), F.conv2d(h, m.pwconv2.weight))


def test_identity_returns_input() -> None:
    m = IdentityMixer(8)
    for x in (torch.randn(2, 8, 3, 4), torch.randn(2, 1 + 12, 8)):
        assert torch.equal(m(x, (3, 4)), x)
    assert not list(m.parameters())


# --------------------------------------------------------------------------- channel mixers


def test_mlp_params_and_hidden() -> None:
    for dim, ratio in [(192, 4.0), (64, 4.0), (10, 2.5), (7, 0.5)]:
        m = Mlp(dim, mlp_ratio=ratio)
        hidden = int(dim * ratio)
        assert m.fc1.out_features == m.hidden == hidden
        assert sum(p.numel() for p in m.parameters()) == 2 * dim * hidden + hidden + dim


def test_mlp_nchw_equals_nlc() -> None:
    m = Mlp(8, mlp_ratio=3.0)
    x = torch.randn(2, 8, 3, 5)
    y_nchw = m(x, (3, 5))
    y_nlc = m(_nlc(x), (3, 5))
    assert y_nchw.shape == x.shape
    torch.testing.assert_close(_nlc(y_nchw), y_nlc, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y_nlc, m.fc2(F.gelu(m.fc1(_nlc(x)))))


def test_mlp_rejects_empty_hidden() -> None:
    with pytest.raises(ValueError, match="hidden"):
        Mlp(2, mlp_ratio=0.25)


def _copy_mlp(src: nn.Module, dim: int, m: int) -> Mlp:
    """A plain Mlp with hidden ``m`` holding the first ``m`` hidden units of ``src``."""
    small = Mlp(dim, mlp_ratio=m / dim)
    assert small.hidden == m
    with torch.no_grad():
        small.fc1.weight.copy_(src.fc1.weight[:m])
        small.fc1.bias.copy_(src.fc1.bias[:m])
        small.fc2.weight.copy_(src.fc2.weight[:, :m])
        small.fc2.bias.copy_(src.fc2.bias)
    return small


def test_nested_full_width_equals_mlp() -> None:
    dim = 8
    nested = NestedMlp(dim, mlp_ratio=4.0)
    mlp = Mlp(dim, mlp_ratio=4.0)
    mlp.load_state_dict(nested.state_dict())
    assert nested.width == 1.0 and nested.active_hidden == 32
    for x in (torch.randn(2, 5, dim), torch.randn(2, dim, 2, 3)):
        torch.testing.assert_close(nested(x, (2, 3)), mlp(x, (2, 3)))


@pytest.mark.parametrize(("width", "m"), [(0.125, 4), (0.25, 8), (0.5, 16), (0.3, 10), (0.01, 1)])
def test_nested_width_equals_smaller_mlp(width: float, m: int) -> None:
    dim = 8
    nested = NestedMlp(dim, mlp_ratio=4.0)
    nested.set_width(width)
    assert nested.active_hidden == m
    small = _copy_mlp(nested, dim, m)
    for x in (torch.randn(2, 5, dim), torch.randn(2, dim, 2, 3)):
        torch.testing.assert_close(nested(x, (2, 3)), small(x, (2, 3)))
    # gradients reach only the active slice of the shared weights
    nested(torch.randn(2, 5, dim), (1, 5)).sum().backward()
    assert nested.fc1.weight.grad[m:].abs().sum() == 0 and nested.fc1.weight.grad[:m].abs().sum() > 0
    assert nested.fc2.weight.grad[:, m:].abs().sum() == 0


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.5, float("nan"), True, "0.5"])
def test_nested_set_width_rejects(bad: object) -> None:
    nested = NestedMlp(8)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        nested.set_width(bad)  # type: ignore[arg-type]
    assert nested.width == 1.0


def test_glu_hidden_formula_and_params() -> None:
    assert glu_hidden(192, 4.0) == 512  # 2*192*4/3 = 512
    assert glu_hidden(64, 4.0) == 168  # 170.67 -> 21.33 * 8 -> 168
    assert glu_hidden(4, 1.0) == 8  # floor of 8
    for dim, ratio in [(192, 4.0), (64, 3.0), (48, 2.0)]:
        m = SwiGLU(dim, mlp_ratio=ratio)
        hidden = glu_hidden(dim, ratio)
        n = sum(p.numel() for p in m.parameters())
        assert n == 3 * dim * hidden + 2 * hidden + dim
        mlp_n = sum(p.numel() for p in Mlp(dim, mlp_ratio=ratio).parameters())
        assert abs(n - mlp_n) / mlp_n < 0.05


def test_glu_equals_swiglu_reference() -> None:
    dim = 8
    m = SwiGLU(dim, mlp_ratio=2.0)
    hidden = m.hidden
    w1, b1 = m.fc1.weight, m.fc1.bias
    x = torch.randn(2, 7, dim)
    gate = x @ w1[:hidden].T + b1[:hidden]
    value = x @ w1[hidden:].T + b1[hidden:]
    expected = (gate * torch.sigmoid(gate) * value) @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x, (1, 7)), expected, atol=1e-6, rtol=1e-5)
    # same weights on NCHW
    x4 = torch.randn(2, dim, 3, 4)
    torch.testing.assert_close(_nlc(m(x4, (3, 4))), m(_nlc(x4), (3, 4)), atol=1e-6, rtol=1e-5)


def test_conv_ffn_params_and_locality() -> None:
    dim, ratio = 8, 2.0
    m = ConvFFN(dim, mlp_ratio=ratio)
    hidden = int(dim * ratio)
    assert sum(p.numel() for p in m.parameters()) == 2 * dim * hidden + hidden + dim + 10 * hidden
    mlp = Mlp(dim, mlp_ratio=ratio)
    x = torch.randn(1, dim, 5, 5)
    x2 = x.clone()
    x2[:, :, 2, 2] += 1.0  # perturb the centre pixel
    conv_diff = (m(x2, (5, 5)) - m(x, (5, 5))).abs().sum(1)[0]
    mlp_diff = (mlp(x2, (5, 5)) - mlp(x, (5, 5))).abs().sum(1)[0]
    # conv_ffn: the 3x3 neighbourhood changes, pixels further away do not
    assert conv_diff[1:4, 1:4].min() > 0
    assert conv_diff[0].abs().sum() == 0 and conv_diff[:, 4].abs().sum() == 0
    # mlp: only the perturbed pixel changes
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2, 2] = False
    assert mlp_diff[2, 2] > 0 and mlp_diff[mask].abs().sum() == 0
