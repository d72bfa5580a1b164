"""The zero-cost proxies and the passes they share. Public API in ``predictors/zero_cost/__init__.py``.

References (definitions reproduced from their code, not copied):

- grad_norm, snip, grasp, fisher, jacob_cov, synflow: Abdelfattah, Mehrotra, Dudziak, Lane 2021,
  "Zero-Cost Proxies for Lightweight NAS" (ICLR), github.com/SamsungLabs/zero-cost-nas,
  ``foresight/pruners/measures/*.py`` and ``predictive.py``.
- nwot: Mellor, Turner, Storkey, Crowley 2021, "Neural Architecture Search without Training" (ICML),
  github.com/BayesWatch/nas-without-training (``score_networks.py``, ``scores.py``).
- zen: Lin, Wang, Sun, Chen, Sun, Qian, Li, Jin 2021, "Zen-NAS: A Zero-Shot NAS for
  High-Performance Image Recognition" (ICCV), github.com/idstcv/ZenNAS,
  ``ZeroShotProxy/compute_zen_score.py``.
- dss*, az_*: ViT-aware proxies (TF-TAS, Zhou et al. CVPR 2022; AZ-NAS, Lee & Ham CVPR 2024), defined
  and computed in ``predictors/zero_cost/vit.py`` (:data:`VIT_PROXIES`), each on its own deep copy.
- zico: Li, Yang, Wang, Marculescu 2023, "ZiCo" (ICLR), github.com/SLDGroup/ZiCo, defined and computed
  in ``predictors/zero_cost/zico.py`` on its own deep copy.

Definitions as implemented. "Layers" are the Conv2d and Linear modules (subclasses included) in
module order, as the reference's ``get_layer_metric_array``; every proxy runs the network in train
mode (a fresh reference network is in train mode; fisher calls ``net.train()``), on float32 unless
said otherwise, and the score of a layer-wise proxy is the sum over layers of the sum over the
layer's array (the reference's ``sum_arr``).

- grad_norm: per layer ``||dL/dW||_2`` (L = mean cross-entropy of the batch); 0 for a weight that
  does not require grad (the reference's ``grad is None``). BN kept (batch statistics).
- snip: per layer ``sum |W * dL/dW|`` (= the reference's ``|dL/dmask|`` at mask 1). BN kept.
- grasp: per layer ``sum(-W * Hg)``, g = dL/dW over all layers' weights, Hg = d(g_detached . g)/dW
  (T = 1, one iteration). BN kept. Attention runs on the math SDPA kernel (see ``_main_pass``).
- fisher: per layer ``fan_in * sum_k 0.5 * mean_n (sum_positions a_nk * dL/da_nk)^2`` with ``a``
  the layer's output (after bias) and ``fan_in = prod(W.shape[1:])``: the reference broadcasts each
  channel's value over that channel's weights before ``sum_arr``. BN kept. Channel k is dim 1 of a
  conv output and the last dim of a linear output. Departure: on a (B, N, C) linear output the
  reference sums over dims >= 2 (the channels) and treats the N tokens as channels; we use the
  layer's C channels, so a token-wise Linear scores the same in NCHW and NLC layout (identical to
  the reference for conv and (B, C) linear outputs). A weight applied functionally (``linear_any``,
  MatFormer slices) counts; the reference's forward patching misses such calls and scores them 0.
- jacob_cov: J = d(sum of logits)/dx per sample (BN batch statistics couple the samples, as in the
  reference's ``y.backward(ones)``); C = corrcoef of J's rows; ``-sum(log(v + 1e-5) + 1/(v + 1e-5))``
  over C's eigenvalues (float64).
- synflow: BatchNorm1d/2d removed, every floating state-dict tensor replaced by its absolute value,
  the whole net in float64, input ones(1, C, H, W), R = sum(output); per layer ``sum |W * dR/dW|``.
  The reference restores the signs afterwards; here the copy is discarded (or reset for zen).
- nwot: forward hooks on activation modules, ``c = input > 0`` per sample (flattened), ``K = sum over
  hooked calls of c c^T + (1-c)(1-c)^T`` (float64), score ``slogdet(K)[1]``. Hooked: the reference's
  rule ("ReLU" in the class name: ReLU, LeakyReLU, StarReLU, and also NB201's ReLUConvBN, whose
  input is then counted twice exactly as in the reference), generalised to GELU, SiLU, Mish,
  Hardswish, ELU, CELU, SELU modules (binarised the same way, at their input). Functional
  activations (``F.silu`` inside GLU/SSM/GLA, linear attention's ``relu``) are not seen. A net with
  no hooked activation has K = 0 and scores -inf (as the reference).
- zen: Gaussian re-initialisation (Conv2d/Linear weight N(0, 1), bias 0; BatchNorm2d/GroupNorm weight
  1, bias 0; other parameters kept), x, x' ~ N(0, 1) of the inputs' shape, two train-mode no-grad
  forwards to the pre-GAP features f (``forward_features``, else the output),
  ``log(mean_n sum |f(x) - f(x + 0.01 x')|) + sum over BatchNorm2d of log sqrt(mean(running_var))``
  with the running variances as the two forwards left them (repeat = 1, as ZenNAS's search). A
  model without BatchNorm2d has no BN term (0). Weights and inputs come from a generator seeded
  with ``seed`` (the reference uses the global RNG in the same order: weights, x, x').
- params: ``count_params`` (all parameters); per layer, the layer's weight + bias count.
- flops: ``count_flops`` at (1, C, H, W) (torch's counter, 2 per multiply-add, eval mode).

Passes of one :func:`compute` call, on one deep copy of the model (the model itself is never touched):

1. main: ONE train-mode forward with hooks (layer outputs for fisher, activation codes for nwot),
   ``autograd.grad(y.sum(), x)`` for jacob_cov on its graph, ONE loss backward for the weight
   gradients (grad_norm, snip, grasp's g) and the layer-output gradients (fisher) - with
   ``create_graph`` when grasp is asked for - and grasp's Hessian-gradient product through it;
2. synflow: a float64 batch-1 all-ones pass with BN removed and absolute weights;
3. zen: the copy is reset to the original, re-initialised, two no-grad forwards of Gaussian inputs;
plus ``count_flops``'s batch-1 eval-mode pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from predictors.zero_cost._hooks import (
    ActivationCodes,
    LayerOutputs,
    fan_in,
    prunable_layers,
    remove_batchnorm,
    restore,
)
from predictors.zero_cost.vit import VIT_PROXIES, compute_vit
from predictors.zero_cost.zico import zico_score
from search_spaces.counting import count_flops, count_params

PROXIES: tuple[str, ...] = (
    "grad_norm", "snip", "grasp", "fisher", "jacob_cov", "synflow", "nwot", "zen", "params", "flops",
)
# Proxies with a value per Conv2d/Linear layer ("node-wise", as ParZC uses them).
NODE_WISE: tuple[str, ...] = ("grad_norm", "snip", "grasp", "fisher", "synflow", "params")
# Proxies computed on request only, besides the ViT-aware ones: ZiCo (Li et al. ICLR 2023, ``zico.py``).
EXTRA_PROXIES: tuple[str, ...] = ("zico",)
# Every name compute() accepts: PROXIES (the default set), the ViT-aware ones and the extra ones.
ALL_PROXIES: tuple[str, ...] = PROXIES + VIT_PROXIES + EXTRA_PROXIES

ZEN_MIXUP_GAMMA = 1e-2  # ZenNAS's --mixup_gamma default
JACOB_COV_K = 1e-5  # zero-cost-nas eval_score's k

LossFn = Callable[[Tensor, Tensor], Tensor]


def resolve_names(names: str | Iterable[str] | None) -> list[str]:
    """The requested proxies in ``ALL_PROXIES`` order (None: ``PROXIES``); ValueError naming the valid ones."""
    if names is None:
        return list(PROXIES)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in ALL_PROXIES]
    if unknown:
        raise ValueError(f"unknown zero-cost proxy {unknown[0]!r}; valid names: {', '.join(ALL_PROXIES)}")
    return [p for p in ALL_PROXIES if p in names]


def compute(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    names: str | Iterable[str] | None = None,
    per_layer: bool = False,
    loss_fn: LossFn | None = None,
    *,
    seed: int = 0,
    inplace: bool = False,
) -> dict[str, Any]:
    """Zero-cost proxies of ``model`` on one batch; ``{name: float}``.

    ``names``: a subset of :data:`ALL_PROXIES` (None: all of :data:`PROXIES`; the ViT-aware
    :data:`VIT_PROXIES` only when named). ``per_layer``: also
    ``result["per_layer"] = {name: {layer name: float}}`` for the node-wise proxies
    (:data:`NODE_WISE`), over the Conv2d/Linear layers in module order; the per-layer values sum to
    the totals. ``loss_fn``: ``loss_fn(logits, targets)``, default cross-entropy (the reference's).
    ``seed``: zen's Gaussian weights and inputs, AZ-NAS's Rademacher signs (drawn from their own
    generators; the global RNG is not used). A proxy on its own, as the reference computes it, is
    ``compute(..., names=[p])``.

    The model is deep-copied once (and once per ViT-aware pass); its parameters, buffers, gradients,
    flags and mode are untouched. ``inplace=True`` skips that copy for a model built only to be
    scored and thrown away (the NB201 benchmark's): the model is left changed (synflow's |w|, no
    batch norm), the values are the same. zen, zico and the ViT-aware proxies start again from the
    original, so with any of them it copies anyway.
    """
    wanted = resolve_names(names)
    if not wanted:
        return {}
    if not isinstance(inputs, Tensor) or inputs.ndim < 2:
        raise ValueError("inputs must be a batch tensor (B, C, H, W)")
    loss_fn = loss_fn or F.cross_entropy
    # a deep copy of a small CNN costs about a quarter of nwot + synflow + snip on it
    rereads = {"zen", "zico", *VIT_PROXIES}.intersection(wanted)
    net = model if inplace and not rereads else copy.deepcopy(model)
    layers = prunable_layers(net)
    # Reference: a layer whose weight gets no gradient scores 0 in grad_norm / synflow (``grad is None``);
    # snip and grasp make their own gradient (mask / requires_grad_(True)) whatever the flag.
    trainable = [m.weight.requires_grad for _, m in layers]
    for _, m in layers:
        m.weight.requires_grad_(True)

    values: dict[str, float] = {}
    layer_values: dict[str, list[float]] = {}
    dirty = False  # the copy no longer holds the original's state (BN running stats at least)
    patched: list[nn.Module] = []

    if "params" in wanted:
        layer_values["params"] = [float(sum(p.numel() for p in m.parameters(recurse=False))) for _, m in layers]
        values["params"] = float(count_params(net))
    if "flops" in wanted:
        values["flops"] = float(count_flops(net, (1, *inputs.shape[1:])))

    main = {"grad_norm", "snip", "grasp", "fisher", "jacob_cov", "nwot"}.intersection(wanted)
    if main:
        out, per = _main_pass(net, layers, inputs, targets, loss_fn, main, trainable)
        values.update(out)
        layer_values.update(per)
        dirty = True
    if "synflow" in wanted:
        patched = remove_batchnorm(net)
        layer_values["synflow"] = _synflow_pass(net, layers, inputs, trainable)
        dirty = True
    if "zen" in wanted:
        if dirty:
            restore(net, model, patched)
        values["zen"] = _zen_pass(net, inputs, seed)
    vit = [p for p in wanted if p in VIT_PROXIES]
    if vit:
        values.update(compute_vit(model, inputs, vit, seed=seed))
    if "zico" in wanted:  # its own deep copy: gradients accumulated over chunks of the batch
        values["zico"] = zico_score(model, inputs, targets, loss_fn)

    for name, per in layer_values.items():
        if name != "params":
            values[name] = math.fsum(per)
    result: dict[str, Any] = {p: values[p] for p in wanted}
    if per_layer:
        names_l = [n for n, _ in layers]
        result["per_layer"] = {p: dict(zip(names_l, layer_values[p])) for p in wanted if p in NODE_WISE}
    return result


# ---------------------------------------------------------------------------------------------
# passes
# ---------------------------------------------------------------------------------------------


def _main_pass(
    net: nn.Module,
    layers: list[tuple[str, nn.Module]],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    want: set[str],
    trainable: list[bool],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """ONE train-mode forward (hooks for fisher / nwot), jacob_cov's input gradient on its graph,
    ONE loss backward (weights for grad_norm / snip, layer outputs for fisher) and, for grasp,
    the Hessian-gradient product through that backward's graph."""
    need_grasp = "grasp" in want
    need_ce = need_grasp or bool(want & {"grad_norm", "snip", "fisher"})
    need_jac = "jacob_cov" in want
    batch = inputs.shape[0]
    net.train()
    x = inputs.detach()
    if need_jac:
        x = x.clone().requires_grad_(True)
    values: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    with ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(need_ce or need_jac))
        if need_grasp:  # the fused attention kernels have no double backward; the math one has
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        capture = stack.enter_context(LayerOutputs(layers)) if "fisher" in want else None
        codes = stack.enter_context(ActivationCodes(net, batch)) if "nwot" in want else None
        y = net(x)
    if codes is not None:
        values["nwot"] = _logdet(codes.kernel)
    if not (need_ce or need_jac):
        return values, per
    with torch.enable_grad():
        if need_jac:
            (jac,) = torch.autograd.grad(y.sum(), x, retain_graph=need_ce)
            values["jacob_cov"] = jacob_cov_score(jac)
        if not need_ce:
            return values, per
        weights = [m.weight for _, m in layers]
        calls = [c for c in capture.calls if c.output.requires_grad] if capture is not None else []
        loss = loss_fn(y, targets)
        grads = torch.autograd.grad(loss, weights + [c.output for c in calls], allow_unused=True,
                                    create_graph=need_grasp)
        wgrads, ograds = grads[: len(weights)], grads[len(weights):]
        if need_grasp:
            # GraSP (Wang et al. 2020) as zero-cost-nas: -theta * Hg, Hg = d(g_detached . g)/dtheta.
            # The reference's first pass only yields g detached: the same values as this gradient.
            z = sum(((g.detach() * g).sum() for g in wgrads if g is not None), torch.zeros((), device=x.device))
            hg = torch.autograd.grad(z, weights, allow_unused=True) if z.requires_grad else [None] * len(weights)
            per["grasp"] = [float((-w.detach() * h).sum()) if h is not None else 0.0 for w, h in zip(weights, hg)]
    del y, grads
    wgrads = [g.detach() if g is not None else None for g in wgrads]
    if "grad_norm" in want:
        per["grad_norm"] = [float(g.norm()) if g is not None and t else 0.0 for g, t in zip(wgrads, trainable)]
    if "snip" in want:
        per["snip"] = [float((w.detach() * g).abs().sum()) if g is not None else 0.0 for w, g in zip(weights, wgrads)]
    if "fisher" in want:
        fisher = [0.0] * len(layers)
        for call, g in zip(calls, ograds):
            if g is None:
                continue
            # g_nk = sum over positions of act * grad; del_k = mean_n(g_nk^2) / 2 (Theis et al. 2018)
            g_nk = _channel_dot(call.output.detach(), g.detach(), call.channel_dim)
            fisher[call.layer] += float(g_nk.pow(2).mean(0).mul(0.5).sum())
        # the reference broadcasts each channel's value over that channel's weights before summing
        per["fisher"] = [f * fan_in(m) for f, (_, m) in zip(fisher, layers)]
    return values, per


def _synflow_pass(
    net: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor, trainable: list[bool]
) -> list[float]:
    """SynFlow (Tanaka et al. 2020) as zero-cost-nas: BN removed (done by the caller), every
    state-dict tensor replaced by its absolute value, float64, input of ones (1, C, H, W),
    R = sum(output); per layer sum |theta * dR/dtheta|. The copy is not restored here (the
    reference discards its copy); :func:`compute` resets it if zen runs afterwards."""
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net.double()
    net.train()
    weights = [m.weight for _, m in layers]
    x = torch.ones((1, *inputs.shape[1:]), dtype=torch.float64, device=inputs.device)
    with torch.enable_grad():
        out = net(x)
        grads = torch.autograd.grad(out.sum(), weights, allow_unused=True)
    return [float((w.detach() * g).abs().sum()) if g is not None and t else 0.0
            for w, g, t in zip(weights, grads, trainable)]


@torch.no_grad()
def _zen_pass(net: nn.Module, inputs: Tensor, seed: int, gamma: float = ZEN_MIXUP_GAMMA) -> float:
    """Zen-score (ZenNAS ``compute_nas_score`` with repeat=1, as its evolution search): Gaussian
    re-initialisation (Conv2d/Linear weights N(0,1), biases 0; BatchNorm2d/GroupNorm weight 1, bias
    0), two train-mode forwards to the pre-GAP features (``forward_features`` when the model has it,
    else its output) of x ~ N(0,1) and x + gamma * x' (x' ~ N(0,1)), then
    ``log(mean_n sum |f(x) - f(x_mix)|) + sum over BatchNorm2d of log sqrt(mean(running_var))``.
    A model without BatchNorm2d has no BN term (it is 0)."""
    gen = torch.Generator(device=inputs.device)
    gen.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    net.train()
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    x = torch.randn(inputs.shape, generator=gen, device=inputs.device, dtype=dtype)
    x2 = torch.randn(inputs.shape, generator=gen, device=inputs.device, dtype=dtype)
    features = getattr(net, "forward_features", net)
    out = features(x)
    mixed = features(x + gamma * x2)
    score = torch.log((out - mixed).abs().flatten(1).sum(dim=1).mean())
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
            score = score + torch.log(torch.sqrt(torch.mean(m.running_var)))
    return float(score)


def _channel_dot(act: Tensor, grad: Tensor, channel_dim: int) -> Tensor:
    """(B, C): per sample and channel, the sum over all other positions of act * grad."""
    b, c = act.shape[0], act.shape[channel_dim]
    if act.ndim == 2:
        return act * grad
    if channel_dim == 1:  # (B, C, ...): a dot product over the trailing positions
        return torch.linalg.vecdot(act.reshape(b, c, -1), grad.reshape(b, c, -1))
    # (B, ..., C): sum over the middle positions
    return (act * grad).reshape(b, -1, c).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# scores of kernels
# ---------------------------------------------------------------------------------------------


def _logdet(kernel: Tensor | None) -> float:
    """nwot: ``log|det K|`` (the reference's ``np.linalg.slogdet(K)[1]``). A net with no hooked
    activation has K = 0 and scores -inf, as the reference (its K starts as a zero matrix)."""
    if kernel is None:
        return -math.inf
    return float(np.linalg.slogdet(kernel.cpu().numpy())[1])


def jacob_cov_score(jac: Tensor, k: float = JACOB_COV_K) -> float:
    """zero-cost-nas ``eval_score``: with C the correlation matrix of the per-sample input
    gradients (rows), ``-sum_i log(v_i + k) + 1 / (v_i + k)`` over C's eigenvalues v. The eigenvalues
    come from the symmetric solver (the reference calls ``np.linalg.eig``; same values to ~1e-12).
    nan where the reference's try/except gives nan (a constant row, fewer than 2 samples)."""
    j = jac.detach().reshape(jac.shape[0], -1).cpu().numpy()
    if j.shape[0] < 2:
        return math.nan
    with np.errstate(all="ignore"):
        corr = np.corrcoef(j)
    if not np.all(np.isfinite(corr)):
        return math.nan
    v = np.linalg.eigvalsh(corr)
    with np.errstate(all="ignore"):
        return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))
