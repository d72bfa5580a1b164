"""hybrid_vit's refill rounds: the supernet's order until GUIDE_AFTER candidates are trained, then a
GP of the trained accuracies on mixer fractions (nas.search.guided.refill_order), and the replay
of that loop on HybridBench (bench/hybridbench_guided.py)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from nas.budget import parse_budget
from nas.search import SearchConfig, create_study
from nas.search._driver import REFILL, _candidates, _nd_order
from nas.search.guided import GP_MAX, GUIDE_AFTER, fit_gp, guided_order, hybrid_features
from nas.store import Store
from search_spaces import ArchSpec
from search_spaces.supernet import get_frame

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

GOOD = {"attention", "pool", "sepconv", "identity", "linear", "single_head"}


def _good(spec: ArchSpec) -> float:
    blocks = [t for st in spec.stages for t, _ in st.mixers()]
    return sum(t in GOOD for t in blocks) / len(blocks)


def _study(tmp_path: Path, n_trained: int) -> tuple[Store, dict[str, float], list[str]]:
    """A study whose supernet ranks the GOOD mixers' share backwards: trained accuracy rises with it,
    inherited accuracy falls with it. Returns the store, each hash's GOOD share, and the trained."""
    tmp_path.mkdir()
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, "g", SearchConfig(), parse_budget("60s"))
    frame = get_frame("tiny", in_chans=1, num_classes=10)
    rng = random.Random(0)
    good: dict[str, float] = {}
    specs = []
    i = 0
    while len(specs) < 100:
        spec = frame.random(i)
        i += 1
        if spec.hash not in good:
            good[spec.hash] = _good(spec)
            specs.append(spec)
    sup = {s.hash: 0.8 - 0.2 * good[s.hash] + rng.gauss(0, 0.01) for s in specs}
    lat = {s.hash: rng.uniform(1.0, 10.0) for s in specs}
    for s in specs:
        h = s.hash
        store.add_architecture(h, "hybrid_vit", s.to_json())
        store.record_evaluation("g", stage="screen", metrics={"score": 1.0, "latency_ms": lat[h], "flops": 1e6},
                                seconds=0.1, arch_hash=h, key=f"screen:{h}")
        store.record_evaluation("g", stage="supernet", metrics={"accuracy": sup[h]}, seconds=0.1,
                                arch_hash=h, key=f"supernet:{h}")
    order = _nd_order([(h, [sup[h], lat[h]]) for h in sup], [False, True])
    trained = order[:n_trained]  # the search trains the supernet's best first
    for h in trained:
        store.record_evaluation("g", stage="latency", metrics={"latency_ms": lat[h]}, seconds=0.1,
                                arch_hash=h, key=f"latency:{h}")
        store.record_evaluation("g", stage="train", metrics={"accuracy": 0.6 + 0.2 * good[h] + rng.gauss(0, 0.005)},
                                seconds=0.1, arch_hash=h, key=f"train:{h}")
    return store, good, order


def test_refill_follows_the_supernet_until_enough_are_trained_then_what_trained(tmp_path: Path) -> None:
    d = types.SimpleNamespace(name="g", cfg=SearchConfig())
    frame = get_frame("tiny", in_chans=1, num_classes=10)
    store, good, order = _study(tmp_path / "few", GUIDE_AFTER - 1)
    got = [h for h, _ in _candidates(d, store, "latency", frame, refill=True)]  # type: ignore[arg-type]
    assert got == order[GUIDE_AFTER - 1:GUIDE_AFTER - 1 + REFILL]  # the supernet's order, continued

    store, good, order = _study(tmp_path / "enough", GUIDE_AFTER)
    supernet_next = order[GUIDE_AFTER:GUIDE_AFTER + REFILL]
    got = [h for h, _ in _candidates(d, store, "latency", frame, refill=True)]  # type: ignore[arg-type]
    assert len(got) == REFILL == len(set(got))
    assert not set(got) & set(order[:GUIDE_AFTER])  # nothing measured or trained again
    # the labels say the GOOD mixers train better, against the supernet: the picks lean to them
    untrained = order[GUIDE_AFTER:]
    assert np.mean([good[h] for h in got]) > np.mean([good[h] for h in untrained]) + 0.15
    assert np.mean([good[h] for h in got]) > np.mean([good[h] for h in supernet_next]) + 0.15


def test_a_fit_that_fails_keeps_the_supernets_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.search.guided as guided

    def fails(*args: object, **kwargs: object) -> list[int]:
        raise np.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(guided, "guided_order", fails)
    store, _, order = _study(tmp_path / "s", GUIDE_AFTER + 5)
    d = types.SimpleNamespace(name="g", cfg=SearchConfig())
    got = [h for h, _ in _candidates(d, store, "latency", None, refill=True)]  # type: ignore[arg-type]
    assert got == order[GUIDE_AFTER + 5:GUIDE_AFTER + 5 + REFILL]


def test_guided_order_fits_a_fixed_subset_past_gp_max() -> None:
    """Past GP_MAX trained rows the GP sees a fixed subset: the picks are deterministic, distinct,
    and still follow what the labels say (accuracy rises with the first feature)."""
    rng = np.random.default_rng(0)
    n = GP_MAX + 200
    x, xt = rng.random((n, 3)), rng.random((50, 3))
    acc = 50 + 20 * x[:, 0] + rng.normal(0, 0.5, n)
    lat, latt = np.full(n, 5.0), np.full(50, 5.0)  # equal latencies: the picks are by accuracy alone
    assert fit_gp(x, acc).z.shape[0] == GP_MAX and fit_gp(x[:GP_MAX - 1], acc[:GP_MAX - 1]).z.shape[0] == GP_MAX - 1
    a = guided_order(x, acc, lat, xt, latt, 10.0, 8)
    assert a == guided_order(x, acc, lat, xt, latt, 10.0, 8) and len(set(a)) == 8
    assert a[0] == int(np.argmax(xt[:, 0]))  # the best predicted first


def test_hybrid_features_are_mixer_shares_log_flops_and_inherited_accuracy() -> None:
    frame = get_frame("tiny", in_chans=1, num_classes=10)
    specs = [frame.random(i) for i in range(5)]
    x = hybrid_features([s.to_json() for s in specs], [0.1, 0.2, 0.3, 0.4, 0.5], [1e6, 2e6, 3e6, 4e6, 5e6])
    tms = sorted({t for s in specs for st in s.stages for t, _ in st.mixers()})
    cms = sorted({c for s in specs for st in s.stages for _, c in st.mixers()})
    assert x.shape == (5, len(tms) + len(cms) + 2)
    np.testing.assert_allclose(x[:, -1], [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(x[:, -2], np.log([1e6, 2e6, 3e6, 4e6, 5e6]))
    np.testing.assert_allclose(x[:, : len(tms)].sum(1), 1.0)  # every block has one token mixer
    np.testing.assert_allclose(x[:, len(tms): len(tms) + len(cms)].sum(1), 1.0)
    np.testing.assert_allclose(x[2, : len(tms) + len(cms)], specs[2].mixer_fractions(tms, cms))


def test_the_replay_on_hybridbench(tmp_path: Path) -> None:
    """The bench's replay on the committed table: the policies agree until GUIDE_AFTER trainings,
    shares grow with the trainings and stay in [0, 1], and the figures reach the JSON."""
    import json

    import hybridbench_guided as hg

    out = tmp_path / "g.json"
    res = hg.main(["--variants", "spos4", "--seeds", "2", "--pool", "60", "--budget", "56", "--json", str(out)])
    assert json.loads(out.read_text())["variants"]["spos4"]["guided_hv"]  # written
    r = res["variants"]["spos4"]
    counts = sorted(r["supernet_hv"])
    assert counts == list(range(hg.FIRST + REFILL, 57, REFILL))
    for p in hg.POLICIES:
        for m in ("hv", "front"):
            v = [r[f"{p}_{m}"][n] for n in counts]
            assert all(0.0 <= a <= b <= 1.0 + 1e-12 for a, b in itertools.pairwise(v))  # trained sets only grow
    for n in counts:
        if n <= GUIDE_AFTER:  # the GP starts after GUIDE_AFTER trainings: the same picks until then
            assert r["guided_hv_diff"][n] == [0.0, 0.0] and r["control_front_diff"][n] == [0.0, 0.0]


def test_the_replay_refuses_bad_arguments() -> None:
    for args, says in ((["--pool", "10"], "--pool must be between"), (["--variants", "nope"], "no supernet 'nope'"),
                       (["--guide-after", "1"], "--guide-after must be at least 2")):
        p = subprocess.run([sys.executable, str(REPO / "bench" / "hybridbench_guided.py"), *args],
                           capture_output=True, text=True)
        assert p.returncode == 2 and says in p.stderr, p.stderr
