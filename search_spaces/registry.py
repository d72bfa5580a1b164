"""Decorator registries: one per kind of block (token mixer, channel mixer).

``@token_mixer("pool")`` on a class registers it under that name; a duplicate name raises.
Every registered class declares, as class attributes:

- ``layout``: ``"nchw"`` (B, C, H, W), ``"nlc"`` (B, N, C) or ``"any"`` (either; the block
  keeps whatever layout it receives). The stage converts between layouts; a mixer never guesses.
- ``supports_prefix``: an ``"nlc"`` mixer that accepts extra (class) tokens in front of the
  H*W grid tokens. Needed for ``head.pool == "cls"``.
- ``paper``: the publication the block comes from.

Token mixers also declare ``uses_heads`` (whether the spec's ``heads`` matters) and
``complexity`` (``"linear"``, ``"nlogn"`` or ``"quadratic"`` in the number of tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T", bound=type[nn.Module])

LAYOUTS = ("nchw", "nlc", "any")
COMPLEXITIES = ("linear", "nlogn", "quadratic")

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}
CHANNEL_MIXERS: dict[str, type[nn.Module]] = {}


def _check_common(name: str, cls: type, kind: str) -> None:
    layout = getattr(cls, "layout", None)
    if layout not in LAYOUTS:
        raise ValueError(f"{kind} {name!r}: class attribute layout must be one of {LAYOUTS}, got {layout!r}")
    if not getattr(cls, "paper", ""):
        raise ValueError(f"{kind} {name!r}: class attribute paper must name the source publication")
    if not isinstance(getattr(cls, "supports_prefix", None), bool):
        raise ValueError(f"{kind} {name!r}: class attribute supports_prefix must be a bool")


def _register(table: dict[str, type[nn.Module]], kind: str, name: str) -> Callable[[T], T]:
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"{kind} name {name!r} must be lower-case letters, digits and underscores")

    def deco(cls: T) -> T:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__qualname__})")
        _check_common(name, cls, kind)
        if kind == "token mixer":
            if getattr(cls, "complexity", None) not in COMPLEXITIES:
                raise ValueError(f"token mixer {name!r}: complexity must be one of {COMPLEXITIES}")
            if not isinstance(getattr(cls, "uses_heads", None), bool):
                raise ValueError(f"token mixer {name!r}: class attribute uses_heads must be a bool")
        cls.registry_name = name
        table[name] = cls
        return cls

    return deco


def token_mixer(name: str) -> Callable[[T], T]:
    """Register a token mixer class: ``cls(dim, *, heads, grid)``, ``forward(x, hw)``."""
    return _register(TOKEN_MIXERS, "token mixer", name)


def channel_mixer(name: str) -> Callable[[T], T]:
    """Register a channel mixer class: ``cls(dim, *, mlp_ratio)``, ``forward(x, hw)``."""
    return _register(CHANNEL_MIXERS, "channel mixer", name)


def _get(table: dict[str, type[nn.Module]], kind: str, name: str) -> type[nn.Module]:
    _load_builtins()
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}") from None


def get_token_mixer(name: str) -> type[nn.Module]:
    return _get(TOKEN_MIXERS, "token mixer", name)


def get_channel_mixer(name: str) -> type[nn.Module]:
    return _get(CHANNEL_MIXERS, "channel mixer", name)


def token_mixer_names() -> list[str]:
    _load_builtins()
    return sorted(TOKEN_MIXERS)


def channel_mixer_names() -> list[str]:
    _load_builtins()
    return sorted(CHANNEL_MIXERS)


def _load_builtins() -> None:
    from search_spaces import layers  # noqa: F401  (importing registers the built-in blocks)
