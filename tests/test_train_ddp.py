"""Standalone training as DDP on Ray Train (``workers.ray_train.train_standalone_ray``), CPU, 2 gloo workers.

DDP (Li et al., VLDB 2020, "PyTorch Distributed"): at equal global batch a 2-worker run of
``predictors.supernet.train_standalone`` equals the single-process run up to float rounding (loss
curve and weights), and a stop decided on rank 0 (``on_epoch``: early stopping such as ASHA, Li et
al. 2020; ``before_step``: a time allowance) stops every rank at the same step. One architecture
with BatchNorm (conv stem and a ``batchnorm`` stage, as in test_supernet_ddp.py) on random 8x8
images, a global batch of 15 (uneven shards of 7 and 8). One local Ray on 127.0.0.1 serves the
module. Nothing here depends on speed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ddp_setup import (
    CFG,
    EPOCHS,
    FRAME,
    WEIGHT_ATOL,
    Data,
    assert_same_run,
    local_ray,
    make_data,
    max_weight_diff,
)

from predictors.supernet import train_standalone
from workers.ray_train import train_standalone_ray


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


@pytest.fixture(scope="module")
def ray_session() -> Iterator[object]:
    yield from local_ray()


SPEC = FRAME.largest(random.Random(1))


def test_two_workers_match_one_process(data: Data, ray_session: object) -> None:
    single = train_standalone(SPEC, data, EPOCHS, config=CFG, num_classes=4)
    ddp = train_standalone_ray(SPEC, data, EPOCHS, config=CFG, num_classes=4, num_workers=2)
    assert not ddp.train_state.stopped
    assert_same_run(single, ddp, "standalone")
    assert not ddp.training and next(ddp.parameters()).device.type == "cpu"


@pytest.mark.slow  # a Ray Train launch; the train-stage test below covers a caller-side stop by default
def test_callbacks_run_in_the_caller_and_stop_every_rank(data: Data, ray_session: object) -> None:
    """``on_epoch`` and ``before_step`` are the caller's closures: they see rank 0's model and clock
    the steps here, and their stop is every rank's (the run would hang or fail otherwise)."""
    seen: dict[str, list] = {"epochs": [], "steps": [], "weights": []}

    def on_epoch(epoch: int, model: torch.nn.Module) -> bool:
        assert not model.training
        seen["epochs"].append(epoch)
        seen["weights"].append({k: v.clone() for k, v in model.state_dict().items()})
        return epoch == 2  # an ASHA-like early stop after the second of three epochs

    def before_step(step: int, step_s: float) -> bool:
        seen["steps"].append(step)
        return False

    ddp = train_standalone_ray(SPEC, data, 3, config=CFG, num_classes=4, num_workers=2,
                               on_epoch=on_epoch, before_step=before_step)
    assert seen["epochs"] == [1, 2] and seen["steps"] == list(range(6))
    assert ddp.train_state.step == 6 and ddp.train_state.total_steps == 9 and not ddp.train_state.stopped
    single = train_standalone(SPEC, data, 3, config=CFG, num_classes=4, on_epoch=lambda e, m: e == 2)
    assert single.train_state.step == 6
    wdiff, where = max_weight_diff(single, ddp)
    assert wdiff <= WEIGHT_ATOL, where
    # the model on_epoch received at the stop is the one returned
    assert all(torch.equal(v, ddp.state_dict()[k]) for k, v in seen["weights"][-1].items())


@pytest.mark.slow  # a Ray Train launch (~25 s on 2 loaded cores)
def test_a_callback_error_comes_back_as_itself(data: Data, ray_session: object) -> None:
    def on_epoch(epoch: int, model: torch.nn.Module) -> bool:
        raise KeyError("no such trial")

    with pytest.raises(KeyError, match="no such trial"):
        train_standalone_ray(SPEC, data, EPOCHS, config=CFG, num_classes=4, num_workers=2, on_epoch=on_epoch)


@pytest.mark.slow  # a Ray Train launch; the caller-side stop above covers the same broadcast
def test_rank0_decides_for_every_rank(data: Data, ray_session: object, tmp_path: Path) -> None:
    """Inside the process group: callbacks that answer differently per rank (only rank 0 is asked),
    an early stop at an epoch end and an allowance stop mid-epoch; every rank ends at rank 0's step."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(conf: dict) -> None:
        import torch.distributed as dist

        torch.set_num_threads(1)
        rank = dist.get_rank()
        calls: list[str] = []

        def on_epoch(epoch: int, model: torch.nn.Module) -> bool:
            calls.append(f"epoch{epoch}")
            return epoch == 1 if rank == 0 else False

        def before_step(step: int, step_s: float) -> bool:
            calls.append(f"step{step}")
            return step == 4 if rank == 0 else True  # rank 1 alone would stop at once

        d = conf["data"]
        a = train_standalone(SPEC, d, 3, config=CFG, num_classes=4, on_epoch=on_epoch)
        b = train_standalone(SPEC, d, 3, config=CFG, num_classes=4, before_step=before_step)
        Path(conf["dir"], f"rank{rank}.json").write_text(json.dumps({
            "early": a.train_state.step, "allowance": b.train_state.step, "stopped": b.train_state.stopped,
            "losses": a.train_state.losses, "calls": calls}))

    from workers.evaluate import Split  # importable on the workers (this module's Data is not)

    TorchTrainer(loop, train_loop_config={"data": Split(data.x, data.y), "dir": str(tmp_path)},
                 torch_config=TorchConfig(backend="gloo", timeout_s=120), scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["early"] == r1["early"] == 3  # stopped after epoch 1 of 3
    assert r0["allowance"] == r1["allowance"] == 4 and r0["stopped"] and r1["stopped"]
    assert r0["losses"] == r1["losses"]  # the global loss, the same on every rank
    assert r1["calls"] == []  # only rank 0 is asked
    assert r0["calls"] == ["epoch1", *[f"step{s}" for s in range(5)]]


def test_the_train_stage_on_two_workers_reports_as_one_process(data: Data, ray_session: object) -> None:
    """``EvalConfig(train_workers=2)`` (``nas search --train-workers 2``): the train stage's per-epoch
    reports (validation accuracy, read in this process) and its result equal the single-process run's,
    and a scheduler's stop after epoch 2 of 3 (as ASHA asks, through the caller's report) stops every
    rank there."""
    from workers.evaluate import EvalConfig, EvalData, Split, evaluate

    split = EvalData(Split(data.x, data.y), Split(data.x[:20], data.y[:20]), 4)
    reports: dict[int, list[tuple[int, float]]] = {1: [], 2: []}
    metrics = {}
    for w in (1, 2):
        cfg = EvalConfig(train_epochs=3, train_batch=15, train_workers=w, seed=3)
        ev = evaluate(SPEC, "train", split, "cpu", config=cfg,
                      report=lambda e, m, w=w: reports[w].append((e, m["accuracy"])) or e >= 2)
        metrics[w] = {k: v for k, v in ev.metrics.items() if k != "seconds"}
    print(f"\ntrain stage reports, 1 process {reports[1]}, 2 workers {reports[2]}")
    assert [e for e, _ in reports[2]] == [1, 2] and reports[1] == reports[2]
    assert metrics[1] == metrics[2] and metrics[2]["steps"] == 6.0 and metrics[2]["early_stop"] == 1.0
