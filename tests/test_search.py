"""Studies end to end on digits: staged search on Ray Tune workers, the store, Optuna in the same
database, failures, SIGKILL of the driver then resume, two drivers on one store, PostgreSQL."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from nas.budget import parse_budget
from nas.search import SearchConfig, create_study, run_study
from nas.store import Store
from predictors.metrics import pareto_front
from search_spaces import ArchSpec
from workers.ray_tune import init_ray, shutdown_ray

NAS = str(Path(sys.executable).parent / "nas")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session() -> Any:
    init_ray(num_cpus=2)
    yield
    shutdown_ray()


def _new(tmp_path: Path, name: str, budget: str, url: str | None = None, **cfg: Any) -> Store:
    store = Store(url or f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, name, SearchConfig(**cfg), parse_budget(budget))
    return store


def _check_accounting(store: Store, name: str) -> None:
    """used_seconds is the sum of the recorded seconds; no trial key twice; no (stage, arch) twice
    in the stages that evaluate a fixed candidate list."""
    info = store.study(name)
    evs = store.evaluations(name)
    counted = sum(e.seconds for e in evs if not (e.error or "").startswith("interrupted"))
    assert info.used_seconds == pytest.approx(counted, rel=1e-9, abs=1e-9)
    keys = [e.key for e in evs]
    assert len(keys) == len(set(keys))
    ok = [e for e in evs if e.error is None]
    assert info.trials_done == len(ok)
    for stage in ("supernet", "latency", "train", "supernet_train"):
        archs = [e.arch_hash for e in ok if e.stage == stage]
        assert len(archs) == len(set(archs)), f"{stage} evaluated an architecture twice"


def _check_optuna(store: Store, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=store.url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        spec = ArchSpec.from_json(t.user_attrs["spec"])
        assert spec.hash == t.user_attrs["spec_hash"]
    return done


def test_staged_search_on_digits(ray_session: Any, tmp_path: Path) -> None:
    store = _new(tmp_path, "staged", "40s", train_epochs=2, seed=1)
    front = run_study(store, "staged")
    info = store.study("staged")
    assert info.status == "completed"
    _check_accounting(store, "staged")
    evs = store.evaluations("staged", errors=False)
    by_stage = collections.Counter(e.stage for e in evs)
    assert set(by_stage) == {"screen", "supernet_train", "supernet", "latency", "train"}, by_stage
    assert by_stage["screen"] >= 8 and by_stage["supernet_train"] == 1
    # the budget is spent and not overrun by more than one trial
    longest = max(e.seconds for e in evs if e.stage != "supernet_train")
    assert 0.8 * 40 <= info.used_seconds <= 40 + longest
    # the stored front is the front of the trained accuracies and measured latencies
    assert front and store.front("staged")
    assert [r["arch_hash"] for r in store.front("staged")] == [r["arch_hash"] for r in front]
    train = store.done("staged", "train")
    lat = store.done("staged", "latency")
    screened = store.done("staged", "screen")
    assert set(train) <= set(lat)  # stage 4 trains what stage 3 measured
    pts = {h: (m["accuracy"], lat[h]["latency_ms"]) for h, m in train.items()}
    hashes = list(pts)
    idx = pareto_front([pts[h] for h in hashes], minimize=[False, True])
    assert {hashes[i] for i in idx} == {r["arch_hash"] for r in front}
    for r in front:
        assert r["metrics"]["source"] == "train"
        assert r["metrics"]["accuracy"] == pytest.approx(train[r["arch_hash"]]["accuracy"])
        assert 0.1 < r["metrics"]["accuracy"] <= 1.0
    # every training result, ASHA-stopped ones too, carries its params and device
    assert all(e.device_key and e.metrics["params"] > 0 for e in evs if e.stage == "train")
    # inherited-weight accuracies are real numbers for the screened candidates
    sup = store.done("staged", "supernet")
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in sup.values()) and set(sup) <= set(screened)
    # Optuna's study in the same database: one trial per screened candidate, specs as user attributes
    done = _check_optuna(store, "staged")
    study = optuna.load_study(study_name="staged", storage=store.url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    scored = [e for e in evs if e.stage == "screen" and "score" in e.metrics]
    assert len(done) == len(scored)  # a candidate whose score is not finite fails in Optuna, with the reason
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL:
            assert "not finite" in t.user_attrs["failed_because"]
    assert {t.user_attrs["spec_hash"] for t in done} == {e.arch_hash for e in scored}
    # the front's trained weights are kept; an export carries them and reproduces the recorded accuracy
    from safetensors.torch import load_file

    from nas.export import export_study
    from nas.search import load_data
    from predictors.supernet import accuracy
    from search_spaces.hybrid_vit import build

    best = max(front, key=lambda r: r["metrics"]["accuracy"])
    res = export_study(store, "staged", tmp_path / "best.py", pick="accuracy", weights=tmp_path / "best.safetensors")
    assert res.spec.hash == best["arch_hash"] and res.weights_source == "trained"
    fj = info.config["frame_json"]
    model = build(res.spec, fj["num_classes"], fj["img_size"], fj["in_chans"])
    model.load_state_dict(load_file(str(tmp_path / "best.safetensors")), strict=True)
    val = load_data(SearchConfig.from_dict(info.config)).val
    m = train[best["arch_hash"]]
    assert accuracy(model.eval(), val, batch_size=256) == pytest.approx(m.get("accuracy_fp32", m["accuracy"]), abs=1e-6)
    assert best["arch_hash"] in (tmp_path / "best.py").read_text()


def test_small_budget_is_spent_by_screening_more(ray_session: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """When the refill rounds run out of screened candidates, the plan screens more instead of
    stopping with budget left; every training result (ASHA-stopped ones too) carries its params
    and device; CPU latency is measured one trial at a time."""
    import nas.search as search

    gates: list[tuple[str, bool]] = []
    gate_init = search._Gate.__init__

    def spy(self: Any, driver: Any, stage: str, limit: float, exclusive: bool = False) -> None:
        gates.append((stage, exclusive))
        gate_init(self, driver, stage, limit, exclusive)

    monkeypatch.setattr(search._Gate, "__init__", spy)
    store = _new(tmp_path, "small", "15s", train_epochs=1, seed=2, workers=2)
    run_study(store, "small")
    info = store.study("small")
    assert info.status == "completed"
    _check_accounting(store, "small")
    evs = [e for e in store.evaluations("small", errors=False)]
    longest = max(e.seconds for e in evs if e.stage != "supernet_train")
    assert 0.8 * 15 <= info.used_seconds <= 15 + longest
    first_train = min(e.id for e in evs if e.stage == "train")
    assert any(e.stage == "screen" and e.id > first_train for e in evs)  # a second screening round ran
    for e in evs:
        if e.stage == "train":
            assert e.device_key and e.metrics["params"] > 0, e

    # on a CPU target the careful latency is measured alone: its gates were exclusive, the others not
    assert {st for st, ex in gates if ex} == {"latency"} and {"screen", "train"} <= {st for st, ex in gates}


def test_worker_raises_and_worker_killed_are_retried(ray_session: Any, tmp_path: Path) -> None:
    store = _new(tmp_path, "chaos", "6trials", strategy="random", train_epochs=1)
    front = run_study(store, "chaos", chaos={2: "raise", 4: "kill"})
    assert store.study("chaos").status == "completed" and front
    evs = store.evaluations("chaos")
    errors = [e for e in evs if e.error]
    assert len(errors) == 2, [e.error for e in errors]
    raised = [e for e in errors if "injected failure in trial 2" in (e.error or "")]
    assert len(raised) == 1 and 'File "' in (raised[0].error or "") and "in _fault" in (raised[0].error or "")
    assert "\x1b[" not in (raised[0].error or "")
    killed = next(e for e in errors if e is not raised[0])
    ok = {e.trial for e in evs if e.error is None}
    assert raised[0].trial in ok and killed.trial in ok  # both retried and finished
    assert store.study("chaos").trials_done == 6
    _check_accounting(store, "chaos")
    _check_optuna(store, "chaos")


def test_constraints_hold_on_the_front(ray_session: Any, tmp_path: Path) -> None:
    store = _new(tmp_path, "cons", "8trials", strategy="nsga2", train_epochs=1, max_params=40_000)
    front = run_study(store, "cons")
    assert front
    assert all(r["metrics"]["params"] <= 40_000 for r in front)
    study = optuna.load_study(study_name="cons", storage=store.url)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trials and all(len(t.user_attrs["constraints"]) == 1 for t in trials)
    over = {t.user_attrs["spec_hash"] for t in trials if t.user_attrs["constraints"][0] > 0}
    assert all(t.user_attrs.get("infeasible") == "max_params" for t in trials
               if t.user_attrs["spec_hash"] in over)
    trained = store.done("cons", "train")
    assert not over & set(trained)  # over-limit candidates are never trained
    assert trained and all(m["params"] <= 40_000 for m in trained.values())


def test_postgres_store_runs_a_study(ray_session: Any, tmp_path: Path, postgres_url: str) -> None:
    store = _new(tmp_path, "pg", "4trials", url=postgres_url, strategy="random", train_epochs=1)
    front = run_study(store, "pg")
    assert store.study("pg").status == "completed" and front
    _check_accounting(store, "pg")
    assert len(_check_optuna(store, "pg")) == 4


# --------------------------------------------------------------------------------------------
# separate driver processes
# --------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NAS_CHAOS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait(store: Store, name: str, cond: Any, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = store.get_study(name)
        if info is not None and cond(info):
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting on study {name}")


def test_sigkill_driver_then_resume(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    proc = subprocess.Popen([NAS, "search", "--budget", "30s", "--study", "k", "--storage", url, "--train-epochs",
                             "2"], cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(url) if (tmp_path / "nas.db").exists() else None
    t0 = time.monotonic()
    while store is None and time.monotonic() - t0 < 60:
        time.sleep(0.5)
        if (tmp_path / "nas.db").exists():
            store = Store(url)
    assert store is not None
    _wait(store, "k", lambda i: i.trials_done >= 12)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray: a machine going down
    proc.wait(timeout=30)
    before = store.evaluations("k")
    assert store.study("k").status == "running"  # nobody marked it: the driver died
    out = subprocess.run([NAS, "resume", "k", "--storage", url, "--json"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info = store.study("k")
    assert info.status == "completed"
    after = store.evaluations("k")
    # nothing lost: every row from before the kill is still there, unchanged
    by_id = {e.id: e for e in after}
    for e in before:
        assert by_id[e.id].metrics == e.metrics and by_id[e.id].seconds == e.seconds
    _check_accounting(store, "k")
    assert info.used_seconds <= 30 * 1.01 + max(e.seconds for e in after if e.stage != "supernet_train")
    # the Optuna trials the kill left running are failed and marked, never left RUNNING
    study = optuna.load_study(study_name="k", storage=url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs.get("interrupted") is True
    assert json.loads(out.stdout)["front"]


def test_two_drivers_on_one_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    Store(url).close()
    procs = [subprocess.Popen([NAS, "search", "--budget", "5trials", "--strategy", "random", "--train-epochs", "1",
                               "--seed", str(i), "--study", f"d{i}", "--storage", url], cwd=tmp_path, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    store = Store(url)
    for i in range(2):
        info = store.study(f"d{i}")
        assert info.status == "completed" and info.trials_done == 5
        assert len(store.evaluations(f"d{i}", errors=False)) == 5
        _check_accounting(store, f"d{i}")
        assert len(_check_optuna(store, f"d{i}")) == 5
    # the same study twice is refused while its driver is alive
    assert store.acquire_driver("d0", os.getpid(), "this-host")
    out = subprocess.run([NAS, "resume", "d0", "--budget", "+1trials", "--storage", url], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "already running" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert store.study("d0").trials_done == 5


def test_stop_is_graceful_and_resume_finishes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    Store(url).close()
    proc = subprocess.Popen([NAS, "search", "--budget", "40trials", "--strategy", "random", "--train-epochs", "1",
                             "--study", "s", "--storage", url], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store = Store(url)
    _wait(store, "s", lambda i: i.trials_done >= 3)
    out = subprocess.run([NAS, "stop", "s", "--storage", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "stop requested" in out.stdout
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    info = store.study("s")
    assert info.status == "stopped" and 3 <= info.trials_done < 40
    _check_accounting(store, "s")
    out = subprocess.run([NAS, "resume", "s", "--storage", url, "--budget", "+0trials"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2  # a zero increment is bad input


def test_exclusive_gate_launches_one_trial_at_a_time(tmp_path: Path) -> None:
    import types

    from nas.search import _Gate, _Stats
    from workers.ray_tune import LAUNCH, WAIT

    stats = _Stats()
    d = types.SimpleNamespace(stop_requested=lambda: False, exhausted=lambda: False, stage_used=lambda s: 0.0,
                              budget=types.SimpleNamespace(kind="seconds"), stats=stats, _total=lambda: 100.0,
                              _used=lambda: 0.0)
    assert _Gate(d, "latency", 50.0).decide(1) == LAUNCH  # type: ignore[arg-type]
    assert _Gate(d, "latency", 50.0, exclusive=True).decide(1) == WAIT  # type: ignore[arg-type]
    assert _Gate(d, "latency", 50.0, exclusive=True).decide(0) == LAUNCH  # type: ignore[arg-type]


def test_candidates_rank_supernet_accuracy_against_screening_latency(tmp_path: Path) -> None:
    """The latency stage takes the non-dominated order of (inherited accuracy, screening latency):
    D is as accurate as A's runner-up but slower than A, so it comes after the whole first front."""
    import types

    from nas.search import _candidates
    from search_spaces.supernet import get_frame

    store = _new(tmp_path, "c", "60s")
    frame = get_frame("tiny", in_chans=1, num_classes=10)
    points = {"A": (0.90, 5.0), "B": (0.80, 4.0), "C": (0.70, 1.0), "D": (0.85, 10.0)}
    specs = {}
    for i, (tag, (acc, lat)) in enumerate(points.items()):
        spec = specs[tag] = frame.random(i)
        store.add_architecture(spec.hash, "hybrid_vit", spec.to_json())
        store.record_evaluation("c", stage="screen", metrics={"score": 1.0, "latency_ms": lat}, seconds=0.1,
                                arch_hash=spec.hash, key=f"screen:{tag}")
        store.record_evaluation("c", stage="supernet", metrics={"accuracy": acc}, seconds=0.1,
                                arch_hash=spec.hash, key=f"supernet:{tag}")
    d = types.SimpleNamespace(name="c", cfg=SearchConfig())
    got = [h for h, _ in _candidates(d, store, "latency", frame)]  # type: ignore[arg-type]
    assert got == [specs[t].hash for t in "ABCD"]
    limited = types.SimpleNamespace(name="c", cfg=SearchConfig(max_latency_ms=4.5))
    assert [h for h, _ in _candidates(limited, store, "latency", frame)] == [specs[t].hash for t in "BC"]  # type: ignore[arg-type]
