"""Zero-cost proxies (predictors.zero_cost): hand-checked values, equality with naive one-proxy-at-a-time
re-implementations of the reference definitions, invariances, and every hybrid_vit mixer."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import search_spaces
from predictors.zero_cost import NODE_WISE, PROXIES, compute
from search_spaces.layers import channel_mixers
from search_spaces.nb201 import NB201Network, NB201Spec
from search_spaces.spec import ArchSpec, StageSpec, StemSpec

LAYERS = (nn.Conv2d, nn.Linear)
ARCH = "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _batch(n: int = 8, size: int = 16, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _nb201_cell_net() -> nn.Module:
    """An NB201 network with one cell per stage (every op type in the cell)."""
    torch.manual_seed(0)
    return NB201Network(NB201Spec.from_string(ARCH), cells_per_stage=1)


def _hybrid_net() -> nn.Module:
    """Small hybrid_vit: conv stem (BN, GELU), sepconv (StarReLU) + MLP with BN, attention + GLU with LN."""
    spec = ArchSpec(
        stem=StemSpec("conv", 4),
        stages=(StageSpec(depth=1, width=16, token_mixer="sepconv", channel_mixer="mlp", mlp_ratio=2.0,
                          norm="batchnorm"),
                StageSpec(depth=1, width=32, token_mixer="attention", channel_mixer="glu", heads=2, mlp_ratio=2.0,
                          norm="layernorm")),
    )
    return search_spaces.get_space("hybrid_vit").build(spec, num_classes=10, img_size=16)



@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    return {"nb201": _nb201_cell_net(), "hybrid": _hybrid_net()}


# ---------------------------------------------------------------------------------------------
# naive re-implementations of the reference definitions: one proxy at a time, loop style
# ---------------------------------------------------------------------------------------------


def _layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, LAYERS)]


def naive_grad_norm(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    net = copy.deepcopy(model).train()
    net.zero_grad()
    F.cross_entropy(net(x), t).backward()
    total = 0.0
    for layer in _layers(net):
        if layer.weight.grad is not None:
            total += float(layer.weight.grad.norm())
    return total


class _Mask(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def naive_snip(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """SNIP with explicit weight masks (a parametrization, so functional uses of the weight see it too)."""
    from torch.nn.utils import parametrize

    net = copy.deepcopy(model).train()
    masks = []
    for layer in _layers(net):
        layer.weight.requires_grad_(False)
        m = _Mask(layer.weight)
        parametrize.register_parametrization(layer, "weight", m)
        masks.append(m.mask)
    F.cross_entropy(net(x), t).backward()
    return sum(float(m.grad.abs().sum()) for m in masks if m.grad is not None)


def naive_grasp(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """The reference's two passes: g = dL/dW; then z = sum(g . dL/dW (create_graph)); -W * dz/dW."""
    return grasp_terms(model, x, t)[0]


def grasp_terms(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[float, float, int]:
    """grasp, the sum of its terms' magnitudes sum|W * dz/dW| and how many terms there are: grasp
    is a signed sum with cancellation, so its float32 error scales with the magnitudes, not with
    the result."""
    net = copy.deepcopy(model).train()
    weights = [layer.weight for layer in _layers(net)]
    with sdpa_kernel([SDPBackend.MATH]):
        grad_w = torch.autograd.grad(F.cross_entropy(net(x), t), weights, allow_unused=True)
        grad_f = torch.autograd.grad(F.cross_entropy(net(x), t), weights, create_graph=True, allow_unused=True)
    z = 0
    for gw, gf in zip(grad_w, grad_f):
        if gw is not None:
            z = z + (gw.data * gf).sum()
    z.backward()
    terms = [(-w.data * w.grad).double() for w in weights if w.grad is not None]
    return (sum(float(v.sum()) for v in terms), sum(float(v.abs().sum()) for v in terms),
            sum(v.numel() for v in terms))


def float32_sum_bound(abs_sum: float, n: int) -> float:
    """How far two float32 computations of one sum of ``n`` terms may honestly differ. Each rounds
    every term and partial sum to float32 (unit roundoff eps/2); torch reduces blockwise and
    pairwise, whose error grows like log2(n) times the sum of the magnitudes (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed. 2002, sec. 4.2). The terms are float32 backward
    passes themselves, and two computations differ by both errors: hence 4 * eps * log2(n)."""
    return 4.0 * float(torch.finfo(torch.float32).eps) * math.log2(max(n, 2)) * abs_sum


@contextlib.contextmanager
def _patched_linear_any(wrapper) -> Iterator[None]:  # type: ignore[no-untyped-def]
    original = channel_mixers.linear_any
    channel_mixers.linear_any = wrapper(original)
    try:
        yield
    finally:
        channel_mixers.linear_any = original


def naive_fisher(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Fisher channel saliency via explicit per-sample channel masks on every layer output (Theis et al.
    2018): dL/dm_nk = sum over positions of a_nk dL/da_nk. Layers called as modules are masked by a
    forward hook; channel mixers' functional calls by wrapping ``linear_any``."""
    net = copy.deepcopy(model).train()
    layers = _layers(net)
    owner = {id(layer.weight): layer for layer in layers}
    masks: list[tuple[nn.Module, torch.Tensor]] = []

    def mask_output(layer: nn.Module, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [out.shape[0]] + [1] * (out.ndim - 1)
        shape[channel_dim] = out.shape[channel_dim]
        m = torch.ones(shape, requires_grad=True)
        masks.append((layer, m))
        return out * m

    def hook(layer: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return mask_output(layer, out, 1 if isinstance(layer, nn.Conv2d) else out.ndim - 1)

    def wrapper(fn):  # type: ignore[no-untyped-def]
        def wrapped(xx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = fn(xx, weight, bias)
            layer = owner.get(id(weight)) or owner.get(id(weight._base))
            return mask_output(layer, out, 1 if out.ndim == 4 else out.ndim - 1) if layer is not None else out
        return wrapped

    for layer in layers:
        layer.register_forward_hook(hook)
    with _patched_linear_any(wrapper):
        F.cross_entropy(net(x), t).backward()
    total = 0.0
    for layer, m in masks:
        g_nk = m.grad.reshape(m.shape[0], -1)
        total += float(g_nk.pow(2).mean(0).mul(0.5).sum()) * math.prod(layer.weight.shape[1:])
    return total


def naive_jacob_cov(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    net = copy.deepcopy(model).train()
    x = x.clone().requires_grad_(True)
    y = net(x)
    y.backward(torch.ones_like(y))
    jacob = x.grad.reshape(x.shape[0], -1).numpy()
    corrs = np.corrcoef(jacob)
    v, _ = np.linalg.eig(corrs)
    k = 1e-5
    return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


def naive_synflow(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.forward = lambda inp: inp
    with torch.no_grad():
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.abs_()
    net.double().train()
    net.zero_grad()
    out = net(torch.ones([1, *x.shape[1:]], dtype=torch.float64))
    torch.sum(out).backward()
    return sum(float(torch.abs(layer.weight.detach() * layer.weight.grad).sum())
               for layer in _layers(net) if layer.weight.grad is not None)


def _hooked(m: nn.Module) -> bool:
    return "ReLU" in str(type(m)) or isinstance(m, (nn.GELU, nn.SiLU))


def naive_nwot(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    net = copy.deepcopy(model).train()
    kernel = np.zeros((x.shape[0], x.shape[0]))

    def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal kernel
        a = inp[0].reshape(inp[0].shape[0], -1)
        c = (a > 0).double()
        kernel = kernel + (c @ c.t()).numpy() + ((1.0 - c) @ (1.0 - c).t()).numpy()

    for m in net.modules():
        if _hooked(m):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(x)
    return float(np.linalg.slogdet(kernel)[1])


def naive_zen(model: nn.Module, x: torch.Tensor, t: torch.Tensor, seed: int = 0) -> float:
    net = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        a = torch.randn(x.shape)
        b = torch.randn(x.shape)
        out = net.forward_features(a)
        mixed = net.forward_features(a + 1e-2 * b)
        score = torch.log(torch.mean(torch.sum(torch.abs(out - mixed), dim=list(range(1, out.ndim)))))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                score = score + torch.log(torch.sqrt(torch.mean(m.running_var)))
    return float(score)


NAIVE = {
    "grad_norm": naive_grad_norm,
    "snip": naive_snip,
    "grasp": naive_grasp,
    "fisher": naive_fisher,
    "jacob_cov": naive_jacob_cov,
    "synflow": naive_synflow,
    "nwot": naive_nwot,
    "zen": naive_zen,
}


@pytest.mark.parametrize("which", ["nb201", "hybrid"])
def test_shared_passes_match_naive_reference(nets: dict[str, nn.Module], which: str) -> None:
    net = nets[which]
    x, t = _batch()
    together = compute(net, x, t)
    assert set(together) == set(PROXIES)
    for name, naive in NAIVE.items():
        expected = naive(net, x, t)
        alone = compute(net, x, t, names=[name])[name]
        if name == "grasp":  # a signed sum: bounded by its terms' magnitudes (it was 2.6e-6 relative on AVX-512)
            _, abs_sum, n = grasp_terms(net, x, t)
            bound = float32_sum_bound(abs_sum, n)
            assert abs(alone - expected) <= bound, (name, alone, expected, bound)
            assert abs(together[name] - expected) <= bound, (name, together[name], expected, bound)
            continue
        assert _rel(alone, expected) < 1e-6, (name, alone, expected)
        # the shared call runs attention on the math SDPA kernel (grasp's double backward needs it)
        assert _rel(together[name], expected) < 1e-6, (name, together[name], expected)


def test_reference_quirks_kept(nets: dict[str, nn.Module]) -> None:
    """NB201's ReLUConvBN has "ReLU" in its class name: the reference hooks it too (its input counts
    twice). The hybrid net's layers applied through linear_any are scored (the reference gives 0)."""
    x, t = _batch()
    net = nets["nb201"]
    names = [type(m).__name__ for m in net.modules() if "ReLU" in type(m).__name__]
    assert "_ReLUConvBN" in names
    assert compute(net, x, t, names=["nwot"])["nwot"] == pytest.approx(naive_nwot(net, x, t), rel=1e-9)
    per = compute(nets["hybrid"], x, t, names=["snip", "fisher"], per_layer=True)["per_layer"]
    assert per["snip"]["stages.0.blocks.0.channel_mixer.fc1"] > 0
    assert per["fisher"]["stages.0.blocks.0.channel_mixer.fc1"] > 0


# ---------------------------------------------------------------------------------------------
# hand-checked values
# ---------------------------------------------------------------------------------------------


def test_synflow_two_layer_linear_by_hand() -> None:
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]))
        net[1].weight.copy_(torch.tensor([[0.5, -1.0]]))
    # R = 1^T |W2| |W1| 1 = 0.5 * 6 + 1 * 15 = 18; sum |W1 * dR/dW1| = sum_ij |W2_i||W1_ij| = R, same for W2
    x = torch.randn(4, 3)
    out = compute(net, x, torch.zeros(4, dtype=torch.long), names=["synflow"], per_layer=True)
    assert out["synflow"] == 36.0
    assert out["per_layer"]["synflow"] == {"0": 18.0, "1": 18.0}


def test_grad_norm_and_snip_one_linear_layer_closed_form() -> None:
    torch.manual_seed(1)
    net = nn.Linear(5, 3, bias=False)
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    net = net.double()
    w = net.weight.detach().numpy()
    xs = x.numpy()
    logits = xs @ w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.eye(3)[t.numpy()]
    grad = (p - y).T @ xs / len(xs)  # d(mean CE)/dW
    out = compute(net, x, t, names=["grad_norm", "snip"])
    assert out["grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-12)
    assert out["snip"] == pytest.approx(np.abs(w * grad).sum(), rel=1e-12)


def test_params_and_flops_exact() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(2, 3, 8, 8)
    out = compute(net, x, torch.zeros(2, dtype=torch.long), names=["params", "flops"], per_layer=True)
    assert out["params"] == 3 * 4 * 9 + 4 + 256 * 5 + 5
    # torch's counter: 2 FLOPs per multiply-add; conv 256 outputs x 27 MACs, linear 256 x 5 MACs
    assert out["flops"] == 2 * (256 * 27 + 256 * 5)
    assert out["per_layer"] == {"params": {"0": 112.0, "3": 1285.0}}


def test_nwot_known_codes() -> None:
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -2.0]])  # codes 111, 010 (0 is not > 0), 100
    # K_ij = 3 - Hamming(c_i, c_j) = [[3,1,1],[1,3,1],[1,1,3]], det 20
    out = compute(net, x, torch.zeros(3, dtype=torch.long), names=["nwot"])
    assert out["nwot"] == pytest.approx(math.log(20.0), rel=1e-12)
    # no hooked activation: K = 0, log|det| = -inf (as the reference)
    assert compute(nn.Linear(2, 2), x, torch.zeros(3, dtype=torch.long), names=["nwot"])["nwot"] == -math.inf


def test_jacob_cov_known_jacobians() -> None:
    k = 1e-5
    # linear model: every sample's Jacobian is W^T 1, the correlation matrix is all ones (eigenvalues B, 0...)
    lin = nn.Linear(6, 3, bias=False)
    x = torch.randn(4, 6)
    expected = -(math.log(4 + k) + 1 / (4 + k) + 3 * (math.log(k) + 1 / k))
    got = compute(lin, x, torch.zeros(4, dtype=torch.long), names=["jacob_cov"])["jacob_cov"]
    assert got == pytest.approx(expected, rel=1e-6)

    class Quadratic(nn.Module):  # y = W (x * x / 2): d(sum y)/dx_n = x_n * (W^T 1)
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x * x / 2)

    net = Quadratic()
    x = torch.randn(5, 6, dtype=torch.float64)
    net = net.double()
    jac = x.numpy() * net.fc.weight.detach().numpy().sum(0)
    v = np.linalg.eigvalsh(np.corrcoef(jac))
    expected = float(-np.sum(np.log(v + k) + 1 / (v + k)))
    got = compute(net, x, torch.zeros(5, dtype=torch.long), names=["jacob_cov"])["jacob_cov"]
    assert got == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# invariances, state, API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["nb201", "hybrid"])
def test_batch_permutation_invariance(nets: dict[str, nn.Module], which: str) -> None:
    net = nets[which]
    x, t = _batch()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    a = compute(net, x, t)
    b = compute(net, x[perm], t[perm])
    for name in PROXIES:
        tol = 1e-4 if name in ("jacob_cov", "grasp") else 1e-5
        assert _rel(a[name], b[name]) < tol, (name, a[name], b[name])


def _snapshot(net: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "modes": [m.training for m in net.modules()],
        "flags": [p.requires_grad for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "dtypes": [p.dtype for p in net.parameters()],
        "forwards": ["forward" in m.__dict__ for m in net.modules()],
    }


@pytest.mark.parametrize("which", ["nb201", "hybrid"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_is_never_modified(which: str, mode: str) -> None:
    net = _nb201_cell_net() if which == "nb201" else _hybrid_net()
    net.train(mode == "train")
    params = list(net.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.full_like(params[1], 0.5)
    x, t = _batch()
    x_before = x.clone()
    before = _snapshot(net)
    compute(net, x, t, per_layer=True)
    after = _snapshot(net)
    assert torch.equal(x, x_before) and not x.requires_grad
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for key in ("modes", "flags", "dtypes", "forwards"):
        assert before[key] == after[key], key
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)


@pytest.mark.parametrize("which", ["nb201", "hybrid"])
def test_inplace_gives_the_copys_values_and_copies_when_a_proxy_rereads_the_model(which: str) -> None:
    """``inplace=True`` (a model built only to be scored): every proxy equal to the copying call's,
    and the model itself changed (so no copy was made); with zen, which starts again from the
    original, it copies anyway and leaves the model as it was."""
    build = _nb201_cell_net if which == "nb201" else _hybrid_net
    x, t = _batch()
    names = ["nwot", "synflow", "snip", "grad_norm", "fisher", "jacob_cov", "params", "flops"]
    copied = compute(build(), x, t, names=names, per_layer=True)
    net = build()
    before = _snapshot(net)
    shared = compute(net, x, t, names=names, per_layer=True, inplace=True)
    for name in names:
        assert shared[name] == copied[name], name
    assert shared["per_layer"] == copied["per_layer"]
    after = _snapshot(net)
    assert any(not torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    net = build()
    before = _snapshot(net)
    pair = ["synflow", "zen"]
    assert compute(net, x, t, names=pair, inplace=True) == compute(build(), x, t, names=pair)
    after = _snapshot(net)
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())


def test_frozen_weights_score_zero_in_grad_norm_and_synflow(nets: dict[str, nn.Module]) -> None:
    net = copy.deepcopy(nets["nb201"])
    net.stem[0].weight.requires_grad_(False)
    x, t = _batch()
    per = compute(net, x, t, names=["grad_norm", "synflow", "snip"], per_layer=True)["per_layer"]
    assert per["grad_norm"]["stem.0"] == 0.0 and per["synflow"]["stem.0"] == 0.0
    assert per["snip"]["stem.0"] > 0.0  # snip masks every layer, whatever its flag (as the reference)


@pytest.mark.parametrize("which", ["nb201", "hybrid"])
def test_per_layer_sums_to_totals(nets: dict[str, nn.Module], which: str) -> None:
    net = nets[which]
    x, t = _batch()
    out = compute(net, x, t, per_layer=True)
    layer_names = [n for n, m in net.named_modules() if isinstance(m, LAYERS)]
    assert set(out["per_layer"]) == set(NODE_WISE)
    for name in NODE_WISE:
        per = out["per_layer"][name]
        assert list(per) == layer_names  # module order
        if name == "params":
            assert sum(per.values()) <= out["params"]
        else:
            assert math.fsum(per.values()) == pytest.approx(out[name], rel=1e-12)
    assert "per_layer" not in compute(net, x, t, names=["grad_norm"])


def test_names_validation_and_subsets(nets: dict[str, nn.Module]) -> None:
    x, t = _batch()
    with pytest.raises(ValueError, match="valid names: grad_norm, snip") as exc:
        compute(nets["nb201"], x, t, names=["grad_norm", "snipp"])
    assert "\n" not in str(exc.value) and "snipp" in str(exc.value)
    assert compute(nets["nb201"], x, t, names=[]) == {}
    assert list(compute(nets["nb201"], x, t, names=["nwot", "params"])) == ["nwot", "params"]
    assert len(PROXIES) == 10 and set(NODE_WISE) <= set(PROXIES)


def test_zen_without_batchnorm_has_no_bn_term() -> None:
    spec = ArchSpec(stem=StemSpec("patch", 4), stages=(StageSpec(depth=1, width=16, token_mixer="pool",
                                                                   channel_mixer="mlp", norm="layernorm"),))
    net = search_spaces.get_space("hybrid_vit").build(spec, num_classes=10, img_size=16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x, t = _batch()
    assert compute(net, x, t, names=["zen"], seed=5)["zen"] == pytest.approx(naive_zen(net, x, t, seed=5), rel=1e-6)


def test_custom_loss_fn(nets: dict[str, nn.Module]) -> None:
    x, t = _batch()
    a = compute(nets["nb201"], x, t, names=["grad_norm"])["grad_norm"]
    b = compute(nets["nb201"], x, t, names=["grad_norm"], loss_fn=lambda y, tt: 2 * F.cross_entropy(y, tt))
    assert b["grad_norm"] == pytest.approx(2 * a, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# every mixer
# ---------------------------------------------------------------------------------------------


def _mixer_net(token_mixer: str, channel_mixer: str) -> nn.Module:
    spec = ArchSpec(stem=StemSpec("conv", 4), stages=(StageSpec(depth=1, width=16, token_mixer=token_mixer,
                                                                 channel_mixer=channel_mixer, heads=2),))
    return search_spaces.get_space("hybrid_vit").build(spec, num_classes=10, img_size=16)


@pytest.mark.parametrize("token_mixer", search_spaces.token_mixer_names())
def test_every_token_mixer_all_proxies_finite(token_mixer: str) -> None:
    x, t = _batch()
    out = compute(_mixer_net(token_mixer, "mlp"), x, t, per_layer=True)
    for name in PROXIES:
        assert math.isfinite(out[name]), (token_mixer, name, out[name])
    for name, per in out["per_layer"].items():
        assert all(math.isfinite(v) for v in per.values()), (token_mixer, name)


@pytest.mark.parametrize("channel_mixer", search_spaces.channel_mixer_names())
def test_every_channel_mixer_all_proxies_finite(channel_mixer: str) -> None:
    x, t = _batch()
    out = compute(_mixer_net("pool", channel_mixer), x, t)
    for name in PROXIES:
        assert math.isfinite(out[name]), (channel_mixer, name, out[name])
