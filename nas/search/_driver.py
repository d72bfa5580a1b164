"""The search driver: budget accounting, the cost model, gates, recording, and ``run_study``.

The candidates of the later stages (``_candidates``, ``_screen_front``), the front (``_front``) and
recovery after a dead driver (``_recover_inflight``, ``_recover_optuna``) live here too; the
strategies, stages and plan are :mod:`nas.search.strategy`, :mod:`~nas.search.stages` and
:mod:`~nas.search.plan`.
"""

from __future__ import annotations

import _thread
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.budget import Budget
from nas.search.config import (
    OBJECTIVES,
    SearchConfig,
    SearchError,
    StudyLost,
    check_gpu_pool,
    check_target,
    ddp_workers,
    load_data,
    trial_resources,
)
from nas.store import HEARTBEAT_S, Store, StoreError, StoreLost
from workers.request import FINISH, LAUNCH, WAIT, TrialError, TrialRequest, TrialResult, stage_devices

# --------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    seconds: dict[str, float] = field(default_factory=dict)
    trials: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)  # the last trials' seconds, per stage

    def mean(self, stage: str, default: float = 1.0) -> float:
        n = self.trials.get(stage, 0)
        return self.seconds.get(stage, 0.0) / n if n else default

    def high(self, stage: str) -> float | None:
        """The slowest of the stage's last 8 trials (None before one has finished)."""
        xs = self.samples.get(stage)
        return max(xs[-8:]) if xs else None


TRAIN_BATCH = 64  # EvalConfig.train_batch and proxy_batch: the screening probe's batch is a training batch


class _CostModel:
    """What a trial will cost, in device-seconds, before it runs.

    The unit is the seconds of one forward/backward of an architecture on a training batch: the
    driver probes the frame's largest architecture once at the start (``probe_s``), and screening
    measures each candidate's own (``probe_step_s``). A stage's cost is that unit times the stage's
    work: training ``epochs x steps`` plus a validation pass per epoch; a supernet evaluation a
    forward pass over the calibration and validation images; a careful latency its repeats of the
    screening latency. Training is calibrated by the ratio of measured to modelled seconds of the
    study's finished training trials; the other stages, once a trial of theirs finished, cost the
    slowest of their last 8 trials."""

    def __init__(self) -> None:
        self.probe_s = 0.05
        self.n_train = 1000
        self.n_val = 250
        self.step: dict[str, float] = {}  # per architecture: probe_step_s from screening
        self.latency_ms: dict[str, float] = {}  # per architecture: the screening latency
        self.ratios: list[float] = []  # measured / modelled seconds of finished training trials
        self.stage_ratios: dict[str, list[float]] = {}  # the same for supernet evaluation and latency
        self.screen_ratios: list[float] = []  # measured / modelled seconds of screening trials

    def load(self) -> float:
        """How much slower than modelled this machine runs trials now (at least 1): the median
        measured/modelled ratio of screening. A stage's first trial is costed at its model times
        this, so a loaded machine's first latency or supernet trial is not costed at quiet speed."""
        xs = sorted(self.screen_ratios[-16:])
        return min(50.0, max(1.0, xs[len(xs) // 2])) if xs else 1.0

    def unit(self, arch: str | None) -> float:
        return self.step.get(arch or "", self.probe_s)

    def train(self, arch: str | None, epochs: float, calibrated: bool = True) -> float:
        step = self.unit(arch)
        spe = max(1, self.n_train // TRAIN_BATCH)
        per_epoch = spe * 1.5 * step + 0.5 * step * math.ceil(self.n_val / TRAIN_BATCH)
        model = 0.3 + epochs * per_epoch
        if not calibrated:
            return model
        return model * (max(self.ratios[-5:]) if self.ratios else self.load())

    def prior(self, stage: str, arch: str | None) -> float:
        """A stage's cost before any trial of it finished."""
        step = self.unit(arch)
        if stage == "screen":  # proxies (about 4 passes), the probe step, a quick latency
            return 0.5 + 6.0 * self.probe_s
        if stage == "supernet":  # extract, BN calibration (8 x 128 images), one validation pass
            return 0.5 + 0.5 * step * math.ceil((self.n_val + 1024) / TRAIN_BATCH)
        if stage == "latency":  # 50 repeats and 10 warm-up runs at batch 1
            return 0.3 + 1.5 * 60 * self.latency_ms.get(arch or "", 1000 * step) / 1000
        if stage == "supernet_train":  # a few steps of 4 subnets each, at least
            return 4 * 4 * 1.5 * self.probe_s
        return 0.0

    def learn(self, stage: str, arch: str | None, seconds: float, metrics: dict[str, float]) -> None:
        """What a finished evaluation tells the model: a candidate's unit, or a training ratio."""
        if stage == "screen" and seconds > 0:
            self.screen_ratios.append(seconds / self.prior("screen", arch))
        if stage == "screen" and arch:
            if metrics.get("probe_step_s", 0.0) > 0:
                self.step[arch] = float(metrics["probe_step_s"])
            if "latency_ms" in metrics:
                self.latency_ms[arch] = float(metrics["latency_ms"])
        elif stage == "train" and metrics.get("epochs", 0.0) > 0 and seconds > 0:
            self.ratios.append(seconds / self.train(arch, float(metrics["epochs"]), calibrated=False))
        elif stage in ("supernet", "latency") and arch and seconds > 0:
            self.stage_ratios.setdefault(stage, []).append(seconds / self.prior(stage, arch))

    def calibrated(self, stage: str, arch: str | None) -> float | None:
        """A supernet evaluation or latency trial of ``arch``: its modelled cost times the largest
        measured/modelled ratio of the stage's last 8 trials (candidates differ in size)."""
        xs = self.stage_ratios.get(stage)
        return self.prior(stage, arch) * max(xs[-8:]) if xs and arch else None


def _probe_seconds(frame: Any, data: Any, threads: int) -> float:
    """Seconds of one forward/backward of the frame's largest architecture on a training batch
    (after one untimed pass): the driver's cost unit before screening measured any candidate."""
    import random

    import torch
    import torch.nn.functional as F

    from search_spaces.hybrid_vit import build
    from workers.evaluate import head

    spec = frame.largest(random.Random(0))
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        model = build(spec, num_classes=frame.num_classes, img_size=frame.img_size, in_chans=frame.in_chans).train()
        x, y = head(data.train, TRAIN_BATCH)  # in memory or streaming: the first images either way
        seconds = math.inf
        for _ in range(2):
            t = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            seconds = time.perf_counter() - t
            model.zero_grad(set_to_none=True)
        return seconds
    finally:
        torch.set_num_threads(prev)


class Driver:
    """Runs one study's stages against the store; one live driver per study (a lease in the store)."""

    def __init__(self, store: Store, name: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
                 chaos: dict[int, str] | None = None) -> None:
        self.store = store
        self.name = name
        info = store.study(name)
        self.cfg = SearchConfig.from_dict(info.config)
        self.conf = dict(info.config)
        self.budget = Budget.from_dict(info.budget)
        self.workdir = Path(self.conf["workdir"])
        self.progress = progress or (lambda _: None)
        self.chaos = chaos or {}
        self.stats = _Stats()
        self.used_seconds = info.used_seconds
        self.trials_done = info.trials_done
        self._stop_checked = 0.0
        self._stop = False
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.lost: str | None = None  # why results can no longer be kept (the store went away, the lease was taken)
        self._beating = threading.Event()
        self._beater: threading.Thread | None = None
        self.best: float | None = None
        self.errors = 0
        self._ordinal = 0
        self.cost = _CostModel()
        self._simulated: dict[str, float] = {}  # a benchmark's training cost per architecture
        self.reserved: dict[str, tuple[str, float]] = {}  # running trials: key -> (stage, seconds reserved)
        for ev in store.evaluations(name, errors=False):
            self._account(ev.stage, ev.seconds, ev.metrics)
            self.stats.samples.setdefault(ev.stage, []).append(ev.seconds)  # the cost model replays them in calibrate()

    # ---- budget ------------------------------------------------------------------------

    def _used(self) -> float:
        return float(self.trials_done) if self.budget.kind == "trials" else self.used_seconds

    def _total(self) -> float:
        return float(self.budget.trials if self.budget.kind == "trials" else self.budget.seconds)  # type: ignore[arg-type]

    def stage_used(self, stage: str) -> float:
        """What ``stage`` used so far (the supernet stage includes training the supernet)."""
        parts = ("supernet", "supernet_train") if stage == "supernet" else (stage,)
        if self.budget.kind == "trials":
            return float(sum(self.stats.trials.get(p, 0) for p in parts))
        return sum(self.stats.seconds.get(p, 0.0) for p in parts)

    def limit(self, stage: str, order: list[str]) -> float:
        """What ``stage`` may use: its cumulative share minus what the stages before it used."""
        i = order.index(stage)
        shares = self._shares(order)
        cum = sum(shares[s] for s in order[: i + 1]) * self._total()
        before = sum(self.stage_used(s) for s in order[:i])
        return cum - before

    def _shares(self, order: list[str]) -> dict[str, float]:
        sh = {s: self.cfg.shares.get(s, 0.0) for s in order}
        t = sum(sh.values()) or 1.0
        return {s: v / t for s, v in sh.items()}

    def stop_requested(self) -> bool:
        """A stop was asked for (``nas stop``, Ctrl-C, SIGTERM), or results can no longer be kept."""
        now = time.monotonic()
        if now - self._stop_checked > 0.5 and self.lost is None:
            self._stop_checked = now
            try:
                self._stop = self._stop or self.store.stop_requested(self.name)
            except StoreError as e:  # the study row (or its database) is gone
                self._lose(str(e))
        return self._stop or self.lost is not None

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why

    # ---- the lease's heartbeat ------------------------------------------------------------

    def start_heartbeat(self, every: float | None = None) -> None:
        """Beat the driver lease every ``every`` seconds (default ``$NAS_HEARTBEAT_S`` or
        ``HEARTBEAT_S``) from a thread of its own, so a stage that blocks (supernet training, a long
        trial) never lets the lease go stale. Only when this process holds the lease; if another
        driver has taken it, or the store is gone, the study stops (``lost``)."""
        if every is None:
            every = float(os.environ.get("NAS_HEARTBEAT_S") or HEARTBEAT_S)
        info = self.store.study(self.name)
        if (info.driver_pid, info.driver_host) != (self.pid, self.host) or self._beater is not None:
            return

        def beat() -> None:
            while not self._beating.wait(every):
                try:
                    if not self.store.heartbeat(self.name, self.pid, self.host):
                        self._lose(f"another driver took over study {self.name!r}; this one stops")
                        return
                except StoreLost as e:
                    self._lose(str(e))
                    return
                except Exception:  # the database did not answer this time: beat again next round
                    continue

        self._beater = threading.Thread(target=beat, name=f"nas-heartbeat-{self.name}", daemon=True)
        self._beater.start()

    def stop_heartbeat(self) -> None:
        self._beating.set()
        if self._beater is not None:
            self._beater.join(timeout=30)
            self._beater = None

    def exhausted(self) -> bool:
        return self._used() >= self._total() * (1 - 1e-9)

    # ---- costs and allowances -----------------------------------------------------------

    def calibrate(self, frame: Any, data: Any) -> None:
        """Size the cost model to this study's data and frame (one probe step in the driver)."""
        cost = self.cost = _CostModel()
        cost.n_train, cost.n_val = len(data.train), len(data.val)
        if not self.cfg.benchmark:  # a benchmark's trainings cost what workers.benchmark simulates
            cost.probe_s = _probe_seconds(frame, data, self.cfg.threads)
        for ev in self.store.evaluations(self.name, errors=False):  # a resumed study: what it measured
            cost.learn(ev.stage, ev.arch_hash, ev.seconds, ev.metrics)

    def _learn(self, stage: str, arch: str | None, seconds: float, metrics: dict[str, float]) -> None:
        """A finished trial: its seconds for the stage's high quantile, and what it tells the cost model."""
        self.stats.samples.setdefault(stage, []).append(seconds)
        self.cost.learn(stage, arch, seconds, metrics)

    def estimate(self, stage: str, arch: str | None = None) -> float:
        """The cost of the next trial (one candidate) of ``stage`` (``arch``: its candidate, when
        known): one trial on a trial budget; for training the calibrated cost model of the
        candidate; for the other stages the slowest of their last trials, or the model before any
        finished."""
        if self.budget.kind == "trials":
            return 1.0
        if self.cfg.benchmark and stage in ("train", "latency"):
            return self.simulated(arch) if stage == "train" else 0.0
        if stage == "supernet_train":  # launched for a few steps at least; its allowance bounds the rest
            return self.cost.prior(stage, arch)
        if stage == "train":
            est = self.cost.train(arch, float(self.cfg.train_epochs))
            if self.cfg.strategy != "staged":  # the baselines measure latency in the same trial
                est += self.estimate("latency", arch)
            return est
        high = self.stats.high(stage)
        if high is None:
            return self.cost.prior(stage, arch) * (1.0 if stage == "screen" else self.cost.load())
        scaled = self.cost.calibrated(stage, arch)
        return high if scaled is None else scaled

    def simulated(self, arch: str | None) -> float:
        """A benchmark training's cost, known before it runs (``workers.benchmark``): the mean
        training's for an architecture not yet known."""
        from search_spaces.nb201 import NB201Spec

        if arch and arch not in self._simulated:  # a candidate that was not noted (a resumed study's)
            spec = (self.store.architecture(arch) or {}).get("spec")
            if spec is not None:
                self.note(NB201Spec.from_dict(json.loads(spec) if isinstance(spec, str) else spec))
        return self._simulated.get(arch or "", float(self.cfg.benchmark_train_s))

    def note(self, spec: Any) -> None:
        """A sampled benchmark candidate: its training's simulated cost, for ``simulated``."""
        if self.cfg.benchmark and spec.hash not in self._simulated:
            from workers.benchmark import simulated_train_seconds

            self._simulated[spec.hash] = simulated_train_seconds(spec, float(self.cfg.benchmark_train_s))

    def left(self) -> float:
        """What the budget still holds, less what the running trials have reserved."""
        return self._total() - self._used() - sum(v for _, v in self.reserved.values())

    def reserved_in(self, stage: str) -> float:
        return sum(v for s, v in self.reserved.values() if s == stage)

    def reserve(self, key: str, stage: str, seconds: float) -> None:
        """A launched trial holds ``seconds`` of the budget until it is recorded."""
        self.reserved[key] = (stage, max(0.0, float(seconds)))

    def release(self, key: str | None) -> None:
        self.reserved.pop(key or "", None)

    def allowance(self, stage: str, estimate: float, stage_left: float | None = None) -> float:
        """The device-seconds a training trial launched now may use: what is left after the running
        trials' reservations (and ``stage_left``), at most 1.5x its estimate so that another worker
        can start beside it."""
        out = min(self.left(), 1.5 * estimate if stage == "train" else math.inf)
        return max(0.0, out if stage_left is None else min(out, stage_left))

    # ---- recording ---------------------------------------------------------------------

    def _counts(self, device: dict[str, Any] | None) -> bool:
        kind = (device or {}).get("kind") or self.cfg.target
        return self.budget.counts(kind)

    def record_result(self, result: TrialResult) -> None:
        """A finished trial, in one transaction with the in-flight note it ends: one row per
        candidate (its stages merged into one, with its own key and seconds), or the supernet
        training's. Its reservation is released."""
        req = result.request
        self.release(req.key)
        rows: list[dict[str, Any]] = []
        archs: list[dict[str, Any]] = []
        learned: list[tuple[str, str | None, float, dict[str, float]]] = []
        try:
            for r in result.results:
                ev = r.evaluation
                cand = r.candidate
                arch = ev.get("spec_hash")
                if arch and cand is not None:  # its params and flops, now known
                    archs.append(dict(spec_hash=arch, space=self.cfg.space, spec_json=cand.spec,
                                      params=ev.get("params"), flops=ev.get("flops")))
                key = f"{cand.key if cand is not None else req.key}:{ev['stage']}"
                rows.append(dict(stage=ev["stage"], metrics=ev.get("metrics", {}),
                                 seconds=float(ev.get("seconds", 0.0)), arch_hash=arch,
                                 device=ev.get("device") or None,
                                 trial=cand.number if cand is not None else None, key=key,
                                 count_seconds=self._counts(ev.get("device")), attempt=result.attempt))
                learned.append((ev["stage"], arch, float(ev.get("seconds", 0.0)), ev.get("metrics", {})))
            self.store.record_evaluations(self.name, rows, inflight=req.key, architectures=archs)
        except StoreLost as e:  # nothing more can be kept: the plan finishes, run_study reports it
            self._lose(str(e))
            return
        for row, (stage, arch, seconds, metrics) in zip(rows, learned):
            if row["count_seconds"]:
                self.used_seconds += seconds
            self.trials_done += 1
            self._account(stage, seconds, metrics)
            self._learn(stage, arch, seconds, metrics)
            self.tick(stage)

    def _account(self, stage: str, seconds: float, metrics: dict[str, float]) -> None:
        """Per-stage seconds and counts, and the best accuracy so far, for one successful evaluation."""
        self.stats.seconds[stage] = self.stats.seconds.get(stage, 0.0) + seconds
        self.stats.trials[stage] = self.stats.trials.get(stage, 0) + 1
        acc = metrics.get("accuracy")
        if acc is not None and stage in ("train", "supernet"):
            self.best = acc if self.best is None else max(self.best, acc)

    def _guard(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """A store write whose failure because the store is gone stops the study instead of Tune."""
        try:
            fn(*args, **kw)
        except StoreLost as e:
            self._lose(str(e))

    def started(self, req: TrialRequest, attempt: int) -> None:
        """A trial began on a worker: note it in flight, so that if this driver dies before its
        result is recorded, the resume records it as interrupted with the device time it ran
        (a batch is one note: its time is counted once)."""
        one = req.candidate
        archs = [dict(spec_hash=c.spec_hash, space=self.cfg.space, spec_json=c.spec) for c in req.candidates]
        self._guard(self.store.start_inflight, self.name, req.key, stage=req.stage,
                    arch_hash=one.spec_hash if one else None, trial=one.number if one else None, attempt=attempt,
                    architectures=archs)

    def record_error(self, error: TrialError) -> None:
        """A failed attempt: one error row with the seconds it ran (a batch's row has no architecture)."""
        req = error.request
        one = req.candidate
        counts = self._counts(None)
        try:
            row = dict(stage=req.stage, metrics={}, seconds=error.device_seconds,
                       arch_hash=one.spec_hash if one else None, error=error.error,
                       trial=one.number if one else None, attempt=error.attempt,
                       key=f"{req.key}:error:{error.attempt}", count_seconds=counts)
            self.store.record_evaluations(self.name, [row], inflight=req.key, architectures=[
                dict(spec_hash=one.spec_hash, space=self.cfg.space, spec_json=one.spec)] if one else [])
        except StoreLost as e:
            self._lose(str(e))
            return
        if counts:
            self.used_seconds += error.device_seconds
        self.errors += 1
        self.tick(req.stage)

    def tick(self, stage: str) -> None:
        self.progress({"stage": stage, "used": self._used(), "total": self._total(), "kind": self.budget.kind,
                       "simulated": bool(self.cfg.benchmark),
                       "trials": self.trials_done, "best": self.best, "errors": self.errors})

    def mark_done(self, stage: str) -> None:
        prog = dict(self.conf.get("progress") or {})
        prog[stage] = self._total()
        self.conf["progress"] = prog
        self.store.set_config(self.name, self.conf)

    def stage_done(self, stage: str) -> bool:
        return (self.conf.get("progress") or {}).get(stage) == self._total()


class _Gate:
    """Budget gating of one stage: launch while the projected use stays within the stage's limit;
    ``exclusive``: one trial at a time (careful CPU latency: a second trial on a 2-core machine
    slowed a measurement 1.2-1.5x and doubled its spread)."""

    def __init__(self, driver: Driver, stage: str, limit: float, exclusive: bool = False,
                 peek: Callable[[], str | None] = lambda: None) -> None:
        self.d = driver
        self.stage = stage
        self.limit = limit
        self.exclusive = exclusive
        self.peek = peek  # the stage's next candidate (its hash), whose cost decides a launch

    def decide(self, running: int) -> str:
        """LAUNCH only when the next trial's estimated cost (:meth:`Driver.estimate`, known before
        the stage's first trial) fits in what the budget holds beyond the running trials'
        reservations, and half of it in the stage's share; WAIT while trials run, else FINISH."""
        if self.d.stop_requested() or self.d.exhausted():
            return FINISH
        if self.exclusive and running:
            return WAIT
        used = self.d.stage_used(self.stage)
        if self.d.budget.kind == "trials":
            total_left = self.d._total() - self.d._used() - running
            if used + running + 0.5 < self.limit and total_left >= 1:
                return LAUNCH
            return WAIT if running else FINISH
        if running and self.stage not in ("train", "supernet_train") and not self.d.stats.samples.get(self.stage):
            return WAIT  # no allowance bounds this stage: its first trial measures the cost alone
        each = self.d.estimate(self.stage, self.peek())
        if each <= self.d.left() and used + self.d.reserved_in(self.stage) + 0.5 * each < self.limit:
            return LAUNCH
        return WAIT if running else FINISH


def front_rows(points: list[dict[str, Any]], objectives: tuple[str, ...],
               rank_by: str = "accuracy") -> list[dict[str, Any]]:
    """Non-dominated points (each a dict with the objectives' metrics), ranked by accuracy
    (``rank_by="score"``: the screening score stands where accuracy would, for a screening ranking)."""
    from predictors.metrics import pareto_front

    keys = [(rank_by, "max") if o == "accuracy" else OBJECTIVES[o] for o in objectives]
    pts = [p for p in points if all(k in p["metrics"] for k, _ in keys)]
    if not pts:
        return []
    vals = [[p["metrics"][k] for k, _ in keys] for p in pts]
    idx = pareto_front(vals, minimize=[m == "min" for _, m in keys])
    chosen = sorted((pts[i] for i in idx), key=lambda p: -p["metrics"][rank_by])
    return [{**p, "rank": r} for r, p in enumerate(chosen)]


def _nd_order(points: list[tuple[str, list[float]]], minimize: list[bool]) -> list[str]:
    """Hashes in non-dominated-sorting order (front 0 first, then front 1, ...)."""
    from predictors.metrics import pareto_front

    left = list(points)
    out: list[str] = []
    while left:
        idx = pareto_front([v for _, v in left], minimize=minimize, keep_duplicates=True)
        keep = set(int(i) for i in idx)
        front = [left[i] for i in sorted(keep, key=lambda i: [(-v if not m else v) for v, m in
                                                                  zip(left[i][1], minimize)])]
        out += [h for h, _ in front]
        left = [p for i, p in enumerate(left) if i not in keep]
    return out


EXECUTORS = ("ray", "local")

#: the zero-cost proxies a benchmark search screens with: the two best on NB201 in bench/nb201_ranking.py
#: (Kendall tau 0.60 and 0.59), at about 1.4 forward/backward passes together
BENCHMARK_PROXIES = ("nwot", "synflow")


def study_frame(conf: dict[str, Any]) -> Any:
    """The study's search space as stored: a hybrid_vit supernet frame, or the NB201 frame."""
    data = conf["frame_json"]
    if data.get("space") == "nb201":
        from search_spaces.nb201 import NB201Frame

        return NB201Frame.from_dict(data)
    from search_spaces.supernet import SupernetFrame

    return SupernetFrame.from_dict(data)


def run_study(store: Store, name: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
              chaos: dict[int, str] | None = None, executor: str = "ray") -> list[dict[str, Any]]:
    """Run (or continue) study ``name`` until its budget is spent or a stop is requested.

    ``executor``: ``ray`` (Ray Tune workers, the default) or ``local`` (one trial at a time in this
    process, no Ray: the same plan, for tests and small searches). Returns the Pareto front (also
    stored). The caller holds the driver lease."""
    if executor not in EXECUTORS:
        raise SearchError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    d = Driver(store, name, progress=progress, chaos=chaos)
    d.start_heartbeat()
    try:
        return _run(d, store, name, executor)
    except StoreLost as e:
        raise StudyLost(str(e)) from None
    except Exception:
        if d.lost is None:  # Tune wraps what failed inside it: was it the store going away?
            try:
                store.check()
            except StoreLost as e:
                d._lose(str(e))
        if d.lost is not None:
            raise StudyLost(d.lost) from None
        raise
    finally:
        d.stop_heartbeat()


def _run(d: Driver, store: Store, name: str, executor: str = "ray") -> list[dict[str, Any]]:
    from nas.search.plan import Plan
    from nas.search.sampling import Sampling, sample_metrics
    from nas.search.stages import SupernetTrain, Train
    from nas.search.strategy import get_strategy
    from workers.evaluate import EvalConfig

    cfg = d.cfg
    strategy = get_strategy(cfg.strategy)
    check_target(cfg.target)
    data = load_data(cfg)
    frame = study_frame(d.conf)
    d.workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(d.workdir / "tune", ignore_errors=True)  # an older version's Ray Tune folder: never read
    eval_cfg = EvalConfig(proxies=BENCHMARK_PROXIES if cfg.benchmark else ("nwot", "synflow", "snip"),
                          score="parzc" if cfg.parzc else cfg.score,
                          parzc=cfg.parzc, train_epochs=cfg.train_epochs, threads=cfg.threads, seed=cfg.seed,
                          supernet=cfg.supernet or str(d.workdir / "supernet"), weights_dir=str(d.workdir / "weights"),
                          space=cfg.space, benchmark=cfg.benchmark, benchmark_column=cfg.benchmark_column,
                          benchmark_latency=cfg.benchmark_latency, device_column=cfg.device_column,
                          benchmark_train_s=float(cfg.benchmark_train_s), proxy_cache=cfg.proxy_cache,
                          train_workers=cfg.train_workers)
    planned = strategy.stages(cfg)
    sampled = planned[0].name
    storage = store.optuna_storage()
    _recover_optuna(store, storage, name, d, sample_metrics(cfg, strategy.screens),
                    _recover_inflight(store, name, d))
    if cfg.supernet and any(isinstance(s, SupernetTrain) for s in planned):
        d.conf["progress"] = {**(d.conf.get("progress") or {}), "supernet_train": -1}
    sampling = Sampling(d, store, frame, strategy, sampled)
    d.calibrate(frame, data)  # the cost model's unit, before any trial runs
    plan = Plan(d, store, frame, strategy, sampling, eval_cfg)
    uses_asha = cfg.early_stop == "asha" and any(isinstance(s, Train) for s in planned)
    if executor == "local":
        from workers.local import run_local

        run_local(plan, data, max_failures=cfg.max_failures, asha_max_t=cfg.train_epochs if uses_asha else None)
    else:
        import ray

        from workers.ray_pool import init_ray, run_trials

        # the supernet's Ray Train workers get CPUs of their own: the trial pool's actors hold theirs while
        # the supernet trains alone (its stage launches one trial, when nothing else runs). Train-stage
        # trials run side by side, each with --train-workers Ray Train workers of its own: CPUs for all of
        # them, which the supernet's (trained alone) can use too
        init_ray(cfg.address, num_cpus=None if cfg.address else max(cfg.workers, 1) + ddp_workers(cfg),
                 temp_dir=None)
        if cfg.target == "cuda":  # before any trial: Ray would wait for missing GPUs for ever
            check_gpu_pool(cfg, ray.cluster_resources().get("GPU", 0.0),
                           f"the Ray cluster at {cfg.address}" if cfg.address else "this machine")
        resources = trial_resources(cfg)
        run_trials(plan, data_ref=ray.put(data), workers=cfg.workers, resources=resources,
                   asha_max_t=cfg.train_epochs if uses_asha else None, max_failures=cfg.max_failures)
    if d.lost is not None:  # never "completed" for results that could not be kept
        raise StudyLost(d.lost)
    stop_reason = "stop requested" if d.stop_requested() else ""
    front = _front(d, store)
    store.set_front(name, front)
    status = "stopped" if stop_reason else "completed"
    store.set_status(name, status, stage=None)
    if d.stop_requested():
        store.clear_stop(name)
    return front


def _recover_inflight(store: Store, name: str, d: Driver) -> set[int]:
    """Trials a dead driver left in flight (any stage): each becomes an ``interrupted`` evaluation
    that counts the device time it ran until the driver's last heartbeat (within HEARTBEAT_S of
    its death), on every device it held. Returns the Optuna trial numbers it covered."""
    covered: set[int] = set()
    for row in store.inflight(name):
        seconds = row["seconds"] * stage_devices(row["stage"], d.cfg.supernet_workers, d.cfg.train_workers)
        counts = d._counts(None)
        store.record_evaluation(
            name, stage=row["stage"], metrics={}, seconds=seconds, arch_hash=row["arch_hash"], trial=row["trial"],
            attempt=row["attempt"], count_seconds=counts, inflight=row["key"],
            key=f"{row['key']}:interrupted:{row['started_at']}",
            error=f"interrupted: the driver stopped while this trial ran ({seconds:.1f} device-s counted); "
                  "it was not finished and may run again")
        if counts:
            d.used_seconds += seconds
        if row["trial"] is not None:
            covered.add(int(row["trial"]))
    return covered


def _recover_optuna(store: Store, storage: Any, name: str, d: Driver, sample_metrics: list[str],
                    covered: frozenset[int] | set[int] = frozenset()) -> None:
    """Optuna trials left RUNNING by a dead driver: completed from the store if their result was
    recorded, otherwise failed and marked interrupted (``_recover_inflight`` recorded the device
    time of those it knew were in flight; the others get an uncounted row)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    recorded = {ev.key: ev for ev in store.evaluations(name)}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        stage = t.user_attrs.get("stage", "screen")
        ev = recorded.get(f"{stage}:{t.number}:{stage}")
        if ev is not None and ev.error is None and all(m in ev.metrics for m in sample_metrics):
            study.tell(t.number, [ev.metrics[m] for m in sample_metrics])
        else:
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            if t.number in covered:  # _recover_inflight recorded it, with its device time
                continue
            h = t.user_attrs.get("spec_hash")
            if h and t.user_attrs.get("spec"):
                store.add_architecture(h, d.cfg.space, t.user_attrs["spec"])
            store.record_evaluation(name, stage=stage, metrics={}, seconds=0.0, arch_hash=h, trial=t.number,
                                    error="interrupted: the driver stopped while this trial ran; it was not "
                                          "counted and its architecture may be sampled again",
                                    key=f"{stage}:{t.number}:interrupted", count_seconds=False)


FIRST_TRAIN = 24  # candidates the planned pass trains (the top of the supernet's order)
REFILL = 8  # candidates a refill round measures and trains


def _candidates(d: Driver, store: Store, stage: str, frame: Any, refill: bool = False) -> list[tuple[str, str]]:
    """The architectures ``stage`` evaluates next, best first, minus those already evaluated
    (``refill``: the next 8 after those, once the planned pass is over: in the supernet's order,
    or once ``guided.GUIDE_AFTER`` candidates are trained, as :func:`nas.search.guided.refill_order`
    picks them)."""
    name = d.name
    cfg = d.cfg
    screened = store.done(name, "screen")
    sup = store.done(name, "supernet")
    lat = store.done(name, "latency")
    already = store.done(name, stage)
    src = sup if sup else screened
    key = "accuracy" if sup else "score"
    train = stage == "train"
    if train and lat:  # train the candidates whose latency was measured carefully
        src = {h: m for h, m in src.items() if h in lat}

    def latency(h: str) -> float:  # the careful measurement when there is one, else the screening one
        return float((lat.get(h) or screened.get(h) or {}).get("latency_ms", math.inf))

    pts = [(h, [m[key], latency(h)]) for h, m in src.items() if key in m]
    ordered = _nd_order(pts, [False, True])
    if not refill:
        ordered = ordered[:FIRST_TRAIN] if train else ordered[: max(8, len(ordered) // 2)]
    if cfg.max_latency_ms is not None:
        ordered = [h for h in ordered if latency(h) <= cfg.max_latency_ms]
    if cfg.max_params is not None:
        ordered = [h for h in ordered if screened.get(h, {}).get("params", 0.0) <= cfg.max_params]
    out = []
    for h in ordered:
        if h in already:
            continue
        arch = store.architecture(h)
        if arch is not None:
            out.append((h, arch["spec"] if isinstance(arch["spec"], str) else json.dumps(arch["spec"])))
    if refill and sup:  # past GUIDE_AFTER trainings, a GP of what trained picks the next ones
        from nas.search.guided import refill_order

        picked = refill_order(d, store, out, sup, screened, latency, REFILL)
        if picked is not None:
            return picked
    return out[:REFILL] if refill else out


class _OneShot(_Gate):
    """Launches exactly one trial (supernet training) if the budget holds a few of its steps; the
    trial's allowance (set at launch by ``SupernetTrain.request``) bounds it at step granularity."""

    def __init__(self, driver: Driver, stage: str, limit: float) -> None:
        super().__init__(driver, stage, limit)
        self.launched = False

    def decide(self, running: int) -> str:
        if running:
            return WAIT
        if self.launched or self.d.stop_requested() or self.d.exhausted() or \
                self.d.estimate(self.stage) > self.d.left():
            return FINISH
        self.launched = True
        return LAUNCH


def _screen_front(d: Driver, store: Store) -> list[tuple[str, str]]:
    """Screened architectures in non-dominated order of (score, latency), not yet ranked by the supernet."""
    screened = store.done(d.name, "screen")
    already = store.done(d.name, "supernet")
    pts = [(h, [m["score"], m.get("latency_ms", 0.0)]) for h, m in screened.items() if "score" in m]
    out = []
    for h in _nd_order(pts, [False, True]):
        if h in already:
            continue
        m = screened[h]
        if d.cfg.max_params is not None and m.get("params", 0.0) > d.cfg.max_params:
            continue
        if d.cfg.max_latency_ms is not None and m.get("latency_ms", 0.0) > d.cfg.max_latency_ms:
            continue
        arch = store.architecture(h)
        if arch is not None:
            out.append((h, arch["spec"] if isinstance(arch["spec"], str) else json.dumps(arch["spec"])))
    return out


def _front(d: Driver, store: Store) -> list[dict[str, Any]]:
    """The study's Pareto front from the best evidence each architecture has: trained accuracy, else
    inherited-weight (supernet) accuracy. When nothing was trained, the rows are the screening
    ranking instead (non-dominated by screening ``score``; ``source`` = ``screen``): a score is
    never stored, shown or ranked as an accuracy."""
    name = d.name
    train = {h: m for h, m in store.done(name, "train").items() if "accuracy" in m}  # a budget stop may have none
    lat = store.done(name, "latency")
    sup = {h: m for h, m in store.done(name, "supernet").items() if "accuracy" in m}
    scr = store.done(name, "screen")
    key = "accuracy"
    if train:  # a benchmark's accuracy was looked up in its table, not trained here: the rows say so
        src, source = train, "benchmark" if any(m.get("benchmark") for m in train.values()) else "train"
    elif sup:
        src, source = sup, "supernet"
    else:
        src, source, key = {h: m for h, m in scr.items() if "score" in m}, "screen", "score"
    points = []
    for h, m in src.items():
        merged = {**scr.get(h, {}), **m}
        if h in lat:
            merged["latency_ms"] = lat[h]["latency_ms"]
        merged[key] = m[key]
        metrics = {k: merged[k] for k in (key, "latency_ms", "params", "flops", "epochs") if k in merged}
        metrics["source"] = source  # type: ignore[assignment]
        points.append({"arch_hash": h, "metrics": metrics})
    if d.cfg.max_params is not None:
        points = [p for p in points if p["metrics"].get("params", 0.0) <= d.cfg.max_params]
    if d.cfg.max_latency_ms is not None:
        points = [p for p in points if p["metrics"].get("latency_ms", math.inf) <= d.cfg.max_latency_ms]
    rows = front_rows(points, d.cfg.objectives, rank_by=key)
    return [{"arch_hash": r["arch_hash"], "rank": r["rank"], "metrics": r["metrics"]} for r in rows]


# --------------------------------------------------------------------------------------------
# signals: SIGINT/SIGTERM ask for a graceful stop
# --------------------------------------------------------------------------------------------


def install_stop_handlers(store: Store, name: str) -> None:
    """Ctrl-C (or SIGTERM) asks the running study to stop gracefully; a second Ctrl-C aborts.

    The handler never touches the database itself: it runs in the main thread between two
    bytecodes, possibly inside a write transaction of that same thread, where a second write waits
    on itself until SQLite's busy timeout (CI met this as an exit 130 on SIGTERM). A thread of its
    own writes the stop request, which the driver reads as for ``nas stop``; if the store cannot
    take it, the main thread is interrupted instead."""
    state = {"n": 0}

    def ask() -> None:
        for attempt in range(5):
            try:
                store.request_stop(name)
                return
            except Exception:
                time.sleep(0.2 * (attempt + 1))
        _thread.interrupt_main()  # the stop cannot be stored: abort as a second Ctrl-C would

    def handler(signum: int, frame: Any) -> None:
        state["n"] += 1
        if state["n"] > 1:
            raise KeyboardInterrupt
        threading.Thread(target=ask, name="nas-stop-request", daemon=True).start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
