"""ViT-aware proxies (predictors.zero_cost.vit): TF-TAS's DSS and AZ-NAS's components against hand-computed
values and loop-style re-implementations of the reference code, the model left untouched, rank aggregation on
hand examples, and every hybrid_vit mixer and an NB201 network giving finite values."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import search_spaces
from predictors.zero_cost import (
    ALL_PROXIES,
    EXTRA_PROXIES,
    PROXIES,
    VIT_PROXIES,
    az_nas_aggregate,
    az_nas_components,
    compute,
    dss_scores,
    rank_aggregate,
)
from search_spaces.hybrid_vit import Block
from search_spaces.layers.common import to_layout
from search_spaces.nb201 import NB201Network, NB201Spec
from search_spaces.spec import ArchSpec, StageSpec, StemSpec
from search_spaces.supernet import get_frame

ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
AZ = ("az_expressivity", "az_progressivity", "az_trainability")


def _batch(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hybrid_net() -> nn.Module:
    """Token layout (pos embed) attention + GLU with LN, then conv3 downsampling to single-head attention
    (ConvBN inside the token mixer) + conv-FFN with BN: every layout change and a BN to remove."""
    spec = ArchSpec(
        stem=StemSpec("conv", 4),
        stages=(StageSpec(depth=1, width=16, token_mixer="attention", channel_mixer="glu", heads=2, mlp_ratio=2.0,
                          norm="layernorm"),
                StageSpec(depth=2, width=32, token_mixer="single_head", channel_mixer="conv_ffn", mlp_ratio=2.0,
                          norm="batchnorm", downsample="conv3")),
        pos_embed="learned",
    )
    return search_spaces.get_space("hybrid_vit").build(spec, num_classes=10, img_size=16)


def _nb201_net() -> nn.Module:
    torch.manual_seed(0)
    return NB201Network(NB201Spec.from_string(ARCH), cells_per_stage=1)


class _Cells(nn.Module):
    """A net of plain ``cells`` (the fallback units), output flattened."""

    def __init__(self, *cells: nn.Module) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.cells:
            x = c(x)
        return x.flatten(1)


# ---------------------------------------------------------------------------------------------
# DSS
# ---------------------------------------------------------------------------------------------


def naive_dss(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """TF-TAS ``compute_dss_per_weight`` in loop style (BN off, |state|, ones input, backward), nuclear
    norms from singular values; MSA = Linear/Conv in token mixers, MLP = those in channel mixers."""
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.forward = lambda t: t
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net.double().train()
    net(torch.ones(1, *x.shape[1:], dtype=torch.float64)).sum().backward()
    div = sal = 0.0
    for blk in (m for m in net.modules() if isinstance(m, Block)):
        for part, msa in ((blk.token_mixer, True), (blk.channel_mixer, False)):
            for m in part.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.grad is not None:
                    w, g = m.weight.detach(), m.weight.grad
                    if msa:
                        o = w.shape[0]
                        div += float(torch.linalg.svdvals(w.reshape(o, -1)).sum()
                                     * torch.linalg.svdvals(g.reshape(o, -1)).sum())
                    else:
                        sal += float((w * g).abs().sum())
    return div, sal


def test_dss_matches_reference_loop_on_hybrid() -> None:
    net = _hybrid_net()
    x, t = _batch()
    out = compute(net, x, t, names=["dss", "dss_diversity", "dss_saliency"])
    div, sal = naive_dss(net, x)
    assert div > 0 and sal > 0
    assert out["dss_diversity"] == pytest.approx(div, rel=1e-10)
    assert out["dss_saliency"] == pytest.approx(sal, rel=1e-10)
    assert out["dss"] == pytest.approx(div + sal, rel=1e-12)


def test_dss_by_hand_on_conv_cells() -> None:
    """3x3 conv (MSA-like: diversity) then 1x1 conv (MLP-like: saliency) on an all-ones 3x3 image:
    dR/dW1[o,c,ky,kx] = a_o * n(ky,kx) with a_o = sum_k |W2|[k,o] and n the in-image count of each tap,
    so mat(dR/dW1) is rank one with nuclear norm ||a|| * sqrt(c) * ||n|| (||n|| = 17);
    dR/dW2[k,o] = S_o = <|W1|[o], n>."""
    torch.manual_seed(1)
    c1, c2 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Conv2d(3, 4, 1, bias=False)
    net = _Cells(c1, c2)
    w1, w2 = c1.weight.detach().abs().double(), c2.weight.detach().abs().double()[:, :, 0, 0]
    count = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]], dtype=torch.float64)
    assert float(count.norm()) == 17.0
    a = w2.sum(dim=0)  # (3,)
    diversity = float(torch.linalg.svdvals(w1.reshape(3, -1)).sum()) * float(a.norm()) * math.sqrt(2) * 17.0
    s_o = (w1 * count).sum(dim=(1, 2, 3))  # (3,)
    saliency = float((w2 * s_o[None, :]).sum())
    out = dss_scores(net, torch.zeros(5, 2, 3, 3))
    assert out["dss_diversity"] == pytest.approx(diversity, rel=1e-10)
    assert out["dss_saliency"] == pytest.approx(saliency, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# AZ-NAS
# ---------------------------------------------------------------------------------------------


def _features_hybrid(net: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int] | None]]:
    h, hw = net.forward_stem(x)
    feats = [(h, hw)]
    for stage in net.stages:
        h, hw = stage.forward_downsample(h, hw)
        for blk in stage.blocks:
            h = blk(h, hw)
            feats.append((h, hw))
    return feats


def _features_nb201(net: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int] | None]]:
    h = net.stem(x)
    feats = [(h, None)]
    for cell in net.cells:
        h = cell(h)
        feats.append((h, None))
    return feats


def _nchw(t: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
    return t if t.ndim == 4 else t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *hw)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).reshape(-1, t.shape[1 if t.ndim == 4 else -1]).double()


def naive_az(model: nn.Module, x: torch.Tensor, extract, seed: int = 0, kaiming: bool = False) -> dict[str, float]:
    """AZ-NAS ``compute_nas_score`` (NB201 version) in loop style, statistics in float64, Rademacher signs
    from a generator seeded with ``seed`` (after the Kaiming draws when ``kaiming``)."""
    net = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    if kaiming:
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    feats = extract(net, x.clone().requires_grad_(True))
    ent = []
    for f, _ in feats:
        r = _flat(f.detach())
        r = r - r.mean(dim=0, keepdim=True)
        s = torch.linalg.eigvalsh(r.T @ r / r.shape[0])
        p = s / s.sum()
        ent.append(float((-p * torch.log(p + 1e-8)).sum()))
    scores = []
    for i in reversed(range(1, len(feats))):
        (f_in, hw_in), (f_out, hw_out) = feats[i - 1], feats[i]
        g_out = (torch.bernoulli(torch.full_like(f_out, 0.5), generator=gen) - 0.5) * 2
        g_in = torch.autograd.grad(f_out, f_in, g_out)[0]
        if g_in.shape == g_out.shape and torch.equal(g_in, g_out):
            scores.append(-math.inf)
            continue
        gi, go = _flat(g_in), _flat(g_out)
        if gi.shape[0] != go.shape[0]:
            a, b = _nchw(g_in, hw_in), _nchw(g_out, hw_out)
            gi, go = _flat(F.pixel_unshuffle(a, a.shape[2] // b.shape[2])), _flat(b)
        s = float(torch.linalg.svdvals(gi.T @ go / go.shape[0]).max())
        scores.append(-s - 1 / (s + 1e-6) + 2)
    return {"az_expressivity": sum(ent), "az_progressivity": min(np.diff(ent)),
            "az_trainability": float(np.mean(scores))}


@pytest.mark.parametrize("which", ["hybrid", "nb201"])
def test_az_matches_reference_loop(which: str) -> None:
    net, extract = (_hybrid_net(), _features_hybrid) if which == "hybrid" else (_nb201_net(), _features_nb201)
    x, t = _batch()
    out = compute(net, x, t, names=list(AZ), seed=3)
    ref = naive_az(net, x, extract, seed=3)
    for k in AZ:
        assert math.isfinite(out[k])
        assert out[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), k
    if which == "nb201":  # the CNN references' re-initialisation
        out = az_nas_components(net, x, seed=3, init="kaiming_normal")
        ref = naive_az(net, x, extract, seed=3, kaiming=True)
        for k in AZ:
            assert out[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), k


def test_az_by_hand_scaling_and_pooling() -> None:
    """One channel: x -> 2x (1x1 conv) -> 2x2 average pool. With +-1 signs, g^T g / rows = 1 exactly, so
    s_max = 2 for the conv and, after the pixel unshuffle, ||(1/4)(1,1,1,1)|| = 1/2 for the pool."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    net = _Cells(conv, nn.AvgPool2d(2))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = az_nas_components(net, x, seed=7)

    def pair(s: float) -> float:
        return -s - 1 / (s + 1e-6) + 2

    assert out["az_trainability"] == pytest.approx((pair(2.0) + pair(0.5)) / 2, rel=1e-12)
    one = -math.log(1 + 1e-8)  # one channel: p = (1,)
    assert out["az_expressivity"] == pytest.approx(3 * one, rel=1e-9)
    assert out["az_progressivity"] == pytest.approx(0.0, abs=1e-15)


def test_az_by_hand_entropy_and_identity() -> None:
    """Rows (1,0), (-1,0), (0,2), (0,-2): covariance diag(1/2, 2), p = (0.2, 0.8). An identity cell: the
    same feature twice (progressivity 0) and G_in = G_out, which the reference scores -inf."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]).reshape(4, 2, 1, 1)
    out = az_nas_components(_Cells(nn.Identity()), x)
    h = -(0.2 * math.log(0.2 + 1e-8) + 0.8 * math.log(0.8 + 1e-8))
    assert out["az_expressivity"] == pytest.approx(2 * h, rel=1e-12)
    assert out["az_progressivity"] == 0.0
    assert out["az_trainability"] == -math.inf


def test_az_seed_and_residual_features() -> None:
    net = _hybrid_net()
    x, _ = _batch()
    a, b, c = (az_nas_components(net, x, seed=s) for s in (0, 0, 1))
    assert a == b
    assert a["az_expressivity"] == c["az_expressivity"] and a["az_progressivity"] == c["az_progressivity"]
    assert a["az_trainability"] != c["az_trainability"]
    # AutoFormer's features: after each residual (token mixer, then channel mixer), no stem feature
    r = az_nas_components(net, x, features="residual")
    feats = []
    net_c = copy.deepcopy(net).train()
    with torch.no_grad():
        h, hw = net_c.forward_stem(x)
        for stage in net_c.stages:
            h, hw = stage.forward_downsample(h, hw)
            for blk in stage.blocks:
                h = to_layout(h, blk.token_mixer.layout, hw)
                h = h + blk.ls1(blk.token_mixer(blk.norm1(h), hw))
                h = to_layout(h, blk.channel_mixer.layout, hw)
                feats.append(h)
                h = h + blk.ls2(blk.channel_mixer(blk.norm2(h), hw))
                feats.append(h)
    ent = []
    for f in feats:
        q = _flat(f)
        q = q - q.mean(0, keepdim=True)
        s = torch.linalg.eigvalsh(q.T @ q / q.shape[0]).clamp_min(0)
        p = s / s.sum()
        ent.append(float((-p * torch.log(p + 1e-8)).sum()))
    assert r["az_expressivity"] == pytest.approx(sum(ent), rel=1e-6)
    with pytest.raises(ValueError, match="residual"):
        az_nas_components(_nb201_net(), x, features="residual")


# ---------------------------------------------------------------------------------------------
# the model is untouched; compute wiring
# ---------------------------------------------------------------------------------------------


def _snapshot(net: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "modes": [m.training for m in net.modules()],
        "flags": [p.requires_grad for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "dtypes": [p.dtype for p in net.parameters()],
        "forwards": ["forward" in m.__dict__ for m in net.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in net.modules()],
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_is_never_modified(mode: str) -> None:
    for net in (_hybrid_net(), _nb201_net()):
        net.train(mode == "train")
        params = list(net.parameters())
        params[0].requires_grad_(False)
        params[1].grad = torch.full_like(params[1], 0.5)
        x, t = _batch()
        x0 = x.clone()
        before = _snapshot(net)
        out = compute(net, x, t, names=list(VIT_PROXIES))
        az_nas_components(net, x, init="kaiming_normal")
        after = _snapshot(net)
        assert all(math.isfinite(v) for v in out.values()), out
        assert torch.equal(x, x0) and not x.requires_grad
        for k, v in before["state"].items():
            assert torch.equal(v, after["state"][k]), k
        for key in ("modes", "flags", "dtypes", "forwards", "hooks"):
            assert before[key] == after[key], key
        for g0, g1 in zip(before["grads"], after["grads"]):
            assert (g0 is None and g1 is None) or torch.equal(g0, g1)


def test_compute_wiring_keeps_existing_proxies() -> None:
    net = _hybrid_net()
    x, t = _batch()
    assert len(PROXIES) == 10 and ALL_PROXIES == PROXIES + VIT_PROXIES + EXTRA_PROXIES
    assert list(compute(net, x, t, names=["nwot", "az_trainability", "dss"])) == ["nwot", "dss", "az_trainability"]
    old = compute(net, x, t, names=["snip", "synflow", "nwot", "zen"], seed=2)
    both = compute(net, x, t, names=["snip", "synflow", "nwot", "zen", *VIT_PROXIES], seed=2)
    assert {k: both[k] for k in old} == old
    assert {k: both[k] for k in VIT_PROXIES} == {**dss_scores(net, x), **az_nas_components(net, x, seed=2)}
    assert set(compute(net, x, t, names=None)) == set(PROXIES)
    with pytest.raises(ValueError, match="az_trainability"):
        compute(net, x, t, names=["az_trainabilty"])


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def test_rank_aggregate_hand_example() -> None:
    """Architecture 2 is second in both proxies; 0 and 1 are best in one and worst in the other. The
    log aggregation prefers the balanced one, the mean of ranks cannot tell them apart."""
    scores = {"a": [3.0, 1.0, 2.0], "b": [10.0, 30.0, 20.0]}
    log = rank_aggregate(scores)
    third = math.log(1 / 3)
    assert log == pytest.approx([third, third, 2 * math.log(2 / 3)], rel=1e-12)
    assert int(np.argmax(log)) == 2
    assert rank_aggregate(scores, how="mean") == [2.0, 2.0, 2.0]
    assert rank_aggregate({"a": [5.0, 5.0, 7.0]}, how="mean") == [1.5, 1.5, 3.0]  # ties share the average


def test_rank_aggregate_matches_rankdata_and_nan_goes_last() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    expected = np.log(scipy.stats.rankdata(a) / 40) + np.log(scipy.stats.rankdata(b) / 40)
    np.testing.assert_allclose(rank_aggregate({"a": a, "b": b}), expected, rtol=1e-12)
    # NaN, +inf and -inf rank below every finite value, tied among themselves
    vals = [math.nan, 1.0, 2.0, math.inf, -math.inf]
    assert rank_aggregate({"x": vals}, how="mean") == [2.0, 4.0, 5.0, 2.0, 2.0]
    # a NaN in one proxy sinks an architecture that is best in the others
    agg = rank_aggregate({"p": [math.nan, 1.0, 2.0], "q": [9.0, 1.0, 2.0], "r": [9.0, 1.0, 2.0]})
    assert int(np.argmax(agg)) == 2 and agg[0] < agg[2]
    for bad in ({}, {"a": [1.0], "b": [1.0, 2.0]}, {"a": []}):
        with pytest.raises(ValueError):
            rank_aggregate(bad)
    with pytest.raises(ValueError, match="how"):
        rank_aggregate({"a": [1.0]}, how="median")


def test_az_nas_aggregate_includes_flops() -> None:
    comp = {"az_expressivity": [1.0, 3.0, 2.0, 4.0], "az_progressivity": [0.1, 0.3, math.nan, 0.2],
            "az_trainability": [-1.0, -0.5, -0.2, -3.0]}
    flops = [4e6, 1e6, 3e6, 2e6]
    expected = sum(np.log(scipy.stats.rankdata(np.nan_to_num(v, nan=-np.inf)) / 4)
                   for v in [*comp.values(), flops])
    np.testing.assert_allclose(az_nas_aggregate(comp, flops), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="flops"):
        az_nas_aggregate({"complexity": [1.0]}, [1.0])


# ---------------------------------------------------------------------------------------------
# every mixer, NB201
# ---------------------------------------------------------------------------------------------


def _frame():
    frame = get_frame("small", img_size=16)
    stages = tuple(dataclasses.replace(sf, widths=(16,) if i < 2 else (32,)) for i, sf in enumerate(frame.stages))
    return dataclasses.replace(frame, stages=stages)


def _mixer_spec(token_mixer: str | None = None, channel_mixer: str | None = None) -> ArchSpec:
    frame = _frame()
    spec = frame.smallest()
    stages = tuple(dataclasses.replace(st, token_mixer=token_mixer or st.token_mixer,
                                       channel_mixer=channel_mixer or st.channel_mixer) for st in spec.stages)
    spec = dataclasses.replace(spec, stages=stages)
    frame.check(spec)
    return spec


def _assert_finite(spec: ArchSpec, label: str) -> None:
    net = search_spaces.get_space("hybrid_vit").build(spec, num_classes=10, img_size=16)
    x, t = _batch()
    out = compute(net, x, t, names=list(VIT_PROXIES))
    assert all(math.isfinite(v) for v in out.values()), (label, out)


@pytest.mark.parametrize("token_mixer", search_spaces.token_mixer_names())
def test_every_token_mixer_finite(token_mixer: str) -> None:
    _assert_finite(_mixer_spec(token_mixer=token_mixer), token_mixer)


@pytest.mark.parametrize("channel_mixer", search_spaces.channel_mixer_names())
def test_every_channel_mixer_finite(channel_mixer: str) -> None:
    _assert_finite(_mixer_spec(token_mixer="pool", channel_mixer=channel_mixer), channel_mixer)


def test_random_subnets_and_nb201_finite() -> None:
    frame = _frame()
    for seed in range(3):
        _assert_finite(frame.random(seed), f"random({seed})")
    x, t = _batch()
    out = compute(_nb201_net(), x, t, names=list(VIT_PROXIES))
    assert all(math.isfinite(v) for v in out.values()) and out["dss_diversity"] > 0 and out["dss_saliency"] > 0
