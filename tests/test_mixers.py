"""One shared suite over every registered token and channel mixer (as timm tests every model)."""

from __future__ import annotations

import pytest
import torch

from search_spaces import count_ops
from search_spaces.layers.common import to_layout
from search_spaces.registry import (
    CHANNEL_MIXERS,
    TOKEN_MIXERS,
    channel_mixer_names,
    get_channel_mixer,
    get_token_mixer,
    token_mixer_names,
)

DIM, HEADS, GRID = 32, 4, (4, 4)
EXPECTED_TOKEN = {"attention", "single_head", "cascaded_group", "linear", "gated_linear", "ssm", "spectral",
                  "pool", "sepconv", "identity"}
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
    from search_spaces.registry import channel_mixer, token_mixer

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
