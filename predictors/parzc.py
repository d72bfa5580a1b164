"""ParZC: parametric zero-cost proxies.

Dong, Li, Pan, Wei, Liu, Wang, Chu, "ParZC: Parametric Zero-Cost Proxies for Efficient NAS",
arXiv 2402.02105 (2024). Zero-cost proxies are sums over layers; ParZC keeps the per-layer
(node-wise) values instead, because nodes contribute unequally and each carries its own
uncertainty, and learns from a few labelled architectures how to turn them into a ranking score.
Our version (not a port of the authors' code):

1. **Node-wise statistics** (:func:`node_features`): one ``predictors.zero_cost.compute`` call
   per architecture. For every Conv2d/Linear layer, in module order, the per-layer grad_norm,
   snip and synflow values, each (a) as log10 of its magnitude (floored at 1e-20: a layer no
   gradient reaches) and (b) divided by its largest value in the same architecture (the
   per-architecture scaling), plus the layer's log10(1 + parameter count); then the global
   nwot (Mellor et al. 2021) and jacob_cov scores repeated on every node. A ``(num_nodes, 9)``
   matrix (NODE_COLUMNS).
2. **Tokenisation** (:func:`tokenize`): architectures have different numbers of nodes (NB201:
   8 + 15 x conv edges, 8..98; hybrid_vit: depth-dependent), so the ordered node sequence is
   adaptive-average-pooled into ``K`` tokens (the bins of ``torch.nn.AdaptiveAvgPool1d``:
   token k averages nodes floor(k n / K) .. ceil((k + 1) n / K) - 1; a short sequence repeats
   nodes, a long one averages neighbours; relative depth is kept). Pooling loses the length
   and absolute scale, so five architecture-level columns are broadcast to every token: log10
   of the node count, log10 of each proxy's sum over layers (the classic global zero-cost
   score) and log10 of the parameter total. A ``(K, 14)`` matrix (TOKEN_COLUMNS); ``fit(...,
   arch=)`` broadcasts more architecture-level columns the same way (our addition, not the paper's:
   an encoding of which operations the architecture uses, which node-wise proxies do not see). Columns are
   standardised over the training set; a non-finite global score (a degenerate network) is
   imputed as worse than every training architecture.
3. **MABN** (mixer architecture with Bayesian network): a per-token linear embedding, MLP-Mixer
   blocks (Tolstikhin et al. 2021: token-mixing MLP across the K tokens, channel-mixing MLP
   across features, pre-LayerNorm, residuals), LayerNorm and mean over tokens, then a Bayesian
   MLP head whose linear layers hold a factorised Gaussian over every weight and bias (Bayes by
   Backprop, Blundell et al. 2015: reparameterised sampling, closed-form KL to a
   N(0, prior_sigma^2) prior). :meth:`ParZC.predict` draws ``mc_samples`` weight samples and
   returns the mean score and its standard deviation (the uncertainty).
4. **DiffKendall** (:func:`diff_kendall`; Zheng, Zhang & Huang, NeurIPS 2023, the loss ParZC
   uses): Kendall's tau with sign replaced by tanh, ``mean_{i<j} tanh(a (p_i - p_j))
   tanh(b (y_i - y_j))``, differentiable, and Kendall's tau-a as a, b -> infinity.
   Loss = 1 - DiffKendall + kl_weight x (mean KL per Bayesian weight); AdamW, linear warm-up
   then cosine decay, mini-batches of architectures.

Measured on NAS-Bench-201 CIFAR-10 (1,000 random cells, features from one batch of 64 CIFAR-10
training images, 156 labelled, Kendall tau on the other 844, 5 random splits), default
hyperparameters: tau 0.803 (0.79-0.82); the best single proxy (synflow) gives 0.57. Without the
nwot/jacob_cov columns: 0.72; with K = 1 token (no node-wise structure): 0.78; K = 16: 0.80,
K = 32: 0.78. The KL weight trades a little ranking for a more informative std (Spearman of std
with the absolute rank error 0.16 at kl_weight 1, prior_sigma 0.3; 0.05 at kl_weight 0.01,
prior_sigma 1, where tau is 0.806). Fit on 156 architectures + prediction of 844 takes about
6 s on one CPU thread.

Scores are in arbitrary units: only their order (and std relative to their spread) means
anything. Importing this module needs only torch and numpy (scipy for ``target_transform="rank"``,
``predictors.zero_cost`` when computing features).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GLOBAL_PROXIES",
    "MABN",
    "NODE_COLUMNS",
    "PROXIES",
    "TOKEN_COLUMNS",
    "BayesianLinear",
    "ParZC",
    "ParZCConfig",
    "diff_kendall",
    "node_features",
    "node_matrix",
    "tokenize",
]

PROXIES: tuple[str, ...] = ("grad_norm", "snip", "synflow")  # node-wise (per layer)
GLOBAL_PROXIES: tuple[str, ...] = ("nwot", "jacob_cov")  # architecture-level extras
# (num_nodes, F) columns produced by node_features / node_matrix
NODE_COLUMNS: tuple[str, ...] = (
    *(f"log_{p}" for p in PROXIES),
    *(f"rel_{p}" for p in PROXIES),
    "log_params",
    *(f"global_{p}" for p in GLOBAL_PROXIES),  # the same value on every node; NaN if not finite
)
# (K, F) columns produced by tokenize: the pooled node columns, then architecture-level ones
TOKEN_COLUMNS: tuple[str, ...] = (
    *NODE_COLUMNS,
    "log_num_nodes",
    *(f"log_total_{p}" for p in PROXIES),
    "log_total_params",
)
_NUM_LAYER_COLUMNS = 2 * len(PROXIES) + 1  # the per-layer part of NODE_COLUMNS (always finite)
_LOG_FLOOR = 1e-20  # |value| below this (exact zeros: no gradient reaches the layer) is floored
_LOG_CEIL = 1e300  # synflow overflows to inf in deep nets; cap it
_FORMAT = "hybrid-nas/parzc"
_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ node features


def _layer_params(model: nn.Module, name: str) -> int:
    """Parameter count of the layer ``name`` (a module name, or failing that a parameter name)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        try:
            return int(model.get_parameter(name).numel())
        except AttributeError:
            return 0
    return int(sum(p.numel() for p in module.parameters(recurse=False)))


def _global_column(name: str, value: float | None) -> float:
    """nwot is a log-determinant already; jacob_cov spans decades (-65 .. -1e4): signed log10.
    Non-finite or missing values (degenerate networks: nwot = -inf, jacob_cov = NaN) become NaN,
    which ParZC imputes as worse than every training architecture."""
    if value is None or not math.isfinite(float(value)):
        return float("nan")
    v = float(value)
    if name == "jacob_cov":
        return math.copysign(math.log10(1.0 + abs(v)), v)
    return v


def node_matrix(
    per_layer: Mapping[str, Mapping[str, float]],
    layer_params: Mapping[str, int] | None = None,
    global_values: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The ``(num_nodes, 9)`` node-feature matrix (columns NODE_COLUMNS) from proxy values.

    ``per_layer`` is ``{proxy: {layer_name: value}}`` as returned under ``"per_layer"`` by
    ``predictors.zero_cost.compute``, layers in module order, for the proxies PROXIES. Nodes are
    the union of the layer names, in the order of the first proxy that lists them; a layer missing
    from one proxy gets 0 for it. Per node and proxy: log10 |value| (floored at 1e-20) and
    |value| / max over the architecture's layers; then log10(1 + parameter count) from
    ``layer_params`` (0 if absent). ``global_values`` holds the GLOBAL_PROXIES scores (the
    result of ``compute`` itself), repeated on every node; missing or non-finite ones are NaN.
    """
    names: list[str] = []
    seen: set[str] = set()
    for p in PROXIES:
        for name in per_layer.get(p, {}):
            if name not in seen:
                seen.add(name)
                names.append(name)
    n = len(names)
    nproxy = len(PROXIES)
    out = np.zeros((n, len(NODE_COLUMNS)), dtype=np.float64)
    for k, p in enumerate(PROXIES):
        values = per_layer.get(p, {})
        mag = np.abs(np.array([float(values.get(name, 0.0)) for name in names], dtype=np.float64))
        mag = np.nan_to_num(mag, nan=0.0, posinf=_LOG_CEIL, neginf=_LOG_CEIL)
        mag = np.clip(mag, 0.0, _LOG_CEIL)
        out[:, k] = np.log10(np.maximum(mag, _LOG_FLOOR))
        top = mag.max() if n else 0.0
        out[:, nproxy + k] = mag / top if top > 0 else 0.0
    params = layer_params or {}
    out[:, 2 * nproxy] = np.log10(1.0 + np.array([float(params.get(name, 0)) for name in names]))
    glob = global_values or {}
    for k, p in enumerate(GLOBAL_PROXIES):
        out[:, _NUM_LAYER_COLUMNS + k] = _global_column(p, glob.get(p))
    return out.astype(np.float32)


def node_features(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    result: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Node-wise zero-cost statistics of ``model`` on one batch: a ``(num_nodes, 9)`` float32 matrix.

    One call of ``predictors.zero_cost.compute(model, inputs, targets, names=["grad_norm", "snip",
    "synflow", "nwot", "jacob_cov"], per_layer=True)`` (the passes are shared), unless ``result``
    (such a call's return value, e.g. from a cache) is given; then :func:`node_matrix` with each
    layer's parameter count read from ``model``."""
    if result is None:
        from predictors.zero_cost import compute

        result = compute(model, inputs, targets, names=[*PROXIES, *GLOBAL_PROXIES], per_layer=True)
    per_layer = result["per_layer"]
    names = {name for p in PROXIES for name in per_layer.get(p, {})}
    params = {name: _layer_params(model, name) for name in names}
    return node_matrix(per_layer, params, {p: result[p] for p in GLOBAL_PROXIES if p in result})


def _log10_sum(logs: np.ndarray) -> float:
    """log10(sum(10**logs)) without overflow."""
    top = float(logs.max())
    return top + math.log10(float(np.sum(10.0 ** (logs - top))))


def _pool_bins(n: int, k: int) -> list[tuple[int, int]]:
    return [((i * n) // k, -((-(i + 1) * n) // k)) for i in range(k)]


def tokenize(mats: Sequence[np.ndarray] | np.ndarray, num_tokens: int) -> np.ndarray:
    """Per-architecture node matrices ``(num_nodes_i, 9)`` -> fixed-size tokens ``(n_arch, K, 14)``.

    Adaptive average pooling of the ordered node sequence into ``num_tokens`` bins (the bins of
    ``torch.nn.AdaptiveAvgPool1d``), then the architecture-level columns of TOKEN_COLUMNS
    broadcast to every token. An architecture with no nodes gets zero per-layer columns (and
    NaN global ones, imputed by ParZC)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    nf = len(NODE_COLUMNS)
    nproxy = len(PROXIES)
    out = np.zeros((len(mats), num_tokens, len(TOKEN_COLUMNS)), dtype=np.float32)
    for a, mat in enumerate(mats):
        m = np.asarray(mat, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != nf:
            raise ValueError(
                f"architecture {a}: node matrix must be (num_nodes, {nf}) as from node_features, got {m.shape}"
            )
        n = m.shape[0]
        if n == 0:
            out[a, :, _NUM_LAYER_COLUMNS:nf] = np.nan
            continue
        if not np.all(np.isfinite(m[:, :_NUM_LAYER_COLUMNS])):
            raise ValueError(f"architecture {a}: node matrix has NaN or inf in its per-layer columns")
        pooled = np.stack([m[s:e].mean(axis=0) for s, e in _pool_bins(n, num_tokens)])
        glob = [math.log10(n)]
        glob += [_log10_sum(m[:, k]) for k in range(nproxy)]
        glob.append(_log10_sum(m[:, 2 * nproxy]))  # log10 sum (1 + params): close enough to total
        out[a, :, :nf] = pooled
        out[a, :, nf:] = np.asarray(glob)
    return out


# ----------------------------------------------------------------------------------- DiffKendall


def diff_kendall(
    pred: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    target_alpha: float | None = None,
) -> torch.Tensor:
    """Differentiable Kendall tau (DiffKendall; Zheng, Zhang & Huang, NeurIPS 2023, eq. 3).

    ``mean over pairs i<j of tanh(alpha (p_i - p_j)) * tanh(beta (y_i - y_j))`` with
    ``beta = target_alpha`` (``alpha`` if None; ``inf`` uses sign(y_i - y_j)). Each factor is
    (e^{a d} - e^{-a d}) / (e^{a d} + e^{-a d}), the paper's form. As alpha, beta -> inf it is
    Kendall's tau-a. Returns a 0-d tensor; fewer than two items give 0."""
    p = pred.reshape(-1)
    y = target.reshape(-1).to(p.dtype)
    if p.numel() != y.numel():
        raise ValueError(f"pred and target must have the same length, got {p.numel()} and {y.numel()}")
    n = p.numel()
    if n < 2:
        return p.sum() * 0.0
    beta = alpha if target_alpha is None else target_alpha
    i, j = torch.triu_indices(n, n, offset=1, device=p.device)
    dp = torch.tanh(alpha * (p[i] - p[j]))
    dy = y[i] - y[j]
    ty = torch.sign(dy) if math.isinf(beta) else torch.tanh(beta * dy)
    return (dp * ty).mean()


# ------------------------------------------------------------------------------------- MABN


class BayesianLinear(nn.Module):
    """Linear layer with a factorised Gaussian over weights and biases (Bayes by Backprop,
    Blundell et al., ICML 2015): w = mu + softplus(rho) * eps, eps ~ N(0, 1) drawn on every
    forward pass (``sample=False`` uses the means); :meth:`kl` is KL(q || N(0, prior_sigma^2))."""

    def __init__(self, in_features: int, out_features: int, prior_sigma: float = 1.0, rho_init: float = -5.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.prior_sigma = prior_sigma
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), float(rho_init)))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.bias_rho = nn.Parameter(torch.full((out_features,), float(rho_init)))
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.bias_mu, -bound, bound)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        if not sample:
            return F.linear(x, self.weight_mu, self.bias_mu)
        w = self.weight_mu + F.softplus(self.weight_rho) * torch.randn_like(self.weight_mu)
        b = self.bias_mu + F.softplus(self.bias_rho) * torch.randn_like(self.bias_mu)
        return F.linear(x, w, b)

    def kl(self) -> torch.Tensor:
        total = self.weight_mu.new_zeros(())
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            sigma = F.softplus(rho)
            var_ratio = (sigma / self.prior_sigma) ** 2
            total = total + 0.5 * (var_ratio + (mu / self.prior_sigma) ** 2 - 1.0 - torch.log(var_ratio)).sum()
        return total

    def num_weights(self) -> int:
        return self.weight_mu.numel() + self.bias_mu.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prior_sigma={self.prior_sigma}"


class _SharedDropout(nn.Module):
    """Dropout whose mask is shared along ``dim`` (one Bernoulli draw per row of the other axes).

    The mixer's hidden activations are small tensors for which drawing one random number per
    element dominates the step time on CPU; sharing the mask across tokens (channel MLP) or
    channels (token MLP) cuts the draws by K or D and regularises as well in our runs."""

    def __init__(self, p: float, dim: int) -> None:
        super().__init__()
        self.p, self.dim = p, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = list(x.shape)
        shape[self.dim] = 1
        keep = torch.rand(shape, dtype=x.dtype, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


class _MixerBlock(nn.Module):
    """MLP-Mixer block (Tolstikhin et al., NeurIPS 2021): token mixing then channel mixing."""

    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(num_tokens, token_hidden),
            nn.GELU(),
            _SharedDropout(dropout, dim=1),  # (B, D, token_hidden): mask shared across channels
            nn.Linear(token_hidden, num_tokens),
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, channel_hidden),
            nn.GELU(),
            _SharedDropout(dropout, dim=1),  # (B, K, channel_hidden): mask shared across tokens
            nn.Linear(channel_hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, D)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MABN(nn.Module):
    """Mixer Architecture with Bayesian Network: tokens (B, K, F) -> score (B,).

    Linear embedding F -> dim, ``depth`` Mixer blocks, LayerNorm, mean over tokens, then the
    Bayesian head BayesianLinear(dim, head_hidden) - GELU - BayesianLinear(head_hidden, 1)."""

    def __init__(
        self,
        num_tokens: int,
        in_features: int,
        *,
        dim: int,
        depth: int,
        token_hidden: int,
        channel_hidden: int,
        head_hidden: int,
        dropout: float,
        prior_sigma: float,
        rho_init: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList(
            _MixerBlock(num_tokens, dim, token_hidden, channel_hidden, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head1 = BayesianLinear(dim, head_hidden, prior_sigma, rho_init)
        self.head2 = BayesianLinear(head_hidden, 1, prior_sigma, rho_init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic part: (B, K, F) -> (B, dim)."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(h).mean(dim=1)

    def head(self, z: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return self.head2(F.gelu(self.head1(z, sample)), sample).squeeze(-1)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return self.head(self.encode(x), sample)

    def kl(self) -> torch.Tensor:
        return self.head1.kl() + self.head2.kl()

    def num_bayesian_weights(self) -> int:
        return self.head1.num_weights() + self.head2.num_weights()


# ------------------------------------------------------------------------------------- ParZC


@dataclass(frozen=True)
class ParZCConfig:
    """Hyperparameters of :class:`ParZC` (all JSON-safe)."""

    num_tokens: int = 8  # K: node tokens per architecture
    dim: int = 32  # token embedding width
    depth: int = 2  # Mixer blocks
    token_hidden: int = 32  # token-mixing MLP hidden size
    channel_hidden: int = 64  # channel-mixing MLP hidden size
    head_hidden: int = 32  # Bayesian head hidden size
    dropout: float = 0.2  # in both mixing MLPs (masks shared across tokens / channels)
    prior_sigma: float = 0.3  # Gaussian prior std of the Bayesian weights
    rho_init: float = -5.0  # initial softplus^-1 of the posterior std (softplus(-5) = 0.0067)
    kl_weight: float = 1.0  # weight of the mean KL per Bayesian weight in the loss
    alpha: float = 5.0  # DiffKendall sharpness on the scores
    target_alpha: float = 2.0  # DiffKendall sharpness on the standardised targets
    target_transform: str = "zscore"  # targets: "zscore" of the accuracies, or "rank" (z-scored ranks)
    steps: int = 600  # optimiser steps
    batch_size: int = 128  # architectures per step (all of them when fewer)
    lr: float = 2e-3
    weight_decay: float = 1e-3
    warmup_steps: int = 30  # linear warm-up, then cosine decay to 0
    mc_samples: int = 64  # weight samples in predict
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_transform not in ("zscore", "rank"):
            raise ValueError(f"ParZC target_transform must be 'zscore' or 'rank', got {self.target_transform!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "target_transform":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"ParZC {f.name} must be a number, got {value!r}")
            if f.type == "float" and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))  # JSON-safe and type-stable: -3 -> -3.0
        positive_ints = ("num_tokens", "dim", "token_hidden", "channel_hidden", "head_hidden", "steps", "batch_size")
        for name in (*positive_ints, "mc_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParZC {name} must be a positive integer, got {value!r}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"ParZC depth must be a non-negative integer, got {self.depth!r}")
        if self.mc_samples < 2:
            raise ValueError(f"ParZC mc_samples must be >= 2 to estimate a std, got {self.mc_samples}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ParZC dropout must be in [0, 1), got {self.dropout}")
        for name in ("prior_sigma", "alpha", "target_alpha", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ParZC {name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_weight", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ParZC {name} must be >= 0, got {getattr(self, name)}")


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the caller's setting. The MABN's tensors are
    tiny: extra threads only add synchronisation, and on a busy CPU (2 threads, another process
    running) they made a fit 40x slower in our measurements."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ParZC:
    """Learned ranker over node-wise zero-cost statistics (see the module docstring).

    >>> model = ParZC(steps=400, seed=0).fit(train_features, train_accuracies)
    >>> mean, std = model.predict(test_features)   # higher mean = predicted better

    ``features`` are either a list of per-architecture node matrices ``(num_nodes_i, 9)`` from
    :func:`node_features` (tokenised here), a 3-D array of equal-length node matrices
    ``(n_arch, num_nodes, 9)``, or already tokenised ``(n_arch, num_tokens, 14)`` from
    :func:`tokenize` (the last dimension tells which). Hyperparameters: :class:`ParZCConfig`.
    Runs on CPU; training and prediction are deterministic given ``seed`` and leave the global
    torch RNG untouched.
    """

    def __init__(self, **hyperparams: Any) -> None:
        unknown = sorted(set(hyperparams) - {f.name for f in fields(ParZCConfig)})
        if unknown:
            allowed = ", ".join(f.name for f in fields(ParZCConfig))
            raise ValueError(f"unknown ParZC hyperparameters: {', '.join(unknown)} (allowed: {allowed})")
        self.config = ParZCConfig(**hyperparams)
        self.net: MABN | None = None
        self.feature_mean: np.ndarray | None = None
        self.feature_std: np.ndarray | None = None
        self.feature_fill: np.ndarray | None = None  # stands in for NaN, per column
        self.history: list[float] = []

    # -- features

    def _tokens(self, features: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        k = self.config.num_tokens
        if isinstance(features, np.ndarray) and features.ndim == 3:
            if features.shape[1:] == (k, len(TOKEN_COLUMNS)):
                return features.astype(np.float32)
            if features.shape[2] == len(NODE_COLUMNS):
                return tokenize(list(features), k)
            raise ValueError(
                f"features of shape {features.shape}: expected (n_arch, {k}, {len(TOKEN_COLUMNS)}) tokens or "
                f"(n_arch, num_nodes, {len(NODE_COLUMNS)}) node matrices"
            )
        if isinstance(features, np.ndarray):
            raise ValueError(f"features must be a 3-D array or a list of 2-D node matrices, got shape {features.shape}")
        return tokenize(list(features), k)

    @staticmethod
    def _with_arch(tokens: np.ndarray, arch: np.ndarray | Sequence[Sequence[float]] | None) -> np.ndarray:
        """The tokens with ``arch`` (n_arch, e): architecture-level columns broadcast to every token,
        as the five global columns are (an architecture encoding, or another score)."""
        if arch is None:
            return tokens
        a = np.asarray(arch, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] != tokens.shape[0]:
            raise ValueError(f"arch must be (n_arch, columns) for {tokens.shape[0]} architectures, got shape {a.shape}")
        return np.concatenate([tokens, np.repeat(a[:, None, :], tokens.shape[1], axis=1)], axis=-1)

    def _normalised(self, tokens: np.ndarray) -> torch.Tensor:
        assert self.feature_mean is not None and self.feature_std is not None and self.feature_fill is not None
        x = np.where(np.isnan(tokens), self.feature_fill, tokens)
        x = (x - self.feature_mean) / self.feature_std
        return torch.from_numpy(np.clip(x, -6.0, 6.0).astype(np.float32))

    def _build(self, in_features: int) -> MABN:
        c = self.config
        return MABN(
            c.num_tokens,
            in_features,
            dim=c.dim,
            depth=c.depth,
            token_hidden=c.token_hidden,
            channel_hidden=c.channel_hidden,
            head_hidden=c.head_hidden,
            dropout=c.dropout,
            prior_sigma=c.prior_sigma,
            rho_init=c.rho_init,
        )

    # -- training

    def fit(self, features: Sequence[np.ndarray] | np.ndarray, accuracies: Sequence[float] | np.ndarray,
            arch: np.ndarray | None = None) -> ParZC:
        """Train on labelled architectures (accuracy: higher is better). Returns self. ``arch``
        (n_arch, e): optional architecture-level columns added to every token (``predict`` then
        needs the same columns)."""
        c = self.config
        tokens = self._with_arch(self._tokens(features), arch)
        y = np.asarray(accuracies, dtype=np.float64).ravel()
        if y.size != tokens.shape[0]:
            raise ValueError(f"got {tokens.shape[0]} architectures but {y.size} accuracies")
        if y.size < 2:
            raise ValueError(f"ParZC needs at least 2 labelled architectures to learn a ranking, got {y.size}")
        if not np.all(np.isfinite(y)):
            raise ValueError("accuracies contain NaN or inf")
        self._fit_normalisation(tokens)
        x = self._normalised(tokens)
        if c.target_transform == "rank":
            from scipy import stats  # lazy: importing predictors needs only torch + numpy

            y = stats.rankdata(y)
        y_std = y.std()
        yt = torch.from_numpy(((y - y.mean()) / (y_std if y_std > 0 else 1.0)).astype(np.float32))

        n = x.shape[0]
        with torch.random.fork_rng(devices=[]), _single_thread():
            torch.manual_seed(c.seed)
            net = self._build(x.shape[-1])
            opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
            nbw = net.num_bayesian_weights()
            self.history = []
            net.train()
            for _ in range(c.steps):
                idx = torch.randperm(n)[: c.batch_size] if n > c.batch_size else torch.arange(n)
                pred = net(x[idx])
                tau = diff_kendall(pred, yt[idx], c.alpha, c.target_alpha)
                loss = 1.0 - tau + c.kl_weight * net.kl() / nbw
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                self.history.append(loss.item())
        net.eval()
        self.net = net
        return self

    def _fit_normalisation(self, tokens: np.ndarray) -> None:
        """Per column: NaN (a non-finite global proxy: a degenerate network) is imputed as one std
        below the smallest finite training value (worse than every training architecture; higher
        nwot and jacob_cov are better), then the column is standardised."""
        flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
        finite = np.isfinite(flat)
        fill = np.zeros(flat.shape[1])
        for j in range(flat.shape[1]):
            col = flat[finite[:, j], j]
            fill[j] = col.min() - (col.std() if col.size > 1 else 0.0) - 1e-3 if col.size else 0.0
        flat = np.where(finite, flat, fill)
        std = flat.std(axis=0)
        self.feature_fill = fill.astype(np.float32)
        self.feature_mean = flat.mean(axis=0).astype(np.float32)
        self.feature_std = np.where(std > 1e-8, std, 1.0).astype(np.float32)

    def _lr_lambda(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # -- prediction

    @torch.no_grad()
    def predict(self, features: Sequence[np.ndarray] | np.ndarray,
                arch: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of the score over ``mc_samples`` Bayesian weight samples, one per architecture.

        Higher mean = predicted more accurate. Deterministic: the same model gives the same
        numbers on every call (the weight samples are drawn from a generator seeded by ``seed``).
        ``arch``: the architecture-level columns the model was fitted with, if any."""
        if self.net is None or self.feature_mean is None:
            raise RuntimeError("ParZC.predict called before fit (or load)")
        tokens = self._with_arch(self._tokens(features), arch)
        fitted = int(self.feature_mean.shape[-1]) - len(TOKEN_COLUMNS)
        if tokens.shape[-1] != self.feature_mean.shape[-1]:
            raise ValueError(f"this ParZC was fitted with {fitted} architecture columns; pass arch with "
                             f"{fitted} columns" if fitted else "this ParZC was fitted without architecture columns")
        if tokens.shape[0] == 0:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.float64)
        x = self._normalised(tokens)
        net = self.net.eval()
        with torch.random.fork_rng(devices=[]), _single_thread():
            # the same mc_samples weight draws whatever the batch: an architecture's prediction
            # does not depend on which others are predicted with it
            torch.manual_seed(self.config.seed + 1)
            z = net.encode(x)
            samples = torch.stack([net.head(z, sample=True) for _ in range(self.config.mc_samples)])
        s = samples.double()
        return s.mean(dim=0).numpy(), s.std(dim=0).numpy()

    # -- persistence

    def save(self, path: str | Path) -> None:
        """torch.save of the hyperparameters (JSON), feature normalisation and state dict."""
        if self.net is None or self.feature_mean is None or self.feature_std is None or self.feature_fill is None:
            raise RuntimeError("ParZC.save called before fit")
        state = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "config": json.dumps(asdict(self.config), sort_keys=True),
            "in_features": int(self.feature_mean.shape[-1]),
            "feature_mean": torch.from_numpy(self.feature_mean.copy()),
            "feature_std": torch.from_numpy(self.feature_std.copy()),
            "feature_fill": torch.from_numpy(self.feature_fill.copy()),
            "state_dict": self.net.state_dict(),
        }
        torch.save(state, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> ParZC:
        """Load a model written by :meth:`save`; it predicts exactly as the saved one.

        ValueError (one line) for anything else: a missing, unreadable, foreign or damaged file."""
        shown = str(path) if len(str(path)) <= 80 else str(path)[:79] + "…"
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file is the same user error
            raise ValueError(f"{shown} is not a readable ParZC checkpoint ({type(e).__name__}); save one with "
                             "ParZC.save(PATH)") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{shown} is not a ParZC checkpoint (written by ParZC.save)")
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{shown}: unsupported ParZC checkpoint version {str(state.get('version'))[:20]!r}")
        try:
            model = cls(**json.loads(state["config"]))
            model.feature_mean = state["feature_mean"].numpy()
            model.feature_std = state["feature_std"].numpy()
            model.feature_fill = state["feature_fill"].numpy()
            net = model._build(int(state["in_features"]))
            net.load_state_dict(state["state_dict"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as e:
            raise ValueError(f"{shown} is a damaged ParZC checkpoint ({type(e).__name__}); save it again") from None
        net.eval()
        model.net = net
        return model
