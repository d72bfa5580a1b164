"""What an architecture is, and how to build it. Imports only torch (+ numpy).

Public API: :func:`get_space`, :func:`list_spaces`, :func:`spec_from_json`, the spec
dataclasses, and the mixer registries.
"""

from __future__ import annotations

from typing import Any

from search_spaces import _compat  # noqa: F401  (first: makes torchvision/timm importable on CPU torch)
from search_spaces._space import RandomTrial, SearchSpace, get_space, list_spaces, register_space
from search_spaces.counting import count_flops, count_ops, count_params
from search_spaces.registry import channel_mixer, channel_mixer_names, token_mixer, token_mixer_names
from search_spaces.spec import ArchSpec, BlockSpec, HeadSpec, StageSpec, StemSpec, canonical_json, spec_hash


def spec_from_json(text: str, space: str | None = None) -> Any:
    """Parse a spec of any registered space (read from its "space" field unless ``space`` is given)."""
    from search_spaces.spec import loads

    data = loads(text, "spec")
    if not isinstance(data, dict):
        raise ValueError("spec must be a JSON object")
    name = space or data.get("space")
    if not isinstance(name, str):
        raise ValueError("spec has no 'space' field; pass the space name")
    return get_space(name).spec_from_dict(data)


__all__ = [
    "ArchSpec",
    "BlockSpec",
    "HeadSpec",
    "RandomTrial",
    "SearchSpace",
    "StageSpec",
    "StemSpec",
    "canonical_json",
    "channel_mixer",
    "channel_mixer_names",
    "count_flops",
    "count_ops",
    "count_params",
    "get_space",
    "list_spaces",
    "register_space",
    "spec_from_json",
    "spec_hash",
    "token_mixer",
    "token_mixer_names",
]
