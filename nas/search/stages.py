"""The stages a plan walks. Each is one object: its name and budget share, how it picks
candidates, what it asks a worker to do (a :class:`~workers.request.TrialRequest`), and when it
is done.

- :class:`Screen`: sampled candidates scored by zero-cost proxies (or ParZC) and a quick latency,
  several per request (``Screen.batch``) so that orchestration is paid per batch;
- :class:`SampledTrain`: sampled candidates trained briefly and measured (the baselines);
- :class:`SupernetTrain`: the weight-sharing supernet trained once (BigNAS, Yu et al. 2020);
- :class:`SupernetRank`: the screening front ranked by inherited-weight accuracy;
- :class:`Latency`: the promising ones measured carefully on the target device;
- :class:`Train`: the final candidates trained from scratch, with ASHA (Li et al. 2020).

A stage is idempotent: it skips what the store already holds, so ``resume`` runs the plan again.
``refill``: a round the strategy adds after the planned stages (no share of its own: it may use
what is left; a sampled stage takes its share of what is left), never marked done.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from nas.search._driver import _candidates, _Gate, _OneShot, _screen_front
from nas.search.config import MAX_SCREEN_BATCH
from workers.request import FINISH, LAUNCH, Candidate, SupernetJob, TrialRequest

if TYPE_CHECKING:
    from nas.search.plan import Plan

__all__ = ["Latency", "SampledTrain", "Screen", "Stage", "SupernetRank", "SupernetTrain", "Train"]


class Stage:
    """One step of a plan. Subclasses set ``name`` (the store's stage), ``share`` (the budget
    share it draws on) and implement :meth:`open` and :meth:`request`."""

    name = ""
    share = ""
    sampled = False  # its candidates come from the strategy's sampler
    marks = True  # a planned pass marks the share done when it ends (resume skips it)

    def __init__(self, refill: bool = False) -> None:
        self.refill = refill
        self.gate: _Gate | None = None
        self.exhausted = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(refill={self.refill})"

    # -- the plan asks these ----------------------------------------------------------------
    def limit(self, plan: Plan) -> float:
        """What the stage may use in all (its share's cumulative limit, or what is left)."""
        d = plan.d
        left = d._total() - d._used()
        if self.refill and self.sampled:  # sampling again: its share of what is left, room for 2 trials
            room = max(left * d.cfg.shares.get(self.share, 0.0), 2.0 * d.estimate(self.name))
            return d.stage_used(self.share) + min(left, room)
        if self.refill:
            return d.stage_used(self.share) + left
        return d.limit(self.share, plan.shares)

    def open(self, plan: Plan) -> bool:
        """Get ready to run (pick the candidates, make the gate); False: nothing to do."""
        raise NotImplementedError

    def next(self, plan: Plan, running: int) -> TrialRequest | str:
        """The next request, or WAIT / FINISH."""
        assert self.gate is not None
        if self.exhausted:
            return FINISH
        what = self.gate.decide(running)
        if what != LAUNCH:
            return what
        req = self.request(plan)
        if req is None:
            self.exhausted = True
            return FINISH
        return req

    def request(self, plan: Plan) -> TrialRequest | None:
        raise NotImplementedError

    @property
    def mark(self) -> str | None:
        """The share marked done when this planned pass ends (None for refill rounds)."""
        return None if self.refill or not self.marks else self.share


class _Listed(Stage):
    """A stage over a fixed list of candidates (picked when it opens), one request each."""

    stages: tuple[str, ...] = ()
    exclusive_on_cpu = False

    def candidates(self, plan: Plan) -> list[tuple[str, str | dict]]:
        """(hash, spec JSON or dict) of the architectures to evaluate, in order."""
        raise NotImplementedError

    def open(self, plan: Plan) -> bool:
        self.todo = [Candidate(key=f"{self.name}:{h}", spec=sp if isinstance(sp, str) else json.dumps(sp), spec_hash=h)
                     for h, sp in self.candidates(plan)]
        if not self.todo:
            if self.mark:
                plan.d.mark_done(self.mark)
            return False
        exclusive = self.exclusive_on_cpu and plan.d.cfg.target == "cpu"  # measured alone, not beside another
        self.gate = _Gate(plan.d, self.name, self.limit(plan), exclusive,
                          peek=lambda: self.todo[0].spec_hash if self.todo else None)
        self.asha = False
        return True

    def request(self, plan: Plan) -> TrialRequest | None:
        if not self.todo:
            return None
        cand = self.todo.pop(0)
        d = plan.d
        est = d.estimate(self.name, cand.spec_hash)
        allowance = None
        if self.name == "train" and d.budget.kind == "seconds":
            allowance = est = d.allowance(self.name, est)
        d.reserve(cand.key, self.name, est)
        return plan.request(cand.key, self.name, self.stages, (cand,), allowance=allowance, asha=self.asha)


class Screen(Stage):
    """Sampled candidates, scored by zero-cost proxies (or ParZC) with a quick latency.

    Candidates of about 0.1-0.5 s each are sent in batches: ``batch`` sizes a request from the
    measured per-candidate cost to about ``TARGET_S`` device-seconds (at most ``MAX_BATCH``), within
    what the stage's share and the budget still hold; ``--screen-batch`` fixes the count instead,
    so that which candidates NSGA-II has seen when it asks (and so a seeded search) does not move
    with the machine's load. Each candidate keeps its own key, seconds and Optuna trial; a trial
    budget sends one candidate per request (each is a counted trial)."""

    name = share = "screen"
    sampled = True
    TARGET_S = 3.0
    MAX_BATCH = MAX_SCREEN_BATCH
    MAX_ASKS = 256  # sampled architectures that need no work (seen before, over a limit) per request

    #: a benchmark search's screening round takes at most this many candidates (``--screen-max``):
    #: its budget share would otherwise screen the whole space, as simulated training is dear
    BENCHMARK_MAX = 1000

    def open(self, plan: Plan) -> bool:
        self.gate = _Gate(plan.d, self.name, self.limit(plan))
        cfg = plan.d.cfg
        self.cap = cfg.screen_max or (self.BENCHMARK_MAX if cfg.benchmark else None)
        self.taken = 0
        return True

    def batch(self, plan: Plan) -> int:
        """How many candidates the next request carries."""
        d = plan.d
        if d.budget.kind != "seconds":
            return 1
        fixed = d.cfg.screen_batch
        if not d.stats.samples.get(self.name):
            return fixed or 1  # before a candidate was measured there is no cost to size a batch by
        assert self.gate is not None
        each = max(d.estimate(self.name), 1e-3)
        room = min(d.left(), self.gate.limit - d.stage_used(self.name) - d.reserved_in(self.name))
        # the share's room bounds a fixed count too: only its last request can be cut short by load
        want = fixed or min(self.MAX_BATCH, round(self.TARGET_S / each))
        return int(max(1, min(want, math.floor(room / each))))

    def request(self, plan: Plan) -> TrialRequest | None:
        d = plan.d
        k = self.batch(plan)
        if self.cap is not None:
            k = min(k, self.cap - self.taken)
            if k <= 0:
                return None
        cands: list[Candidate] = []
        for _ in range(self.MAX_ASKS + k):
            if len(cands) == k:
                break
            c = plan.sampling.ask()
            if c is not None:
                cands.append(c)
        if not cands:  # the space gives nothing new: the stage is done
            return None
        self.taken += len(cands)
        key = cands[0].key if len(cands) == 1 else f"{cands[0].key}-{cands[-1].number}"
        d.reserve(key, self.name, len(cands) * d.estimate(self.name))
        return plan.request(key, self.name, ("screen",), tuple(cands), sampled=True)


class SampledTrain(Stage):
    """Sampled candidates trained briefly from scratch and measured, in one request each: the
    baselines (NSGA-II, random, regularized evolution) of ``bench/search_quality.py``."""

    name = share = "train"
    sampled = True

    def open(self, plan: Plan) -> bool:
        self.gate = _Gate(plan.d, self.name, self.limit(plan))
        return True

    def request(self, plan: Plan) -> TrialRequest | None:
        d = plan.d
        for _ in range(Screen.MAX_ASKS):
            cand = plan.sampling.ask()
            if cand is not None:
                break
        else:
            return None
        est = d.estimate("train", cand.spec_hash)
        if d.cfg.benchmark and d.budget.kind == "seconds" and est > d.left():
            plan.sampling.fail(cand.number)  # its known cost does not fit in what is left: the stage ends
            return None
        allowance, reserve = None, 0.0
        if d.budget.kind == "seconds":
            allowance = est = d.allowance("train", est)
            reserve = d.estimate("latency", cand.spec_hash)  # the latency after the training
        d.reserve(cand.key, self.name, est)
        return plan.request(cand.key, self.name, ("train", "latency"), (cand,), allowance=allowance,
                            reserve=reserve, sampled=True)


class SupernetTrain(Stage):
    """The study's weight-sharing supernet, trained once over the frame (or continued from the
    checkpoint an allowance stopped); skipped when ``--supernet`` gave one or training finished.
    Its allowance: 80% of the supernet share; the schedule is planned on 60% of it."""

    name = "supernet_train"
    share = "supernet"
    marks = False  # the ranking after it marks the share

    def open(self, plan: Plan) -> bool:
        d = plan.d
        if d.cfg.supernet or plan.supernet_trained():
            return False
        rows = plan.store.evaluations(d.name, stage="supernet_train")
        parts = [e for e in rows if e.error is None]
        # training seconds in the checkpoint that rows already count: a finished part records the
        # checkpoint's total; a failed or interrupted one, the time it ran
        counted = 0.0
        for e in rows:
            counted = counted + e.seconds if e.error else max(counted, e.metrics.get("train_seconds", 0.0))
        limit = self.limit(plan)
        share_left = limit - d.stage_used(self.share)
        self.job = SupernetJob(frame=plan.frame.to_json(), out=str(d.workdir / "supernet"),
                               epochs=d.cfg.supernet_epochs, max_epochs=d.cfg.max_supernet_epochs,
                               plan_seconds=0.6 * share_left if d.budget.kind == "seconds" else None,
                               counted=counted, seed=d.cfg.seed, workers=d.cfg.supernet_workers)
        self.key = "supernet_train" if not parts else f"supernet_train.{len(parts)}"
        self.cap = 0.8 * share_left
        self.gate = _OneShot(d, self.name, limit)
        return True

    def request(self, plan: Plan) -> TrialRequest | None:
        d = plan.d
        est = d.estimate(self.name)
        allowance = None
        if d.budget.kind == "seconds":
            allowance = est = d.allowance(self.name, est, self.cap)
        d.reserve(self.key, self.name, est)
        return plan.request(self.key, self.name, (), (), supernet=self.job, allowance=allowance)


class SupernetRank(_Listed):
    """The screening front (non-dominated by score and screening latency) ranked by the
    inherited-weight accuracy of each subnet; skipped when there is no supernet to use."""

    name = "supernet"
    share = "supernet"
    stages = ("supernet",)

    def open(self, plan: Plan) -> bool:
        if not (plan.d.cfg.supernet or plan.supernet_usable()):
            return False  # no supernet (no budget, a stop, or training failed): screening scores rank
        return super().open(plan)

    def candidates(self, plan: Plan) -> list[tuple[str, str]]:
        return _screen_front(plan.d, plan.store)


class Latency(_Listed):
    """Careful latency of the promising candidates; on a CPU target one at a time (a second trial
    on a 2-core machine slowed a measurement 1.2-1.5x and doubled its spread)."""

    name = share = "latency"
    stages = ("latency",)
    exclusive_on_cpu = True

    def candidates(self, plan: Plan) -> list[tuple[str, str]]:
        return _candidates(plan.d, plan.store, self.name, plan.frame, refill=self.refill)


class Train(_Listed):
    """Short training from scratch of the final candidates. With ``--early-stop asha``, ASHA stops
    the weak ones between epochs when more than two train; the default trains each to the end
    (on HybridBench an early epoch's accuracy hardly predicts the last: bench/hybridbench_asha.py)."""

    name = share = "train"
    stages = ("train",)

    def candidates(self, plan: Plan) -> list[tuple[str, str]]:
        return _candidates(plan.d, plan.store, self.name, plan.frame, refill=self.refill)

    def open(self, plan: Plan) -> bool:
        ok = super().open(plan)
        self.asha = ok and plan.d.cfg.early_stop == "asha" and len(self.todo) > 2
        return ok
