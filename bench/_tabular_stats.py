"""Statistics of the tabular search-quality benchmark (``bench/search_quality_tabular.py``).

Pure functions over a benchmark table (NAS-Bench-201 accuracy, Dong & Yang, ICLR 2020, joined
with HELP's measured latencies, Lee et al., NeurIPS 2021): no store, no torch, no scipy.

- :func:`load_table` / :func:`make_table`: the table (accuracy, latency on one device column).
- :func:`reference_point`: (10th-percentile accuracy, 90th-percentile latency) of the table.
- :func:`true_front`, :func:`true_hv`: the table's Pareto front of (accuracy max, latency min)
  and its hypervolume.
- :func:`hv_ratio`: hypervolume of a found set over the true one.
- :func:`best_acc_under`: best accuracy among found architectures under a latency limit.
- :func:`trainings_to_fraction`: the shortest prefix of a run whose ``hv_ratio`` reaches a
  fraction (0.95).
- :func:`wilcoxon_greater`: the exact paired one-sided Wilcoxon signed-rank test (Wilcoxon,
  Biometrics Bulletin 1945), with mid-ranks for ties and zero differences dropped, the null
  distribution enumerated exactly over the actual (mid-)ranks.
- :func:`evaluate_run`, :func:`summarise`, :func:`paired_p_values`, :func:`json_safe`: what
  the benchmark reports per seed, per strategy and per comparison.

JSON convention (:func:`json_safe`): a count that was never reached (``inf``) is written as the
string ``"inf"`` (``float("inf")`` reads it back), a value that does not exist (NaN, e.g. no
found architecture under the latency limit) as ``null``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from predictors.metrics import hypervolume, pareto_front

__all__ = [
    "MINIMIZE",
    "Table",
    "best_acc_under",
    "evaluate_run",
    "hv_ratio",
    "json_safe",
    "load_table",
    "make_table",
    "median_latency",
    "paired_p_values",
    "reference_point",
    "summarise",
    "trainings_to_fraction",
    "true_front",
    "true_hv",
    "wilcoxon_greater",
]

MINIMIZE = (False, True)  # (accuracy: maximised, latency: minimised)


@dataclass(eq=False)
class Table:
    """A benchmark table on one device: ``acc[i]`` and ``lat[i]`` of architecture ``arch[i]``;
    ``index`` maps an arch string to its row. Derived values (reference point, front, true HV)
    are computed once and cached in ``_cache``."""

    arch: tuple[str, ...]
    acc: np.ndarray
    lat: np.ndarray
    index: dict[str, int]
    device: str = ""
    label_column: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.arch)

    @property
    def points(self) -> np.ndarray:
        """(n, 2) array of (accuracy, latency)."""
        if "points" not in self._cache:
            self._cache["points"] = np.column_stack([self.acc, self.lat])
        return self._cache["points"]


def make_table(acc: Sequence[float] | np.ndarray, lat: Sequence[float] | np.ndarray,
               arch: Sequence[str] | None = None, *, device: str = "", label_column: str = "") -> Table:
    """A :class:`Table` from arrays (``arch`` defaults to ``"0"``, ``"1"``, ...). ValueError if the
    lengths differ, a value is not finite, or an arch repeats."""
    a = np.asarray(acc, dtype=np.float64).ravel()
    t = np.asarray(lat, dtype=np.float64).ravel()
    names = tuple(str(i) for i in range(a.size)) if arch is None else tuple(arch)
    if not (a.size == t.size == len(names)):
        raise ValueError(f"accuracy, latency and arch lengths differ: {a.size}, {t.size}, {len(names)}")
    if a.size == 0:
        raise ValueError("the table is empty")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(t))):
        raise ValueError("the table has a non-finite accuracy or latency")
    index = {s: i for i, s in enumerate(names)}
    if len(index) != len(names):
        raise ValueError("the table lists an architecture twice")
    return Table(arch=names, acc=a, lat=t, index=index, device=device, label_column=label_column)


def _read_csv(path: str | Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {str(p)!r} does not exist")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if "arch" not in header:
        raise ValueError(f"{what} file {str(p)!r} has no 'arch' column (columns: {', '.join(header)})")
    return header, rows


def _number(text: str | None, what: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not finite")
    return value


def load_table(labels: str | Path, latency: str | Path, label_column: str, device: str) -> Table:
    """The labels CSV (``arch`` + ``label_column``) joined on ``arch`` with the latency CSV
    (``arch`` + the ``device`` column), in the labels file's row order.

    The files must agree: the same set of architectures, each listed once, and where both have
    an ``index`` column the same index for each architecture. Every accuracy and latency must be
    a finite number, every latency positive. ValueError (one line, naming the file and column)
    otherwise."""
    lab_header, lab_rows = _read_csv(labels, "labels")
    lat_header, lat_rows = _read_csv(latency, "latency")
    if label_column not in lab_header:
        raise ValueError(f"labels file has no column {label_column!r}; columns: {', '.join(lab_header)}")
    if device not in lat_header:
        devices = [c for c in lat_header if c not in ("index", "arch")]
        raise ValueError(f"latency file has no column {device!r}; choose one of: {', '.join(devices)}")
    by_arch: dict[str, dict[str, str]] = {}
    for r in lat_rows:
        if r["arch"] in by_arch:
            raise ValueError(f"latency file lists arch {r['arch']!r} twice")
        by_arch[r["arch"]] = r
    seen: set[str] = set()
    acc, lat, arch = [], [], []
    both_index = "index" in lab_header and "index" in lat_header
    for r in lab_rows:
        name = r["arch"]
        if name in seen:
            raise ValueError(f"labels file lists arch {name!r} twice")
        seen.add(name)
        other = by_arch.get(name)
        if other is None:
            raise ValueError(f"arch {name!r} of the labels file is not in the latency file: are they the same space?")
        if both_index and r["index"] != other["index"]:
            raise ValueError(f"arch {name!r} has index {r['index']} in the labels file but {other['index']} in the "
                             "latency file")
        acc.append(_number(r[label_column], f"labels {label_column} of {name}"))
        t = _number(other[device], f"latency {device} of {name}")
        if t <= 0:
            raise ValueError(f"latency {device} of {name} is {t}, not positive")
        lat.append(t)
        arch.append(name)
    if len(seen) != len(by_arch):
        raise ValueError(f"the latency file has {len(by_arch) - len(seen)} architectures that the labels file lacks")
    return make_table(acc, lat, arch, device=device, label_column=label_column)


# ------------------------------------------------------------------------------ the true front


def reference_point(table: Table) -> tuple[float, float]:
    """(10th-percentile accuracy, 90th-percentile latency) of the whole table (numpy's linear
    percentile): the corner that the hypervolume is measured from."""
    if "ref" not in table._cache:
        table._cache["ref"] = (float(np.percentile(table.acc, 10)), float(np.percentile(table.lat, 90)))
    return table._cache["ref"]


def median_latency(table: Table) -> float:
    """The table's median latency (the limit of ``best_acc_at_median_latency``)."""
    if "median_lat" not in table._cache:
        table._cache["median_lat"] = float(np.median(table.lat))
    return table._cache["median_lat"]


def true_front(table: Table) -> np.ndarray:
    """Row indices (ascending) of the table's Pareto front of (accuracy max, latency min); of a
    group of identical points only the first row."""
    if "front" not in table._cache:
        table._cache["front"] = pareto_front(table.points, MINIMIZE)
    return table._cache["front"]


def _hv(idx: np.ndarray, table: Table) -> float:
    if idx.size == 0:
        return 0.0
    return hypervolume(table.points[idx], reference_point(table), MINIMIZE)


def true_hv(table: Table) -> float:
    """Hypervolume of the table's true front (from :func:`reference_point`)."""
    if "true_hv" not in table._cache:
        hv = _hv(true_front(table), table)
        if not hv > 0:
            raise ValueError("the table's true front has zero hypervolume; the reference point dominates it")
        table._cache["true_hv"] = hv
    return table._cache["true_hv"]


def _indices(found_idx: Sequence[int] | np.ndarray, table: Table) -> np.ndarray:
    idx = np.unique(np.asarray(found_idx, dtype=np.int64).ravel())  # sorted, distinct
    if idx.size and (idx[0] < 0 or idx[-1] >= len(table)):
        raise ValueError(f"row index out of range 0..{len(table) - 1}")
    return idx


def hv_ratio(found_idx: Sequence[int] | np.ndarray, table: Table) -> float:
    """HV of the found architectures (rows of ``table``; repeats count once) over the true HV.

    1.0 exactly for the true front's own rows (same points, same computation); 0.0 for an empty
    set or one that does not improve on the reference point in both objectives."""
    return _hv(_indices(found_idx, table), table) / true_hv(table)


def best_acc_under(found_idx: Sequence[int] | np.ndarray, table: Table, max_latency: float | None = None) -> float:
    """Best accuracy among the found rows whose latency is <= ``max_latency`` (default: the
    table's median latency); NaN if there is none."""
    limit = median_latency(table) if max_latency is None else float(max_latency)
    idx = _indices(found_idx, table)
    ok = idx[table.lat[idx] <= limit]
    return float(table.acc[ok].max()) if ok.size else math.nan


def trainings_to_fraction(order_idx: Sequence[int] | np.ndarray, table: Table, fraction: float = 0.95) -> float:
    """The smallest n such that the first n rows of ``order_idx`` (the run's trainings in the
    order they were recorded) reach ``hv_ratio >= fraction``; ``math.inf`` if the whole order
    never does. Returned as a float holding an integer (or inf)."""
    order = np.asarray(order_idx, dtype=np.int64).ravel()
    seen: set[int] = set()
    for n, row in enumerate(order.tolist(), start=1):
        if row in seen:  # a repeat adds nothing: the ratio is that of n - 1, already below
            continue
        seen.add(row)
        if hv_ratio(order[:n], table) >= fraction:
            return float(n)
    return math.inf


# ------------------------------------------------------------------- Wilcoxon signed-rank test


def _doubled_midranks(values: np.ndarray) -> list[int]:
    """2 x the mid-ranks (1-based) of ``values``: integers, exact for ties."""
    order = np.argsort(values, kind="stable")
    ranks = [0] * values.size
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[int(order[k])] = (i + 1) + (j + 1)  # 2 x mean of ranks i+1..j+1
        i = j + 1
    return ranks


def wilcoxon_greater(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Exact p-value of the paired one-sided Wilcoxon signed-rank test, H1: x > y.

    d = x - y; pairs with a NaN are dropped, zero differences are dropped (scipy's default
    ``zero_method="wilcox"``); the |d| are ranked with mid-ranks for ties; the statistic is
    T+ = sum of the ranks of the positive d. Under H0 each rank is + or - with probability 1/2,
    independently; the p-value P(T+ >= observed) is counted exactly over all 2^n sign patterns
    by dynamic programming over the doubled (integer) mid-ranks, so ties are handled exactly
    (scipy's ``method="exact"`` ignores ties; this does not). Without ties and zeros it equals
    ``scipy.stats.wilcoxon(x, y, alternative="greater")`` (exact for n <= 50); with ties or zeros
    it equals scipy's exhaustive permutation test (what scipy's ``auto`` runs for n <= 13; for
    larger n scipy falls back to the normal approximation, this stays exact). No differences left
    (all zero) gives 1.0. Cost O(n^3) in Python integers: fine for a few hundred pairs."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired test needs two sequences of the same length, got {a.size} and {b.size}")
    d = a - b
    d = d[~np.isnan(d)]
    d = d[d != 0]
    n = d.size
    if n == 0:
        return 1.0
    ranks = _doubled_midranks(np.abs(d))
    observed = sum(r for r, v in zip(ranks, d) if v > 0)
    total = sum(ranks)
    counts = [0] * (total + 1)  # counts[s]: sign patterns whose doubled T+ is s
    counts[0] = 1
    top = 0
    for r in ranks:
        for s in range(top, -1, -1):
            if counts[s]:
                counts[s + r] += counts[s]
        top += r
    tail = sum(counts[observed:])
    return min(1.0, tail / 2**n)


# ------------------------------------------------------------------------- per run, per strategy


def _finite_or(value: float, missing: Any) -> Any:
    return value if math.isfinite(value) else missing


def evaluate_run(order_idx: Sequence[int] | np.ndarray, table: Table, trainings: Sequence[int], *,
                 fraction: float = 0.95, max_latency: float | None = None) -> dict[int, dict[str, Any]]:
    """For each N in ``trainings``: the metrics of the run's first N trainings (``order_idx``:
    table rows in the order the run trained them; a row may repeat, it then counts as a training
    but adds nothing). A run with fewer than N trainings is judged on all of them (``short``).

    Per N: ``trained`` (the run's total), ``used`` (min(N, trained)), ``short``, ``distinct``
    (distinct architectures among the used), ``hv_ratio``, ``best_acc``,
    ``best_acc_at_median_latency`` (NaN if none), ``trainings_to_95pct_hv`` (smallest prefix
    n <= N with ``hv_ratio >= fraction``, inf if none)."""
    order = np.asarray(order_idx, dtype=np.int64).ravel()
    out: dict[int, dict[str, Any]] = {}
    for n_req in trainings:
        used = order[: int(n_req)]
        out[int(n_req)] = {
            "trained": int(order.size),
            "used": int(used.size),
            "short": bool(order.size < int(n_req)),
            "distinct": int(np.unique(used).size),
            "hv_ratio": hv_ratio(used, table),
            "best_acc": float(table.acc[used].max()) if used.size else math.nan,
            "best_acc_at_median_latency": best_acc_under(used, table, max_latency),
            "trainings_to_95pct_hv": trainings_to_fraction(used, table, fraction),
        }
    return out


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def summarise(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One strategy at one N over seeds: ``hv_ratio_mean``, ``hv_ratio_std`` (sample std,
    ddof=1; 0 for one seed), ``best_acc_at_median_latency_mean`` (NaN ignored; NaN if all are),
    ``best_acc_at_median_latency_nan`` (how many seeds had none), ``best_acc_mean``/``_std``,
    ``trainings_to_95pct_hv_median`` (inf when at least half the seeds never got there),
    ``short_runs`` (seeds that trained fewer than N), ``seeds`` and ``per_seed`` (as given).
    Values may be inf/NaN: pass the result through :func:`json_safe` before ``json.dump``."""
    hv = np.array([float(r["hv_ratio"]) for r in per_seed], dtype=np.float64)
    bm = np.array([float(r["best_acc_at_median_latency"]) for r in per_seed], dtype=np.float64)
    ba = np.array([float(r["best_acc"]) for r in per_seed], dtype=np.float64)
    t95 = np.array([float(r["trainings_to_95pct_hv"]) for r in per_seed], dtype=np.float64)
    finite_bm = bm[~np.isnan(bm)]
    finite_ba = ba[~np.isnan(ba)]
    return {
        "seeds": len(per_seed),
        "hv_ratio_mean": float(hv.mean()) if hv.size else math.nan,
        "hv_ratio_std": _std(hv),
        "best_acc_at_median_latency_mean": float(finite_bm.mean()) if finite_bm.size else math.nan,
        "best_acc_at_median_latency_nan": int(np.isnan(bm).sum()),
        "best_acc_mean": float(finite_ba.mean()) if finite_ba.size else math.nan,
        "best_acc_std": _std(finite_ba),
        "trainings_to_95pct_hv_median": float(np.median(t95)) if t95.size else math.nan,
        "short_runs": int(sum(bool(r.get("short", False)) for r in per_seed)),
        "per_seed": [dict(r) for r in per_seed],
    }


def paired_p_values(per_seed: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], *, reference: str = "staged",
                    metric: str = "hv_ratio") -> dict[str, dict[str, float]]:
    """``{f"{reference}_vs_{baseline}": {str(N): p}}``: :func:`wilcoxon_greater` of the reference
    strategy's ``metric`` against each other strategy's, paired by the ``seed`` key of the per-seed
    records (seeds missing on either side are left out; none in common gives NaN)."""
    out: dict[str, dict[str, float]] = {}
    if reference not in per_seed:
        return out
    for base, by_n in per_seed.items():
        if base == reference:
            continue
        row: dict[str, float] = {}
        for n, records in by_n.items():
            ref_records = per_seed[reference].get(n, [])
            mine = {r["seed"]: float(r[metric]) for r in ref_records}
            theirs = {r["seed"]: float(r[metric]) for r in records}
            common = sorted(set(mine) & set(theirs))
            row[str(n)] = (wilcoxon_greater([mine[s] for s in common], [theirs[s] for s in common])
                           if common else math.nan)
        out[f"{reference}_vs_{base}"] = row
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with every float inf as the string ``"inf"`` (``"-inf"``), every NaN as None, numpy
    scalars as Python numbers and tuples as lists, so ``json.dump(..., allow_nan=False)`` works."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return obj
