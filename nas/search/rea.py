"""Regularized Evolution (REA) as an Optuna sampler.

Real, Aggarwal, Huang & Le, "Regularized Evolution for Image Classifier Architecture Search",
AAAI 2019. An *aging* population holds the ``population_size`` most recently completed trials
(the oldest leaves, not the worst). Each new trial draws ``sample_size`` members of the population
at random (a tournament), takes the best of them as its parent, and is the parent with exactly one
parameter mutated. Until the population is full, trials are sampled at random.

How it fits Optuna and our define-by-run spaces (conditional, hierarchical parameter names such as
``s2.token_mixer``, where a stage's parameters exist only if the stage does):

- Everything happens in :meth:`RegularizedEvolutionSampler.sample_independent`; there is no
  relative search space. :meth:`~RegularizedEvolutionSampler.before_trial` picks the parent and
  the one parameter to mutate (uniformly among the parent's parameters that can take more than one
  value) and writes them to the trial's system attributes (``rea:parent``, the parent's trial
  number or ``None`` for a random trial, and ``rea:mutate``), so the plan lives in the storage.
- A parameter the parent has is copied from it, except the mutated one, which is resampled to a
  *different* value (categorical: another choice; int/float: another value, uniformly, respecting
  ``step`` and ``log``). A parameter the parent does not have (a branch the mutation opened), or
  whose parent value lies outside the child's distribution (a choice set or range that depends on
  an earlier parameter), is sampled at random.
- Multi-objective studies: the tournament winner has the best non-dominated rank within the sample
  (fast non-dominated sorting, Deb et al., "A Fast and Elitist Multiobjective Genetic Algorithm:
  NSGA-II", IEEE TEC 2002), ties broken by the larger crowding distance, then at random. One
  objective: the best value, ties at random.
- Constraints (values <= 0 are feasible), as Optuna's NSGA-II: a feasible member beats an
  infeasible one, and among infeasible ones the smaller total violation wins. They come from
  ``constraints_func`` (evaluated after each trial and stored in the trial's ``constraints``
  system attribute, as NSGA-II does), else from Optuna's own constraints (``Trial.set_constraint``),
  else from ``user_attrs["constraints"]``.
- FAIL, PRUNED and running trials are not in the population. The population is read from the
  storage (completed trials ordered by number), so a study resumed in a new process with a new
  sampler continues the same population. Deterministic given ``seed``.

The tournament draws ``sample_size`` *distinct* members (the paper draws with replacement; with
``sample_size`` well below ``population_size`` the two hardly differ, and ``sample_size ==
population_size`` then means "always the best of the population").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = ["MUTATE_KEY", "PARENT_KEY", "RegularizedEvolutionSampler", "rea_sampler"]

PARENT_KEY = "rea:parent"  # system attr: the parent's trial number, or None for a random trial
MUTATE_KEY = "rea:mutate"  # system attr: the name of the parameter mutated, or None
_CONSTRAINTS_KEY = "constraints"  # Optuna's system attr for constraint values (NSGA-II, set_constraint)
_MAX_REJECTIONS = 64


@dataclass
class _Plan:
    """What a trial copies: its parent's parameters (None: a random trial) and the mutated name."""

    number: int
    parent: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    mutate: str | None = None


class RegularizedEvolutionSampler(optuna.samplers.BaseSampler):
    """Regularized Evolution (aging evolution; Real et al., AAAI 2019) for define-by-run spaces.

    Args:
        population_size: how many of the most recent completed trials form the population; trials
            are random until that many have completed.
        sample_size: tournament size, the number of distinct population members compared to pick
            a parent (1 <= ``sample_size`` <= ``population_size``).
        seed: seed of the sampler's own random state; same seed, same trials.
        constraints_func: ``FrozenTrial -> Sequence[float]``, values <= 0 feasible, as for
            :class:`optuna.samplers.NSGAIISampler`. Without it, Optuna's own constraints
            (``Trial.set_constraint``) or ``user_attrs["constraints"]`` are used where a trial has them.
    """

    def __init__(
        self,
        population_size: int = 32,
        sample_size: int = 8,
        seed: int | None = None,
        constraints_func: Callable[[FrozenTrial], Sequence[float]] | None = None,
    ) -> None:
        for name, value in (("population_size", population_size), ("sample_size", sample_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if sample_size > population_size:
            raise ValueError(
                f"sample_size ({sample_size}) must not exceed population_size ({population_size}): "
                "the tournament draws distinct members of the population"
            )
        if constraints_func is not None and not callable(constraints_func):
            raise ValueError(f"constraints_func must be callable or None, got {type(constraints_func).__name__}")
        self.population_size = int(population_size)
        self.sample_size = int(sample_size)
        self._seed = seed
        self._rng = np.random.RandomState(seed)
        self._constraints_func = constraints_func
        self._plans: dict[int, _Plan] = {}  # trial id -> plan, a cache of what the system attrs hold

    def __str__(self) -> str:
        return f"RegularizedEvolutionSampler(population_size={self.population_size}, sample_size={self.sample_size})"

    def reseed_rng(self) -> None:
        self._rng.seed()

    # ------------------------------------------------------------------ Optuna sampler interface

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """Pick the parent (tournament over the aging population) and the parameter to mutate,
        and store them in the trial's system attributes. A trial that already has a plan keeps it."""
        if PARENT_KEY in trial.system_attrs:
            self._plans[trial._trial_id] = self._plan_from_attrs(study, trial)
            return
        population = self.population(study)
        plan = _Plan(number=trial.number)
        if len(population) >= self.population_size:
            parent = self._tournament(study, population)
            candidates = sorted(n for n, d in parent.distributions.items() if not d.single())
            plan.parent = parent.number
            plan.params = dict(parent.params)
            plan.mutate = candidates[self._rng.randint(len(candidates))] if candidates else None
        storage = study._storage
        storage.set_trial_system_attr(trial._trial_id, PARENT_KEY, plan.parent)
        storage.set_trial_system_attr(trial._trial_id, MUTATE_KEY, plan.mutate)
        self._plans[trial._trial_id] = plan

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        plan = self._plans.get(trial._trial_id)
        if plan is None or plan.number != trial.number:  # planned by another sampler object / process
            plan = self._plans[trial._trial_id] = self._plan_from_attrs(study, trial)
        if plan.parent is None or param_name not in plan.params:
            return _sample_random(param_distribution, self._rng)
        value = plan.params[param_name]
        if not _contains(param_distribution, value):  # the choices or range depend on earlier params
            return _sample_random(param_distribution, self._rng)
        if param_name == plan.mutate:
            return _sample_different(param_distribution, value, self._rng)
        return value

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._plans.pop(trial._trial_id, None)
        if self._constraints_func is not None and state in (TrialState.COMPLETE, TrialState.PRUNED):
            cons = _check_constraints(self._constraints_func(trial))
            study._storage.set_trial_system_attr(trial._trial_id, _CONSTRAINTS_KEY, list(cons))

    # ----------------------------------------------------------------------------- population

    def population(self, study: Study) -> list[FrozenTrial]:
        """The current population: the last ``population_size`` COMPLETE trials by trial number."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        done = sorted(done, key=lambda t: t.number)
        return done[-self.population_size :]

    def _tournament(self, study: Study, population: Sequence[FrozenTrial]) -> FrozenTrial:
        idx = self._rng.choice(len(population), size=self.sample_size, replace=False)
        sample = [population[i] for i in sorted(idx)]
        return sample[self._winner(study, sample)]

    def _winner(self, study: Study, sample: Sequence[FrozenTrial]) -> int:
        """Index in ``sample`` of the tournament winner (see the module docstring)."""
        violation = np.array([_violation(self._constraints(t)) for t in sample])
        cand = np.flatnonzero(violation <= 0.0)
        if cand.size == 0:  # nobody feasible: the smallest total violation
            cand = np.flatnonzero(violation == violation.min())
        signs = np.array([1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions])
        values = np.array([t.values for t in (sample[i] for i in cand)], dtype=np.float64) * signs
        if values.shape[1] == 1:
            best = np.flatnonzero(values[:, 0] == values[:, 0].min())
        else:
            ranks = fast_non_dominated_sort(values)
            front = np.flatnonzero(ranks == 0)
            crowd = crowding_distance(values[front])
            best = front[crowd == crowd.max()]
        return int(cand[best[self._rng.randint(best.size)]])

    def _constraints(self, trial: FrozenTrial) -> tuple[float, ...] | None:
        """The trial's constraint values, or None when it has none (counts as feasible)."""
        attrs = trial.system_attrs
        if self._constraints_func is not None:
            stored = attrs.get(_CONSTRAINTS_KEY)
            if stored is None:  # e.g. a trial added with add_trial: after_trial never ran
                return _check_constraints(self._constraints_func(trial))
            return tuple(float(c) for c in stored)
        native = [float(c) for c in attrs.get(_CONSTRAINTS_KEY) or ()]
        native += [float(v) for k, v in sorted(attrs.items()) if k.startswith(_CONSTRAINTS_KEY + ":")]
        if native:
            return tuple(native)
        user = trial.user_attrs.get("constraints")
        if user:
            return tuple(float(c) for c in user)
        return None

    def _plan_from_attrs(self, study: Study, trial: FrozenTrial) -> _Plan:
        attrs = trial.system_attrs
        parent, mutate = attrs.get(PARENT_KEY), attrs.get(MUTATE_KEY)
        plan = _Plan(number=trial.number, mutate=mutate)
        if parent is None:
            return plan
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number == parent:
                plan.parent, plan.params = parent, dict(t.params)
                break
        return plan


# ------------------------------------------------------------------------ multi-objective ranks


def fast_non_dominated_sort(values: np.ndarray) -> np.ndarray:
    """Non-dominated rank (0 = the first front) of each row of ``values`` (n, m), all objectives
    minimised: Deb et al. 2002's fast non-dominated sorting, O(m n^2)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    le = np.all(v[:, None, :] <= v[None, :, :], axis=2)
    lt = np.any(v[:, None, :] < v[None, :, :], axis=2)
    dominates = le & lt  # dominates[i, j]: i dominates j
    count = dominates.sum(axis=0)  # how many dominate j
    ranks = np.full(n, -1, dtype=np.int64)
    current = list(np.flatnonzero(count == 0))
    rank = 0
    while current:
        nxt: list[int] = []
        for i in current:
            ranks[i] = rank
            for j in np.flatnonzero(dominates[i]):
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(int(j))
        current = nxt
        rank += 1
    return ranks


def crowding_distance(values: np.ndarray) -> np.ndarray:
    """Crowding distance (Deb et al. 2002) of each row of one front ``values`` (n, m): per
    objective, the boundary points get infinity and an interior point the normalised gap between
    its two neighbours; summed over objectives. A constant objective adds nothing."""
    v = np.asarray(values, dtype=np.float64)
    n, m = v.shape
    dist = np.zeros(n, dtype=np.float64)
    if n <= 2:
        dist[:] = np.inf
        return dist
    for k in range(m):
        order = np.argsort(v[:, k], kind="stable")
        col = v[order, k]
        span = col[-1] - col[0]
        if not span > 0.0:
            continue
        dist[order[0]] = dist[order[-1]] = np.inf
        with np.errstate(invalid="ignore", over="ignore"):
            gaps = (col[2:] - col[:-2]) / span
        dist[order[1:-1]] += np.nan_to_num(gaps, nan=0.0, posinf=0.0)
    return dist


# ---------------------------------------------------------------------------- constraints


def _check_constraints(cons: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(c) for c in cons)
    if any(math.isnan(c) for c in out):
        raise ValueError(f"constraint values must not be NaN, got {out}")
    return out


def _violation(cons: Sequence[float] | None) -> float:
    """Total violation: the sum of the positive constraint values (0 for a feasible trial; a NaN
    value counts as an infinite violation)."""
    return float(sum(math.inf if math.isnan(c) else max(0.0, c) for c in cons)) if cons else 0.0


# ---------------------------------------------------------------------------- distributions


def _grid(dist: IntDistribution | FloatDistribution) -> tuple[float, float, int] | None:
    """(low, step, number of values) of a stepped distribution, None for a continuous float."""
    if isinstance(dist, IntDistribution):
        return dist.low, dist.step, (dist.high - dist.low) // dist.step + 1
    if dist.step is None:
        return None
    return dist.low, dist.step, round((dist.high - dist.low) / dist.step) + 1


def _contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` (external representation) is a value of ``dist``."""
    if isinstance(dist, CategoricalDistribution):
        try:
            dist.to_internal_repr(value)
        except ValueError:
            return False
        return True
    if isinstance(dist, (IntDistribution, FloatDistribution)):
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        if not (dist.low <= x <= dist.high):
            return False
        grid = _grid(dist)
        if grid is None:
            return True
        k = (x - grid[0]) / grid[1]
        return abs(k - round(k)) < 1e-8
    return False


def _from_grid(dist: IntDistribution | FloatDistribution, k: int) -> Any:
    low, step, _ = _grid(dist)  # type: ignore[misc]
    if isinstance(dist, IntDistribution):
        return int(low + k * step)
    return float(min(dist.high, low + k * step))


def _sample_random(dist: BaseDistribution, rng: np.random.RandomState) -> Any:
    """A value of ``dist`` drawn uniformly (log-uniformly for ``log=True``), as Optuna's random sampler."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[rng.randint(len(dist.choices))]
    if isinstance(dist, IntDistribution):
        if dist.log:
            x = math.exp(rng.uniform(math.log(dist.low - 0.5), math.log(dist.high + 0.5)))
            return int(min(dist.high, max(dist.low, round(x))))
        return _from_grid(dist, int(rng.randint(_grid(dist)[2])))  # type: ignore[index]
    if isinstance(dist, FloatDistribution):
        grid = _grid(dist)
        if grid is not None:
            return _from_grid(dist, int(rng.randint(grid[2])))
        if dist.log:
            return float(min(dist.high, max(dist.low, math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))))
        return float(rng.uniform(dist.low, dist.high))
    raise ValueError(f"RegularizedEvolutionSampler cannot sample {type(dist).__name__}")


def _sample_different(dist: BaseDistribution, value: Any, rng: np.random.RandomState) -> Any:
    """A value of ``dist`` other than ``value`` (which ``dist`` contains), drawn uniformly among the
    others (log-uniformly for ``log=True``); ``value`` itself only if it is the only one."""
    if dist.single():
        return value
    if isinstance(dist, CategoricalDistribution):
        cur = dist.to_internal_repr(value)
        j = rng.randint(len(dist.choices) - 1)
        return dist.choices[j + 1 if j >= cur else j]
    log = bool(getattr(dist, "log", False))
    if log:  # log-uniform: reject the current value (each draw differs with probability >= 1/2 or so)
        for _ in range(_MAX_REJECTIONS):
            x = _sample_random(dist, rng)
            if x != value:
                return x
    grid = _grid(dist)  # type: ignore[arg-type]
    if grid is None:  # continuous: a different value with probability one
        for _ in range(_MAX_REJECTIONS):
            x = _sample_random(dist, rng)
            if x != value:
                return x
        return value
    cur = round((float(value) - grid[0]) / grid[1])
    j = rng.randint(grid[2] - 1)
    return _from_grid(dist, j + 1 if j >= cur else j)  # type: ignore[arg-type]


def rea_sampler(cfg: Any, seed: int, constraints: Callable[[FrozenTrial], Sequence[float]] | None = None
                ) -> RegularizedEvolutionSampler:
    """The ``rea`` strategy's sampler: population 32, tournament 8 (on NAS-Bench-201 at 100 to 1,000
    trials this was best or tied among (16, 4), (32, 8) and (64, 16); tests/test_rea.py)."""
    return RegularizedEvolutionSampler(population_size=32, sample_size=8, seed=seed, constraints_func=constraints)
