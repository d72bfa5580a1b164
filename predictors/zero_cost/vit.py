"""ViT-aware training-free proxies (TF-TAS's DSS-indicator, AZ-NAS's components) and rank aggregation.

References (definitions reproduced from their code, not copied):

- dss, dss_diversity, dss_saliency: Zhou, Wang, Zhang, Chen, Yang, Ji 2022, "Training-free Transformer
  Architecture Search" (CVPR), github.com/decemberzhou/TF_TAS, ``lib/training_free/indicators/dss.py``
  and ``p_utils.py``.
- az_expressivity, az_progressivity, az_trainability, :func:`az_nas_aggregate`: Lee & Ham 2024,
  "AZ-NAS: Assembling Zero-Cost Proxies for Network Architecture Search" (CVPR),
  github.com/cvlab-yonsei/AZ-NAS, ``NB201/ZeroShotProxy/compute_az_nas_score.py`` (cells),
  ``ImageNet_AutoFormer/lib/training_free/indicators/az_nas.py`` (ViT), ``search_autoformer_az.py``
  and ``NB201/tss_general.ipynb`` (aggregation).

**Units.** A *block* is any module with ``token_mixer`` and ``channel_mixer`` submodules
(``search_spaces.hybrid_vit.Block``, also an exported model's copy of it). A net without blocks
(NAS-Bench-201) falls back to the entries of its top-level ``cells`` ModuleList (NB201: the
cells and the residual reduction blocks), or else of ``stages`` / ``blocks`` / ``layers``.

**DSS** (TF-TAS). On a deep copy: BatchNorm1d/2d made identities, every floating state-dict
tensor replaced by its absolute value (TF-TAS's ``linearize``), the net in train mode with
dropout/drop-path off, input ``ones(1, C, H, W)``, ``R = sum(net(ones))``, ``G_W = dR/dW``. With
``mat(W)`` the weight as a matrix (out, rest) - a Linear's (out, in), a conv's
(out, in/groups * prod(kernel)):

    dss_diversity = sum over blocks b, over the Linear/Conv layers W in b.token_mixer of
                    ||mat(|W|)||_* * ||mat(G_W)||_*        (||.||_* = nuclear norm)
    dss_saliency  = sum over blocks b, over the Linear/Conv layers W in b.channel_mixer of
                    sum |W * G_W|
    dss           = dss_diversity + dss_saliency

TF-TAS's MSA = its ``qkv`` and square (proj) Linears -> here every Linear/Conv1d/2d/3d inside a
token mixer; MLP = its other Linears -> every such layer inside a channel mixer (the reference
tells them apart by class name and shape, so an MLP of ratio 1 would count as MSA there; here the
block part decides, which is what the shape test stands for in AutoFormer's space). MatFormer's
sliced weights and ``linear_any``'s 1x1-conv path count; a weight whose gradient is None scores 0,
as in the reference. Parameters that are not Linear/Conv weights (spectral's filter, SSM's A/D,
biases, norms) are not scored, as in the reference, which scores only Linear weights. Fallback
without blocks: a layer of a unit whose kernel is larger than 1 in any dimension mixes positions
and counts as "MSA" (diversity), a Linear or 1x1 conv mixes channels and counts as "MLP"
(saliency); layers outside the units (stem, classifier) are not scored. Departures from the
reference: (1) the classifier head is left out; TF-TAS adds its saliency, and lists it twice
(``get_layer_metric_array_dss`` appends a 1000-way ``LinearSuper`` under both of its tests), which
the paper's formula (MSA diversity + MLP saliency) does not contain; (2) the pass runs in float64
(as our synflow) rather than float32, so the all-positive network cannot overflow and the
near-constant LayerNorm inputs of an all-ones image keep their precision; (3) the patch embedding
is not scored, as in the reference (its ``PatchembedSuper`` branch is never reached).

**AZ-NAS components.** On a deep copy in train mode (BN batch statistics, as the NB201/MBV2
references' ``model.train()``; the AutoFormer one uses eval mode, the same for a net without BN;
dropout/drop-path off), the given batch ``x`` (the reference's trainloader
branch) is run once with hooks; the features are ``f_0`` = the input of the first unit, then the
output of every unit, in execution order (``features="block"``; for NB201 this is exactly the
reference's ``extract_cell_features``: stem output + every cell). ``features="residual"`` gives
the AutoFormer reference's list instead: per block, the stream after the token-mixer residual and
after the channel-mixer residual, no ``f_0``. A feature becomes a matrix F of rows = positions
(``(B, C, H, W) -> (B*H*W, C)``, ``(B, N, C) -> (B*N, C)``, class tokens included):

    E(F)             = -sum_i p_i log(p_i + 1e-8),  p = s / sum(s),  s = eigenvalues of
                       cov(F) = (F - mean_rows F)^T (F - mean_rows F) / rows
    az_expressivity  = sum_l E(f_l)
    az_progressivity = min_l (E(f_l) - E(f_{l-1}))
    az_trainability  = mean over pairs (f_{l-1}, f_l), l = L..1, of  -s_max - 1/(s_max + 1e-6) + 2,
                       s_max = largest singular value of  G_in^T G_out / rows(G_out),
                       G_out = Rademacher (+-1) matrix of f_l's shape,
                       G_in  = (d f_l / d f_{l-1})^T G_out  (one vector-Jacobian product)

When the pair's grids differ (a downsampling between stages), ``G_in`` is pixel-unshuffled by
``s = ceil(h_in / h_out)`` so its rows match ``G_out``'s, as the reference; a pair whose
``G_in`` equals ``G_out`` (an identity unit) scores -inf, as the NB201/MBV2 references (the
AutoFormer one skips it); NaN components become -inf, as the reference. Rademacher signs are
``2 * bernoulli(0.5) - 1`` from a ``torch.Generator`` seeded with ``seed``, drawn for l = L..1
(the reference's order; it uses the global RNG). Departures: (1) the statistics run in float64
and the covariance eigenvalues are clamped at 0 (a covariance is PSD; the reference's float32
round-off can give a tiny negative eigenvalue whose ``log(p + 1e-8)`` is NaN); (2) a grid that
does not divide (7 -> 4) is zero-padded to ``s * h_out`` before the unshuffle, where the reference
would fail on the row mismatch; class tokens are dropped only for such a pair; (3) the network is
scored with its own weights; the CNN references re-initialise it with Kaiming-normal (fan-in,
ReLU gain; BN/GN weight 1, bias 0), which :func:`az_nas_components` does with
``init="kaiming_normal"`` (weights drawn from the same seeded generator, before the signs); the
AutoFormer reference also keeps the supernet's weights; (4) ``f_0`` is included in block mode
(as the cell references' stem output), so the first block has a trainability term. The AutoFormer
reference computes expressivity and trainability only; progressivity is the NB201/MBV2 code's.

**Aggregation** (AZ-NAS): over a population of N architectures, ``rank_k(a)`` is the rank of a's
value of proxy k in ascending order (1 = lowest = worst, ties share the average rank, as
``scipy.stats.rankdata``); ``how="log"``: ``sum_k log(rank_k / N)`` (AZ-NAS's non-linear
aggregation, which favours architectures good in every proxy), ``how="mean"``: ``mean_k rank_k``.
Higher is better. Non-finite values (NaN, +inf, -inf) are explicitly the worst: they rank below
every finite value, tied among themselves (k of them share rank (k + 1) / 2). The reference maps
NaN to -inf and lets ``rankdata`` put -inf lowest; +inf is worst here too, since a proxy that
overflows says nothing good about an architecture. :func:`az_nas_aggregate` adds FLOPs as the
complexity component (more FLOPs rank higher, as the paper and its code).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from predictors.zero_cost._hooks import remove_batchnorm

DSS_PROXIES: tuple[str, ...] = ("dss", "dss_diversity", "dss_saliency")
AZ_PROXIES: tuple[str, ...] = ("az_expressivity", "az_progressivity", "az_trainability")
VIT_PROXIES: tuple[str, ...] = DSS_PROXIES + AZ_PROXIES

AZ_LOG_EPS = 1e-8  # AZ-NAS: log(p + 1e-8)
AZ_SIGMA_EPS = 1e-6  # AZ-NAS: 1 / (s_max + 1e-6)
FEATURES: tuple[str, ...] = ("block", "residual")
INITS: tuple[str, ...] = ("kaiming_normal",)

_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_UNIT_LISTS: tuple[str, ...] = ("cells", "stages", "blocks", "layers")
_STOCHASTIC: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)

HW = tuple[int, int]


def compute_vit(model: nn.Module, inputs: Tensor, names: Iterable[str], *, seed: int = 0) -> dict[str, float]:
    """The requested :data:`VIT_PROXIES` of ``model`` on ``inputs`` (one DSS pass and/or one AZ-NAS
    pass, each on its own deep copy); ``{name: float}`` in the order asked."""
    names = list(names)
    unknown = [n for n in names if n not in VIT_PROXIES]
    if unknown:
        raise ValueError(f"unknown ViT proxy {unknown[0]!r}; valid names: {', '.join(VIT_PROXIES)}")
    out: dict[str, float] = {}
    if set(names) & set(DSS_PROXIES):
        out.update(dss_scores(model, inputs))
    if set(names) & set(AZ_PROXIES):
        out.update(az_nas_components(model, inputs, seed=seed))
    return {n: out[n] for n in names}


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------


def _is_block(m: nn.Module) -> bool:
    return isinstance(getattr(m, "token_mixer", None), nn.Module) and isinstance(
        getattr(m, "channel_mixer", None), nn.Module)


def _units(net: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules whose outputs are the features, and whether they are blocks."""
    blocks = [m for m in net.modules() if _is_block(m)]
    if blocks:
        return blocks, True
    for attr in _UNIT_LISTS:
        seq = getattr(net, attr, None)
        if isinstance(seq, (nn.ModuleList, nn.Sequential)) and len(seq):
            return list(seq), False
    raise ValueError(f"{type(net).__name__} has no blocks (modules with token_mixer and channel_mixer) and no "
                     f"top-level {'/'.join(_UNIT_LISTS)} list; the ViT proxies need one of them")


def _deterministic_train(net: nn.Module) -> None:
    """Train mode (BN batch statistics) with every stochastic module (dropout, drop-path) off."""
    net.train()
    for m in net.modules():
        if isinstance(m, _STOCHASTIC) or type(m).__name__ == "DropPath":
            m.eval()


# ---------------------------------------------------------------------------------------------
# DSS (TF-TAS)
# ---------------------------------------------------------------------------------------------


def _dss_layers(net: nn.Module) -> list[tuple[bool, nn.Module]]:
    """(is_msa, layer) for every scored Linear/Conv layer, each module once, in module order."""
    units, blocks = _units(net)
    seen: set[int] = set()
    out: list[tuple[bool, nn.Module]] = []

    def add(module: nn.Module, msa: bool | None) -> None:
        for m in module.modules():
            if isinstance(m, _LAYERS) and id(m) not in seen and isinstance(m.weight, Tensor):
                seen.add(id(m))
                spatial = any(k > 1 for k in getattr(m, "kernel_size", (1,)))
                out.append((spatial if msa is None else msa, m))

    for u in units:
        if blocks:
            add(u.token_mixer, True)
            add(u.channel_mixer, False)
        else:
            add(u, None)
    return out


def _as_matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _nuclear(t: Tensor) -> float:
    return float(torch.linalg.matrix_norm(_as_matrix(t), ord="nuc"))


def dss_scores(model: nn.Module, inputs: Tensor) -> dict[str, float]:
    """TF-TAS's DSS-indicator (Zhou et al., CVPR 2022) and its two parts; see the module docstring.

    ``inputs`` only gives the image shape (the pass runs on ``ones(1, C, H, W)``). The model is
    deep-copied; nothing of it is changed."""
    net = copy.deepcopy(model)
    layers = _dss_layers(net)
    for _, m in layers:
        m.weight.requires_grad_(True)
    remove_batchnorm(net)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net.double()
    _deterministic_train(net)
    weights = [m.weight for _, m in layers]
    x = torch.ones((1, *inputs.shape[1:]), dtype=torch.float64, device=inputs.device)
    grads: Sequence[Tensor | None] = [None] * len(weights)
    with torch.enable_grad():
        out = net(x)
        if weights and out.requires_grad:
            grads = torch.autograd.grad(out.sum(), weights, allow_unused=True)
    diversity, saliency = [], []
    for (msa, _), w, g in zip(layers, weights, grads):
        if g is None:
            continue
        w = w.detach()
        if msa:
            diversity.append(_nuclear(w) * _nuclear(g))
        else:
            saliency.append(float((w * g).abs().sum()))
    div, sal = math.fsum(diversity), math.fsum(saliency)
    return {"dss": div + sal, "dss_diversity": div, "dss_saliency": sal}


# ---------------------------------------------------------------------------------------------
# AZ-NAS components
# ---------------------------------------------------------------------------------------------


def _hw_of(args: tuple[Any, ...]) -> HW | None:
    if len(args) > 1 and isinstance(args[1], (tuple, list)) and len(args[1]) == 2:
        return int(args[1][0]), int(args[1][1])
    return None


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


class _FeatureTap:
    """Forward hooks recording the features (tensor, token grid or None) in execution order."""

    def __init__(self, net: nn.Module, features: str) -> None:
        units, blocks = _units(net)
        if features == "residual" and not blocks:
            raise ValueError('features="residual" needs blocks (token_mixer + channel_mixer); this net has none')
        self.feats: list[tuple[Tensor, HW | None]] = []
        self._hw: HW | None = None
        self._handles: list[Any] = []
        if features == "block":
            self._handles.append(units[0].register_forward_pre_hook(self._first_input))
        for u in units:
            if features == "residual":
                if not isinstance(getattr(u, "norm2", None), nn.Module):
                    raise ValueError('features="residual" needs blocks with a norm2 before the channel mixer')
                self._handles.append(u.register_forward_pre_hook(self._block_grid))
                self._handles.append(u.norm2.register_forward_pre_hook(self._mid))
            self._handles.append(u.register_forward_hook(self._output))

    def _first_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.feats and args and isinstance(args[0], Tensor):
            self.feats.append((args[0], _hw_of(args)))

    def _block_grid(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._hw = _hw_of(args)

    def _mid(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            self.feats.append((args[0], self._hw))

    def _output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        out = _first_tensor(output)
        if out is not None:
            hw = _hw_of(args)
            if hw is None and isinstance(output, (tuple, list)) and len(output) > 1:
                hw = _hw_of((None, output[1]))
            self.feats.append((out, hw))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _rows(t: Tensor) -> Tensor:
    """(positions, channels) in float64: NCHW -> (B*H*W, C), (B, N, C) -> (B*N, C), (B, C) as is."""
    if t.ndim == 4:
        t = t.permute(0, 2, 3, 1)
    return t.detach().reshape(-1, t.shape[-1]).to(torch.float64)


def _grid(t: Tensor, hw: HW | None) -> Tensor:
    """(B, C, H, W): a token tensor (B, N, C) on grid ``hw`` with its N - H*W prefix tokens dropped."""
    if t.ndim == 4:
        return t
    if t.ndim != 3 or hw is None:
        raise ValueError(f"cannot view a feature of shape {tuple(t.shape)} as an image grid")
    h, w = hw
    return t[:, t.shape[1] - h * w:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


def _entropy(f: Tensor) -> float:
    """AZ-NAS expressivity of one feature: entropy of the normalised covariance spectrum."""
    r = _rows(f)
    r = r - r.mean(dim=0, keepdim=True)
    sigma = r.T @ r / r.shape[0]
    s = torch.linalg.eigvalsh(sigma).clamp_min(0.0)
    p = s / s.sum()
    return float(-(p * torch.log(p + AZ_LOG_EPS)).sum())


def _trainability(g_in: Tensor, hw_in: HW | None, g_out: Tensor, hw_out: HW | None) -> float:
    """AZ-NAS trainability of one pair: ``-s - 1/(s + 1e-6) + 2``, s = sigma_max(G_in^T G_out / rows)."""
    if g_in.shape == g_out.shape and torch.equal(g_in, g_out):
        return -math.inf
    a, b = _rows(g_in), _rows(g_out)
    if a.shape[0] != b.shape[0]:
        gi, go = _grid(g_in, hw_in), _grid(g_out, hw_out)
        (hi, wi), (ho, wo) = gi.shape[-2:], go.shape[-2:]
        s = max(1, math.ceil(hi / ho), math.ceil(wi / wo))
        gi = F.pad(gi, (0, max(0, s * wo - wi), 0, max(0, s * ho - hi)))[..., : s * ho, : s * wo]
        a, b = _rows(F.pixel_unshuffle(gi, s)), _rows(go)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"AZ-NAS trainability: cannot match features {tuple(g_in.shape)} -> {tuple(g_out.shape)}")
    mat = a.T @ b / b.shape[0]
    s_max = float(torch.linalg.matrix_norm(mat, ord=2))
    return -s_max - 1.0 / (s_max + AZ_SIGMA_EPS) + 2.0


@torch.no_grad()
def _kaiming_init(net: nn.Module, gen: torch.Generator) -> None:
    """AZ-NAS's ``init_model('kaiming_norm_fanin')``: Conv2d/Linear weights Kaiming-normal (fan-in,
    ReLU), biases 0; affine BatchNorm2d/GroupNorm weight 1, bias 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _finite_or_neg_inf(v: float) -> float:
    return -math.inf if math.isnan(v) else float(v)


def az_nas_components(
    model: nn.Module, inputs: Tensor, *, seed: int = 0, features: str = "block", init: str | None = None
) -> dict[str, float]:
    """AZ-NAS's expressivity, progressivity and trainability (Lee & Ham, CVPR 2024) of ``model`` on
    the batch ``inputs``; see the module docstring. ``features``: "block" (default) or "residual"
    (AutoFormer's per-residual features). ``init``: None (the model's weights) or "kaiming_normal"
    (the CNN references' re-initialisation). ``seed`` seeds the Rademacher signs (and the init).
    The model is deep-copied; nothing of it is changed."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {features!r}")
    if init is not None and init not in INITS:
        raise ValueError(f"init must be None or one of {', '.join(INITS)}; got {init!r}")
    net = copy.deepcopy(model)
    gen = torch.Generator(device=inputs.device)
    gen.manual_seed(seed)
    if init == "kaiming_normal":
        _kaiming_init(net, gen)
    _deterministic_train(net)
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = inputs.detach().to(dtype=dtype).clone().requires_grad_(True)  # every feature joins the graph
    tap = _FeatureTap(net, features)
    try:
        with torch.enable_grad():
            net(x)
    finally:
        tap.close()
    feats = tap.feats
    if len(feats) < 2:
        raise ValueError(f"AZ-NAS needs at least two features; {type(model).__name__} gave {len(feats)}")

    ent = np.array([_entropy(f) for f, _ in feats])
    with np.errstate(invalid="ignore"):
        expressivity = float(np.sum(ent))
        progressivity = float(np.min(ent[1:] - ent[:-1]))

    scores = []
    with torch.enable_grad():
        for i in reversed(range(1, len(feats))):
            (f_in, hw_in), (f_out, hw_out) = feats[i - 1], feats[i]
            g_out = torch.bernoulli(torch.full_like(f_out, 0.5), generator=gen).mul_(2.0).sub_(1.0)
            g_in = None
            if f_out.requires_grad and f_in.requires_grad:
                (g_in,) = torch.autograd.grad(f_out, f_in, g_out, allow_unused=True)
            scores.append(_trainability(torch.zeros_like(f_in) if g_in is None else g_in, hw_in, g_out, hw_out))
    with np.errstate(invalid="ignore"):
        trainability = float(np.mean(scores))
    return {
        "az_expressivity": _finite_or_neg_inf(expressivity),
        "az_progressivity": _finite_or_neg_inf(progressivity),
        "az_trainability": _finite_or_neg_inf(trainability),
    }


# ---------------------------------------------------------------------------------------------
# rank aggregation
# ---------------------------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ascending ranks 1..N with ties averaged (``scipy.stats.rankdata``); every non-finite value
    ranks below every finite one, all of them tied."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    n = a.shape[0]
    bad = ~np.isfinite(a)
    k = int(bad.sum())
    ranks = np.empty(n, dtype=np.float64)
    ranks[bad] = (k + 1) / 2.0
    good = a[~bad]
    if good.size:
        order = np.argsort(good, kind="mergesort")
        s = good[order]
        starts_mask = np.r_[True, s[1:] != s[:-1]]
        starts = np.flatnonzero(starts_mask)
        ends = np.r_[starts[1:], s.size]
        avg = (starts + 1 + ends) / 2.0  # mean of the ranks start+1 .. end
        r = np.empty(s.size, dtype=np.float64)
        r[order] = avg[np.cumsum(starts_mask) - 1]
        ranks[~bad] = r + k
    return ranks


def rank_aggregate(scores: Mapping[str, Sequence[float]], how: str = "log") -> list[float]:
    """Aggregate several proxies over one population by their ranks; higher is better.

    ``scores``: ``{proxy: values}``, one value per architecture, all of one length N, higher taken
    as better (negate a proxy where lower is better). ``how="log"``: ``sum_k log(rank_k / N)``
    (AZ-NAS, Lee & Ham 2024); ``how="mean"``: ``mean_k rank_k``. Ranks ascend from 1, ties
    averaged; NaN and +-inf rank below every finite value (tied among themselves)."""
    if how not in ("log", "mean"):
        raise ValueError(f'how must be "log" or "mean"; got {how!r}')
    if not scores:
        raise ValueError("rank_aggregate needs at least one proxy")
    lengths = {k: len(v) for k, v in scores.items()}
    n = next(iter(lengths.values()))
    if n == 0 or any(v != n for v in lengths.values()):
        raise ValueError(f"every proxy needs one value per architecture (same non-zero length); got {lengths}")
    total = np.zeros(n, dtype=np.float64)
    for values in scores.values():
        r = _ranks(values)
        total += np.log(r / n) if how == "log" else r
    if how == "mean":
        total /= len(scores)
    return total.tolist()


def az_nas_aggregate(components: Mapping[str, Sequence[float]], flops: Sequence[float]) -> list[float]:
    """AZ-NAS's score of each architecture of a population (Lee & Ham, CVPR 2024):
    ``sum over components and complexity of log(rank / N)``, with complexity = ``flops`` (more FLOPs
    rank higher, as in the paper). ``components``: e.g. ``{"az_expressivity": [...],
    "az_progressivity": [...], "az_trainability": [...]}`` (the AutoFormer reference uses
    expressivity and trainability only). Non-finite values rank worst (:func:`rank_aggregate`)."""
    if "complexity" in components:
        raise ValueError("pass the complexity as flops, not as a component named 'complexity'")
    if not components:
        raise ValueError("az_nas_aggregate needs at least one component")
    return rank_aggregate({**components, "complexity": flops}, how="log")


__all__ = [
    "AZ_PROXIES",
    "DSS_PROXIES",
    "VIT_PROXIES",
    "az_nas_aggregate",
    "az_nas_components",
    "compute_vit",
    "dss_scores",
    "rank_aggregate",
]
