"""Decorator registries: one per kind of block (token mixer, channel mixer).

``@token_mixer("pool")`` on a class registers it under that name; a duplicate name raises.
Every registered class declares, as class attributes:

- ``layout``: ``"nchw"`` (B, C, H, W), ``"nlc"`` (B, N, C) or ``"any"`` (either; the block
  keeps whatever layout it receives). The stage converts between layouts; a mixer never guesses.
- ``supports_prefix``: an ``"nlc"`` mixer that accepts extra (class) tokens in front of the
  H*W grid tokens. Needed for ``head.pool == "cls"``.
- ``paper``: the publication the block comes from.
- ``fused_slices``: how the supernet slices the mixer's fused weights (:data:`FusedSlices`);
  ``()`` when no weight is fused.
- ``onnx_blocker``: ``None`` when ``torch.onnx`` exports the block, else the reason it cannot.

Token mixers also declare ``uses_heads`` (whether the spec's ``heads`` matters) and
``complexity`` (``"linear"``, ``"nlogn"`` or ``"quadratic"`` in the number of tokens).

Nothing has a default: registration raises if a class leaves out any of these (inherited from a
deliberate base class is fine), so a new mixer cannot silently be "unfused" or "exportable".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias, TypeVar

from torch import nn

T = TypeVar("T", bound=type[nn.Module])

LAYOUTS = ("nchw", "nlc", "any")
COMPLEXITIES = ("linear", "nlogn", "quadratic")

#: How dim 0 of a fused tensor divides into segments, each of which the supernet slices on its own
#: (keeps its leading rows): ``k`` for k equal segments, or the segment sizes in order with at most
#: one ``None`` standing for "the rest" (e.g. ``(16, 16, None)``: q and k of 16 rows, then v).
SliceRule: TypeAlias = int | tuple[int | None, ...]

#: A mixer's ``fused_slices``: ``(name, rule)`` pairs. ``name`` is a tensor of the mixer (``"qkv.weight"``)
#: or a submodule (``"qkv"``: all its tensors), dotted as in ``named_parameters()``; the first pair
#: that names a tensor gives its rule. Every other tensor is sliced as one block (leading rows).
#: A tuple, not a dict: class attributes stay immutable (also in exported model files, which copy them).
FusedSlices: TypeAlias = tuple[tuple[str, SliceRule], ...]

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}
CHANNEL_MIXERS: dict[str, type[nn.Module]] = {}

_MISSING = object()


def _got(value: object) -> str:
    return "it is missing" if value is _MISSING else f"got {value!r}"[:200]


def _is_rule(rule: object) -> bool:
    if isinstance(rule, bool):
        return False
    if isinstance(rule, int):
        return rule >= 2
    return (isinstance(rule, tuple) and len(rule) >= 2 and sum(s is None for s in rule) <= 1
            and all(s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 1) for s in rule))


def _check_common(name: str, cls: type, kind: str) -> None:
    layout = getattr(cls, "layout", None)
    if layout not in LAYOUTS:
        raise ValueError(f"{kind} {name!r}: class attribute layout must be one of {LAYOUTS}, got {layout!r}")
    if not getattr(cls, "paper", ""):
        raise ValueError(f"{kind} {name!r}: class attribute paper must name the source publication")
    if not isinstance(getattr(cls, "supports_prefix", None), bool):
        raise ValueError(f"{kind} {name!r}: class attribute supports_prefix must be a bool")
    # no defaults: a class that leaves these out is refused, not taken as "unfused" / "exportable"
    fused = getattr(cls, "fused_slices", _MISSING)
    if not isinstance(fused, tuple) or not all(
            isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and e[0] and _is_rule(e[1])
            for e in fused):
        raise ValueError(f"{kind} {name!r}: class attribute fused_slices must be a tuple of (tensor or submodule, "
                         f"rule) pairs, () when no weight is fused; {_got(fused)}")
    blocker = getattr(cls, "onnx_blocker", _MISSING)
    if blocker is not None and not (isinstance(blocker, str) and blocker.strip()):
        raise ValueError(f"{kind} {name!r}: class attribute onnx_blocker must be None (exports to ONNX) or the "
                         f"reason it cannot be exported; {_got(blocker)}")


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


def fused_rule(cls: type, local: str) -> SliceRule | None:
    """The rule ``cls.fused_slices`` gives the mixer's tensor ``local`` (e.g. ``"qkv.weight"``);
    ``None`` when the tensor is not fused."""
    for prefix, rule in cls.fused_slices:
        if local == prefix or local.startswith(prefix + "."):
            return rule
    return None


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
