"""ZiCo (Li et al. ICLR 2023): equal to an independent NumPy transcription of the reference procedure,
an analytic case that pins the reference's gradient accumulation, and the model left untouched."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from predictors.zero_cost import ALL_PROXIES, compute, zico_score
from search_spaces.hybrid_vit import build
from search_spaces.nb201 import NB201Network, NB201Spec
from search_spaces.spec import ArchSpec, StageSpec, StemSpec

torch.set_num_threads(1)


def _batch(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hybrid() -> nn.Module:
    spec = ArchSpec(
        stem=StemSpec("conv", 4),
        stages=(StageSpec(depth=1, width=16, token_mixer="attention", channel_mixer="glu", heads=2, mlp_ratio=2.0),
                StageSpec(depth=1, width=32, token_mixer="ssm", channel_mixer="conv_ffn", mlp_ratio=2.0,
                          norm="batchnorm", downsample="conv3")),
    )
    return build(spec, num_classes=10, img_size=16, seed=0)


def _nb201() -> nn.Module:
    torch.manual_seed(0)
    return NB201Network(NB201Spec.from_string("|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+"
                                              "|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"), cells_per_stage=1)


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    """The reference procedure step by step: train mode, backward per batch without zeroing,
    record each Conv2d/Linear weight gradient as a NumPy vector, then sum over layers of
    log(sum(mean|g| / std(g))) over the weights whose std is not zero."""
    net = copy.deepcopy(model).train()
    grads: dict[str, list[np.ndarray]] = {}
    for xb, yb in zip(x.chunk(batches), y.chunk(batches)):
        F.cross_entropy(net(xb), yb).backward()
        for name, mod in net.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.grad is not None:
                grads.setdefault(name, []).append(mod.weight.grad.detach().double().numpy().reshape(-1).copy())
    total = 0.0
    for recs in grads.values():
        a = np.array(recs)
        std = np.std(a, axis=0)
        nz = np.nonzero(std)[0]
        s = np.sum(np.mean(np.abs(a), axis=0)[nz] / std[nz])
        if s != 0:
            total += np.log(s)
    return float(total)


@pytest.mark.parametrize("make", [_hybrid, _nb201], ids=["hybrid", "nb201"])
@pytest.mark.parametrize("batches", [2, 4])
def test_zico_equals_reference_procedure(make, batches) -> None:  # type: ignore[no-untyped-def]
    net = make()
    x, y = _batch()
    got = zico_score(net, x, y, batches=batches)
    assert math.isfinite(got)
    assert got == pytest.approx(_reference(net, x, y, batches), rel=1e-9, abs=1e-9)
    if batches == 2:
        assert compute(net, x, y, names=["zico"]) == {"zico": got}


def test_zico_pins_gradient_accumulation() -> None:
    """Two identical chunks: the reference records g and 2g (no zero_grad), so per weight
    mean|g| / std = 1.5|g| / 0.5|g| = 3, and a bias-free linear layer scores log(3 * #nonzero)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False))
    x = torch.randn(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 3])
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    g = torch.autograd.grad(F.cross_entropy(net(x), y), net[1].weight)[0]
    nonzero = int((g != 0).sum())
    assert nonzero > 0
    assert zico_score(net, xx, yy) == pytest.approx(math.log(3 * nonzero), rel=1e-12)


def test_zico_leaves_model_untouched_and_rejects_bad_input() -> None:
    net = _hybrid()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _batch()
    zico_score(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()) and net.training
    assert "zico" in ALL_PROXIES
    with pytest.raises(ValueError, match="at least 2 batches"):
        zico_score(net, x, y, batches=1)
    with pytest.raises(ValueError, match="only 1 inputs"):
        zico_score(net, x[:1], y[:1])
