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
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ddp_setup import (
    CFG,
    EPOCHS,
    FRAME,
    Data,
    assert_same_run,
    local_ray,
    make_data,
    max_weight_diff,
    ray,
)

from predictors.supernet import TrainConfig, train_supernet
from workers.ray_train import train_supernet_ray


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


@pytest.fixture(scope="module")
def ray_session() -> Iterator[object]:
    yield from local_ray()


STOP_AT = 4  # the interrupted run stops after this many steps (mid-epoch)


@pytest.fixture(scope="module")
def single(data: Data) -> torch.nn.Module:
    return train_supernet(FRAME, data, EPOCHS, config=CFG)


@pytest.fixture(scope="module")
def ddp(data: Data, ray_session: object) -> torch.nn.Module:
    return train_supernet_ray(FRAME, data, EPOCHS, config=CFG, num_workers=2)


def test_two_workers_match_one_process(single: torch.nn.Module, ddp: torch.nn.Module) -> None:
    assert_same_run(single, ddp, "supernet")


def test_stop_and_resume_continues_exactly(data: Data, ddp: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train_supernet_ray(FRAME, data, EPOCHS, config=CFG, num_workers=2, out=out, max_steps=STOP_AT)
    assert first.train_state.step == STOP_AT and (out / "supernet.pt").is_file()
    rest = train_supernet_ray(FRAME, data, EPOCHS, config=CFG, num_workers=2, out=out)
    assert rest.train_state.step == 6
    curve = first.train_state.losses + rest.train_state.losses
    print(f"\nresumed after {STOP_AT} steps: losses {curve}\nuninterrupted: {ddp.train_state.losses}")
    # the same computation in the same order: bit for bit
    assert curve == ddp.train_state.losses
    wdiff, where = max_weight_diff(rest, ddp)
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
def test_errors_come_back_as_one_line(data: Data, ray_session: object, tmp_path: Path) -> None:
    from predictors.supernet import SupernetError

    out = tmp_path / "run"
    train_supernet(FRAME, data, EPOCHS, config=CFG, out=out, max_steps=1)
    with pytest.raises(SupernetError, match="trained with another recipe") as e:
        train_supernet_ray(FRAME, data, EPOCHS + 1, config=CFG, num_workers=2, out=out)
    assert "\n" not in str(e.value)
