"""Mixer-specific correctness tests for the attention family: attention, single_head, cascaded_group,
linear. (Shape/gradient/bf16/grid tests for every registered mixer live in the shared suite.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import search_spaces  # noqa: F401  (first: patches torchvision so timm imports on CPU torch)
from search_spaces.layers.attention import Attention, CascadedGroupAttention, SingleHeadAttention
from search_spaces.layers.linear_attention import LinearAttention
from search_spaces.registry import get_token_mixer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomize_bn(module: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def _conv_bn(cbn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    c, bn = cbn.c, cbn.bn
    y = F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return y * scale[None, :, None, None] + (bn.bias - bn.running_mean * scale)[None, :, None, None]


def test_registry_names_and_attributes() -> None:
    expected = {
        "attention": (Attention, "nlc", True, True, "quadratic"),
        "single_head": (SingleHeadAttention, "nchw", False, False, "quadratic"),
        "cascaded_group": (CascadedGroupAttention, "nchw", True, False, "quadratic"),
        "linear": (LinearAttention, "nlc", True, True, "linear"),
    }
    for name, (cls, layout, heads, prefix, complexity) in expected.items():
        assert get_token_mixer(name) is cls
        assert (cls.layout, cls.uses_heads, cls.supports_prefix, cls.complexity) == (layout, heads, prefix, complexity)


@pytest.mark.parametrize("cls", [Attention, CascadedGroupAttention, LinearAttention])
def test_heads_must_divide_dim(cls: type[torch.nn.Module]) -> None:
    with pytest.raises(ValueError, match="heads"):
        cls(30, heads=4)
    with pytest.raises(ValueError, match="heads"):
        cls(32, heads=0)


# ----------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dim,heads", [(32, 1), (48, 3), (192, 3)])
def test_attention_param_count(dim: int, heads: int) -> None:
    m = Attention(dim, heads=heads)
    assert sum(p.numel() for p in m.parameters()) == 4 * dim * dim + 4 * dim


@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_matches_reference(prefix: int) -> None:
    dim, heads, hw = 48, 4, (3, 5)
    m = Attention(dim, heads=heads).eval()
    x = torch.randn(2, prefix + hw[0] * hw[1], dim)
    b, n, _ = x.shape
    hd = dim // heads
    qkv = x @ m.qkv.weight.T + m.qkv.bias
    q, k, v = (qkv[..., i * dim : (i + 1) * dim].reshape(b, n, heads, hd).transpose(1, 2) for i in range(3))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    ref = (attn @ v).transpose(1, 2).reshape(b, n, dim) @ m.proj.weight.T + m.proj.bias
    torch.testing.assert_close(m(x, hw), ref, atol=1e-5, rtol=1e-5)


def test_attention_matches_timm() -> None:
    timm = pytest.importorskip("timm")
    dim, heads = 64, 4
    ours = Attention(dim, heads=heads).eval()
    theirs = timm.layers.Attention(dim, num_heads=heads, qkv_bias=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1 + 7 * 7, dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, (7, 7)), theirs(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- linear


def _linear_reference(m: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The same formula with the explicit N x N kernel matrix, rows normalised."""
    b, n, c = x.shape
    qkv = (x @ m.qkv.weight.T + m.qkv.bias).reshape(b, n, 3, m.heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0].relu(), qkv[1].relu(), qkv[2]
    a = q @ k.transpose(-2, -1)  # (B, heads, N, N)
    a = a / (a.sum(dim=-1, keepdim=True) + m.eps)
    return (a @ v).transpose(1, 2).reshape(b, n, c) @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize("dim,heads,n", [(32, 1, 16), (48, 4, 1 + 20)])
def test_linear_matches_quadratic_reference(dim: int, heads: int, n: int) -> None:
    m = LinearAttention(dim, heads=heads)
    assert sum(p.numel() for p in m.parameters()) == 4 * dim * dim + 4 * dim
    x = torch.randn(2, n, dim)
    with torch.no_grad():
        torch.testing.assert_close(m(x, (4, 4)), _linear_reference(m, x), atol=1e-5, rtol=1e-5)


def test_linear_is_permutation_equivariant() -> None:
    m = LinearAttention(32, heads=2)
    x = torch.randn(2, 25, 32)
    perm = torch.randperm(25)
    with torch.no_grad():
        torch.testing.assert_close(m(x[:, perm], (5, 5)), m(x, (5, 5))[:, perm], atol=1e-5, rtol=1e-5)


def test_linear_cost_is_linear_in_tokens() -> None:
    m = LinearAttention(16, heads=2)

    def flops(n: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            m(torch.randn(1, n, 16), (1, n))
        return counter.get_total_flops()

    assert flops(4096) == 2 * flops(2048)


def test_linear_kernel_runs_in_float32_under_autocast() -> None:
    m = LinearAttention(32, heads=2)
    seen: list[torch.dtype] = []
    handle = m.proj.register_forward_pre_hook(lambda _mod, args: seen.append(args[0].dtype))
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, (4, 4))
    handle.remove()
    assert seen == [torch.bfloat16]  # cast back before the projection
    assert torch.isfinite(y).all()
    with torch.no_grad():
        torch.testing.assert_close(y.float(), m(x, (4, 4)), atol=5e-2, rtol=5e-2)


# -------------------------------------------------------------------------------------- single_head


def _single_head_reference(m: SingleHeadAttention, x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    p = m.pdim
    x1, x2 = x[:, :p], x[:, p:]
    x1 = F.group_norm(x1, 1, m.pre_norm.weight, m.pre_norm.bias, m.pre_norm.eps)
    qkv = _conv_bn(m.qkv, x1).flatten(2)  # (B, 32 + p, N)
    q, k, v = qkv[:, :16], qkv[:, 16:32], qkv[:, 32:]
    attn = torch.softmax(q.transpose(1, 2) @ k / 4.0, dim=-1)  # (B, N, N), scale 16 ** -0.5
    y1 = (v @ attn.transpose(1, 2)).reshape(b, p, h, w)
    return _conv_bn(m.proj, torch.cat([y1, x2], dim=1).relu())


@pytest.mark.parametrize("dim,pdim", [(64, 13), (128, 27), (8, 4), (3, 3)])
def test_single_head_partial_dim_and_params(dim: int, pdim: int) -> None:
    m = SingleHeadAttention(dim)
    assert m.pdim == pdim
    expected = 2 * pdim + pdim * (32 + pdim) + 2 * (32 + pdim) + dim * dim + 2 * dim
    assert sum(p.numel() for p in m.parameters()) == expected
    assert m.proj.bn.weight.eq(1).all()  # not SHViT's zero init: see the class docstring


@pytest.mark.parametrize("hw", [(4, 7), (1, 5), (6, 2)])
def test_single_head_matches_reference_on_non_square_grid(hw: tuple[int, int]) -> None:
    m = SingleHeadAttention(64)
    _randomize_bn(m)
    m.eval()
    x = torch.randn(2, 64, *hw)
    with torch.no_grad():
        y = m(x, hw)
        assert y.shape == x.shape
        torch.testing.assert_close(y, _single_head_reference(m, x), atol=1e-5, rtol=1e-5)


def test_single_head_untouched_channels_enter_only_through_projection() -> None:
    m = SingleHeadAttention(64)
    _randomize_bn(m)
    m.eval()
    h, w = 4, 5
    x = torch.randn(1, 64, h, w, requires_grad=True)
    m(x, (h, w))[0, :, 2, 3].sum().backward()
    g = x.grad[0].abs().sum(dim=0)  # per pixel, summed over channels
    g_untouched = x.grad[0, m.pdim :].abs().sum(dim=0)
    g_partial = x.grad[0, : m.pdim].abs().sum(dim=0)
    # The untouched channels reach output pixel (2, 3) only from pixel (2, 3) (1x1 projection) ...
    assert g_untouched[2, 3] > 0
    g_untouched[2, 3] = 0
    assert g_untouched.eq(0).all()
    # ... while the attended channels reach it from every pixel.
    assert (g_partial > 0).all() and (g > 0).all()


# ----------------------------------------------------------------------------------- cascaded_group


def _cascaded_reference(m: CascadedGroupAttention, x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    gh, gw = m.grid
    pos = [(i, j) for i in range(h) for j in range(w)]
    bias = torch.empty(m.heads, h * w, h * w)
    for a, (ya, xa) in enumerate(pos):
        for t, (yt, xt) in enumerate(pos):
            dy, dx = min(abs(ya - yt), gh - 1), min(abs(xa - xt), gw - 1)
            bias[:, a, t] = m.attention_biases[:, dy * gw + dx]
    d, outs, prev = m.d, [], None
    for i in range(m.heads):
        feat = x[:, i * d : (i + 1) * d] + (0 if prev is None else prev)
        qkv = _conv_bn(m.qkvs[i], feat)
        q, k, v = qkv[:, :16], qkv[:, 16:32], qkv[:, 32:]
        q = _conv_bn(m.dws[i], q)
        attn = torch.softmax(q.flatten(2).transpose(1, 2) @ k.flatten(2) / 4.0 + bias[i], dim=-1)
        prev = (v.flatten(2) @ attn.transpose(1, 2)).reshape(b, d, h, w)
        outs.append(prev)
    return _conv_bn(m.proj, torch.cat(outs, dim=1).relu())


def test_cascaded_group_param_count() -> None:
    dim, heads, grid = 64, 4, (7, 5)
    m = CascadedGroupAttention(dim, heads=heads, grid=grid)
    d = dim // heads
    per_head = d * (32 + d) + 2 * (32 + d) + 16 * 25 + 2 * 16
    expected = heads * per_head + dim * dim + 2 * dim + heads * grid[0] * grid[1]
    assert sum(p.numel() for p in m.parameters()) == expected


@pytest.mark.parametrize("hw", [(4, 4), (6, 3), (2, 5)])
def test_cascaded_group_matches_reference_off_build_grid(hw: tuple[int, int]) -> None:
    m = CascadedGroupAttention(32, heads=2, grid=(4, 4))
    _randomize_bn(m)
    with torch.no_grad():
        m.attention_biases.normal_()
    m.eval()
    x = torch.randn(2, 32, *hw)
    with torch.no_grad():
        y = m(x, hw)
        assert y.shape == x.shape
        torch.testing.assert_close(y, _cascaded_reference(m, x), atol=1e-5, rtol=1e-5)


def test_cascaded_group_bias_offsets_clamp_to_build_grid() -> None:
    m = CascadedGroupAttention(16, heads=1, grid=(4, 4))
    idx = m.bias_index((6, 3))
    assert idx.shape == (18, 18)
    assert int(idx.max()) == 3 * 4 + 2  # |dy| 5 -> 3, |dx| at most 2
    assert torch.equal(idx, idx.T)
    assert idx.diagonal().eq(0).all()


def test_cascaded_group_cascade_feeds_later_heads() -> None:
    heads, dim = 4, 32
    m = CascadedGroupAttention(dim, heads=heads, grid=(4, 4))
    _randomize_bn(m)
    m.eval()
    inputs: dict[int, torch.Tensor] = {}
    for i, qkv in enumerate(m.qkvs):
        qkv.register_forward_pre_hook(lambda _mod, args, i=i: inputs.__setitem__(i, args[0].clone()))
    x = torch.randn(1, dim, 6, 3)
    with torch.no_grad():
        m(x, (6, 3))
        before = dict(inputs)
        x2 = x.clone()
        x2[:, : dim // heads] += torch.randn(1, dim // heads, 6, 3)  # perturb only group 0
        m(x2, (6, 3))
    for i in range(1, heads):  # every later head's input changes although its own group did not
        assert not torch.allclose(before[i], inputs[i])
