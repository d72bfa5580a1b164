"""predictors.metrics: rank correlations against scipy and by hand, Pareto fronts, hypervolumes."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from scipy import stats

from predictors.metrics import hypervolume, kendall_tau, pareto_front, spearman

# ------------------------------------------------------------------------- rank correlations


def test_kendall_spearman_match_scipy() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 5, 50, 300):
        a = rng.normal(size=n)
        b = a + rng.normal(size=n)
        assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    # with ties: tau-b, as scipy
    a = [1, 2, 2, 3, 4, 4, 5]
    b = [2, 1, 3, 3, 5, 4, 4]
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_kendall_hand_computed() -> None:
    # b = (1, 3, 2, 4) against a = (1, 2, 3, 4): 6 pairs, one discordant (2,3) -> (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    # spearman of (1,2,3,4) vs (1,3,2,4): 1 - 6*sum d^2/(n(n^2-1)) = 1 - 6*2/60 = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert isinstance(kendall_tau(np.arange(3), np.arange(3)), float)


def test_rank_correlations_nan_safe_and_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert kendall_tau([1, 1, 1, 1], [1, 2, 3, 4]) == 0.0
        assert spearman([1, 2, 3, 4], [5, 5, 5, 5]) == 0.0
        assert kendall_tau([1.0], [2.0]) == 0.0
        assert spearman([], []) == 0.0
        # non-finite pairs are dropped
        a = [1, 2, np.nan, 3, 4, np.inf]
        b = [1, 2, 3, np.nan, 4, 5]
        assert kendall_tau(a, b) == pytest.approx(1.0)
        assert spearman(a, b) == pytest.approx(1.0)
        assert kendall_tau([np.nan, np.nan], [1, 2]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2, 3], [1, 2])


# ------------------------------------------------------------------------------ Pareto front


def _brute_front(p: np.ndarray, minimize: list[bool]) -> set[int]:
    q = p * np.where(minimize, 1.0, -1.0)
    out = set()
    for i in range(len(q)):
        dom = any(np.all(q[j] <= q[i]) and np.any(q[j] < q[i]) for j in range(len(q)) if j != i)
        if not dom:
            out.add(i)
    return out


def test_pareto_front_hand_example_with_ties() -> None:
    # (error, latency), both minimised
    pts = np.array(
        [
            [0.10, 5.0],  # 0: front
            [0.20, 3.0],  # 1: front
            [0.10, 6.0],  # 2: dominated by 0 (tie on error, slower)
            [0.30, 3.0],  # 3: dominated by 1 (tie on latency, worse error)
            [0.20, 3.0],  # 4: duplicate of 1
            [0.05, 9.0],  # 5: front
            [0.40, 1.0],  # 6: front
            [0.25, 4.0],  # 7: dominated by 1
        ]
    )
    assert pareto_front(pts, [True, True]).tolist() == [0, 1, 5, 6]
    assert pareto_front(pts, [True, True], keep_duplicates=True).tolist() == [0, 1, 4, 5, 6]
    # duplicate listed first: the lowest index of the group is the one kept
    assert pareto_front(pts[[4, 1, 0]], [True, True]).tolist() == [0, 2]
    # all identical
    assert pareto_front(np.ones((4, 3)), [True, False, True]).tolist() == [0]
    assert pareto_front(np.ones((4, 3)), [True, False, True], keep_duplicates=True).tolist() == [0, 1, 2, 3]
    assert pareto_front(np.zeros((0, 2)), [True, True]).tolist() == []
    # infinities are ordinary worst / best values
    assert pareto_front([[0.0, np.inf]], [True, True]).tolist() == [0]
    assert pareto_front([[0.0, np.inf], [0.0, np.inf], [1.0, 5.0]], [True, True]).tolist() == [0, 2]
    assert pareto_front([[0.0, np.inf], [1.0, -np.inf]], [True, True]).tolist() == [0, 1]
    assert pareto_front([[0.0, np.inf, 1.0], [0.0, np.inf, 1.0]], [True] * 3).tolist() == [0]


def test_pareto_front_maximize_mixture() -> None:
    # (accuracy: max, latency: min)
    pts = np.array([[90.0, 10.0], [92.0, 12.0], [91.0, 13.0], [89.0, 9.0], [92.0, 11.0]])
    assert pareto_front(pts, [False, True]).tolist() == [0, 3, 4]
    # flipping a direction flips the answer consistently
    assert pareto_front(pts * [1, -1], [False, False]).tolist() == [0, 3, 4]
    assert pareto_front(-pts, [True, False]).tolist() == [0, 3, 4]


def test_pareto_front_random_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    for m in (1, 2, 3, 4):
        for _ in range(10):
            p = rng.integers(0, 5, size=(30, m)).astype(float)  # many ties
            minimize = list(rng.integers(0, 2, size=m).astype(bool))
            front = pareto_front(p, minimize, keep_duplicates=True)
            assert set(front.tolist()) == _brute_front(p, minimize)
            distinct = pareto_front(p, minimize)
            # one index per distinct front point, the first of its group
            rows = {tuple(p[i]) for i in front}
            assert len(distinct) == len(rows)
            for i in distinct:
                assert i == min(j for j in front if tuple(p[j]) == tuple(p[i]))


def test_pareto_front_bad_input() -> None:
    with pytest.raises(ValueError, match="objectives"):
        pareto_front(np.zeros((3, 2)), [True])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front(np.array([[0.0, np.nan]]), [True, True])


# ------------------------------------------------------------------------------- hypervolume


def _hv_inclusion_exclusion(p: np.ndarray, ref: np.ndarray) -> float:
    """Volume of the union of boxes [p_i, ref] (all minimised) by inclusion-exclusion: O(2^n)."""
    p = p[np.all(p < ref, axis=1)]
    total = 0.0
    for k in range(1, len(p) + 1):
        for subset in itertools.combinations(range(len(p)), k):
            corner = p[list(subset)].max(axis=0)
            total += (-1) ** (k + 1) * float(np.prod(ref - corner))
    return total


def test_hypervolume_2d_rectangles() -> None:
    ref = [4.0, 4.0]
    assert hypervolume([[1.0, 1.0]], ref, [True, True]) == pytest.approx(9.0)
    # staircase: [1,3],[2,2],[3,1] -> 3x1 + 2x1 + 1x1 columns = 1*1 + 1*2 + 1*3 = 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], ref, [True, True]) == pytest.approx(6.0)
    # dominated and duplicate points change nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2]], ref, [True, True]) == pytest.approx(6.0)
    # points not strictly better than the ref contribute 0
    assert hypervolume([[5, 0], [0, 4]], ref, [True, True]) == 0.0
    assert hypervolume([[5, 0], [1, 1]], ref, [True, True]) == pytest.approx(9.0)
    assert hypervolume(np.zeros((0, 2)), ref, [True, True]) == 0.0


def test_hypervolume_3d_boxes() -> None:
    ref = [2.0, 2.0, 2.0]
    assert hypervolume([[0, 0, 0]], ref, [True] * 3) == pytest.approx(8.0)
    # two boxes [0,2]x[1,2]x[0,2] (vol 4) and [1,2]x[0,2]x[0,2] (vol 4), overlap [1,2]^2x[0,2] (2)
    assert hypervolume([[0, 1, 0], [1, 0, 0]], ref, [True] * 3) == pytest.approx(6.0)
    # three boxes of volume 2x1x1 = 2, each pair and the triple meet in [1,2]^3: 3*2 - 3*1 + 1 = 4
    assert hypervolume([[0, 1, 1], [1, 0, 1], [1, 1, 0]], ref, [True] * 3) == pytest.approx(4.0)


def test_hypervolume_maximize_mixture() -> None:
    # (accuracy: max, latency: min), ref = (acc 0, latency 10)
    pts = [[0.9, 4.0], [0.8, 2.0], [0.5, 12.0]]
    # boxes [0,0.9]x[4,10] and [0,0.8]x[2,10]: 0.9*6 + 0.8*2 = 7.0; the third is past the ref
    assert hypervolume(pts, [0.0, 10.0], [False, True]) == pytest.approx(7.0)
    # same as negating accuracy and minimising both
    neg = np.array(pts) * [-1, 1]
    assert hypervolume(neg, [0.0, 10.0], [True, True]) == pytest.approx(7.0)
    # 3-D mixture: max, min, max
    p3 = np.array([[3.0, 1.0, 2.0], [1.0, 0.0, 3.0]])
    expected = _hv_inclusion_exclusion(p3 * [-1, 1, -1], np.array([0.0, 2.0, 0.0]))
    assert hypervolume(p3, [0.0, 2.0, 0.0], [False, True, False]) == pytest.approx(expected)


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_hypervolume_random_against_inclusion_exclusion(d: int) -> None:
    rng = np.random.default_rng(d)
    for _ in range(8):
        n = int(rng.integers(1, 9))
        p = rng.integers(0, 6, size=(n, d)).astype(float)  # ties on purpose
        ref = np.full(d, 5.0)
        assert hypervolume(p, ref, [True] * d) == pytest.approx(_hv_inclusion_exclusion(p, ref), abs=1e-9)


def test_hypervolume_1d_and_errors() -> None:
    assert hypervolume([[1.0], [3.0]], [5.0], [True]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="ref"):
        hypervolume([[1.0, 2.0]], [3.0], [True, True])
