"""A search strategy: a sampler and an ordered list of stages, registered by name.

A :class:`Strategy` says how candidates are sampled (an Optuna sampler made from the study's
config), which stages the :class:`~nas.search.plan.Plan` walks, and what it does once they are
done (``rounds``: more stages while budget is left, or nothing). A new strategy is one file that
defines its sampler, plus one :func:`register_strategy` line in ``nas/search/strategies.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nas.search.config import SearchConfig
    from nas.search.plan import Plan
    from nas.search.stages import Stage

__all__ = ["SHARES", "Strategy", "get_strategy", "register_strategy", "strategy_names"]

#: the budget shares a stage can draw on, in plan order (``--stages screen=0.2,...``)
SHARES = ("screen", "supernet", "latency", "train")

#: sampler(config, seed, constraints_func) -> an Optuna sampler
SamplerFactory = Callable[["SearchConfig", int, Any], Any]


@dataclass(frozen=True)
class Strategy:
    """``stages(cfg)`` lists the planned stages in order (the first is the sampled one);
    ``rounds(plan)`` gives the next round of stages once they are all done, or None to stop;
    ``screens``: the sampled stage scores candidates with a proxy (the Optuna study's objective
    is the screening ``score`` where the user asked for accuracy)."""

    name: str
    summary: str
    sampler: SamplerFactory
    stages: Callable[[SearchConfig], list[Stage]]
    rounds: Callable[[Plan], list[Stage] | None] | None = None
    screens: bool = False


_REGISTRY: dict[str, Strategy] = {}

#: modules that register strategies when imported
_MODULES = ("nas.search.strategies",)


def register_strategy(strategy: Strategy) -> Strategy:
    """Add ``strategy`` under its name; a name registered twice is a programming error."""
    if strategy.name in _REGISTRY and _REGISTRY[strategy.name] is not strategy:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    _REGISTRY[strategy.name] = strategy
    return strategy


def _load() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def strategy_names() -> tuple[str, ...]:
    """The registered strategies' names, in registration order."""
    _load()
    return tuple(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; ValueError naming the choices otherwise."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"strategy must be one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]
