"""Make ``import torchvision`` / ``import timm`` work when torchvision's compiled ops cannot load.

The package registry ships torchvision only as a CUDA build. Against a CPU build of torch its
``_C`` extension fails to load, so ``torchvision/_meta_registrations.py`` dies with
"operator torchvision::nms does not exist" and ``import timm`` fails with it. This module is
imported first by :mod:`search_spaces` (and so by everything else). It loads torchvision's
extension the way torchvision itself would; only if that fails does it declare the schemas
of the two operators that torchvision registers fake kernels for at import time. Calling them
still fails loudly (no kernel): no classification model uses them. Where torchvision works,
nothing is changed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def patch_torchvision() -> bool:
    """Declare torchvision's missing op schemas if its extension cannot load; True if patched."""
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or _LIBRARY is not None:
        return False
    if _has_op("nms"):
        return False
    for lib in Path(next(iter(spec.submodule_search_locations))).glob("_C.*"):
        if lib.suffix in {".so", ".pyd"}:
            try:
                torch.ops.load_library(str(lib))
            except OSError:
                pass
    if _has_op("nms"):
        return False
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _has_op(name):
            _LIBRARY.define(schema)
    return True


patch_torchvision()
