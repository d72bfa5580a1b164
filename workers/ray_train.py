"""Ray Train wiring for the supernet: :func:`predictors.supernet.train_supernet` on several workers.

:func:`train_supernet_ray` runs the very same training function on ``num_workers`` processes under
``ray.train.torch.TorchTrainer`` (Ray Train sets up ``torch.distributed``: gloo on CPU, NCCL on
GPUs; Li et al., VLDB 2020, "PyTorch Distributed"). The recipe, the data sharding, the gradient
sum and the checkpoints are the training function's (``predictors.supernet``); this module only
starts the workers, hands them the data and reads rank 0's result back. No recipe lives here.

The result is what the single-process call returns: a :class:`~search_spaces.supernet.Supernet`
(on the CPU) with its ``train_state``. A failure on any worker becomes one line: the
``SupernetError`` of a rank (bad checkpoint, bad settings) as that same error, anything else as a
:class:`RayTrainError` naming the rank.

Multi-node runs need ``out`` (and Ray Train's ``storage_path``) on storage every node sees.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from predictors.supernet import SupernetError, TrainConfig, TrainState
from search_spaces.supernet import Supernet, SupernetFrame

__all__ = ["RayTrainError", "train_supernet_ray"]

_RESULT = "result.pt"
_WAIT_S = 30.0  # how long to wait for the workers' resources to come free (placement groups of a run just ended)


class RayTrainError(RuntimeError):
    """Distributed supernet training failed for a reason other than the user's settings (one line)."""


@dataclass
class _Data:
    """Only the tensors the workers need (not the dataset object that held them)."""

    x: Tensor
    y: Tensor


def _loop(conf: dict[str, Any]) -> None:
    """One Ray Train worker: ``train_supernet`` in the process group Ray Train made; rank 0 reports
    the trained weights and the train state as a Ray Train checkpoint."""
    torch.set_num_threads(int(conf["threads"]))
    from ray import train
    from ray.train import Checkpoint

    from predictors.supernet import train_supernet

    device: Any = "cpu"
    if conf["use_gpu"]:
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)  # NCCL collectives and broadcast_object_list use the current device
    net = train_supernet(conf["frame"], conf["data"], conf["epochs"], device=device, **conf["kwargs"])
    st: TrainState = net.train_state  # type: ignore[attr-defined]
    metrics = {"step": st.step, "total_steps": st.total_steps}
    if train.get_context().get_world_rank() != 0:
        train.report(metrics)  # every rank reports (a Ray Train collective); rank 0's checkpoint is the result
        return
    with tempfile.TemporaryDirectory(prefix="nas-supernet-") as d:
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save({"model": state, "train_state": asdict(st)}, Path(d) / _RESULT)
        train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _needs(num_workers: int, per_worker: dict[str, float]) -> dict[str, float]:
    return {k: v * num_workers for k, v in per_worker.items() if v}


def _check_resources(num_workers: int, per_worker: dict[str, float]) -> None:
    """Fail in one line, rather than wait forever, when Ray cannot place the workers: never (the
    cluster has too few) or not within ``_WAIT_S`` (others hold them)."""
    need = _needs(num_workers, per_worker)
    total = ray.cluster_resources()
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if short:
        k, v = next(iter(short.items()))
        raise RayTrainError(f"the supernet's {num_workers} Ray Train workers need {v:g} {k} but the Ray cluster has "
                            f"{total.get(k, 0.0):g}; use fewer supernet workers")
    deadline = time.monotonic() + _WAIT_S
    while True:
        free = ray.available_resources()
        busy = {k: v for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
        if not busy:
            return
        if time.monotonic() > deadline:
            k, v = next(iter(busy.items()))
            raise RayTrainError(f"the supernet's {num_workers} Ray Train workers need {v:g} {k} but only "
                                f"{free.get(k, 0.0):g} are free (other workers hold the rest); use fewer supernet "
                                "workers or fewer --workers")
        time.sleep(0.2)


def _one_line(e: BaseException) -> BaseException:
    """The error to raise for a failed run: a rank's SupernetError as itself, else a RayTrainError."""
    failures: dict[int, BaseException] = dict(getattr(e, "worker_failures", None) or {})
    if not failures and getattr(e, "controller_failure", None) is not None:
        failures = {-1: e.controller_failure}  # type: ignore[attr-defined]
    for _, err in sorted(failures.items()):
        seen: set[int] = set()
        cur: BaseException | None = err
        while cur is not None and id(cur) not in seen:  # the root cause through Ray's wrappers
            seen.add(id(cur))
            if isinstance(cur, SupernetError):
                return SupernetError(str(cur).strip().splitlines()[0] if str(cur).strip() else "supernet error")
            cur = getattr(cur, "cause", None) or cur.__cause__
    rank, err = min(failures.items()) if failures else (None, e)
    text = " ".join(str(err).split())[:400] or type(err).__name__
    who = "" if rank is None or rank < 0 else f" (rank {rank})"
    return RayTrainError(f"supernet training on Ray Train failed{who}: {type(err).__name__}: {text}")


def train_supernet_ray(
    frame: SupernetFrame,
    data: Any,
    epochs: int,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    threads: int = 1,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    ckpt_every: int = 200,
    max_steps: int | None = None,
    meta: dict[str, Any] | None = None,
    total_steps: int | None = None,
    max_seconds: float | None = None,
    storage_path: str | Path | None = None,
) -> Supernet:
    """``train_supernet(frame, data, epochs, ...)`` on ``num_workers`` Ray Train workers (DDP).

    ``use_gpu``: one GPU per worker and NCCL, else CPU and gloo. ``resources_per_worker``: Ray
    resources per worker (default one CPU, plus one GPU with ``use_gpu``). ``threads``: torch
    threads per worker. The other arguments are ``train_supernet``'s (``config.batch_size`` is the
    global batch, split over the workers); ``out`` is made absolute (Ray Train runs each worker in
    a folder of its own). Starts a private local Ray when none is running. Returns the supernet on
    the CPU with its ``train_state``, as rank 0 finished it."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise SupernetError(f"the supernet's workers must be a positive integer, got {num_workers!r}")
    if not ray.is_initialized():
        from workers.ray_pool import init_ray

        init_ray(num_cpus=num_workers)
    per_worker = dict(resources_per_worker or {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})})
    _check_resources(num_workers, per_worker)
    cfg = config or TrainConfig()
    kwargs = {"config": cfg, "out": None if out is None else str(Path(out).resolve()), "ckpt_every": ckpt_every,
              "max_steps": max_steps, "meta": meta, "total_steps": total_steps, "max_seconds": max_seconds}
    # in-memory data: only its tensors; streaming data (no tensor x) travels as itself, a path and
    # index arrays, and each rank decodes only its shard of each global batch
    shipped = _Data(data.x, data.y) if isinstance(getattr(data, "x", None), Tensor) else data
    conf = {"frame": frame, "data": shipped, "epochs": epochs, "kwargs": kwargs,
            "threads": threads, "use_gpu": use_gpu}
    own = storage_path is None
    storage = Path(storage_path or tempfile.mkdtemp(prefix="nas-raytrain-")).resolve()
    trainer = TorchTrainer(
        _loop, train_loop_config=conf,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name="supernet", storage_path=str(storage), failure_config=FailureConfig(max_failures=0)),
    )
    try:
        try:
            result = trainer.fit()
        except Exception as e:  # a worker raised, or Ray Train itself failed
            raise _one_line(e) from None
        if result.checkpoint is None:
            raise RayTrainError("supernet training on Ray Train ended without rank 0's result")
        with result.checkpoint.as_directory() as d:
            got = torch.load(Path(d) / _RESULT, map_location="cpu", weights_only=False)
    finally:
        if own:
            shutil.rmtree(storage, ignore_errors=True)
    net = Supernet(frame, seed=cfg.seed)
    net.load_state_dict(got["model"])
    net.train_state = TrainState(**got["train_state"])  # type: ignore[attr-defined]
    return net
