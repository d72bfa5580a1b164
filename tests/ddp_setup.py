"""What the DDP tests share (tests/test_supernet_ddp.py, tests/test_train_ddp.py): a tiny frame with
BatchNorm, random 8x8 images, a global batch of 15 (uneven shards of 7 and 8 on 2 ranks), the
tolerances, and one local Ray per test module. Not a test module itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from predictors.supernet import TrainConfig
from search_spaces.spec import StemSpec
from search_spaces.supernet import StageFrame, SupernetFrame

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")  # a module importing this one is skipped without Ray Train
pytest.importorskip("ray.train.torch")

# BatchNorm twice: the conv stem's conv-BN layers, and BatchNorm as the stage's pre-norm (NLC layout).
# No pooling mixer: pool(x) - x ignores a constant shift, so the pre-norm's bias would get a gradient
# that is pure rounding noise, and AdamW (which divides by the gradient's scale) turns any noise into
# steps of size lr whose sign is chance: weights could then differ by ~lr x steps for no fault.
FRAME = SupernetFrame(
    stem=StemSpec(kind="conv", stride=4, norm="layernorm"),
    stages=(StageFrame(max_depth=2, widths=(8, 16), heads=(1, 2), mlp_ratios=(2.0,),
                       token_mixers=("attention", "sepconv"), channel_mixers=("mlp", "glu"), norm="batchnorm",
                       downsample="none"),),
    img_size=8, in_chans=1, num_classes=4,
)
CFG = TrainConfig(batch_size=15, lr=3e-3, warmup_epochs=0.5, augment=True, flip=True, seed=3)
EPOCHS = 2  # 45 images / 15 = 3 steps an epoch: 6 steps

# Tolerances. Losses are fp32 means (~1.4): the 2-rank run sums the two shards' gradients where one
# process sums over the whole batch, so results differ in the last bits (2.4e-7 = 2 ulp seen) and
# the difference grows slowly with steps; 2e-5 is ~150 ulp, while one optimiser step moves the loss
# by ~1e-2 and a wrong shard weighting (e.g. averaging shards of 7 and 8 equally) by ~1e-3.
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 1e-5  # AdamW steps are ~lr = 3e-3 each: a wrong step would show as ~1e-3


@dataclass
class Data:
    """Only the tensors (the shape of a dataset the training functions take)."""

    x: torch.Tensor
    y: torch.Tensor


def make_data() -> Data:
    """45 random 8x8 single-channel images in 4 classes (3 steps an epoch at batch 15)."""
    g = torch.Generator().manual_seed(0)
    return Data(torch.randn(45, 1, 8, 8, generator=g), torch.randint(0, 4, (45,), generator=g))


def local_ray() -> Iterator[object]:
    """A module fixture's body: one local Ray with 2 CPUs for the module's Ray Train launches."""
    from workers.ray_pool import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield ray
    shutdown_ray()


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, str]:
    """The largest absolute difference between two models' state dicts (same keys), and where."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(((sa[k].double() - sb[k].double()).abs().max().item(), k) for k in sa)


def assert_same_run(single: torch.nn.Module, ddp: torch.nn.Module, what: str) -> None:
    """The 2-rank run equals the single-process one: per-step losses to LOSS_ATOL (and the curve
    moves, so the check has teeth), weights to WEIGHT_ATOL, BatchNorm's running statistics moved."""
    a = torch.tensor(single.train_state.losses, dtype=torch.float64)
    b = torch.tensor(ddp.train_state.losses, dtype=torch.float64)
    assert len(a) == len(b) == 6 and ddp.train_state.step == 6
    diff = (a - b).abs().max().item()
    print(f"\n{what} loss curve, 1 process vs 2 gloo workers: max |diff| {diff:.3g} over {len(a)} steps")
    assert torch.allclose(a, b, rtol=0, atol=LOSS_ATOL), (a.tolist(), b.tolist())
    assert (a[1:] - a[:-1]).abs().max().item() > 100 * LOSS_ATOL
    wdiff, where = max_weight_diff(single, ddp)
    print(f"final weights: max |diff| {wdiff:.3g} ({where})")
    assert wdiff <= WEIGHT_ATOL, where
    # BatchNorm ran on the global batch: the running statistics moved (and agree: checked above)
    bn = [k for k in single.state_dict() if k.endswith("running_var")]
    assert bn and all(not torch.equal(single.state_dict()[k], torch.ones_like(single.state_dict()[k])) for k in bn)
