"""The built-in strategies: ``staged`` (the default), and the baselines ``nsga2`` and ``random``.

- ``staged``: screen (NSGA-II, Deb et al. 2002, or TPE for one objective) -> supernet training and
  ranking (BigNAS) -> careful latency -> short training (stopped early by ASHA only with
  ``--early-stop asha``); then, while budget is left, rounds of latency + training of the next
  candidates (from 32 trainings on, picked by a GP of the trained accuracies:
  :func:`nas.search.guided.refill_order`), and when those run out, a round that screens more (its
  share of what is left), ranks, measures and trains them.
  On a tabular benchmark (``--benchmark``): screen, then predictor-guided training
  (:mod:`nas.search.guided`), with more screening when the screened candidates run out.
- ``nsga2`` / ``random``: every sampled candidate is trained briefly and measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nas.search.guided import GuidedTrain
from nas.search.rea import rea_sampler
from nas.search.stages import Latency, SampledTrain, Screen, Stage, SupernetRank, SupernetTrain, Train
from nas.search.strategy import Strategy, register_strategy

if TYPE_CHECKING:
    from nas.search.config import SearchConfig
    from nas.search.plan import Plan

__all__ = ["optuna_sampler", "random_sampler", "sampled_train"]


def optuna_sampler(cfg: SearchConfig, seed: int, constraints: Any) -> Any:
    """NSGA-II (population 16) for several objectives, TPE for one."""
    import optuna

    if len(cfg.objectives) == 1:
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=16, constraints_func=constraints)


def random_sampler(cfg: SearchConfig, seed: int, constraints: Any) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def sampled_train(cfg: SearchConfig) -> list[Stage]:
    """One stage: every sampled candidate trained briefly and measured."""
    return [SampledTrain()]


def _staged(cfg: SearchConfig) -> list[Stage]:
    if cfg.benchmark:  # latencies come with screening (a table lookup): a predictor picks what to train
        return [Screen(), GuidedTrain()]
    return [Screen(), SupernetTrain(), SupernetRank(), Latency(), Train()]


def _staged_rounds(plan: Plan) -> list[Stage] | None:
    """After the planned pass: latency + training of the next candidates; when a round ran
    nothing (the screened candidates are used up), one that screens more; when that ran nothing
    either, stop."""
    d = plan.d
    ran = d.trials_done + d.errors
    if d.cfg.benchmark:  # the screened candidates are used up: screen more, and go on training
        if plan.memo.get("rescreen") == ran or not plan.memo.pop("pool_used_up", False):
            return None
        plan.memo["rescreen"] = ran
        return [Screen(refill=True), GuidedTrain(refill=True)]
    if plan.memo.get("refill") == ran:
        if plan.memo.get("rescreen") == ran:
            return None
        plan.memo["rescreen"] = plan.memo["refill"] = ran
        return [Screen(refill=True), SupernetRank(refill=True), Latency(refill=True), Train(refill=True)]
    plan.memo["refill"] = ran
    return [Latency(refill=True), Train(refill=True)]


register_strategy(Strategy("staged", "screen with proxies, rank with a supernet, measure, then train the best",
                           optuna_sampler, _staged, _staged_rounds, screens=True))
register_strategy(Strategy("nsga2", "NSGA-II samples; every candidate is trained briefly and measured",
                           optuna_sampler, sampled_train))
register_strategy(Strategy("random", "random samples; every candidate is trained briefly and measured",
                           random_sampler, sampled_train))
register_strategy(Strategy("rea", "regularized evolution (Real et al. 2019); every candidate is trained and measured",
                           rea_sampler, sampled_train))
