"""The train stage's early stopping: ASHA's rungs and cut, the ``--early-stop`` choice (off by
default since HybridBench's learning curves showed that an early epoch hardly predicts the last),
old studies resumed as they began, and bench/hybridbench_asha.py's replay on the committed curves."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nas.budget import parse_budget
from nas.search import Driver, SearchConfig, SearchError, create_study, run_study
from nas.store import Store
from workers.request import Asha, TrialRequest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import hybridbench_asha as replay_bench  # noqa: E402


def test_asha_rungs_and_cut() -> None:
    """Rungs at grace * eta^k below max_t; the first report at a rung passes; later ones stop below
    the (1 - 1/eta) quantile of the earlier ones; a repeated report and the last epoch never stop."""
    assert sorted(Asha(10).rungs) == [1, 2, 4, 8]
    assert sorted(Asha(10, grace=3, eta=2).rungs) == [3, 6]
    assert sorted(Asha(10, grace=2, eta=3).rungs) == [2, 6]
    assert Asha(1).rungs == {}
    judge = Asha(4)  # rungs 1, 2
    assert judge.report("a", 1, 0.5) is False  # alone at the rung
    assert judge.report("b", 1, 0.4) is True  # below the median of [0.5]
    assert judge.report("c", 1, 0.6) is False
    # the median of [0.5, 0.4, 0.6] is 0.5: 0.49 stops, 0.5 does not
    assert judge.report("d", 1, 0.49) is True and judge.report("e", 1, 0.5) is False
    assert judge.report("c", 1, 0.0) is False  # a key reports once per rung
    assert judge.report("a", 3, 0.0) is False and judge.report("a", 4, 0.0) is False  # not rungs
    assert judge.rungs[1] == {"a": 0.5, "b": 0.4, "c": 0.6, "d": 0.49, "e": 0.5}
    # eta 4: only the top quarter of the earlier ones continues
    wide = Asha(8, eta=4)
    for i, acc in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):
        wide.report(str(i), 1, acc)
    assert wide.report("x", 1, 0.39) is True and wide.report("y", 1, 0.41) is False


def test_early_stop_is_off_by_default_and_old_studies_keep_asha() -> None:
    assert SearchConfig().early_stop == "none"
    assert SearchConfig(early_stop="asha").early_stop == "asha"
    with pytest.raises(SearchError, match="--early-stop must be one of none, asha, got 'always'"):
        SearchConfig(early_stop="always")
    stored = SearchConfig(target="cpu").to_dict()
    assert SearchConfig.from_dict(stored).early_stop == "none"
    # a config stored before the choice existed ran ASHA, and a resumed study goes on as it began
    del stored["early_stop"]
    assert SearchConfig.from_dict(stored).early_stop == "asha"


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[TrialRequest], list[tuple[str, int, float]]]:
    """Every request the driver saw start, and every report an ASHA judge got."""
    seen: list[TrialRequest] = []
    reports: list[tuple[str, int, float]] = []
    started, report = Driver.started, Asha.report

    def spy_started(self: Driver, req: TrialRequest, attempt: int) -> None:
        seen.append(req)
        started(self, req, attempt)

    def spy_report(self: Asha, key: str, epoch: int, accuracy: float) -> bool:
        reports.append((key, epoch, accuracy))
        return report(self, key, epoch, accuracy)

    monkeypatch.setattr(Driver, "started", spy_started)
    monkeypatch.setattr(Asha, "report", spy_report)
    return seen, reports


@pytest.mark.parametrize("early_stop", ["none", "asha"])
def test_a_study_trains_to_the_end_unless_asha_is_asked_for(early_stop: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A staged study (in process, digits, 3 epochs): by default no judge hears a report and every
    training runs its 3 epochs; with ``early_stop="asha"`` the train requests of a round of more
    than two carry ASHA, the judge hears those trainings at epochs 1 and 2, and a training it stops
    is recorded as stopped there."""
    seen, reports = _spy(monkeypatch)
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, "s", SearchConfig(train_epochs=3, early_stop=early_stop), parse_budget("40trials"))
    run_study(store, "s", executor="local")
    trains = [r for r in seen if r.stage == "train"]
    done = store.done("s", "train")
    assert len(trains) >= 3 and len(done) >= 3
    judged = {r.key for r in trains if r.asha}
    if early_stop == "none":
        assert judged == set()
    else:  # a round of more than two trainings is judged (a refill round of one or two is not)
        assert len(judged) >= 3
    epochs = Counter(m["epochs"] for m in done.values())
    if early_stop == "none":
        assert reports == [] and set(epochs) == {3.0}
        assert not any("early_stop" in m for m in done.values())
        return
    # the judge heard each training once per rung it reached, and only at rungs 1 and 2
    per_key = Counter((k, e) for k, e, _ in reports)
    assert set(per_key.values()) == {1} and {1, 2} <= {e for _, e, _ in reports} <= {1, 2, 3}
    assert {k for k, _, _ in reports} == judged
    for m in done.values():  # a stopped training ends at a rung, a finished one at 3 epochs
        assert m["epochs"] in (1.0, 2.0) if m.get("early_stop") == 1.0 else m["epochs"] == 3.0


def test_replay_stops_and_delivers_exactly() -> None:
    """Rows on one worker: ASHA (grace 1, eta 2) stops the row that arrives below the first at epoch
    1, the budget ends the study before an epoch it cannot pay, and the Pareto rungs keep a fast row
    that accuracy alone would stop."""
    curves = np.array([[0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.6, 0.7, 0.8]])
    lat = np.array([1.0, 0.5, 2.0])
    cost = np.array([1.0, 1.0, 1.0])
    got, spent, stopped = replay_bench.replay([0, 1, 2], curves, lat, cost, 9.0, None, 1)
    assert got == {0: 0.7, 1: 0.6, 2: 0.8} and spent == 9.0 and stopped == 0
    got, spent, stopped = replay_bench.replay([0, 1, 2], curves, lat, cost, 9.0, ("g", 1, 2), 1)
    assert got == {0: 0.7, 1: 0.4, 2: 0.8} and spent == 7.0 and stopped == 1
    # 5 seconds: rows 0 (3 epochs) and 1 (stopped after 1) and one epoch of row 2
    got, spent, stopped = replay_bench.replay([0, 1, 2], curves, lat, cost, 5.0, ("g", 1, 2), 1)
    assert got == {0: 0.7, 1: 0.4, 2: 0.6} and spent == 5.0
    # two epochs (one rung): by accuracy alone the second and third rows stop; ranked by fronts of
    # (accuracy, latency), the third, less accurate but the fastest, is on the first front and continues
    curves = np.array([[0.6, 0.8], [0.58, 0.62], [0.55, 0.75]])
    lat = np.array([2.0, 3.0, 0.5])
    got, _, stopped = replay_bench.replay([0, 1, 2], curves, lat, cost, 9.0, ("g", 1, 2), 1)
    assert got == {0: 0.8, 1: 0.58, 2: 0.55} and stopped == 2
    got, _, stopped = replay_bench.replay([0, 1, 2], curves, lat, cost, 9.0, ("p", 1, 2), 1)
    assert got == {0: 0.8, 1: 0.58, 2: 0.75} and stopped == 1


def test_replay_on_the_committed_curves(tmp_path: Path) -> None:
    """The bench on HybridBench: without early stopping nothing stops; every policy spends at most
    its budget; the shares lie in [0, 1]; and the JSON holds what was printed."""
    out = tmp_path / "asha.json"
    res = replay_bench.main(["--policies", "none,g1e2,p3e2", "--budgets", "0.2", "--seeds", "3",
                             "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert len(res["tau_epoch_final"]) == 10 and all(-1 <= t <= 1 for t in res["tau_epoch_final"])
    cell = res["budgets"]["0.2"]
    assert cell["none"]["stopped"] == 0 and cell["none"]["hv_diff"] == [0.0, 0.0]
    assert cell["g1e2"]["stopped"] > 0
    for v in cell.values():
        assert 0 <= v["hv"] <= 1 and v["spent_share"] <= 1 + 1e-9 and v["best_short"] >= -0.05


@pytest.mark.parametrize(("args", "message"), [
    (["--policies", "g1e2"], "--policies must include none"),
    (["--policies", "none,g0e2"], "grace must be 1..9"),
    (["--policies", "none,asha"], "is not none, g<grace>e<eta> or p<grace>e<eta>"),
    (["--budgets", "0"], "--budgets must be shares in (0, 1]"),
    (["--pool", "1"], "--pool must be between 2"),
    (["--seeds", "1"], "--seeds must be at least 2"),
    (["--variant", "nope"], "no supernet 'nope'"),
])
def test_replay_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        replay_bench.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.strip().splitlines()[-1].count(message) == 1


def test_short_runs_against_the_committed_table(tmp_path: Path) -> None:
    """The 5-epoch runs cover the 40 rows with a second seed; seed 0's 10-epoch tau against seed 1
    is the table's noise ceiling (as hybridbench_ranking computes it); the short runs rank worse."""
    from hybridbench_ranking import noise_ceiling, read_table

    res = replay_bench.main(["--policies", "none", "--budgets", "0.1", "--seeds", "2"])
    sh = res["short_runs"]
    rows = read_table(replay_bench.DEFAULT_TABLE)
    assert sh["rows"] == 40 and sh["epochs"] == 5
    assert sh["tau_full"] == pytest.approx(noise_ceiling(rows)[0], abs=1e-12)
    assert sh["diff"][0] == pytest.approx(sh["tau_short"] - sh["tau_full"], abs=1e-12)
    assert sh["tau_short"] < sh["tau_full"] and sh["diff"][1] > 0
    # a file that mixes recipes is refused, exit 2, one line
    lines = replay_bench.DEFAULT_SHORT.read_text().splitlines()
    mixed = [json.loads(line) for line in lines[:6]]
    mixed[0]["recipe"]["epochs"] = 3
    bad = tmp_path / "mixed.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    with pytest.raises(SystemExit) as e:
        replay_bench.main(["--short-runs", str(bad), "--seeds", "2"])
    assert e.value.code == 2
