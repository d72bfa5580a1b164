"""Plain nn.Module blocks. Importing this package registers the built-in token and channel mixers.

Conventions every mixer follows (see search_spaces/registry.py):
``TokenMixer(dim, *, heads, grid)`` and ``ChannelMixer(dim, *, mlp_ratio)``; ``forward(x, hw)``
where ``x`` is in the class's declared ``layout`` and ``hw`` is the (H, W) token grid.
"""

from __future__ import annotations

from search_spaces.layers import (  # noqa: F401  (imported for registration)
    attention,
    channel_mixers,
    conv_mixers,
    gated_linear,
    hydra,
    linear_attention,
    spectral,
    ssd,
    ssm,
)
from search_spaces.layers.norm import NORMS, make_norm

__all__ = ["NORMS", "make_norm"]
