"""HybridBench ranking (bench/hybridbench_ranking.py): the architecture encoding and the predictor
fitted on labels, on the committed table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import hybridbench_ranking as hr  # noqa: E402

from predictors.metrics import kendall_tau  # noqa: E402
from search_spaces.spec import ArchSpec  # noqa: E402

TABLE = ROOT / "bench" / "data" / "hybridbench_c10_v1.csv"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return hr.read_table(TABLE)


def test_mixer_fractions_are_the_table_counts_over_the_blocks(rows: list[dict]) -> None:
    tms = [k[2:] for k in rows[0] if k.startswith("n_")][:10]  # the 10 token mixers, then the 4 channel mixers
    cms = [k[2:] for k in rows[0] if k.startswith("n_")][10:]
    assert len(cms) == 4
    for r in rows:
        spec = ArchSpec.from_dict(json.loads(r["spec"]))
        got = spec.mixer_fractions(tms, cms)
        assert got == [r[f"n_{m}"] / r["blocks"] for m in (*tms, *cms)]
        assert math.isclose(sum(got[:10]), 1.0) and math.isclose(sum(got[10:]), 1.0)
    # a mixer the spec does not use counts 0, and one not listed counts in neither group
    spec = ArchSpec.from_dict(json.loads(rows[0]["spec"]))
    assert spec.mixer_fractions(["no_such_mixer"], []) == [0.0]


def test_mixer_features_hold_every_mixer_and_log_flops(rows: list[dict]) -> None:
    x = hr.mixer_features(rows)
    assert x.shape == (200, 15)
    assert np.allclose(x[:, :10].sum(1), 1.0) and np.allclose(x[:, 10:14].sum(1), 1.0)
    assert np.allclose(x[:, 14], np.log([r["flops"] for r in rows]))


def test_gp_on_labels_is_scored_on_held_out_rows_and_adds_to_the_supernet(rows: list[dict]) -> None:
    """Split k holds out the same rows as ParZC's split k; the GP on mixers, FLOPs and the supernet's
    accuracy ranks those rows better than the supernet's accuracy alone, in every split."""
    acc = np.array([r["test_acc_mean"] for r in rows])
    sup = np.array([r["supernet_acc"] for r in rows])
    x = np.column_stack([hr.mixer_features(rows), sup])
    taus = hr.gp_splits(x, acc, 100, 5)
    assert taus == hr.gp_splits(x, acc, 100, 5)  # deterministic
    for seed, t in enumerate(taus):
        te = np.random.default_rng(seed).permutation(200)[100:]
        assert t > kendall_tau(sup[te], acc[te]), seed


def test_mixer_bias_finds_a_family_a_score_places_too_high(rows: list[dict]) -> None:
    acc = np.array([r["test_acc_mean"] for r in rows])
    lifted = acc + np.array([1.0 if r["lead_token_mixer"] == "ssm" else 0.0 for r in rows])
    bias = hr.mixer_bias(rows, acc, {"truth": acc, "lifted": lifted})
    assert set(bias["truth"]) == {r["lead_token_mixer"] for r in rows} and len(bias["truth"]) == 10
    assert all(v == 0.0 for v in bias["truth"].values())
    assert bias["lifted"]["ssm"] > 0.3 and all(v <= 0.0 for m, v in bias["lifted"].items() if m != "ssm")


def test_paired_difference_is_the_tau_difference_with_a_paired_se(rows: list[dict]) -> None:
    acc = np.array([r["test_acc_mean"] for r in rows])
    sup, flops = np.array([r["supernet_acc"] for r in rows]), np.array([r["flops"] for r in rows])
    assert hr.paired_difference(sup, sup, acc, 50, seed=0) == (0.0, 0.0)
    d, se = hr.paired_difference(sup, flops, acc, 50, seed=0)
    assert d == pytest.approx(kendall_tau(sup, acc) - kendall_tau(flops, acc)) and 0.0 < se < 0.2
    assert (d, se) == hr.paired_difference(sup, flops, acc, 50, seed=0)
    assert math.isnan(hr.paired_difference(sup, flops, acc, 0, seed=0)[1])


def test_seed_ensembles_pair_each_recipe_with_its_second_seed(rows: list[dict]) -> None:
    """Only recipes with an ``_s1`` twin are paired; each row gets the mean of its two ranks."""
    acc = np.array([r["test_acc_mean"] for r in rows])
    sup, flops = np.array([r["supernet_acc"] for r in rows]), np.array([r["flops"] for r in rows])
    got = hr.seed_ensembles({"supernet a": sup, "supernet a_s1": flops, "supernet b": sup, "flops": flops})
    assert list(got) == ["supernet a + a_s1 (mean rank)"]
    assert np.allclose(got["supernet a + a_s1 (mean rank)"], (rankdata(sup) + rankdata(flops)) / 2)
    # a seed paired with itself ranks exactly as it does alone
    same = hr.seed_ensembles({"supernet a": sup, "supernet a_s1": sup})["supernet a + a_s1 (mean rank)"]
    assert kendall_tau(same, acc) == pytest.approx(kendall_tau(sup, acc))
