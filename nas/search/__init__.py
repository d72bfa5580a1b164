"""The search: a study from ``nas search`` to its Pareto front, resumable at any point.

The objects (see README, "The search as objects"):

- :class:`~nas.search.strategy.Strategy` (registry: :func:`register_strategy`): a sampler and an
  ordered list of stages. Built in (``nas/search/strategies.py``): ``staged`` (screen with
  zero-cost proxies, train and rank with a weight-sharing supernet, measure latency, train the
  best (stopped early by ASHA only with ``--early-stop asha``), then refill rounds), and the
  baselines ``nsga2``, ``random`` and ``rea`` (``nas/search/rea.py``), which train every sampled
  candidate briefly and measure it.
- :class:`~nas.search.stages.Stage`: name, budget share, candidates, requests, gate.
- :class:`~nas.search.plan.Plan`: walks the stages; the executor asks it for requests
  (``workers.ray_pool`` on Ray workers, ``workers.local`` in this process).
- :class:`Driver` (``_driver.py``): budget, cost model, recording in the store.
- :mod:`nas.search.config`: :class:`SearchConfig` and the study's set-up.

Every result is recorded in the SQL store (``nas.store``) in one transaction before the sampler
hears of it; Optuna's study lives in the same database. A stage is idempotent: ``resume`` runs the
plan again and each stage skips what the store already holds, so nothing is lost or counted twice.
"""

from __future__ import annotations

from nas.search._driver import Driver, front_rows, install_stop_handlers, run_study
from nas.search.config import (
    DEFAULT_SHARES,
    MAX_TRAIN_EPOCHS,
    MAX_WORKERS,
    OBJECTIVES,
    PRECISION_CHOICES,
    SearchConfig,
    SearchError,
    StudyLost,
    check_target,
    create_study,
    default_workdir,
    load_data,
    make_frame,
    max_threads,
    param_count,
    parse_budget_arg,
    parse_count,
    parse_shares,
    prepare_study,
)
from nas.search.strategy import Strategy, get_strategy, register_strategy, strategy_names

__all__ = [
    "DEFAULT_SHARES",
    "MAX_TRAIN_EPOCHS",
    "MAX_WORKERS",
    "OBJECTIVES",
    "PRECISION_CHOICES",
    "Driver",
    "SearchConfig",
    "SearchError",
    "Strategy",
    "StudyLost",
    "check_target",
    "create_study",
    "default_workdir",
    "front_rows",
    "get_strategy",
    "install_stop_handlers",
    "load_data",
    "make_frame",
    "max_threads",
    "param_count",
    "parse_budget_arg",
    "parse_count",
    "parse_shares",
    "prepare_study",
    "register_strategy",
    "run_study",
    "strategy_names",
]
