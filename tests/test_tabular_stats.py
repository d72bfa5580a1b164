"""The statistics of bench/search_quality_tabular.py (bench/_tabular_stats.py): the exact
Wilcoxon signed-rank test against scipy's reference values, the hypervolume ratio on the real
NAS-Bench-201 x HELP table, and the per-run / per-strategy summaries on constructed data."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _tabular_stats as ts

# --------------------------------------------------------------------------------- Wilcoxon

# p-values of scipy.stats.wilcoxon(x, y, alternative="greater") (one sample: wilcoxon(d, ...)),
# scipy 1.17.1, default zero_method="wilcox", method="auto" (exact here: no ties, n <= 50),
# computed outside the repository and pasted here.
X20 = [0.8188, 0.914, 0.8715, 0.6788, 0.7051, 0.9057, 0.6018, 0.8874, 0.879, 0.7638, 0.7061, 0.6974, 0.6892,
       0.7558, 0.7766, 0.7937, 0.9484, 0.8774, 0.8178, 0.9461]
Y20 = [0.8909, 0.9058, 0.9149, 0.6452, 0.6773, 0.895, 0.7076, 0.8943, 0.8614, 0.7381, 0.7626, 0.7013, 0.7181,
       0.7762, 0.7036, 0.8141, 0.93, 0.8132, 0.827, 0.9317]
D30 = [0.01103, 0.05079, 0.04674, -0.00531, 0.00106, -0.00582, 0.02709, 0.00832, 0.03241, -0.04542, 0.057, 0.00711,
       0.03041, 0.0059, -0.00137, 0.02389, 0.03474, 0.00392, 0.00542, 0.03057, -0.01611, -0.03543, 0.02185,
       -0.01012, -0.04761, -0.01442, -0.00403, -0.0258, -0.03477, 0.0111]
SCIPY_CASES = [
    ([0.9, 0.8, 0.85, 0.7, 0.95], [0.8, 0.82, 0.8, 0.6, 0.9], 0.0625),
    (X20, Y20, 0.5508413314819336),
    (Y20, X20, 0.4636392593383789),
    ([1, 2, -3, 4, 5, 6, -7, 8], None, 0.15625),
    ([1, 2, -3, 4, 5, 6, -7, 8, 0.0], None, 0.15625),  # the zero difference is dropped
    ([3, 1, 4, 1.5, 9, 2.6], None, 0.015625),
    ([-1, -2, -3.5], None, 1.0),
    ([0.05, 0.03, -0.01, 0.04, 0.06, 0.02, 0.07, -0.015, 0.08, 0.035, 0.045, 0.055], None, 0.001220703125),
    (D30, None, 0.14004339091479778),
]


@pytest.mark.parametrize(("x", "y", "expected"), SCIPY_CASES)
def test_wilcoxon_matches_scipy_without_ties(x: list[float], y: list[float] | None, expected: float) -> None:
    y = [0.0] * len(x) if y is None else y
    assert ts.wilcoxon_greater(x, y) == pytest.approx(expected, abs=1e-12, rel=0)


def _brute_force(d: list[float]) -> float:
    """P(T+ >= observed) over all 2^n sign patterns of the nonzero |d|, mid-ranks for ties: the
    definition, written independently of the module's dynamic programme."""
    nonzero = [float(v) for v in d if v != 0]
    a = [abs(v) for v in nonzero]
    srt = sorted(a)

    def midrank(v: float) -> float:
        pos = [k + 1 for k, s in enumerate(srt) if s == v]
        return sum(pos) / len(pos)

    r = [midrank(v) for v in a]
    observed = sum(rk for rk, v in zip(r, nonzero) if v > 0)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=len(r))
               if sum(rk for rk, sg in zip(r, signs) if sg) >= observed - 1e-9)
    return hits / 2 ** len(r)


TIE_CASES = [
    [1, 2, -2, 4, 5, 6, -7, 8],
    [1, 1, 1, -1, 2, 2, -3, 0, 0, 4],
    [0.5, -0.5, 0.5, 0.5, 1.5, -1.5, 2.0, 2.0, 2.0, -2.0, 3.0, 0.25],
    [-1, -1, -1, 1],
    [2, 2, 2, 2],
]


@pytest.mark.parametrize("d", TIE_CASES)
def test_wilcoxon_with_ties_is_the_exact_enumeration(d: list[float]) -> None:
    assert ts.wilcoxon_greater(d, [0.0] * len(d)) == pytest.approx(_brute_force(d), abs=1e-12, rel=0)


def test_wilcoxon_tie_case_agrees_with_scipy() -> None:
    # scipy.stats.wilcoxon([1, 2, -2, 4, 5, 6, -7, 8], alternative="greater").pvalue, scipy 1.17.1
    # (with ties or zeros and n <= 13, method="auto" runs an exhaustive permutation test, i.e. this
    # same enumeration; for n > 13 it falls back to the normal approximation; method="exact"
    # ignores ties and would give 0.15625)
    assert ts.wilcoxon_greater([1, 2, -2, 4, 5, 6, -7, 8], [0] * 8) == pytest.approx(0.1328125, abs=1e-12)


def test_wilcoxon_edge_cases() -> None:
    assert ts.wilcoxon_greater([1.0, 2.0], [1.0, 2.0]) == 1.0  # nothing left after dropping zeros
    assert ts.wilcoxon_greater([1.0, math.nan, 3.0], [0.0, 0.0, 0.0]) == pytest.approx(0.25)  # NaN pair dropped
    assert ts.wilcoxon_greater([1, 2, 3, 4, 5, 6], [0] * 6) == pytest.approx(1 / 64)
    # the two one-sided tails of a tie-free sample overlap exactly at the observed statistic
    p_up = ts.wilcoxon_greater(D30, [0.0] * 30)
    p_down = ts.wilcoxon_greater([0.0] * 30, D30)
    assert p_up + p_down > 1.0
    with pytest.raises(ValueError, match="same length"):
        ts.wilcoxon_greater([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- the real table

LABELS = "nb201_cifar10.csv"
LATENCY = "nb201_latency_help.csv"


@pytest.fixture(scope="module")
def tables(shared_data: Path) -> dict[str, ts.Table]:
    lab, lat = shared_data / LABELS, shared_data / LATENCY
    if not (lab.is_file() and lat.is_file()):
        pytest.skip(f"{LABELS} / {LATENCY} not in {shared_data}")
    return {dev: ts.load_table(lab, lat, "cifar10_test_acc", dev)
            for dev in ("titan_rtx_256_ms", "2080ti_32_ms", "gold_6226_ms")}


def test_real_table_loads_and_its_true_front_is_hv_ratio_one(tables: dict[str, ts.Table]) -> None:
    for table in tables.values():
        assert len(table) == 15625
        assert table.acc.max() == pytest.approx(94.3733)
        front = ts.true_front(table)
        assert 20 <= front.size <= 80
        assert ts.hv_ratio(front, table) == 1.0  # exactly: the same points, the same computation
        assert ts.hv_ratio(np.arange(len(table)), table) == pytest.approx(1.0, abs=1e-12)
        assert ts.hv_ratio([], table) == 0.0
        acc_ref, lat_ref = ts.reference_point(table)
        assert acc_ref == pytest.approx(np.percentile(table.acc, 10))
        assert lat_ref == pytest.approx(np.percentile(table.lat, 90))


@pytest.mark.parametrize(("k", "expected"), [(30, 0.78), (100, 0.87)])
def test_random_cells_reach_the_stated_hv_ratio(tables: dict[str, ts.Table], k: int, expected: float) -> None:
    """hv_ratio of k uniformly random cells (no repeats) on titan_rtx_256_ms, mean over 50 seeds:
    the issue states 0.78 +- 0.05 for 30 cells and 0.87 +- 0.03 for 100."""
    table = tables["titan_rtx_256_ms"]
    ratios = [ts.hv_ratio(np.random.default_rng(s).choice(len(table), k, replace=False), table) for s in range(50)]
    assert float(np.mean(ratios)) == pytest.approx(expected, abs=0.03)
    assert 0.0 < min(ratios) <= max(ratios) < 1.0


def test_load_table_checks_that_the_files_agree(tmp_path: Path) -> None:
    lab = tmp_path / "lab.csv"
    lat = tmp_path / "lat.csv"
    lab.write_text("index,arch,acc\n0,a,90.0\n1,b,80.0\n2,c,70.0\n")
    lat.write_text("index,arch,dev_ms\n2,c,1.0\n0,a,3.0\n1,b,2.0\n")  # another order: joined on arch
    t = ts.load_table(lab, lat, "acc", "dev_ms")
    assert t.arch == ("a", "b", "c")
    assert t.lat.tolist() == [3.0, 2.0, 1.0]
    assert t.index == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="no column 'gpu_ms'"):
        ts.load_table(lab, lat, "acc", "gpu_ms")
    with pytest.raises(ValueError, match="no column 'top1'"):
        ts.load_table(lab, lat, "top1", "dev_ms")
    for text, message in (("0,a,3.0\n1,b,2.0\n2,d,1.0", "not in the latency file"),
                          ("0,a,3.0\n2,b,2.0\n1,c,1.0", "index"),
                          ("0,a,3.0\n1,b,2.0\n2,c,1.0\n3,e,1.0", "lacks"),
                          ("0,a,3.0\n1,b,nan\n2,c,1.0", "not finite")):
        lat.write_text(f"index,arch,dev_ms\n{text}\n")
        with pytest.raises(ValueError, match=message):
            ts.load_table(lab, lat, "acc", "dev_ms")


# ------------------------------------------------------------------------ constructed tables


@pytest.fixture
def stairs() -> ts.Table:
    """A staircase front (rows 0-3) of equal steps, dominated rows 4-6 (6 sits on the reference
    latency), and low fillers 7-11 that put the reference point at (50, 5) in (accuracy, latency)."""
    acc = [60, 70, 80, 90, 55, 65, 75, 50, 50, 50, 50, 50]
    lat = [1, 2, 3, 4, 3.5, 4.5, 5, 5, 5, 5, 5, 5]
    return ts.make_table(acc, lat)


def test_constructed_front_and_ratio(stairs: ts.Table) -> None:
    assert ts.reference_point(stairs) == pytest.approx((50.0, 5.0))
    assert ts.true_front(stairs).tolist() == [0, 1, 2, 3]
    # by hand: slabs of width 1 in latency from 1 to 5 under the best accuracy reached so far
    assert ts.true_hv(stairs) == pytest.approx(10 + 20 + 30 + 40)
    assert ts.hv_ratio([3], stairs) == pytest.approx(0.4)
    assert ts.hv_ratio([3, 4], stairs) == pytest.approx(0.4 + 0.05 * 0.5)
    assert ts.hv_ratio([3, 3, 3], stairs) == ts.hv_ratio([3], stairs)  # repeats count once
    assert ts.hv_ratio([6, 7, 8], stairs) == 0.0  # on the reference latency: no volume
    with pytest.raises(ValueError, match="out of range"):
        ts.hv_ratio([12], stairs)


def test_best_acc_under(stairs: ts.Table) -> None:
    assert ts.median_latency(stairs) == pytest.approx(4.75)
    assert ts.best_acc_under([0, 5, 6], stairs) == 65.0  # 75 is at 5 ms > median
    assert ts.best_acc_under([0, 1, 2, 3], stairs, max_latency=2.5) == 70.0
    assert math.isnan(ts.best_acc_under([6, 7], stairs))
    assert math.isnan(ts.best_acc_under([], stairs))


def test_trainings_to_fraction_on_constructed_orders(stairs: ts.Table) -> None:
    # every front row is needed for 95%: without any one of them the ratio is 0.9
    for three in itertools.combinations(range(4), 3):
        assert ts.hv_ratio(three, stairs) == pytest.approx(0.9)
    assert ts.trainings_to_fraction([3, 2, 1, 0], stairs) == 4.0
    assert ts.trainings_to_fraction([7, 4, 5, 3, 8, 2, 1, 0, 6], stairs) == 8.0
    assert ts.trainings_to_fraction([3, 3, 3, 2, 2, 1, 0], stairs) == 7.0  # repeats count as trainings
    assert ts.trainings_to_fraction([3, 2, 1, 4, 5, 6], stairs) == math.inf
    assert ts.trainings_to_fraction([], stairs) == math.inf
    assert ts.trainings_to_fraction([0, 1, 2, 3], stairs, fraction=1.0) == 4.0
    assert ts.trainings_to_fraction([3, 0], stairs, fraction=0.45) == 2.0
    assert ts.trainings_to_fraction([3, 0], stairs, fraction=0.35) == 1.0
    # the definition: the first prefix whose hv_ratio reaches the fraction
    rng = np.random.default_rng(0)
    for _ in range(20):
        order = rng.integers(0, len(stairs), size=10)
        expect = next((n for n in range(1, 11) if ts.hv_ratio(order[:n], stairs) >= 0.95), math.inf)
        assert ts.trainings_to_fraction(order, stairs) == expect


def test_evaluate_run_summarise_and_json(stairs: ts.Table) -> None:
    runs = {
        "staged": {0: [3, 2, 1, 0], 1: [3, 2, 1, 0, 4], 2: [2, 1, 3, 6]},
        "random": {0: [7, 4, 5, 3], 1: [6, 8], 2: [5, 4, 9, 3, 0]},
    }
    per_seed: dict[str, dict[int, list[dict]]] = {}
    for strat, by_seed in runs.items():
        for seed, order in by_seed.items():
            for n, rec in ts.evaluate_run(order, stairs, [2, 4]).items():
                per_seed.setdefault(strat, {}).setdefault(n, []).append({"seed": seed, **rec})
    short = per_seed["random"][4][1]
    assert short["short"] and short["used"] == 2 and short["trained"] == 2
    assert math.isnan(short["best_acc_at_median_latency"])  # 75 and 50 at 5 ms > the median 4.75
    assert per_seed["staged"][4][0]["trainings_to_95pct_hv"] == 4.0
    assert per_seed["staged"][2][0]["trainings_to_95pct_hv"] == math.inf  # not within the first 2
    assert per_seed["staged"][4][1]["distinct"] == 4 and not per_seed["staged"][4][1]["short"]

    s = ts.summarise(per_seed["random"][4])
    assert s["seeds"] == 3 and s["short_runs"] == 1
    assert s["best_acc_at_median_latency_nan"] == 1
    assert s["best_acc_at_median_latency_mean"] == pytest.approx((90 + 90) / 2)
    hv = [r["hv_ratio"] for r in per_seed["random"][4]]
    assert s["hv_ratio_mean"] == pytest.approx(np.mean(hv))
    assert s["hv_ratio_std"] == pytest.approx(np.std(hv, ddof=1))
    assert s["trainings_to_95pct_hv_median"] == math.inf
    assert ts.summarise(per_seed["staged"][4])["trainings_to_95pct_hv_median"] == 4.0  # 4, 4 and inf

    p = ts.paired_p_values(per_seed)
    assert set(p) == {"staged_vs_random"} and set(p["staged_vs_random"]) == {"2", "4"}
    d = [a["hv_ratio"] - b["hv_ratio"] for a, b in zip(per_seed["staged"][4], per_seed["random"][4])]
    assert p["staged_vs_random"]["4"] == pytest.approx(_brute_force(d), abs=1e-12)

    text = json.dumps(ts.json_safe({"random": {"4": s}, "p": p}), allow_nan=False)
    back = json.loads(text)
    assert back["random"]["4"]["trainings_to_95pct_hv_median"] == "inf"
    assert float(back["random"]["4"]["trainings_to_95pct_hv_median"]) == math.inf
    assert back["random"]["4"]["per_seed"][1]["best_acc_at_median_latency"] is None


# ------------------------------------------------------------------- the bench script, without runs


def test_bench_script_end_to_end_on_fake_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The script's judging, tables and JSON, with the runs replaced by made-up trainings (the
    studies themselves need the search core; this checks everything after them)."""
    import search_quality_tabular as sqt

    rng = np.random.default_rng(1)
    n = 60
    acc = np.round(rng.uniform(60, 95, n), 4)
    lat = np.round(rng.uniform(1, 20, n), 4)
    arch = [f"|cell{i}~0|" for i in range(n)]
    lab, lat_csv = tmp_path / "lab.csv", tmp_path / "lat.csv"
    lab.write_text("index,arch,acc\n" + "".join(f"{i},{a},{v}\n" for i, (a, v) in enumerate(zip(arch, acc))))
    lat_csv.write_text("index,arch,dev_ms\n" + "".join(f"{i},{a},{v}\n" for i, (a, v) in enumerate(zip(arch, lat))))
    table = ts.load_table(lab, lat_csv, "acc", "dev_ms")
    front = ts.true_front(table).tolist()

    def fake_run_all(jobs: list[dict], n_procs: int) -> tuple[list[dict], list[str]]:
        results = []
        for job in jobs:
            r = np.random.default_rng(1000 + job["seed"])
            k = {"staged": 12, "random": 8}[job["strategy"]]  # random trains fewer than 10: short at 10
            order = list(r.choice(n, k, replace=False))
            if job["strategy"] == "staged":
                order = front + order  # staged finds the whole front first
            trained = [{"arch": arch[i], "accuracy": float(acc[i]), "latency_ms": None, "seconds": 10.0}
                       for i in order]
            if job["strategy"] == "random" and job["seed"] == 3:
                trained[0]["accuracy"] = trained[0]["accuracy"] / 100  # a store that disagrees: not judged
            results.append({"strategy": job["strategy"], "seed": job["seed"], "name": job["name"], "db": job["db"],
                            "status": "completed", "cached": False, "trained": trained, "screened": 7,
                            "screen_rows": 7, "screen_seconds": 3.5, "used_seconds": 100.0, "wall_s": 0.1})
        assert n_procs == 1 and {j["config"]["benchmark_train_s"] for j in jobs} == {10.0}
        assert {j["budget"] for j in jobs} == {"300.0s"}  # 1.5 x 20 trainings x 10 s
        return results, []

    monkeypatch.setattr(sqt, "check_core", lambda strategies: None)
    monkeypatch.setattr(sqt, "_default_train_seconds", lambda: 10.0)
    monkeypatch.setattr(sqt, "run_all", fake_run_all)
    out = tmp_path / "res.json"
    rc = sqt.main(["--labels", str(lab), "--latency", str(lat_csv), "--device", "dev_ms", "--label-column", "acc",
                   "--strategies", "staged,random", "--seeds", "6", "--trainings", "20,10", "--json", str(out),
                   "--jobs", "1", "--data", "imagefolder:none", "--workdir", str(tmp_path / "runs")])
    assert rc == 1  # one run not judged
    printed = capsys.readouterr()
    assert "not the table's" in printed.err and "fraction" in printed.err
    assert "Dong & Yang, ICLR 2020" in printed.out and "93.70 ± 0.36" in printed.out
    res = json.loads(out.read_text())
    assert set(res) == {"staged", "random", "p_values", "meta"}
    assert set(res["staged"]) == {"10", "20"}
    if len(front) <= 10:
        assert res["staged"]["10"]["hv_ratio_mean"] == 1.0
    assert res["staged"]["20"]["hv_ratio_mean"] == 1.0 and res["staged"]["20"]["hv_ratio_std"] == 0.0
    assert res["staged"]["20"]["trainings_to_95pct_hv_median"] <= len(front)
    assert res["random"]["10"]["short_runs"] == 5 and res["random"]["10"]["seeds"] == 5
    assert all(r["seed"] != 3 for r in res["random"]["10"]["per_seed"])
    assert res["random"]["20"]["trainings_to_95pct_hv_median"] in ("inf", *range(1, 9))
    # staged beats random on all 5 common seeds: the smallest one-sided p with 5 pairs is 1/32
    assert res["p_values"]["staged_vs_random"]["20"] == pytest.approx(1 / 32)
    meta = res["meta"]
    assert meta["true_front_size"] == len(front) and meta["budget_seconds"] == 300.0
    assert meta["strategies"]["staged"]["screened_mean"] == 7.0
    assert meta["reference_point"] == pytest.approx([np.percentile(acc, 10), np.percentile(lat, 90)])
