"""The search-space protocol, the space registry, and a seeded Optuna-like trial."""

from __future__ import annotations

import random as _random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from torch import nn


class Spec(Protocol):
    """What every space's spec offers (ArchSpec, NB201Spec)."""

    @property
    def hash(self) -> str: ...

    def to_json(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    def short(self) -> str: ...


class Trial(Protocol):
    """The part of ``optuna.trial.Trial`` a space uses (define-by-run)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int: ...


class RandomTrial:
    """A seeded stand-in for an Optuna trial: uniform choices, records what it suggested."""

    def __init__(self, seed: int) -> None:
        self._rng = _random.Random(seed)
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name in self.params:
            return self.params[name]
        value = choices[self._rng.randrange(len(choices))]
        self.params[name] = value
        return value

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int:
        if name in self.params:
            return self.params[name]
        value = low + step * self._rng.randrange((high - low) // step + 1)
        self.params[name] = value
        return value


class SearchSpace(ABC):
    """A named space of architectures: sample, build and describe its specs."""

    name: ClassVar[str]
    default_img_size: ClassVar[int]
    default_num_classes: ClassVar[int]

    @abstractmethod
    def sample(self, trial: Trial) -> Any:
        """Define-by-run: draw a spec with hierarchical parameter names."""

    def random(self, seed: int) -> Any:
        """A spec drawn uniformly by ``sample`` from a seeded RandomTrial (no Optuna needed)."""
        return self.sample(RandomTrial(seed))

    @abstractmethod
    def build(self, spec: Any, num_classes: int | None = None, img_size: int | None = None) -> nn.Module:
        """A freshly initialised model of ``spec`` (deterministic)."""

    @abstractmethod
    def spec_from_json(self, text: str) -> Any:
        """Parse and validate a spec; ValueError with a one-line reason if invalid."""

    @abstractmethod
    def spec_from_dict(self, data: dict[str, Any]) -> Any:
        """Validate a spec given as a decoded JSON object."""

    @abstractmethod
    def describe(self, spec: Any, img_size: int | None = None, num_classes: int | None = None) -> dict[str, Any]:
        """Parameters, FLOPs and a per-stage table, JSON-serialisable."""


_SPACES: dict[str, Callable[[], SearchSpace]] = {}
S = TypeVar("S", bound=type[SearchSpace])


def register_space(name: str) -> Callable[[S], S]:
    """Class decorator: register a search space under ``name`` (duplicates raise)."""

    def deco(cls: S) -> S:
        if name in _SPACES:
            raise ValueError(f"search space {name!r} is already registered")
        cls.name = name
        _SPACES[name] = cls
        return cls

    return deco


def get_space(name: str) -> SearchSpace:
    """The search space called ``name``; ValueError naming the known spaces otherwise."""
    _load_builtins()
    try:
        return _SPACES[name]()
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; choose one of: {', '.join(list_spaces())}") from None


def list_spaces() -> list[str]:
    _load_builtins()
    return sorted(_SPACES)


def _load_builtins() -> None:
    from search_spaces import hybrid_vit, nb201  # noqa: F401
