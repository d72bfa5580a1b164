"""bench/gpu_check.py: the CPU path of the GPU machine check.

``--device cpu --quick`` runs in a fresh interpreter where Ray, Optuna, SQLAlchemy and alembic
cannot be imported (as on the GPU image), exits 0, writes every section to the JSON file with
the measured CPU figures as numbers in sane ranges and the GPU-only ones as "unmeasured" strings.
Bad arguments exit 2 with one line. A failing section is recorded and makes the exit code 1.
Nothing here depends on speed: the run gets a generous --time-limit and no figure is a timing bound.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("fingerprint", "numerics", "export", "latency_repeatability", "mixer_step_time", "supernet",
            "latency_predictor")

# runs the script as __main__ with the GPU image's missing packages made unimportable
BLOCKED_RUN = r"""
import importlib.abc, runpy, sys
BLOCK = ("ray", "optuna", "sqlalchemy", "alembic")
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(name + " is not installed on the GPU image")
sys.meta_path.insert(0, _Blocked())
for name in BLOCK:  # the blocker itself works (these are installed in the dev venv)
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit("the blocker let " + name + " through")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    # a generous --time-limit: on a loaded machine the predictor must not stop early (no speed dependence)
    proc = _run("--device", "cpu", "--quick", "--json", str(out), "--time-limit", "1800", timeout=1800)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _fig(report: dict[str, Any], section: str) -> dict[str, Any]:
    return report["sections"][section]["figures"]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unmeasured(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("unmeasured")


def test_quick_cpu_run_exits_0_without_ray_optuna_sqlalchemy(quick_run: Any) -> None:
    proc, report = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tuple(report["sections"]) == SECTIONS
    assert {n: s["status"] for n, s in report["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    assert report["ok"] is True and report["failed_sections"] == []
    assert report["heavy_modules_imported"] == []
    assert report["device"] == "cpu" and report["quick"] is True
    # one table at the end: (section, figure, value), every section in it
    table = proc.stdout[proc.stdout.index("section"):]
    assert table.splitlines()[0].split() == ["section", "figure", "value"]
    for name in SECTIONS:
        assert f"\n{name} " in table


def test_measured_cpu_figures_are_numbers_in_range(quick_run: Any) -> None:
    _, report = quick_run
    fp = _fig(report, "fingerprint")
    assert fp["kind"] == "cpu" and isinstance(fp["name"], str) and fp["name"]

    num = _fig(report, "numerics")
    assert num["archs"] >= 3
    archs = [a["arch"] for a in num["details"]["archs"]]
    assert {"deit_tiny", "poolformer_s12", "hybrid_tiny"} <= set(archs) and any(a.startswith("random") for a in archs)
    for p in ("bf16", "fp16"):
        assert 0.0 <= num[f"{p}_top1_agreement_min"] <= num[f"{p}_top1_agreement_mean"] <= 1.0
        assert _number(num[f"{p}_max_abs_err"]) and num[f"{p}_max_abs_err"] >= 0
        # a cast of the whole model: about 1% relative for bf16 on these nets (README), far below 1
        assert _number(num[f"{p}_rel_err_max"]) and 0.0 <= num[f"{p}_rel_err_max"] < 0.2

    exp = _fig(report, "export")
    assert exp["ran_on"] == "cpu"
    assert _number(exp["fp32_max_abs_diff"]) and 0.0 <= exp["fp32_max_abs_diff"] <= 1e-5
    assert _number(exp["bf16_max_abs_diff"]) and exp["bf16_max_abs_diff"] >= 0
    assert exp["details"]["child"]["project_modules"] == []

    rep = _fig(report, "latency_repeatability")
    assert _number(rep["eager_cv"]) and rep["eager_cv"] >= 0
    assert _number(rep["eager_median_ms"]) and rep["eager_median_ms"] > 0
    assert len(rep["details"]["eager"]["medians_ms"]) == 5

    mix = _fig(report, "mixer_step_time")
    for cfg in ("stride4", "stride16"):
        for m in ("ssm", "gated_linear", "ssd", "hydra"):
            assert _number(mix[f"{cfg}_fp32_{m}_over_attention"]) and mix[f"{cfg}_fp32_{m}_over_attention"] > 0

    sn = _fig(report, "supernet")
    assert _number(sn["steps_per_s"]) and sn["steps_per_s"] > 0
    assert sn["subnets_per_step"] == 4 and _number(sn["last_loss"])

    lp = _fig(report, "latency_predictor")
    assert lp["n_test"] == lp["n_test_requested"] == 10
    assert _number(lp["mape_pct"]) and lp["mape_pct"] >= 0
    assert 0.0 <= lp["within_5pct"] <= lp["within_10pct"] <= 1.0
    assert -1.0 <= lp["kendall_tau"] <= 1.0
    assert len(lp["details"]["archs"]) == 10


def test_gpu_only_figures_are_unmeasured_strings(quick_run: Any) -> None:
    _, report = quick_run
    gpu_only = {
        "fingerprint": ["driver", "sm_clock_mhz", "power_limit_w"],
        "numerics": ["fp8_max_abs_err", "fp8_rel_err_max", "fp8_top1_agreement_min"],
        "export": ["fp8_max_abs_diff"],
        "latency_repeatability": ["cuda_graph_cv", "cuda_graph_median_ms"],
        "mixer_step_time": ["stride4_bf16_ssm_over_attention", "stride16_bf16_gated_linear_over_attention"],
    }
    for section, names in gpu_only.items():
        for name in names:
            assert _unmeasured(_fig(report, section)[name]), (section, name, _fig(report, section)[name])
    assert _fig(report, "numerics")["fp8_max_abs_err"] == "unmeasured (needs sm_89+)"
    assert _fig(report, "latency_repeatability")["cuda_graph_cv"] == "unmeasured (needs CUDA)"


BAD_ARGS = [
    ["--device", "tpu"],
    ["--bogus"],
    ["--threads", "0"],
    ["--predictor-exclude", "nonesuch"],
]
if not torch.cuda.is_available():
    BAD_ARGS.append(["--device", "cuda"])


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a))
def test_bad_arguments_exit_2_with_one_line(args: list[str], tmp_path: Path) -> None:
    proc = _run(*args, "--json", str(tmp_path / "r.json"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error:"), proc.stderr
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- the guard, without the heavy work


def _load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_section_is_recorded_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _load_script(monkeypatch)

    def fine(ctx: Any, out: dict[str, Any]) -> None:
        out["value"] = 1.0

    def broken(ctx: Any, out: dict[str, Any]) -> None:
        out["partial"] = 2.0
        raise RuntimeError("kernel exploded\nsecond line")

    checks = dict.fromkeys(SECTIONS, fine)
    checks["numerics"] = broken
    monkeypatch.setattr(mod, "CHECKS", checks)
    path = tmp_path / "r.json"
    assert mod.main(["--device", "cpu", "--quick", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    sec = report["sections"]["numerics"]
    assert sec["status"] == "error" and sec["error"] == "RuntimeError: kernel exploded"
    assert sec["figures"] == {"partial": 2.0}  # what it measured before failing is kept
    assert [n for n, s in report["sections"].items() if s["status"] == "ok"] == [n for n in SECTIONS
                                                                                  if n != "numerics"]
    assert report["failed_sections"] == ["numerics"] and report["ok"] is False

    monkeypatch.setattr(mod, "CHECKS", dict.fromkeys(SECTIONS, fine))
    assert mod.main(["--device", "cpu", "--quick", "--json", str(path)]) == 0
