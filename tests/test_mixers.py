"""One shared suite over every registered token and channel mixer (as timm tests every model)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from search_spaces import count_ops
from search_spaces.layers.common import to_layout
from search_spaces.registry import (
    CHANNEL_MIXERS,
    TOKEN_MIXERS,
    channel_mixer,
    channel_mixer_names,
    fused_rule,
    get_channel_mixer,
    get_token_mixer,
    token_mixer,
    token_mixer_names,
)
from search_spaces.supernet import _segment_sizes

DIM, HEADS, GRID = 32, 4, (4, 4)
EXPECTED_TOKEN = {"attention", "single_head", "cascaded_group", "linear", "gated_linear", "ssm", "ssd", "hydra",
                  "spectral", "pool", "sepconv", "identity"}
EXPECTED_CHANNEL = {"mlp", "glu", "conv_ffn", "nested"}


def _make(kind: str, name: str, dim: int = DIM, grid: tuple[int, int] = GRID) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "token":
        return get_token_mixer(name)(dim, heads=HEADS, grid=grid)
    return get_channel_mixer(name)(dim, mlp_ratio=2.0)


def _input(layout: str, hw: tuple[int, int], b: int = 2, dim: int = DIM, prefix: int = 0) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(b, dim, *hw)
    if layout == "nchw":
        assert prefix == 0
        return x
    x = to_layout(x, "nlc", hw)
    if prefix:
        x = torch.cat([torch.randn(b, prefix, dim), x], dim=1)
    return x


def _layouts(cls: type) -> list[str]:
    return ["nchw", "nlc"] if cls.layout == "any" else [cls.layout]


ALL = [("token", n) for n in token_mixer_names()] + [("channel", n) for n in channel_mixer_names()]
IDS = [f"{k}:{n}" for k, n in ALL]


def test_registry_has_every_block_of_the_design() -> None:
    assert set(token_mixer_names()) == EXPECTED_TOKEN
    assert set(channel_mixer_names()) == EXPECTED_CHANNEL


def test_duplicate_names_raise() -> None:
    with pytest.raises(ValueError, match="already registered"):
        token_mixer("pool")(TOKEN_MIXERS["identity"])
    with pytest.raises(ValueError, match="already registered"):
        channel_mixer("mlp")(CHANNEL_MIXERS["nested"])


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"choose one of: .*attention"):
        get_token_mixer("softmax_attn")


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_declares_layout_paper_and_flags(kind: str, name: str) -> None:
    cls = get_token_mixer(name) if kind == "token" else get_channel_mixer(name)
    assert cls.layout in ("nchw", "nlc", "any")
    assert len(cls.paper) > 10 and any(ch.isdigit() for ch in cls.paper), "paper must name authors and year"
    if cls.supports_prefix:
        assert cls.layout in ("nlc", "any")
    doc = (cls.__doc__ or "") + (__import__(cls.__module__).__doc__ or "")
    assert doc.strip(), f"{name} needs a docstring naming its paper"


DECLARATIONS = ("fused_slices", "onnx_blocker")


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_declares_fused_slices_and_onnx_blocker(kind: str, name: str) -> None:
    """Both are declared on the class (or a base of its own), never taken from a default: a mixer
    that forgets them must not pass as "nothing fused" or "exports to ONNX"."""
    cls = get_token_mixer(name) if kind == "token" else get_channel_mixer(name)
    for attr in DECLARATIONS:
        owners = [k.__qualname__ for k in cls.__mro__ if attr in vars(k) and k not in (nn.Module, object)]
        assert owners, f"{name}: {cls.__qualname__} must declare {attr}"
    assert cls.onnx_blocker is None or (isinstance(cls.onnx_blocker, str) and cls.onnx_blocker.strip())
    assert isinstance(cls.fused_slices, tuple)


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_fused_slices_name_real_tensors_whose_segments_fit(kind: str, name: str) -> None:
    """Every declared name matches tensors of the block, and at two widths the rule cuts each
    tensor's dim 0 into segments that add up, none of which shrinks as the width grows (the
    supernet keeps the leading rows of each, so a small segment must fit in the big one)."""
    cls = get_token_mixer(name) if kind == "token" else get_channel_mixer(name)
    small, big = ({n: t.shape for n, t in [*m.named_parameters(), *m.named_buffers()] if t.ndim}
                  for m in (_make(kind, name, dim=16), _make(kind, name, dim=32)))
    for declared, _ in cls.fused_slices:
        assert any(n == declared or n.startswith(declared + ".") for n in big), \
            f"{name}: fused_slices names {declared!r}, which is no tensor or submodule of the block"
    for n, shape in big.items():
        rule = fused_rule(cls, n)
        if rule is None or n not in small:
            continue
        seg_small, seg_big = _segment_sizes(rule, small[n][0]), _segment_sizes(rule, shape[0])
        assert sum(seg_small) == small[n][0] and sum(seg_big) == shape[0], (name, n, rule)
        assert all(0 < a <= b for a, b in zip(seg_small, seg_big)), (name, n, seg_small, seg_big)


def _probe_class(**overrides: Any) -> type[nn.Module]:
    """An otherwise valid token mixer class; ``attr=...`` replaces a declaration, ``attr=None`` with
    ``drop=attr`` removes it."""
    body: dict[str, Any] = {"layout": "nlc", "supports_prefix": False, "paper": "Nobody 2024, A Probe",
                            "uses_heads": False, "complexity": "linear", "fused_slices": (), "onnx_blocker": None}
    drop = overrides.pop("drop", None)
    body.update(overrides)
    body.pop(drop, None)
    return type("Probe", (nn.Module,), body)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"drop": "fused_slices"}, "fused_slices"),
    ({"drop": "onnx_blocker"}, "onnx_blocker"),
    ({"fused_slices": NotImplemented}, "fused_slices"),
    ({"fused_slices": {"qkv": 3}}, "fused_slices"),  # a dict would be a mutable class attribute
    ({"fused_slices": (("qkv", 1),)}, "fused_slices"),
    ({"fused_slices": (("qkv", (None, None)),)}, "fused_slices"),
    ({"onnx_blocker": ""}, "onnx_blocker"),
    ({"onnx_blocker": False}, "onnx_blocker"),
])
def test_registration_refuses_a_mixer_without_the_declarations(overrides: dict[str, Any], message: str) -> None:
    for register, table in ((token_mixer, TOKEN_MIXERS), (channel_mixer, CHANNEL_MIXERS)):
        before = dict(table)
        with pytest.raises(ValueError, match=message):
            register("decl_probe")(_probe_class(**dict(overrides)))
        assert table == before
    try:  # the probe itself is valid: only the declaration under test made it fail
        token_mixer("decl_probe")(_probe_class(fused_slices=(("qkv", (4, None)),), onnx_blocker="no reason"))
    finally:
        TOKEN_MIXERS.pop("decl_probe", None)


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_shape_forward_backward_finite(kind: str, name: str) -> None:
    m = _make(kind, name)
    for layout in _layouts(type(m)):
        x = _input(layout, GRID).requires_grad_(True)
        y = m(x, GRID)
        assert y.shape == x.shape
        assert torch.isfinite(y).all()
        m.zero_grad()
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        if name != "identity":
            assert x.grad.abs().sum() > 0
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_gradients_taken_with_a_graph_equal_those_without(kind: str, name: str) -> None:
    """GraSP (Wang et al. 2020; a zero-cost proxy) takes a Hessian-gradient product, so its first
    gradient is taken with ``create_graph``. Blocks with a hand-written backward (ssm, ssd, hydra)
    then differentiate a plain formulation instead: its gradients must be the same (float64, 100
    tokens: several SSD chunks and scan blocks), and the second backward must run. A plain autograd
    call on the saved inputs counted the paths between them twice (ssm's delta, B and C come from its
    input): gradients off by up to 4e-2."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid = (10, 10)
    m = _make(kind, name, grid=grid).double()
    for layout in _layouts(type(m)):
        x = _input(layout, grid).double().requires_grad_(True)
        params = [x, *m.parameters()]
        w = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
        plain = torch.autograd.grad((m(x, grid) * w).sum(), params, allow_unused=True)
        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
            graph = torch.autograd.grad((m(x, grid) * w).sum(), params, allow_unused=True, create_graph=True)
            for a, b in zip(plain, graph):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
            z = sum((g.detach() * g).sum() for g in graph if g is not None and g.requires_grad)
            if isinstance(z, torch.Tensor):
                hg = torch.autograd.grad(z, params, allow_unused=True)
                assert all(h is None or torch.isfinite(h).all() for h in hg)


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_bf16_autocast_close_to_fp32(kind: str, name: str) -> None:
    m = _make(kind, name).eval()
    for layout in _layouts(type(m)):
        x = _input(layout, GRID)
        with torch.no_grad():
            ref = m(x, GRID)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(x, GRID)
        assert y.shape == ref.shape
        assert torch.isfinite(y).all()
        err = (y.float() - ref).norm() / ref.norm().clamp_min(1e-6)
        assert err < 0.05, f"{name}: bf16 relative error {err:.3f}"


@pytest.mark.parametrize(("kind", "name"), ALL, ids=IDS)
def test_other_token_grids(kind: str, name: str) -> None:
    """Built for a 4x4 grid, every block runs on 7x5 and 2x2 grids (GFNet resizes its filter, ...)."""
    m = _make(kind, name).eval()
    for hw in ((7, 5), (2, 2), (1, 1)):
        for layout in _layouts(type(m)):
            x = _input(layout, hw, b=2)
            with torch.no_grad():
                y = m(x, hw)
            assert y.shape == x.shape and torch.isfinite(y).all(), f"{name} at {hw}"


@pytest.mark.parametrize(("kind", "name"), [a for a in ALL if (TOKEN_MIXERS | CHANNEL_MIXERS)[a[1]].supports_prefix],
                         ids=lambda a: a if isinstance(a, str) else None)
def test_prefix_tokens(kind: str, name: str) -> None:
    m = _make(kind, name).eval()
    x = _input("nlc", GRID, prefix=1)
    with torch.no_grad():
        y = m(x, GRID)
    assert y.shape == x.shape and torch.isfinite(y).all()


def _ops(m: torch.nn.Module, hw: tuple[int, int]) -> int:
    x = _input(type(m).layout if type(m).layout != "any" else "nlc", hw, b=1)
    with torch.no_grad():
        return count_ops(lambda: m(x, hw))


@pytest.mark.parametrize("name", [n for n in token_mixer_names() if TOKEN_MIXERS[n].complexity == "linear"])
def test_linear_mixers_scale_linearly_in_operations(name: str) -> None:
    """Counted operations (matmul FLOPs + elements of every other op), not seconds: 4x tokens, ~4x ops."""
    m = _make("token", name, grid=(16, 16)).eval()
    small, big = _ops(m, (16, 16)), _ops(m, (32, 32))
    if small == 0:
        assert big == 0  # identity does nothing
        return
    assert 3.6 <= big / small <= 4.4, f"{name}: ops ratio {big / small:.2f} for 4x the tokens"


@pytest.mark.parametrize("name", [n for n in token_mixer_names() if TOKEN_MIXERS[n].complexity == "quadratic"])
def test_quadratic_mixers_really_are_superlinear(name: str) -> None:
    """The counter can tell: softmax attention grows clearly faster than 4x for 4x the tokens."""
    m = _make("token", name, grid=(16, 16)).eval()
    assert _ops(m, (32, 32)) / _ops(m, (16, 16)) > 6.0
