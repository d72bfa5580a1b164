"""Sampled candidates: Optuna's ask/tell on the study in the store, define-by-run over the frame.

``ask`` samples an architecture from the study's frame with the strategy's sampler. One that
needs no work is told at once: an architecture the sampled stage already evaluated gets its
stored result, one over ``--max-params`` the worst values. ``tell`` is called after the result
is recorded in the store, so no Optuna trial is COMPLETE without our row.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from nas.search.config import OBJECTIVES, SearchConfig, param_count
from workers.request import Candidate

if TYPE_CHECKING:
    from nas.search._driver import Driver
    from nas.search.strategy import Strategy
    from nas.store import Store

__all__ = ["Sampling", "sample_metrics", "set_constraints"]


def sample_metrics(cfg: SearchConfig, screens: bool) -> list[str]:
    """The Optuna study's objectives: the screening score stands in for accuracy when sampling screens."""
    return ["score" if o == "accuracy" and screens else OBJECTIVES[o][0] for o in cfg.objectives]


def set_constraints(trial: Any, cfg: SearchConfig, cons: list[float], native: tuple[str, ...] | None = None) -> None:
    """Constraint values (<= 0 is feasible) as a user attribute, and through Optuna's own
    ``Trial.set_constraint`` where it exists (Optuna >= 5) for the ``native`` keys (default all):
    Optuna keeps the first value set, so the latency limit is set natively once it is measured."""
    trial.set_user_attr("constraints", cons)
    names = [n for n in ("max_params", "max_latency_ms") if getattr(cfg, n) is not None]
    setter = getattr(trial, "set_constraint", None)
    if setter is not None:
        for key, value in zip(names, cons):
            if native is None or key in native:
                setter(key, float(value))


def _constraints(trial: Any) -> list[float]:
    return list(trial.user_attrs.get("constraints", []))


class Sampling:
    """The strategy's sampler over the study's frame, on the Optuna study named like ours.

    The sampler runs on an in-memory copy of the stored study, and each trial is written to the
    stored study twice, each time in one transaction: when asked (its parameters and attributes,
    RUNNING) and when told (its state and values). Sampling on the stored study directly made
    some 25 small transactions per candidate, 0.1-0.16 s of driver time against 0.15 s of
    screening on a worker; the driver then kept two workers 30% busy. Trial numbers are the same
    in both (one driver per study, and the copy starts from the stored trials in order)."""

    def __init__(self, d: Driver, store: Store, frame: Any, strategy: Strategy, stage: str) -> None:
        import optuna

        self.d, self.frame, self.stage = d, frame, stage
        cfg = self.cfg = d.cfg
        self.metrics = sample_metrics(cfg, strategy.screens)
        self.modes = [OBJECTIVES[o][1] for o in cfg.objectives]
        directions = ["maximize" if m == "max" else "minimize" for m in self.modes]
        self.storage = store.optuna_storage()
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created ..." on the CLI
        try:
            stored = optuna.create_study(study_name=d.name, storage=self.storage, load_if_exists=True,
                                         directions=directions)
            memory = optuna.create_study(directions=directions)
        finally:
            optuna.logging.set_verbosity(level)
        past = stored.get_trials(deepcopy=False)
        # a resumed study continues the sampler's stream instead of drawing the same candidates again
        seed = cfg.seed + len(past)
        # Optuna >= 5 reads constraints set on the trial; older versions take a constraints_func
        use_cons = (cfg.max_params is not None or cfg.max_latency_ms is not None) and not hasattr(
            optuna.trial.Trial, "set_constraint")
        sampler = strategy.sampler(cfg, seed, _constraints if use_cons else None)
        self.study_id = self.storage.get_study_id_from_name(d.name)
        self.study = memory
        self.study.sampler = sampler
        self.study.add_trials(sorted(past, key=lambda t: t.number))
        self.done = dict(store.done(d.name, stage))  # arch -> metrics: a repeat is told these at once
        self.asked: dict[int, tuple[Any, int, Any]] = {}  # number -> (trial, stored id, as written when asked)

    def _frozen(self, trial: Any) -> Any:
        return self.study._storage.get_trial(trial._trial_id)  # the in-memory copy's own record

    def _write(self, trial: Any) -> tuple[int, Any]:
        """The asked trial into the stored study, in one transaction; (its id there, what was written)."""
        frozen = self._frozen(trial)
        tid = self.storage.create_new_trial(self.study_id, template_trial=frozen)
        number = self.storage.get_trial_number_from_id(tid)
        if number != trial.number:
            raise RuntimeError(f"Optuna study {self.d.name!r} is out of step with its sampler (trial {number} stored "
                               f"as {trial.number}): was it changed by another process?")
        return tid, frozen

    def _finish(self, trial: Any, tid: int, written: Any, state: Any, values: list[float] | None) -> None:
        """Tell the in-memory copy, then write what changed and the outcome to the stored study."""
        self.study.tell(trial, values, state=state)
        now = self._frozen(trial)
        for k, v in now.user_attrs.items():  # e.g. the latency constraint, why it failed
            if written.user_attrs.get(k, _MISSING) != v:
                self.storage.set_trial_user_attr(tid, k, v)
        for k, v in now.system_attrs.items():  # e.g. what the sampler noted after the trial
            if written.system_attrs.get(k, _MISSING) != v:
                self.storage.set_trial_system_attr(tid, k, v)
        self.storage.set_trial_state_values(tid, now.state, now.values)

    def ask(self) -> Candidate | None:
        """A new candidate, or None when the sampled architecture needs no work (told already)."""
        import optuna

        trial = self.study.ask()
        spec = self.frame.sample(trial)
        self.d.note(spec)
        cfg = self.cfg
        trial.set_user_attr("spec_hash", spec.hash)
        trial.set_user_attr("spec", spec.to_json())
        trial.set_user_attr("stage", self.stage)
        cons: list[float] = []
        over = False
        if cfg.max_params is not None:
            cons.append(float(param_count(spec, self.frame) - cfg.max_params))
            over = cons[-1] > 0
            if over:  # over the limit before any work: not evaluated, worst values for Optuna
                trial.set_user_attr("infeasible", "max_params")
        # the latency limit is a placeholder until the latency is measured (see tell)
        set_constraints(trial, cfg, cons + ([0.0] if cfg.max_latency_ms is not None else []), ("max_params",))
        tid, written = self._write(trial)
        done = optuna.trial.TrialState.COMPLETE
        if spec.hash in self.done and all(m in self.done[spec.hash] for m in self.metrics):
            self._latency_constraint(trial, self.done[spec.hash])
            self._finish(trial, tid, written, done, [self.done[spec.hash][m] for m in self.metrics])
            return None
        if over:  # infeasible already: its latency limit is never measured
            set_constraints(trial, cfg, _constraints(trial), ("max_latency_ms",))
            self._finish(trial, tid, written, done, [-1e12 if md == "max" else 1e12 for md in self.modes])
            return None
        self.asked[trial.number] = (trial, tid, written)
        return Candidate(key=f"{self.stage}:{trial.number}", spec=spec.to_json(), spec_hash=spec.hash,
                         number=trial.number)

    def tell(self, number: int | None, metrics: dict[str, float]) -> None:
        """A recorded result: its objectives to the sampler (FAIL when one is missing or not finite)."""
        import optuna

        entry = self.asked.pop(number, None) if number is not None else None
        if entry is None:
            return
        trial, tid, written = entry
        self._latency_constraint(trial, metrics)
        missing = [m for m in self.metrics if not isinstance(metrics.get(m), (int, float))
                   or not math.isfinite(metrics[m])]
        if missing:  # e.g. nwot is -inf for a net whose features collapse: the trial fails in Optuna
            trial.set_user_attr("failed_because", f"objective not finite: {', '.join(missing)}")
            self._finish(trial, tid, written, optuna.trial.TrialState.FAIL, None)
            return
        h = trial.user_attrs.get("spec_hash")
        if h:
            self.done[h] = dict(metrics)
        self._finish(trial, tid, written, optuna.trial.TrialState.COMPLETE, [float(metrics[m]) for m in self.metrics])

    def _latency_constraint(self, trial: Any, metrics: dict[str, float]) -> None:
        if self.cfg.max_latency_ms is not None and "latency_ms" in metrics:
            cons = _constraints(trial)
            cons[-1] = float(metrics["latency_ms"]) - self.cfg.max_latency_ms
            set_constraints(trial, self.cfg, cons, ("max_latency_ms",))

    def fail(self, number: int | None) -> None:
        """A candidate whose every attempt failed: FAIL in Optuna."""
        import optuna

        entry = self.asked.pop(number, None) if number is not None else None
        if entry is not None:
            self._finish(*entry, optuna.trial.TrialState.FAIL, None)


_MISSING = object()
