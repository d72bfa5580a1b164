"""Ranking and multi-objective metrics: Kendall tau, Spearman, Pareto front, hypervolume.

- :func:`kendall_tau`, :func:`spearman`: rank correlations through ``scipy.stats`` (Kendall's
  tau-b, Spearman's rho; scipy is imported on first use, so importing this module needs only
  numpy), NaN-safe: pairs with a non-finite value are dropped, and a constant or
  too-short input gives 0.0 without a warning.
- :func:`pareto_front`: indices of the non-dominated points, any number of objectives, each
  minimised or maximised.
- :func:`hypervolume`: the volume dominated by the points and bounded by a reference point,
  exact in any dimension (2-D by a sweep, more by slicing objectives; While et al., "A Faster
  Algorithm for Calculating Hypervolume", IEEE TEC 2006).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["hypervolume", "kendall_tau", "pareto_front", "spearman"]


# ------------------------------------------------------------------------- rank correlations


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"rank correlation needs two sequences of the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    return x.size < 2 or bool(np.all(x == x[0])) or bool(np.all(y == y[0]))


def _rank_correlation(name: str, a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """``scipy.stats.<name>`` on the finite pairs; 0.0 (no warning) for degenerate input."""
    x, y = _paired(a, b)
    if _degenerate(x, y):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from scipy import stats  # lazy: predictors stay importable with torch + numpy alone

        value = getattr(stats, name)(x, y).statistic
    return 0.0 if not np.isfinite(value) else float(value)


def kendall_tau(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b between ``a`` and ``b`` (``scipy.stats.kendalltau``).

    Pairs where either value is NaN or infinite are dropped. Fewer than two pairs left, or a
    constant sequence, gives 0.0 (no rank information), with no warning."""
    return _rank_correlation("kendalltau", a, b)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation rho between ``a`` and ``b`` (``scipy.stats.spearmanr``).

    Same NaN and constant-input rules as :func:`kendall_tau`."""
    return _rank_correlation("spearmanr", a, b)


# ------------------------------------------------------------------------------ Pareto front


def _as_minimised(points: Sequence[Sequence[float]] | np.ndarray, minimize: Sequence[bool]) -> np.ndarray:
    """(n, m) float array with every maximised objective negated, so that smaller is better."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, len(minimize))
    if p.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n_points, n_objectives), got shape {p.shape}")
    flags = [bool(v) for v in minimize]
    if len(flags) != p.shape[1]:
        raise ValueError(f"minimize has {len(flags)} entries but the points have {p.shape[1]} objectives")
    if np.isnan(p).any():
        raise ValueError("points contain NaN; drop or impute those rows before computing a Pareto front")
    sign = np.where(flags, 1.0, -1.0)
    return p * sign


def _front_minimised(p: np.ndarray, keep_duplicates: bool = False) -> np.ndarray:
    """Indices (ascending) of the non-dominated rows of ``p`` (all objectives minimised).

    Rows are visited in lexicographic order (ties by index): a row can only be dominated by a row
    that comes before it, and if it is dominated at all then it is dominated by a front member
    (transitivity), so each row is compared with the front found so far: O(n * |front| * m);
    with two objectives it is enough to track the best second objective so far: O(n log n)."""
    n, m = p.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(tuple(p[:, k] for k in reversed(range(m))))  # stable: equal rows keep index order
    if m == 2:  # sweep: O(n log n). A row survives iff its y beats every earlier row's y
        kept: list[int] = []
        best_y = np.inf
        for i in order:
            x, y = p[i]
            if not kept or y < best_y:
                kept.append(int(i))
                best_y = y
            elif keep_duplicates and kept and p[kept[-1], 0] == x and p[kept[-1], 1] == y:
                kept.append(int(i))
        return np.sort(np.asarray(kept, dtype=np.int64))
    front: list[int] = []
    fvals = np.empty((n, m), dtype=np.float64)
    for i in order:
        q = p[i]
        if front:
            f = fvals[: len(front)]
            weak = np.all(f <= q, axis=1)
            dominated = weak & np.any(f < q, axis=1) if keep_duplicates else weak
            if dominated.any():
                continue
        fvals[len(front)] = q
        front.append(int(i))
    return np.sort(np.asarray(front, dtype=np.int64))


def pareto_front(
    points: Sequence[Sequence[float]] | np.ndarray,
    minimize: Sequence[bool],
    *,
    keep_duplicates: bool = False,
) -> np.ndarray:
    """Indices (ascending) of the non-dominated points.

    ``points`` is (n_points, n_objectives); ``minimize[k]`` says whether objective k is minimised
    (True) or maximised (False). Point a dominates b if a is at least as good in every objective
    and strictly better in one. Identical points do not dominate each other; by default only the
    first (lowest index) of a group of identical non-dominated points is returned, so the front is
    a set of distinct points; ``keep_duplicates=True`` returns all of them. ``inf`` is allowed
    (as the worst or best value), NaN raises ValueError.
    """
    p = _as_minimised(points, minimize)
    return _front_minimised(p, keep_duplicates=keep_duplicates)


# ------------------------------------------------------------------------------- hypervolume


def _hv2d(p: np.ndarray, ref: np.ndarray) -> float:
    """2-D (minimised) hypervolume of mutually non-dominated points strictly inside ``ref``."""
    p = p[np.argsort(p[:, 0], kind="stable")]  # x ascending => y descending on a front
    xs = np.append(p[1:, 0], ref[0])
    return float(np.sum((xs - p[:, 0]) * (ref[1] - p[:, 1])))


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume by slicing objectives (HSO) over the last objective, down to the 2-D sweep.

    ``p`` holds points strictly better than ``ref`` in every objective (minimised)."""
    n, d = p.shape
    if n == 0:
        return 0.0
    if d == 1:
        return float(ref[0] - p[:, 0].min())
    p = p[_front_minimised(p)]
    if d == 2:
        return _hv2d(p, ref)
    p = p[np.argsort(p[:, -1], kind="stable")]
    z = np.append(p[:, -1], ref[-1])
    volume = 0.0
    for i in range(p.shape[0]):
        depth = z[i + 1] - z[i]
        if depth > 0.0:  # the slab [z_i, z_{i+1}) sees the points 0..i
            volume += depth * _hv(p[: i + 1, :-1], ref[:-1])
    return volume


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray,
    ref: Sequence[float] | np.ndarray,
    minimize: Sequence[bool],
) -> float:
    """Exact hypervolume of the region dominated by ``points`` and bounded by ``ref``.

    ``points`` is (n_points, n_objectives), ``ref`` the reference point (one value per objective),
    ``minimize[k]`` the direction of objective k (maximised objectives are negated together with
    the reference). Only points strictly better than ``ref`` in every objective contribute;
    the others add 0. Dominated and duplicate points are removed first.

    Algorithm: 1-D is ``ref - best``; 2-D a sort and sweep, O(n log n); d >= 3 slices the last
    objective (HSO, While et al. 2006): sort by it, and for each slab between consecutive values
    add depth x the (d-1)-dimensional hypervolume of the points below, recursively down to the
    2-D sweep. Cost O(n^(d-1) log n) in the worst case (O(n^2 log n) for 3-D): exact and fine for
    fronts of a few hundred points in 3-D or a few dozen in 5-D, not meant for large fronts in
    many dimensions.
    """
    p = _as_minimised(points, minimize)
    r = np.asarray(ref, dtype=np.float64).ravel()
    if r.size != p.shape[1]:
        raise ValueError(f"ref has {r.size} values but the points have {p.shape[1]} objectives")
    if not np.all(np.isfinite(r)):
        raise ValueError("ref must be finite")
    r = r * np.where([bool(v) for v in minimize], 1.0, -1.0)
    inside = np.all(p < r, axis=1)
    return _hv(p[inside], r)
