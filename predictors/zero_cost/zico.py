"""ZiCo: the inverse coefficient of variation of weight gradients across batches.

Li, Yang, Wang, Marculescu 2023, "ZiCo: Zero-shot NAS via Inverse Coefficient of Variation on
Gradients" (ICLR), github.com/SLDGroup/ZiCo (``ZeroShotProxy/compute_zico.py``). Definition as in
that code, not copied:

- the network in train mode; for each of ``batches`` mini-batches in turn: forward, cross-entropy
  loss, ``backward()``, then record every Conv2d/Linear weight's ``.grad``, flattened. The reference
  never zeroes the gradients between batches, so record k holds the SUM of the first k batches'
  gradients; we reproduce that (the paper's equation uses per-batch gradients; the published
  search and its figures used the code);
- per layer, over the recorded vectors: ``s = std`` (population, over the batches) and ``m = mean |g|``
  per weight; over the weights with ``s != 0``, ``t = sum(m / s)``; the layer adds ``log t`` when
  ``t != 0`` (a layer with ``t == 0`` is skipped);
- the score is the sum over layers.

Departures: the reference draws ``--maxbatch 2`` loader batches of ``--batch_size`` images; we split
the one screening batch into ``batches`` equal consecutive chunks (2 by default), so the proxy sees
the same images as the others. A layer whose weight gets no gradient (the reference would fail on
``None.data``) contributes nothing. Statistics in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from predictors.zero_cost._hooks import prunable_layers

ZICO_BATCHES = 2  # the reference's --maxbatch default


def zico_score(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    batches: int = ZICO_BATCHES,
) -> float:
    """ZiCo of ``model`` on ``inputs`` split into ``batches`` consecutive chunks (see the module
    docstring). The model is deep-copied; it is not modified."""
    if batches < 2:
        raise ValueError(f"zico needs at least 2 batches to measure a spread, got {batches}")
    if inputs.shape[0] < batches:
        raise ValueError(f"zico splits the batch into {batches} chunks; got only {inputs.shape[0]} inputs")
    loss_fn = loss_fn or F.cross_entropy
    net = copy.deepcopy(model)
    net.train()
    layers = prunable_layers(net)
    for _, m in layers:
        m.weight.requires_grad_(True)
    net.zero_grad(set_to_none=True)
    records: list[list[Tensor | None]] = [[] for _ in layers]
    with torch.enable_grad():
        for x, y in zip(inputs.detach().chunk(batches), targets.chunk(batches)):
            loss_fn(net(x), y).backward()  # accumulates, as the reference (no zero_grad between batches)
            for rec, (_, m) in zip(records, layers):
                g = m.weight.grad
                rec.append(None if g is None else g.detach().flatten().double().clone())
    score = 0.0
    for rec in records:
        if any(g is None for g in rec):
            continue
        g = torch.stack(rec)  # type: ignore[arg-type]
        std = g.std(dim=0, unbiased=False)
        nz = std != 0
        total = float((g.abs().mean(dim=0)[nz] / std[nz]).sum())
        if total != 0:
            score += math.log(total)
    return score
