"""What the driver asks a worker to do, and what comes back: typed, frozen, JSON-native.

A :class:`TrialRequest` is one unit of work on one worker: the stages to evaluate for each of its
candidates (one candidate, or a batch of screening candidates that share the orchestration
cost), or the training of the study's supernet (:class:`SupernetJob`). Each candidate carries its
own idempotency key, so a batch is recorded candidate by candidate, each with its own seconds.

:func:`run_request` executes a request in the calling process; the Ray trainable and the
in-process executor both call it, so the plan runs the same with or without Ray.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from workers.evaluate import EvalConfig, EvalData, evaluate, fingerprint, stage_devices

__all__ = [
    "FINISH",
    "LAUNCH",
    "WAIT",
    "Asha",
    "Candidate",
    "CandidateResult",
    "Plan",
    "SupernetJob",
    "TrialError",
    "TrialRequest",
    "TrialResult",
    "run_request",
]


#: what a plan answers an executor before each launch, besides a request to run
LAUNCH, WAIT, FINISH = "launch", "wait", "finish"


@dataclass(frozen=True)
class Candidate:
    """One architecture in a request: its evaluation's key in the store, spec and Optuna trial."""

    key: str
    spec: str
    spec_hash: str
    number: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str):
            raise TypeError(f"candidate {self.key!r}: spec must be JSON text, got {type(self.spec).__name__}")


@dataclass(frozen=True)
class SupernetJob:
    """Train (or continue training) the study's supernet over ``frame`` into ``out``; the recipe
    is :func:`predictors.supernet.train_within`. ``counted``: training seconds already recorded.
    Seconds here, and a request's allowance, are device-seconds: on ``workers`` = N Ray Train
    workers (one device each) a wall-clock second is N of them (``run_request`` converts both ways;
    the checkpoint keeps wall-clock seconds)."""

    frame: str
    out: str
    epochs: int | None = None
    max_epochs: int = 30
    plan_seconds: float | None = None
    counted: float = 0.0
    seed: int = 0
    workers: int = 1  # > 1: trained by that many Ray Train workers (workers.ray_train), else in this process


@dataclass(frozen=True)
class TrialRequest:
    """One trial: ``stages`` evaluated in order for every candidate, or a supernet training.

    ``allowance`` bounds a training stage in device-seconds (checked at every step), less
    ``reserve`` for the stages after it; ``asha`` lets a scheduler stop the training between
    epochs; ``fault`` injects a failure in the first attempt (chaos tests: ``raise`` or ``kill``,
    with a marker file that makes the retry succeed)."""

    key: str
    stage: str
    stages: tuple[str, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    supernet: SupernetJob | None = None
    device: str = "cpu"
    eval: EvalConfig = field(default_factory=EvalConfig)
    allowance: float | None = None
    reserve: float = 0.0
    asha: bool = False
    fault: tuple[str, str] | None = None  # (kind, marker path)
    ordinal: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if (self.supernet is None) == (not self.candidates):
            raise ValueError(f"request {self.key!r} needs candidates or a supernet job, not both or neither")
        if self.candidates and not self.stages:
            raise ValueError(f"request {self.key!r} has candidates but no stages to evaluate")

    @property
    def devices(self) -> int:
        """Devices the trial holds while it runs: its wall-clock second is that many device-seconds."""
        return stage_devices(self.stage, self.supernet.workers if self.supernet else 1, self.eval.train_workers)

    @property
    def candidate(self) -> Candidate | None:
        """The request's only candidate (None for a batch or a supernet job)."""
        return self.candidates[0] if len(self.candidates) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval"] = self.eval.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRequest:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in names}
        d["eval"] = EvalConfig.from_dict(d.get("eval") or {})
        d["candidates"] = tuple(Candidate(**c) for c in d.get("candidates") or ())
        d["supernet"] = SupernetJob(**d["supernet"]) if d.get("supernet") else None
        d["fault"] = tuple(d["fault"]) if d.get("fault") else None
        return cls(**d)


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's evaluation as recorded: the first stage's, with the later stages' metrics
    and seconds merged in (``stage`` is the first). ``evaluation`` is an Evaluation dict."""

    candidate: Candidate | None
    evaluation: dict[str, Any]


@dataclass
class TrialResult:
    """A finished trial: one result per candidate (or the supernet training's), in order.
    ``stopped_early``: a scheduler ended its training between epochs."""

    request: TrialRequest
    results: list[CandidateResult]
    stopped_early: bool = False
    attempt: int = 0  # failed attempts before this one


@dataclass
class TrialError:
    """A failed attempt: its traceback, the driver-measured (wall-clock) seconds, and whether it will
    be retried."""

    request: TrialRequest
    error: str
    seconds: float
    attempt: int
    final: bool

    @property
    def device_seconds(self) -> float:
        """What the attempt cost the budget: its seconds on each device it held."""
        return self.seconds * self.request.devices


class Asha:
    """Asynchronous successive halving (ASHA; Li et al., "A System for Massively Parallel
    Hyperparameter Tuning", MLSys 2020): rungs at epochs 1, 2, 4, ... below ``max_t``; a training
    that reaches a rung below the top ``1/eta`` of the accuracies recorded there so far stops.
    The last rung is never cut (a training that reaches ``max_t`` epochs finishes)."""

    def __init__(self, max_t: int, grace: int = 1, eta: int = 2) -> None:
        self.eta = eta
        self.rungs: dict[int, dict[str, float]] = {}
        r = grace
        while r < max_t:
            self.rungs[r] = {}
            r *= eta

    def report(self, key: str, epoch: int, accuracy: float) -> bool:
        """True: stop this training now."""
        rung = self.rungs.get(epoch)
        if rung is None or key in rung:
            return False
        stop = bool(rung) and self.below(rung, key, accuracy)
        rung[key] = accuracy
        return stop

    def below(self, before: dict[str, float], key: str, accuracy: float) -> bool:
        """True: ``key``'s ``accuracy`` falls below the top ``1/eta`` of ``before``, what the rung
        recorded until it came."""
        done = sorted(before.values(), reverse=True)
        # the (1 - 1/eta) quantile of what the rung recorded before (linear interpolation)
        q = (1 - 1 / self.eta) * (len(done) - 1)
        lo, hi = math.floor(q), math.ceil(q)
        asc = done[::-1]
        cutoff = asc[lo] + (asc[hi] - asc[lo]) * (q - lo)
        return accuracy < cutoff


class Plan(Protocol):
    """The driver's side of a search: ``next`` is asked before every launch and returns the request
    to run, WAIT (ask again when a trial ends) or FINISH; every attempt comes back through
    ``started`` / ``finished`` / ``failed`` (which record it)."""

    def next(self, running: int) -> TrialRequest | str: ...

    def started(self, request: TrialRequest, attempt: int) -> None: ...

    def finished(self, result: TrialResult) -> None: ...

    def failed(self, error: TrialError) -> None: ...


def merge(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """A candidate's evaluations of several stages as one row: the first stage's, later metrics
    added (the first's win on a clash), seconds summed."""
    ev = dict(evals[0])
    for extra in evals[1:]:
        ev["metrics"] = {**extra["metrics"], **ev["metrics"]}
        ev["seconds"] += extra["seconds"]
        ev["flops"] = ev.get("flops") or extra.get("flops")
    return ev


def _fault(req: TrialRequest) -> None:
    """Chaos testing: fail the first attempt of this trial (the marker file makes the retry pass)."""
    if req.fault is None:
        return
    kind, marker_path = req.fault
    marker = Path(marker_path)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure in trial {req.ordinal}")


Report = Callable[[dict[str, Any]], bool | None]


def _ray_trainer(req: TrialRequest) -> Callable[..., Any]:
    """``train_supernet``'s stand-in that trains on ``req.supernet.workers`` Ray Train workers (one
    GPU each on a CUDA device, else one CPU each), ``req.eval.threads`` torch threads each."""
    from predictors.latency import parse_device
    from workers.ray_train import train_supernet_ray

    assert req.supernet is not None
    workers, gpu, threads = req.supernet.workers, parse_device(req.device).type == "cuda", req.eval.threads

    def trainer(frame: Any, data: Any, epochs: int, *, device: Any = None, **kw: Any) -> Any:
        return train_supernet_ray(frame, data, epochs, num_workers=workers, use_gpu=gpu, threads=threads, **kw)

    return trainer


def run_request(req: TrialRequest, data: EvalData, report: Report | None = None) -> TrialResult:
    """Execute ``req`` here. ``report(metrics)`` receives the per-epoch reports of a training
    stage (``asha_epoch`` when the request allows a scheduler to stop it); when it returns True
    the training stops there and the candidate's result is what it trained so far."""
    import torch

    from search_spaces import spec_from_json
    from search_spaces._runtime import retain_freed_memory

    torch.set_num_threads(req.eval.threads)
    retain_freed_memory()  # see search_spaces/_runtime.py
    _fault(req)
    if req.supernet is not None:
        from predictors.latency import parse_device
        from predictors.supernet import train_within

        job, n = req.supernet, max(1, req.supernet.workers)
        if n > 1:  # N devices: the budget's device-seconds are N wall-clock seconds each, in and out
            job = replace(job, counted=job.counted / n,
                          plan_seconds=None if job.plan_seconds is None else job.plan_seconds / n)
        ev = train_within(job, data, device=req.device, allowance=None if req.allowance is None else req.allowance / n,
                          trainer=_ray_trainer(req) if n > 1 else None)
        if n > 1:
            ev["seconds"] *= n
            ev["metrics"]["train_seconds"] *= n
            if req.allowance is not None:
                ev["metrics"]["allowance"] = float(req.allowance)
        ev["device"] = fingerprint(str(parse_device(req.device)), req.eval.threads)
        return TrialResult(req, [CandidateResult(None, ev)])
    from predictors.latency import parse_device

    device = fingerprint(str(parse_device(req.device)), req.eval.threads)
    out: list[CandidateResult] = []
    for cand in req.candidates:
        spec = spec_from_json(cand.spec, req.eval.space)
        evals: list[dict[str, Any]] = []
        used = [0.0]  # seconds of this candidate's earlier stages

        def epoch_report(epoch: int, m: dict[str, float], evals: list[dict[str, Any]] = evals,
                         used: list[float] = used) -> bool:
            if report is None:
                return False
            extra = {"asha_epoch": epoch} if req.asha else {}
            return bool(report({**m, **extra, "seconds": used[0] + m["seconds"], "evaluations": json.dumps(evals),
                                "device": json.dumps(device), "final": False}))

        for stage in req.stages:
            left = None if req.allowance is None else float(req.allowance) - used[0] - float(req.reserve)
            ev = evaluate(spec, stage, data, req.device, config=req.eval,
                          report=epoch_report if stage == "train" else None,
                          allowance=left if stage == "train" else None)
            used[0] += ev.seconds
            evals.append(ev.to_dict())
            if left is not None and stage == "train":  # what it was allowed, next to what it used
                evals[-1]["metrics"]["allowance"] = float(left)
        out.append(CandidateResult(cand, merge(evals)))
    return TrialResult(req, out)
