"""The plan: walks a strategy's stages within their budget shares, then its rounds.

A :class:`Plan` is what an executor runs (``workers.ray_pool.run_trials`` or
``workers.local.run_local``): before each launch it is asked for the next request; it hands
every result and failure to the driver, which records it, and then tells the sampler.
A stage starts only when the previous one has no trial running, so it can read its results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nas.search.stages import Stage
from workers.evaluate import EvalConfig
from workers.request import FINISH, WAIT, Candidate, SupernetJob, TrialError, TrialRequest, TrialResult

if TYPE_CHECKING:
    from nas.search._driver import Driver
    from nas.search.sampling import Sampling
    from nas.search.strategy import Strategy
    from nas.store import Store

__all__ = ["Plan"]


class Plan:
    """One study's run: ``strategy``'s stages not yet done, in order, then its rounds."""

    def __init__(self, d: Driver, store: Store, frame: Any, strategy: Strategy, sampling: Sampling,
                 eval_cfg: EvalConfig) -> None:
        self.d, self.store, self.frame, self.strategy, self.sampling = d, store, frame, strategy, sampling
        self.eval_cfg = eval_cfg
        planned = strategy.stages(d.cfg)
        self.shares = list(dict.fromkeys(s.share for s in planned))  # the shares in plan order
        self.queue: list[Stage] = [s for s in planned if not d.stage_done(s.share)]
        self.cur: Stage | None = None
        self.memo: dict[str, Any] = {}  # the strategy's round policy keeps its state here

    # -- what an executor calls ---------------------------------------------------------------
    def next(self, running: int) -> TrialRequest | str:
        """The next request to launch, WAIT (ask again when a trial ends) or FINISH."""
        for _ in range(64):  # a stage may end at once (nothing left); then the next one is asked
            if self.cur is None:
                if running:
                    return WAIT
                if not self._start_next():
                    return FINISH
                continue
            what = self.cur.next(self, running)
            if not isinstance(what, str) or what != FINISH:
                return what
            if running:
                return WAIT
            self._end()
        return WAIT if running else FINISH

    def started(self, request: TrialRequest, attempt: int) -> None:
        self.d.started(request, attempt)

    def finished(self, result: TrialResult) -> None:
        """Record the result, then tell the sampler about each sampled candidate."""
        self.d.record_result(result)
        if result.request.stage == self.sampling.stage:
            for r in result.results:
                if r.candidate is not None and r.candidate.number is not None:
                    self.sampling.tell(r.candidate.number, r.evaluation.get("metrics", {}))

    def failed(self, error: TrialError) -> None:
        if error.final:  # a retried attempt keeps its reservation
            self.d.release(error.request.key)
        self.d.record_error(error)
        if error.final and error.request.stage == self.sampling.stage:
            for c in error.request.candidates:
                self.sampling.fail(c.number)

    # -- what stages call ---------------------------------------------------------------------
    def request(self, key: str, stage: str, stages: tuple[str, ...], candidates: tuple[Candidate, ...], *,
                supernet: SupernetJob | None = None, allowance: float | None = None, reserve: float = 0.0,
                asha: bool = False, sampled: bool = False) -> TrialRequest:
        """A request with the study's device and evaluation settings (and, for sampled requests,
        the chaos tests' injected fault of that ordinal)."""
        d = self.d
        fault = None
        ordinal = None
        if sampled:
            d._ordinal += 1
            ordinal = d._ordinal
            kind = d.chaos.get(ordinal)
            if kind:
                fault = (kind, str(d.workdir / "chaos" / f"{ordinal}"))
        return TrialRequest(key=key, stage=stage, stages=stages, candidates=candidates, supernet=supernet,
                            device=d.cfg.target, eval=self.eval_cfg, allowance=allowance, reserve=reserve,
                            asha=asha, fault=fault, ordinal=ordinal)

    def supernet_trained(self) -> bool:
        """The supernet's training ran to the end of its schedule (parts an allowance stopped say
        ``complete`` = 0; rows from before parts existed are complete)."""
        parts = self.store.evaluations(self.d.name, stage="supernet_train", errors=False)
        return any(p.metrics.get("complete", 1.0) >= 1.0 for p in parts)

    def supernet_usable(self) -> bool:
        """A supernet checkpoint exists, complete or not: its subnets can be ranked."""
        return bool(self.store.evaluations(self.d.name, stage="supernet_train", errors=False))

    # -- walking the stages -------------------------------------------------------------------
    def _end(self) -> None:
        assert self.cur is not None
        mark = self.cur.mark
        if mark and not self.d.stop_requested():
            self.d.mark_done(mark)
        self.cur = None

    def _start_next(self) -> bool:
        d = self.d
        while True:
            if d.stop_requested() or d.exhausted():
                return False
            if not self.queue:
                more = self.strategy.rounds(self) if self.strategy.rounds is not None else None
                if not more:
                    return False
                self.queue = list(more)
            stage = self.queue.pop(0)
            self.store.set_status(d.name, "running", stage=stage.share)
            if stage.open(self):
                self.cur = stage
                return True
