"""Ray Train wiring: :func:`predictors.supernet.train_supernet` and :func:`~predictors.supernet.train_standalone`
on several workers.

:func:`train_supernet_ray` and :func:`train_standalone_ray` run the very same training functions on
``num_workers`` processes under ``ray.train.torch.TorchTrainer`` (Ray Train sets up
``torch.distributed``: gloo on CPU, NCCL on GPUs; Li et al., VLDB 2020, "PyTorch Distributed"). The
recipe, the data sharding, the gradient sum and the checkpoints are the training functions'
(``predictors.supernet``); this module only starts the workers, hands them the data and reads rank
0's result back (:func:`_fit`, shared by both). No recipe lives here.

The result is what the single-process call returns: a :class:`~search_spaces.supernet.Supernet`, or
the standalone model, on the CPU with its ``train_state``. A failure on any worker becomes one line:
the ``SupernetError`` of a rank (bad checkpoint, bad settings) as that same error, anything else as a
:class:`RayTrainError` naming the rank.

Standalone training's callbacks (``on_epoch``, ``before_step``) run in the calling process, not on
a worker: rank 0 asks through a pair of Ray queues (:class:`_Relay`) and waits for the answer, which
``train_standalone`` broadcasts to the other ranks. So a caller's closures (a scheduler's report,
a clock started before the call) work as they do in one process.

Multi-node runs need ``out`` (and Ray Train's ``storage_path``) on storage every node sees.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor, nn

from predictors.supernet import SupernetError, TrainConfig, TrainState
from search_spaces._runtime import retain_freed_memory
from search_spaces.spec import ArchSpec
from search_spaces.supernet import Supernet, SupernetFrame

__all__ = ["RayTrainError", "train_standalone_ray", "train_supernet_ray"]

_RESULT = "result.pt"
_WAIT_S = 30.0  # how long to wait for the workers' resources to come free (placement groups of a run just ended)


class RayTrainError(RuntimeError):
    """Distributed supernet training failed for a reason other than the user's settings (one line)."""


@dataclass
class _Data:
    """Only the tensors the workers need (not the dataset object that held them)."""

    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class _Kind:
    """How the messages name a kind of run."""

    whose: str  # "the supernet's": whose Ray Train workers
    what: str  # "supernet training": what failed
    fewer: str  # "supernet workers": what to use fewer of


_SUPERNET = _Kind("the supernet's", "supernet training", "supernet workers")
_STANDALONE = _Kind("standalone training's", "standalone training", "train workers")


def _worker_device(use_gpu: bool) -> Any:
    """This worker's device: its GPU (made current: NCCL collectives and broadcast_object_list use
    the current device) or the CPU."""
    if not use_gpu:
        return "cpu"
    from ray.train.torch import get_device

    device = get_device()
    torch.cuda.set_device(device)
    return device


def _report(model: nn.Module, st: TrainState) -> None:
    """Every rank reports (a Ray Train collective); rank 0's checkpoint, the weights on the CPU and
    the train state, is the result."""
    from ray import train
    from ray.train import Checkpoint

    metrics = {"step": st.step, "total_steps": st.total_steps}
    if train.get_context().get_world_rank() != 0:
        train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="nas-raytrain-") as d:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"model": state, "train_state": asdict(st)}, Path(d) / _RESULT)
        train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _loop(conf: dict[str, Any]) -> None:
    """One Ray Train worker: ``train_supernet`` in the process group Ray Train made."""
    torch.set_num_threads(int(conf["threads"]))
    retain_freed_memory()  # see search_spaces/_runtime.py
    from predictors.supernet import train_supernet

    device = _worker_device(conf["use_gpu"])
    net = train_supernet(conf["frame"], conf["data"], conf["epochs"], device=device, **conf["kwargs"])
    _report(net, net.train_state)  # type: ignore[attr-defined]


class _Relay:
    """Rank 0's line to the calling process: ``ask(*question)`` puts the question on one Ray queue
    and waits for the answer on the other, which the caller's thread running :meth:`serve` puts
    there while Ray Train runs. The queues are small actors that take no CPU (the workers hold them all)."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.up = Queue(actor_options={"num_cpus": 0})
        self.down = Queue(actor_options={"num_cpus": 0})

    def ask(self, *question: Any) -> Any:
        self.up.put(question)
        ok, value = self.down.get()
        if not ok:  # the caller's callback raised: the run fails (the caller raises the callback's error)
            raise RuntimeError(f"the caller's callback failed: {value}")
        return value

    def serve(self, answer: Callable[..., Any], done: threading.Event, failed: list[Exception]) -> None:
        """Answer questions until ``done``; a callback's exception goes to ``failed`` (and rank 0 is
        told, so that it does not wait forever)."""
        from ray.util.queue import Empty

        while not done.is_set():
            try:
                question = self.up.get(timeout=0.2)
            except Empty:
                continue
            try:
                reply = (True, answer(*question))
            except Exception as e:  # re-raised by the caller after the run
                failed.append(e)
                reply = (False, f"{type(e).__name__}: {e}")
            self.down.put(reply)

    def close(self) -> None:
        for q in (self.up, self.down):
            q.shutdown()


def _standalone_loop(conf: dict[str, Any]) -> None:
    """One Ray Train worker: ``train_standalone`` in the process group Ray Train made. Rank 0's
    callbacks ask the caller through the relay; the other ranks' are never called (rank 0 decides,
    ``train_standalone`` broadcasts), but must be there so that they join the broadcast."""
    torch.set_num_threads(int(conf["threads"]))
    retain_freed_memory()  # see search_spaces/_runtime.py
    from ray import train

    from predictors.supernet import train_standalone

    device = _worker_device(conf["use_gpu"])
    relay: _Relay | None = conf["relay"]
    first = train.get_context().get_world_rank() == 0

    def on_epoch(epoch: int, model: nn.Module) -> bool:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return bool(relay.ask("epoch", epoch, state)) if first and relay is not None else False

    def before_step(step: int, step_s: float) -> bool:
        return bool(relay.ask("step", step, step_s)) if first and relay is not None else False

    model = train_standalone(conf["spec"], conf["data"], conf["epochs"], device=device,
                             on_epoch=on_epoch if conf["on_epoch"] else None,
                             before_step=before_step if conf["before_step"] else None, **conf["kwargs"])
    _report(model, model.train_state)  # type: ignore[arg-type]


def _needs(num_workers: int, per_worker: dict[str, float]) -> dict[str, float]:
    return {k: v * num_workers for k, v in per_worker.items() if v}


def _check_resources(num_workers: int, per_worker: dict[str, float], kind: _Kind = _SUPERNET) -> None:
    """Fail in one line, rather than wait forever, when Ray cannot place the workers: never (the
    cluster has too few) or not within ``_WAIT_S`` (others hold them)."""
    need = _needs(num_workers, per_worker)
    total = ray.cluster_resources()
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if short:
        k, v = next(iter(short.items()))
        raise RayTrainError(f"{kind.whose} {num_workers} Ray Train workers need {v:g} {k} but the Ray cluster has "
                            f"{total.get(k, 0.0):g}; use fewer {kind.fewer}")
    deadline = time.monotonic() + _WAIT_S
    while True:
        free = ray.available_resources()
        busy = {k: v for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
        if not busy:
            return
        if time.monotonic() > deadline:
            k, v = next(iter(busy.items()))
            raise RayTrainError(f"{kind.whose} {num_workers} Ray Train workers need {v:g} {k} but only "
                                f"{free.get(k, 0.0):g} are free (other workers hold the rest); use fewer "
                                f"{kind.fewer} or fewer --workers")
        time.sleep(0.2)


def _one_line(e: BaseException, kind: _Kind = _SUPERNET) -> BaseException:
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
    return RayTrainError(f"{kind.what} on Ray Train failed{who}: {type(err).__name__}: {text}")


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
    cfg = config or TrainConfig()
    kwargs = {"config": cfg, "out": None if out is None else str(Path(out).resolve()), "ckpt_every": ckpt_every,
              "max_steps": max_steps, "meta": meta, "total_steps": total_steps, "max_seconds": max_seconds}
    conf = {"frame": frame, "epochs": epochs, "kwargs": kwargs}
    got = _fit(_loop, conf, data, num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker,
               threads=threads, storage_path=storage_path, kind=_SUPERNET)
    net = Supernet(frame, seed=cfg.seed)
    net.load_state_dict(got["model"])
    net.train_state = TrainState(**got["train_state"])  # type: ignore[attr-defined]
    return net


def _fit(loop: Callable[[dict[str, Any]], None], conf: dict[str, Any], data: Any, *, num_workers: int, use_gpu: bool,
         resources_per_worker: dict[str, float] | None, threads: int, storage_path: str | Path | None, kind: _Kind,
         answer: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run ``loop(conf)`` on ``num_workers`` Ray Train workers (``conf`` gains ``data``, ``threads``,
    ``use_gpu`` and ``relay``) and return rank 0's result (``{"model": state dict, "train_state": dict}``).
    Checks the arguments and the resources first, starts a private local Ray when none is running,
    and turns any failure into one line (:func:`_one_line`). With ``answer``, ``conf["relay"]`` is a
    :class:`_Relay` whose questions ``answer`` serves in a thread of this process while the run lasts;
    an exception of ``answer`` is raised here as itself."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise SupernetError(f"{kind.whose} workers must be a positive integer, got {num_workers!r}")
    if not ray.is_initialized():
        from workers.ray_pool import init_ray

        init_ray(num_cpus=num_workers)
    per_worker = dict(resources_per_worker or {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})})
    _check_resources(num_workers, per_worker, kind)
    relay = None if answer is None else _Relay()  # after init_ray: a queue would start a default Ray
    # in-memory data: only its tensors; streaming data (no tensor x) travels as itself, a path and
    # index arrays, and each rank decodes only its shard of each global batch
    shipped = _Data(data.x, data.y) if isinstance(getattr(data, "x", None), Tensor) else data
    conf = {**conf, "data": shipped, "threads": threads, "use_gpu": use_gpu, "relay": relay}
    own = storage_path is None
    storage = Path(storage_path or tempfile.mkdtemp(prefix="nas-raytrain-")).resolve()
    trainer = TorchTrainer(
        loop, train_loop_config=conf,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=kind.what.split()[0], storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=0)),
    )
    done = threading.Event()
    failed: list[Exception] = []
    server = None
    if relay is not None and answer is not None:  # fit() stays in this thread (Ray may want the main one)
        server = threading.Thread(target=relay.serve, args=(answer, done, failed), name="raytrain-relay", daemon=True)
        server.start()
    try:
        try:
            result = trainer.fit()
        except Exception as e:  # a worker raised, or Ray Train itself failed
            if failed:
                raise failed[0] from None
            raise _one_line(e, kind) from None
        finally:
            done.set()
            if server is not None:
                server.join()
            if relay is not None:
                relay.close()
        if failed:
            raise failed[0]
        if result.checkpoint is None:
            raise RayTrainError(f"{kind.what} on Ray Train ended without rank 0's result")
        with result.checkpoint.as_directory() as d:
            return torch.load(Path(d) / _RESULT, map_location="cpu", weights_only=False)
    finally:
        if own:
            shutil.rmtree(storage, ignore_errors=True)


def train_standalone_ray(
    spec: ArchSpec,
    data: Any,
    epochs: int,
    *,
    config: TrainConfig | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
    num_workers: int = 2,
    use_gpu: bool | None = None,
    device: str | torch.device = "cpu",
    resources_per_worker: dict[str, float] | None = None,
    threads: int = 1,
    on_epoch: Callable[[int, nn.Module], bool | None] | None = None,
    before_step: Callable[[int, float], bool] | None = None,
    storage_path: str | Path | None = None,
) -> nn.Module:
    """``train_standalone(spec, data, epochs, ...)`` on ``num_workers`` Ray Train workers (DDP).

    ``config``, ``num_classes``, ``seed`` are ``train_standalone``'s (``config.batch_size`` is the
    global batch, split over the workers). ``use_gpu``: one GPU per worker and NCCL, else CPU and
    gloo (None: whether ``device`` is a CUDA device). ``device``: where the model that ``on_epoch``
    receives lives in this process. ``resources_per_worker``, ``threads``, ``storage_path``: as in
    :func:`train_supernet_ray`.

    ``on_epoch(epoch, model)`` and ``before_step(step, step_seconds)`` run here, in the calling
    process (rank 0 sends each question, with its weights after an epoch, and waits): their answer
    stops every rank at the same step, as in one process. ``before_step`` costs a round trip to this
    process per step (milliseconds). Returns the model on the CPU, rank 0's weights, with its
    ``train_state``."""
    from predictors.supernet import _check_data, standalone_model

    _check_data(data, "training")  # a SupernetError here, before any worker starts
    cfg = config or TrainConfig()
    gpu = torch.device(device).type == "cuda" if use_gpu is None else use_gpu
    init_seed = cfg.seed if seed is None else seed

    def model_on(dev: str | torch.device) -> nn.Module:
        return standalone_model(spec, data, num_classes, init_seed).to(dev)

    probe: list[nn.Module] = []  # the model on_epoch sees, built at the first epoch's end

    def answer(kind: str, *args: Any) -> bool:
        if kind == "step":
            return bool(before_step(*args)) if before_step is not None else False
        epoch, state = args
        if not probe:
            probe.append(model_on(device))
        probe[0].load_state_dict(state)
        return bool(on_epoch(epoch, probe[0].eval())) if on_epoch is not None else False

    conf = {"spec": spec, "epochs": epochs, "on_epoch": on_epoch is not None, "before_step": before_step is not None,
            "kwargs": {"config": cfg, "num_classes": num_classes, "seed": init_seed}}
    got = _fit(_standalone_loop, conf, data, num_workers=num_workers, use_gpu=gpu,
               resources_per_worker=resources_per_worker, threads=threads, storage_path=storage_path,
               kind=_STANDALONE, answer=None if on_epoch is None and before_step is None else answer)
    model = model_on("cpu")
    model.load_state_dict(got["model"])
    model.train_state = TrainState(**got["train_state"])  # type: ignore[assignment]
    return model.eval()
