"""Supernet training as DDP on Ray Train (``workers.ray_train``), on CPU with 2 gloo workers.

DDP (Li et al., VLDB 2020, "PyTorch Distributed"): at equal global batch a 2-worker run equals
the single-process run up to float rounding (loss curve and weights), a run stopped after k steps
and resumed continues exactly, and every rank draws the same sandwich / FairNAS subnets per step
(BigNAS, Yu et al. 2020). A tiny frame with BatchNorm (conv stem and a ``batchnorm`` stage) on
random 8x8 images, a global batch of 15 (uneven shards of 7 and 8), 6 steps. One local Ray on
127.0.0.1 serves the module. Nothing here depends on speed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from predictors.supernet import TrainConfig, train_supernet
from search_spaces.spec import StemSpec
from search_spaces.supernet import StageFrame, SupernetFrame

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

from workers.ray_pool import init_ray, shutdown_ray  # noqa: E402
from workers.ray_train import train_supernet_ray  # noqa: E402

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
STOP_AT = 4  # the interrupted run stops after this many steps (mid-epoch)

# Tolerances. Losses are fp32 means (~1.4): the 2-rank run sums the two shards' gradients where one
# process sums over the whole batch, so results differ in the last bits (2.4e-7 = 2 ulp seen) and
# the difference grows slowly with steps; 2e-5 is ~150 ulp, while one optimiser step moves the loss
# by ~1e-2 and a wrong shard weighting (e.g. averaging shards of 7 and 8 equally) by ~1e-3.
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 1e-5  # AdamW steps are ~lr = 3e-3 each: a wrong step would show as ~1e-3


@dataclass
class _Data:
    x: torch.Tensor
    y: torch.Tensor


@pytest.fixture(scope="module")
def data() -> _Data:
    g = torch.Generator().manual_seed(0)
    return _Data(torch.randn(45, 1, 8, 8, generator=g), torch.randint(0, 4, (45,), generator=g))


@pytest.fixture(scope="module")
def ray_session() -> object:
    init_ray(num_cpus=2)
    yield ray
    shutdown_ray()


@pytest.fixture(scope="module")
def single(data: _Data) -> torch.nn.Module:
    return train_supernet(FRAME, data, EPOCHS, config=CFG)


@pytest.fixture(scope="module")
def ddp(data: _Data, ray_session: object) -> torch.nn.Module:
    return train_supernet_ray(FRAME, data, EPOCHS, config=CFG, num_workers=2)


def _max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(((sa[k].double() - sb[k].double()).abs().max().item(), k) for k in sa)


def test_two_workers_match_one_process(single: torch.nn.Module, ddp: torch.nn.Module) -> None:
    a = torch.tensor(single.train_state.losses, dtype=torch.float64)
    b = torch.tensor(ddp.train_state.losses, dtype=torch.float64)
    assert len(a) == len(b) == 6 and ddp.train_state.step == 6
    diff = (a - b).abs().max().item()
    print(f"\nloss curve, 1 process vs 2 gloo workers: max |diff| {diff:.3g} over {len(a)} steps")
    assert torch.allclose(a, b, rtol=0, atol=LOSS_ATOL), (a.tolist(), b.tolist())
    assert (a[1:] - a[:-1]).abs().max().item() > 100 * LOSS_ATOL  # the curve moves: the check has teeth
    wdiff, where = _max_weight_diff(single, ddp)
    print(f"final weights: max |diff| {wdiff:.3g} ({where})")
    assert wdiff <= WEIGHT_ATOL, where
    # BatchNorm ran on the global batch: the running statistics moved and agree too
    bn = [k for k in single.state_dict() if k.endswith("running_var")]
    assert bn and all(not torch.equal(single.state_dict()[k], torch.ones_like(single.state_dict()[k])) for k in bn)


def test_stop_and_resume_continues_exactly(data: _Data, ddp: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train_supernet_ray(FRAME, data, EPOCHS, config=CFG, num_workers=2, out=out, max_steps=STOP_AT)
    assert first.train_state.step == STOP_AT and (out / "supernet.pt").is_file()
    rest = train_supernet_ray(FRAME, data, EPOCHS, config=CFG, num_workers=2, out=out)
    assert rest.train_state.step == 6
    curve = first.train_state.losses + rest.train_state.losses
    print(f"\nresumed after {STOP_AT} steps: losses {curve}\nuninterrupted: {ddp.train_state.losses}")
    # the same computation in the same order: bit for bit
    assert curve == ddp.train_state.losses
    wdiff, where = _max_weight_diff(rest, ddp)
    print(f"resumed vs uninterrupted weights: max |diff| {wdiff:.3g}")
    assert wdiff == 0.0, where


@pytest.mark.slow  # two more Ray Train launches; the match test above fails too if ranks disagree
def test_every_rank_draws_the_same_subnets(ray_session: object, tmp_path: Path) -> None:
    """Each rank's sandwich (uniform and FairNAS) for 40 steps, in separate processes; and the step's
    own check: ranks made to draw different subnets fail together with one clear error."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(conf: dict) -> None:
        import torch.distributed as dist

        from predictors.supernet import (
            SupernetError,
            _optimizer,
            sandwich,
            supernet_step,
        )
        from search_spaces.supernet import Supernet

        torch.set_num_threads(1)
        rank = dist.get_rank()
        got = {s: [[spec.hash for spec in sandwich(conf["frame"], TrainConfig(sampling=s, seed=7), step)]
                   for step in range(40)] for s in ("uniform", "fair")}
        net = Supernet(conf["frame"], seed=0)
        specs = sandwich(conf["frame"], TrainConfig(), rank)  # rank-dependent on purpose
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))
        try:
            supernet_step(net, _optimizer(net, TrainConfig()), x, y, specs, TrainConfig(), share=0.5, step=9)
            error = None
        except SupernetError as e:
            error = str(e)
        Path(conf["dir"], f"rank{rank}.json").write_text(json.dumps({"specs": got, "error": error}))

    TorchTrainer(loop, train_loop_config={"frame": FRAME, "dir": str(tmp_path)},
                 torch_config=TorchConfig(backend="gloo"), scaling_config=ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for sampling in ("uniform", "fair"):
        assert r0["specs"][sampling] == r1["specs"][sampling]
        assert len({tuple(s) for s in r0["specs"][sampling]}) > 30  # the steps do draw different subnets
    assert r0["error"] == r1["error"] and "drew different subnets at step 9" in r0["error"]


@pytest.mark.slow  # a Ray Train launch, to keep the default suite under 15 minutes on 2 cores
def test_errors_come_back_as_one_line(data: _Data, ray_session: object, tmp_path: Path) -> None:
    from predictors.supernet import SupernetError

    out = tmp_path / "run"
    train_supernet(FRAME, data, EPOCHS, config=CFG, out=out, max_steps=1)
    with pytest.raises(SupernetError, match="trained with another recipe") as e:
        train_supernet_ray(FRAME, data, EPOCHS + 1, config=CFG, num_workers=2, out=out)
    assert "\n" not in str(e.value)
