"""predictors.parzc: DiffKendall, tokenisation, the ParZC fit/predict/save/load contract, and a
small real ranking run on NAS-Bench-201 cells (labels from the shared CSV, skipped without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from predictors.metrics import kendall_tau
from predictors.parzc import (
    GLOBAL_PROXIES,
    NODE_COLUMNS,
    PROXIES,
    TOKEN_COLUMNS,
    ParZC,
    diff_kendall,
    node_features,
    node_matrix,
    tokenize,
)

LABELS_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nb201_cifar10.csv"
FAST = {"steps": 60, "mc_samples": 16, "warmup_steps": 5}


def _tau_a(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(n) for j in range(i + 1, n))
    return float(s) / (n * (n - 1) / 2)


def _synthetic(n: int, seed: int, node_range: tuple[int, int] = (8, 60)) -> tuple[list[np.ndarray], np.ndarray]:
    """Node matrices of varying length whose score is a noisy function of the features."""
    rng = np.random.default_rng(seed)
    mats, y = [], []
    for _ in range(n):
        nodes = int(rng.integers(*node_range))
        quality = rng.normal()
        per_layer = {
            p: {f"layer{k}": float(np.exp(quality + rng.normal(scale=0.3))) for k in range(nodes)} for p in PROXIES
        }
        params = {f"layer{k}": int(rng.integers(100, 10_000)) for k in range(nodes)}
        glob = {"nwot": 700.0 + 20 * quality + rng.normal(), "jacob_cov": -100.0 * np.exp(-quality)}
        mats.append(node_matrix(per_layer, params, glob))
        y.append(90.0 + quality + rng.normal(scale=0.2))
    return mats, np.asarray(y)


# -------------------------------------------------------------------------------- DiffKendall


def test_diff_kendall_tends_to_kendall_tau_a() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.normal(size=40)
        y = 0.5 * x + rng.normal(size=40)  # continuous: no ties
        exact = _tau_a(x, y)
        assert exact == pytest.approx(kendall_tau(x, y), abs=1e-12)  # tau-a == tau-b without ties
        px, py = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        soft = float(diff_kendall(px, py, 1.0))
        assert abs(soft) < abs(exact)  # every pair's term is shrunk towards 0 at small alpha
        # on concordant data every term tanh(a d) tanh(2 a d) grows towards 1 with alpha
        gaps = [1.0 - float(diff_kendall(px, 2 * px, a)) for a in (1.0, 10.0, 100.0, 1e4)]
        assert gaps[0] > gaps[1] > gaps[2] > gaps[3] >= 0.0
        assert abs(float(diff_kendall(px, py, 1e8)) - exact) < 1e-3
        # sign on the targets (target_alpha=inf): the limit in alpha alone
        assert float(diff_kendall(px, py, 1e8, float("inf"))) == pytest.approx(exact, abs=1e-3)


def test_diff_kendall_differentiable_and_bounded() -> None:
    p = torch.randn(30, requires_grad=True)
    y = torch.randn(30)
    tau = diff_kendall(p, y, alpha=2.0)
    assert -1.0 <= tau.item() <= 1.0
    tau.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert float(diff_kendall(y, y, 1e6)) == pytest.approx(1.0)
    assert float(diff_kendall(-y, y, 1e6)) == pytest.approx(-1.0)
    assert float(diff_kendall(torch.ones(1), torch.ones(1))) == 0.0
    with pytest.raises(ValueError, match="same length"):
        diff_kendall(torch.ones(3), torch.ones(4))


# ------------------------------------------------------------------------------ tokenisation


def test_node_matrix_columns() -> None:
    per_layer = {
        "grad_norm": {"a": 1.0, "b": 10.0, "c": 0.0},
        "snip": {"a": 2.0, "b": 4.0, "c": 8.0},
        "synflow": {"a": 1e30, "b": float("inf"), "c": 1e10},
    }
    m = node_matrix(per_layer, {"a": 9, "b": 99}, {"nwot": 800.0, "jacob_cov": float("nan")})
    assert m.shape == (3, len(NODE_COLUMNS)) and m.dtype == np.float32
    col = {name: m[:, k] for k, name in enumerate(NODE_COLUMNS)}
    np.testing.assert_allclose(col["log_grad_norm"], [0.0, 1.0, -20.0])  # zero -> the 1e-20 floor
    np.testing.assert_allclose(col["rel_snip"], [0.25, 0.5, 1.0])
    np.testing.assert_allclose(col["log_params"], [1.0, 2.0, 0.0])
    assert np.all(np.isfinite(col["log_synflow"]))  # inf capped
    np.testing.assert_allclose(col["global_nwot"], 800.0)
    assert np.all(np.isnan(col["global_jacob_cov"]))  # non-finite global -> NaN (imputed by ParZC)


def test_tokenize_variable_node_counts() -> None:
    mats, _ = _synthetic(6, seed=1, node_range=(1, 120))
    mats.append(np.zeros((0, len(NODE_COLUMNS)), dtype=np.float32))  # an architecture without layers
    tokens = tokenize(mats, 8)
    assert tokens.shape == (7, 8, len(TOKEN_COLUMNS))
    # pooling bins as torch's adaptive average pooling
    m = mats[0]
    ref = torch.nn.functional.adaptive_avg_pool1d(torch.tensor(m.T, dtype=torch.float64)[None], 8)[0].T.numpy()
    np.testing.assert_allclose(tokens[0, :, : len(NODE_COLUMNS)], ref, rtol=1e-5, atol=1e-5)
    col = TOKEN_COLUMNS.index("log_num_nodes")
    assert tokens[0, 0, col] == pytest.approx(np.log10(len(m)))
    assert np.all(tokens[0, :, col] == tokens[0, 0, col])  # broadcast to every token
    assert np.isnan(tokens[6, :, NODE_COLUMNS.index("global_nwot")]).all()
    with pytest.raises(ValueError, match="node matrix"):
        tokenize([np.zeros((3, 4))], 8)


# -------------------------------------------------------------------------------------- ParZC


@pytest.fixture(scope="module")
def fitted() -> tuple[ParZC, list[np.ndarray], np.ndarray, list[np.ndarray]]:
    mats, y = _synthetic(50, seed=2)
    test_mats, _ = _synthetic(12, seed=3)
    return ParZC(seed=0, **FAST).fit(mats, y), mats, y, test_mats


def test_fit_predict_shapes_and_std(fitted) -> None:
    model, _, _, test_mats = fitted
    mean, std = model.predict(test_mats)
    assert mean.shape == (12,) and std.shape == (12,)
    assert np.all(np.isfinite(mean)) and np.all(std > 0)
    assert len(model.history) == FAST["steps"]
    empty_mean, empty_std = model.predict([])
    assert empty_mean.shape == (0,) and empty_std.shape == (0,)


def test_predict_is_repeatable_and_batch_independent(fitted) -> None:
    model, _, _, test_mats = fitted
    mean, std = model.predict(test_mats)
    mean2, std2 = model.predict(test_mats)
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(std, std2)
    one_mean, one_std = model.predict(test_mats[3:4])
    assert one_mean[0] == pytest.approx(mean[3], rel=1e-5, abs=1e-6)
    assert one_std[0] == pytest.approx(std[3], rel=1e-4, abs=1e-6)


def test_feature_layouts_agree(fitted) -> None:
    model, _, _, test_mats = fitted
    mean, _ = model.predict(test_mats)
    tokens = tokenize(test_mats, model.config.num_tokens)
    np.testing.assert_allclose(model.predict(tokens)[0], mean, rtol=1e-6, atol=1e-6)
    # equal node counts: a 3-D array of node matrices
    same, _ = _synthetic(5, seed=4, node_range=(30, 31))
    np.testing.assert_allclose(model.predict(np.stack(same))[0], model.predict(same)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        model.predict(np.zeros((2, 5, 4), dtype=np.float32))


def test_save_load_round_trip(fitted, tmp_path: Path) -> None:
    model, _, _, test_mats = fitted
    path = tmp_path / "parzc.pt"
    model.save(path)
    loaded = ParZC.load(path)
    assert loaded.config == model.config
    mean, std = model.predict(test_mats)
    mean2, std2 = loaded.predict(test_mats)
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(std, std2)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ParZC checkpoint"):
        ParZC.load(tmp_path / "other.pt")


def test_deterministic_given_seed(fitted) -> None:
    model, mats, y, test_mats = fitted
    state = torch.random.get_rng_state()
    again = ParZC(seed=0, **FAST).fit(mats, y)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    np.testing.assert_array_equal(again.predict(test_mats)[0], model.predict(test_mats)[0])
    other = ParZC(seed=1, **FAST).fit(mats, y)
    assert not np.array_equal(other.predict(test_mats)[0], model.predict(test_mats)[0])


def test_learns_synthetic_ranking(fitted) -> None:
    model, _, _, _ = fitted
    mats, y = _synthetic(40, seed=5)
    assert kendall_tau(model.predict(mats)[0], y) > 0.5


def test_architecture_columns_carry_what_the_proxies_miss(tmp_path: Path) -> None:
    """Accuracy that depends on an architecture-level column the node-wise proxies know nothing of
    (a mixer's share, say): ParZC learns it with ``arch``, and cannot without."""
    rng = np.random.default_rng(7)
    mats, _ = _synthetic(80, seed=7)
    arch = rng.uniform(size=(80, 2))
    y = 90.0 + 2.0 * arch[:, 0] + rng.normal(scale=0.05, size=80)
    with_arch = ParZC(seed=0, **FAST).fit(mats[:50], y[:50], arch=arch[:50])
    without = ParZC(seed=0, **FAST).fit(mats[:50], y[:50])
    assert kendall_tau(with_arch.predict(mats[50:], arch=arch[50:])[0], y[50:]) > 0.6
    assert abs(kendall_tau(without.predict(mats[50:])[0], y[50:])) < 0.3
    # the same columns are needed to predict, and they survive save/load
    with pytest.raises(ValueError, match="fitted with 2 architecture columns"):
        with_arch.predict(mats[50:])
    with pytest.raises(ValueError, match="fitted without architecture columns"):
        without.predict(mats[50:], arch=arch[50:])
    with pytest.raises(ValueError, match="arch must be"):
        with_arch.predict(mats[50:], arch=arch[:3])
    with_arch.save(tmp_path / "p.pt")
    np.testing.assert_array_equal(ParZC.load(tmp_path / "p.pt").predict(mats[50:], arch=arch[50:])[0],
                                  with_arch.predict(mats[50:], arch=arch[50:])[0])


def test_nan_globals_are_imputed() -> None:
    mats, y = _synthetic(30, seed=6)
    k = NODE_COLUMNS.index("global_jacob_cov")
    for i in (0, 5):  # degenerate networks: non-finite jacob_cov
        mats[i][:, k] = np.nan
    model = ParZC(seed=0, **FAST).fit(mats, y)
    mean, std = model.predict(mats)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown ParZC hyperparameters"):
        ParZC(num_layers=3)
    with pytest.raises(ValueError, match="mc_samples"):
        ParZC(mc_samples=1)
    with pytest.raises(ValueError, match="target_transform"):
        ParZC(target_transform="log")
    with pytest.raises(RuntimeError, match="before fit"):
        ParZC().predict([np.zeros((3, len(NODE_COLUMNS)), dtype=np.float32)])
    mats, y = _synthetic(4, seed=7)
    with pytest.raises(ValueError, match="accuracies"):
        ParZC(**FAST).fit(mats, y[:3])
    with pytest.raises(ValueError, match="NaN"):
        ParZC(**FAST).fit(mats, [1.0, 2.0, float("nan"), 3.0])


def test_target_transform_rank_runs() -> None:
    mats, y = _synthetic(20, seed=8)
    mean, _ = ParZC(target_transform="rank", **FAST).fit(mats, y).predict(mats)
    assert mean.shape == (20,)


# ----------------------------------------------------------------------- real NB201 ranking


@pytest.mark.skipif(
    not LABELS_CSV.is_file(), reason=f"NB201 labels CSV not present at {LABELS_CSV} (shared data folder absent)"
)
def test_ranks_nb201_cells() -> None:
    """60 seeded random cells, node features from one random batch of 16, ParZC trained on 40,
    Kendall tau on the other 20 (about 0.8 in development; a random ranking is 0 +- 0.16)."""
    from search_spaces import get_space
    from search_spaces.nb201 import load_labels

    labels = load_labels(LABELS_CSV)
    space = get_space("nb201")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    t = torch.randint(0, 10, (16,), generator=g)
    specs = [space.random(1000 + i) for i in range(60)]
    feats = [node_features(space.build(s), x, t) for s in specs]
    assert all(f.shape[1] == len(NODE_COLUMNS) for f in feats)
    assert len({f.shape[0] for f in feats}) > 1  # NB201 cells differ in conv count
    assert {name for name in GLOBAL_PROXIES} <= {c.removeprefix("global_") for c in NODE_COLUMNS}
    acc = np.array([labels[s.to_string()] for s in specs])
    model = ParZC(seed=0, steps=300).fit(feats[:40], acc[:40])
    mean, std = model.predict(feats[40:])
    assert np.all(std > 0)
    assert kendall_tau(mean, acc[40:]) > 0.3
