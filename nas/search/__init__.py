"""The search: a study from ``nas search`` to its Pareto front, resumable at any point.

Strategies (``SearchConfig.strategy``):

- ``staged`` (the default):
  1. ``screen``: many candidates sampled by Optuna (NSGA-II, Deb et al. 2002) from the space and
     scored with zero-cost proxies (or ParZC) plus a quick latency measurement;
  2. ``supernet``: a weight-sharing supernet over the same frame is trained once (sandwich rule,
     in-place distillation; BigNAS, Yu et al. 2020) and the screening front is ranked by
     inherited-weight validation accuracy;
  3. ``latency``: the promising ones are measured carefully on the target device;
  4. ``train``: the final candidates are trained briefly from scratch, with ASHA early stopping
     (Li et al. 2020), and the Pareto front is taken over trained accuracy and measured latency.
- ``nsga2`` / ``random``: every trial trains an Optuna-sampled candidate briefly and measures its
  latency (the baselines of ``bench/search_quality.py``).

Every trial runs on a Ray Tune worker (``workers.ray_tune``) and is recorded in the SQL store
(``nas.store``) in one transaction when it finishes; Optuna's study lives in the same database.
A stage is idempotent: ``resume`` runs the stages again and each skips what the store already
holds, so nothing is lost or counted twice.
"""

from __future__ import annotations

from nas.search._driver import Driver, front_rows, install_stop_handlers, run_study
from nas.search.config import (
    DEFAULT_SHARES,
    MAX_TRAIN_EPOCHS,
    MAX_WORKERS,
    OBJECTIVES,
    PRECISION_CHOICES,
    STRATEGIES,
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

__all__ = [
    "DEFAULT_SHARES",
    "MAX_TRAIN_EPOCHS",
    "MAX_WORKERS",
    "OBJECTIVES",
    "PRECISION_CHOICES",
    "STRATEGIES",
    "Driver",
    "SearchConfig",
    "SearchError",
    "StudyLost",
    "check_target",
    "create_study",
    "default_workdir",
    "front_rows",
    "install_stop_handlers",
    "load_data",
    "make_frame",
    "max_threads",
    "param_count",
    "parse_budget_arg",
    "parse_count",
    "parse_shares",
    "prepare_study",
    "run_study",
]
