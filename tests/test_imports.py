"""Dependencies point one way, and search_spaces/predictors run on a GPU node with only torch + numpy."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("scipy", "sklearn", "optuna", "ray", "sqlalchemy", "nas", "workers", "typer", "rich", "timm", "torchvision",
         "PIL")


def test_search_spaces_and_predictors_import_with_torch_and_numpy_only() -> None:
    code = (
        "import sys\n"
        "import search_spaces, search_spaces.hybrid_vit, search_spaces.nb201\n"
        "import predictors, predictors.zero_cost, predictors.parzc, predictors.metrics, predictors.latency\n"
        "import predictors.precision, predictors.supernet, search_spaces.supernet\n"
        "search_spaces.get_space('hybrid_vit'); search_spaces.token_mixer_names()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported beyond torch + numpy: {out.stdout.strip()}"
