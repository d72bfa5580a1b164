"""Studies: budget, store, search loop, resume, export, dashboard, datasets.

Submodules are imported on demand (``from nas.data import load``); this package imports nothing
heavy, so ``import nas`` stays cheap on a GPU node with only torch installed.
"""

from __future__ import annotations
