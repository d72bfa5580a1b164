"""Benchmark mode (``nas search --space nb201 --benchmark ...``): the table evaluator, its simulated
cost, the proxies' cache, the config's checks, a search through the CLI, and search quality
against random sampling on NAS-Bench-201 x HELP ground truth (3 seeds)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.budget import parse_budget
from nas.search import SearchConfig, SearchError, create_study, run_study
from nas.search.config import load_data
from nas.store import Store
from predictors.metrics import hypervolume, pareto_front
from predictors.online import OnlineGP, expected_hvi
from predictors.zero_cost import compute
from search_spaces.counting import count_flops, count_params
from search_spaces.nb201 import (
    NB201Space,
    NB201Spec,
    enumerate_specs,
    nb201_flops,
    nb201_mean_flops,
    nb201_params,
)
from workers.benchmark import BenchmarkError, evaluate_benchmark, load_table, simulated_train_seconds
from workers.evaluate import EvalConfig, _balanced_batch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABELS, LATENCY, CIFAR = DATA / "nb201_cifar10.csv", DATA / "nb201_latency_help.csv", DATA / "cifar10-jpeg.tar.gz"
NAS = str(Path(sys.executable).parent / "nas")

pytestmark = pytest.mark.skipif(not (LABELS.is_file() and LATENCY.is_file() and CIFAR.is_file()),
                                reason="needs ../shared/data (NB201 labels, HELP latency, CIFAR-10)")


def _cfg(tmp_path: Path, **kw: object) -> SearchConfig:
    base = dict(space="nb201", data=f"imagefolder:{CIFAR}", data_limit=200, benchmark=str(LABELS),
                benchmark_latency=str(LATENCY), device_column="titan_rtx_256_ms", proxy_cache=str(tmp_path / "zc"))
    return SearchConfig(**{**base, **kw})  # type: ignore[arg-type]


def _rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------


def test_nb201_flops_formula_equals_the_counter() -> None:
    specs = enumerate_specs()
    for i in random.Random(0).sample(range(len(specs)), 12):
        model = NB201Space().build(specs[i])
        assert nb201_flops(specs[i]) == count_flops(model, (1, 3, 32, 32))
        assert nb201_params(specs[i]) == count_params(model)
    assert nb201_mean_flops() == pytest.approx(float(np.mean([nb201_flops(s) for s in specs])), rel=1e-12)


def test_train_and_latency_are_the_tables_with_a_simulated_cost(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    data = load_data(cfg)
    ev_cfg = EvalConfig(space="nb201", benchmark=str(LABELS), benchmark_latency=str(LATENCY),
                        device_column="titan_rtx_256_ms", benchmark_train_s=500.0, proxies=("nwot", "synflow"))
    labels = {r[1]: float(r[2]) for r in _rows(LABELS)[1:]}
    head, *lat_rows = _rows(LATENCY)
    col = head.index("titan_rtx_256_ms")
    latency = {r[1]: float(r[col]) for r in lat_rows}
    for spec in (NB201Spec.from_string(a) for a in random.Random(1).sample(sorted(labels), 5)):
        tr = evaluate_benchmark(spec, "train", data, ev_cfg)
        assert tr.metrics["accuracy"] == labels[spec.to_string()]
        assert tr.metrics["latency_ms"] == latency[spec.to_string()] and tr.metrics["benchmark"] == 1.0
        assert tr.seconds == pytest.approx(500.0 * nb201_flops(spec) / nb201_mean_flops(), rel=1e-12)
        assert tr.device["kind"] == "benchmark" and tr.device["column"] == "cifar10_test_acc"
        lat = evaluate_benchmark(spec, "latency", data, ev_cfg)
        assert lat.seconds == 0.0 and lat.metrics["latency_ms"] == latency[spec.to_string()]
    # the costs average to the stated mean over the whole space
    mean = np.mean([simulated_train_seconds(s, 500.0) for s in enumerate_specs()])
    assert mean == pytest.approx(500.0, rel=1e-9)


def test_screening_computes_real_proxies_on_a_fixed_batch_and_charges_cached_ones(tmp_path: Path) -> None:
    data = load_data(_cfg(tmp_path))
    ev_cfg = EvalConfig(space="nb201", benchmark=str(LABELS), benchmark_latency=str(LATENCY),
                        device_column="gold_6226_ms", proxies=("nwot", "synflow"), proxy_cache=str(tmp_path / "zc"))
    spec = NB201Spec.from_string("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|"
                                 "nor_conv_1x1~2|")
    first = evaluate_benchmark(spec, "screen", data, ev_cfg)
    x, y = _balanced_batch(data.train, 64, data.num_classes, 0)
    direct = compute(NB201Space().build(spec), x, y, names=["nwot", "synflow"])
    assert first.metrics["zc.nwot"] == pytest.approx(direct["nwot"], rel=1e-9)
    assert first.metrics["zc.synflow"] == pytest.approx(direct["synflow"], rel=1e-9)
    assert first.metrics["score"] == first.metrics["zc.nwot"] and first.seconds > 0
    assert first.device["kind"] == "cpu"  # real seconds on this CPU
    files = list((tmp_path / "zc").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 1
    again = evaluate_benchmark(spec, "screen", data, ev_cfg)
    assert again.metrics == first.metrics and again.seconds == pytest.approx(first.seconds)  # charged as measured
    assert len(files[0].read_text().splitlines()) == 1


def test_bad_tables_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="no such file"):
        load_table(str(tmp_path / "none.csv"), None, str(LATENCY), "gold_6226_ms")
    with pytest.raises(BenchmarkError, match="column 'nope' is not in"):
        load_table(str(LABELS), None, str(LATENCY), "nope")
    short = tmp_path / "short.csv"
    short.write_text("\n".join(LABELS.read_text().splitlines()[:50]) + "\n")
    with pytest.raises(BenchmarkError, match="list different architectures"):
        load_table(str(short), None, str(LATENCY), "gold_6226_ms")


def test_config_checks(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="only against its benchmark table"):
        SearchConfig(space="nb201")
    with pytest.raises(SearchError, match="use it with --space nb201"):
        SearchConfig(benchmark=str(LABELS))
    with pytest.raises(SearchError, match="--benchmark-latency"):
        SearchConfig(space="nb201", benchmark=str(LABELS))
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    with pytest.raises(SearchError, match="simulated device-seconds, not gpu time"):
        create_study(store, "g", _cfg(tmp_path), parse_budget("1gpu-h"))
    with pytest.raises(SearchError, match="RGB images"):
        create_study(store, "d", _cfg(tmp_path, data="digits"), parse_budget("9000s"))
    assert store.studies() == []


# --------------------------------------------------------------------------------------------
# the predictor and the pick
# --------------------------------------------------------------------------------------------


def test_expected_hvi_equals_a_monte_carlo_estimate() -> None:
    rng = np.random.default_rng(0)
    front = np.array([[90.0, 5.0], [92.0, 9.0], [93.0, 14.0]])
    ref = (80.0, 20.0)
    base = hypervolume(front, ref, minimize=[False, True])
    mean, std, lat = np.array([91.0, 93.5, 85.0]), np.array([1.0, 0.5, 2.0]), np.array([7.0, 12.0, 3.0])
    got = expected_hvi(mean, std, lat, front[:, 0], front[:, 1], *ref)
    for i in range(3):
        draws = rng.normal(mean[i], std[i], 20000)
        mc = np.mean([hypervolume(np.vstack([front, [a, lat[i]]]), ref, minimize=[False, True]) - base
                      for a in draws])
        assert got[i] == pytest.approx(mc, rel=0.03, abs=1e-3)
    assert expected_hvi(np.array([99.0]), np.array([1.0]), np.array([25.0]), front[:, 0], front[:, 1], *ref)[0] == 0.0


def test_online_gp_ranks_nb201_cells_from_their_encoding() -> None:
    """Fitted on 100 labelled cells (one-hot encoding only), it ranks 1,000 others with Kendall tau
    well above chance (the measured figure is 0.53)."""
    from predictors.metrics import kendall_tau
    from search_spaces.nb201 import OPS

    labels = {r[1]: float(r[2]) for r in _rows(LABELS)[1:]}
    cells = random.Random(0).sample(sorted(labels), 1100)
    x = np.array([[1.0 if op == o else 0.0 for op in NB201Spec.from_string(a).ops for o in OPS] for a in cells])
    y = np.array([labels[a] for a in cells])
    mean, std = OnlineGP().fit(x[:100], y[:100]).predict(x[100:])
    assert np.all(std > 0) and np.all(np.isfinite(mean))
    assert kendall_tau(mean, y[100:]) > 0.4


# --------------------------------------------------------------------------------------------
# searches
# --------------------------------------------------------------------------------------------


def test_cli_benchmark_search_marks_its_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    args = [NAS, "search", "--space", "nb201", "--benchmark", str(LABELS), "--benchmark-latency", str(LATENCY),
            "--device-column", "2080ti_32_ms", "--data", f"imagefolder:{CIFAR}", "--data-limit", "200",
            "--budget", "8000s", "--strategy", "random", "--study", "b", "--storage", url]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "from a benchmark, not trained here" in out.stdout and "nb201_cifar10.csv:cifar10_test_acc" in out.stdout
    assert "simulated device-s" in out.stdout and "--budget +10000s" in out.stdout  # ten mean trainings
    best = subprocess.run([NAS, "best", "b", "--storage", url, "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    rows = json.loads(best.stdout)
    assert rows and all(r["metrics"]["source"] == "benchmark" for r in rows)
    store = Store(url)
    trained = store.evaluations("b", stage="train", errors=False)
    assert trained and all(e.metrics["benchmark"] == 1.0 for e in trained)
    assert sum(e.seconds for e in trained) <= 8000.0  # a training's known cost never overruns the budget
    assert store.study("b").used_seconds == pytest.approx(sum(e.seconds for e in store.evaluations("b")), rel=1e-9)
    from fastapi.testclient import TestClient

    from nas.dashboard import create_app

    app = create_app(url, export_dir=tmp_path / "exports", log_dir=tmp_path / "logs")
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as c:
        page = c.get("/studies/b")
        api = c.get("/api/studies/b").json()
    assert page.status_code == 200 and 'id="benchmark"' in page.text and "nothing trained here" in page.text
    assert "2080ti_32_ms" in api["study"]["benchmark"], api.get("study")
    assert {r["source"] for r in api["front"]} == {"benchmark"} and api["study"]["best"]["accuracy"] is not None


def test_a_fixed_screen_batch_repeats_a_seeded_search_whatever_the_screening_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--screen-batch N: the same seed screens and trains the same cells in the same order whether
    each proxy computation is charged 1/1000 or 25x its measured seconds (an idle or a loaded
    machine; the loaded one has less budget left, so it may stop training sooner). Sized by
    seconds, as by default, those two charges send the 24 cells in requests of 1 and 23 against
    24 of 1, and NSGA-II, asked before its first generation of 16 is told, then screens other
    cells (checked: this test fails with screen_batch=None). A shared proxy cache keeps the
    scores identical."""
    import workers.benchmark as wb

    measured = wb._proxies
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    order: dict[str, dict[str, list[str | None]]] = {}
    charged: dict[str, float] = {}
    for name, factor in (("idle", 1e-3), ("loaded", 25.0)):
        def charge(spec: object, data: object, cfg: object, factor: float = factor) -> tuple[dict[str, float], float]:
            metrics, seconds = measured(spec, data, cfg)
            return metrics, factor * seconds

        monkeypatch.setattr(wb, "_proxies", charge)
        cfg = _cfg(tmp_path, strategy="staged", seed=3, screen_max=24, screen_batch=5)
        create_study(store, name, cfg, parse_budget(f"{int(12 * cfg.benchmark_train_s)}s"))
        run_study(store, name, executor="local")
        assert store.study(name).status == "completed"
        order[name] = {stage: [e.arch_hash for e in store.evaluations(name, stage=stage, errors=False)]
                       for stage in ("screen", "train")}
        charged[name] = sum(e.seconds for e in store.evaluations(name, stage="screen"))
    idle, loaded = order["idle"], order["loaded"]
    assert len(idle["screen"]) == 24 and loaded["screen"] == idle["screen"]
    # the charge is budget spent, so the loaded study may train fewer cells: the same ones, in order
    n = min(len(idle["train"]), len(loaded["train"]))
    assert n >= 8 and loaded["train"][:n] == idle["train"][:n]
    assert charged["loaded"] == pytest.approx(25_000.0 * charged["idle"], rel=1e-6)  # the charge did differ


def _hv_ratio(store: Store, name: str, table: dict[str, tuple[float, float]], n: int,
              true_hv: float, ref: tuple[float, float]) -> float:
    pts = []
    for e in store.evaluations(name, stage="train", errors=False)[:n]:
        spec = store.architecture(e.arch_hash)["spec"]  # type: ignore[index]
        pts.append(table[spec["arch"]])
    return hypervolume(np.array(pts), ref, minimize=[False, True]) / true_hv


def test_staged_beats_random_on_nb201_with_three_seeds(tmp_path: Path) -> None:
    """The quick form of bench/search_quality_tabular.py: 3 seeds, 30 trainings, staged screening
    capped at 60 cells (the benchmark screens 1,000), titan_rtx_256_ms. Screening requests carry a
    fixed 8 cells (``--screen-batch``): sized by measured seconds, as by default, they shrink under
    load and NSGA-II then asks from other parents, which moved staged's mean from 0.857 to 0.781
    beside two busy loops. Fixed, the run repeats itself cell for cell, loaded or not (checked:
    two copies side by side gave the same figures). Measured at 8 cells (4 and 16 give the same
    cells; seeds 0, 1, 2): staged 0.755, 0.840, 0.831 (mean 0.809) against random 0.711, 0.842,
    0.779 (mean 0.777), a ratio of 1.04. Over seeds 0-9: staged 0.845 against random 0.786, 1.07x;
    staged is ahead on 8 of the 10. The 20-seed benchmark (README, 1,000 cells screened: 1.18x at
    30 trainings) is the evidence; this is a deterministic regression guard."""
    head, *lat_rows = _rows(LATENCY)
    col = head.index("titan_rtx_256_ms")
    acc = {r[1]: float(r[2]) for r in _rows(LABELS)[1:]}
    table = {r[1]: (acc[r[1]], float(r[col])) for r in lat_rows}
    pts = np.array(list(table.values()))
    ref = (float(np.percentile(pts[:, 0], 10)), float(np.percentile(pts[:, 1], 90)))
    true_hv = hypervolume(pts[pareto_front(pts, minimize=[False, True])], ref, minimize=[False, True])
    torch.set_num_threads(1)
    ratios: dict[str, list[float]] = {"staged": [], "random": []}
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    for strategy in ratios:
        for seed in range(3):
            name = f"{strategy}-{seed}"
            cfg = _cfg(tmp_path, strategy=strategy, seed=seed, screen_max=60, screen_batch=8)
            create_study(store, name, cfg, parse_budget(f"{int(45 * cfg.benchmark_train_s)}s"))
            run_study(store, name, executor="local")
            assert store.study(name).status == "completed"
            assert len(store.evaluations(name, stage="train", errors=False)) >= 30
            ratios[strategy].append(_hv_ratio(store, name, table, 30, true_hv, ref))
    staged, rand = float(np.mean(ratios["staged"])), float(np.mean(ratios["random"]))
    print(f"HV ratio at 30 trainings: staged {ratios['staged']} mean {staged:.4f}; random {ratios['random']} "
          f"mean {rand:.4f}")
    assert math.isfinite(staged) and staged >= 1.03 * rand, ratios
