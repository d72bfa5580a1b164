"""The search plan without Ray: the in-process executor runs the same stages, budget and recording.

Every study here runs on digits through ``run_study(..., executor="local")``: one trial at a
time in this process, the real evaluations, the real SQLite store and Optuna study.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nas.budget import parse_budget
from nas.search import Driver, SearchConfig, create_study, run_study
from nas.search.stages import Screen, Stage, _Listed
from nas.search.strategies import random_sampler
from nas.search.strategy import Strategy, get_strategy, register_strategy, strategy_names
from nas.store import Store
from workers.request import Candidate, TrialRequest


def _new(tmp_path: Path, name: str, budget: str, **kw: Any) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, name, SearchConfig(**{"train_epochs": 1, **kw}), parse_budget(budget))
    return store


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[TrialRequest]:
    """Every request the driver saw start (each attempt)."""
    seen: list[TrialRequest] = []
    started = Driver.started

    def spy(self: Driver, req: TrialRequest, attempt: int) -> None:
        seen.append(req)
        started(self, req, attempt)

    monkeypatch.setattr(Driver, "started", spy)
    return seen


def _check(store: Store, name: str) -> None:
    """Accounting invariants: the study's totals are its rows', nothing is left in flight, every
    key is unique, and no Optuna trial is left running or COMPLETE without our row."""
    import optuna

    info = store.study(name)
    evs = store.evaluations(name)
    assert info.used_seconds == pytest.approx(sum(e.seconds for e in evs))
    assert info.trials_done == sum(e.error is None for e in evs)
    assert store.inflight(name) == []
    assert len({e.key for e in evs}) == len(evs)
    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    recorded = {e.trial for e in evs if e.error is None and e.trial is not None}
    sampled = {e.stage for e in evs if e.trial is not None}
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("infeasible"):
            # a repeat of a recorded architecture is told the stored result without a row of its own
            assert t.number in recorded or any(
                e.arch_hash == t.user_attrs["spec_hash"] and e.stage in sampled for e in evs), t.number


def test_staged_plan_runs_every_stage_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial budget: how far the plan gets does not depend on the machine's speed. (A seconds budget
    is charged in wall time; beside busy processes a 25-second one ran out before the train stage.)"""
    seen = _spy(monkeypatch)
    store = _new(tmp_path, "s", "30trials")
    front = run_study(store, "s", executor="local")
    info = store.study("s")
    assert info.status == "completed" and front and info.trials_done == 30
    _check(store, "s")
    stages = Counter(e.stage for e in store.evaluations("s", errors=False))
    assert set(stages) == {"screen", "supernet_train", "supernet", "latency", "train"}, stages
    # every stage: one candidate per request, the supernet trained once
    assert all(len(r.candidates) == 1 for r in seen if r.stage != "supernet_train")
    assert [r.supernet is not None for r in seen if r.stage == "supernet_train"] == [True]


def test_screening_requests_are_batched_by_measured_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch)
    store = _new(tmp_path, "b", "12s", shares={"screen": 1.0, "train": 0.0, "supernet": 0.0, "latency": 0.0})
    run_study(store, "b", executor="local")
    info = store.study("b")
    assert info.status == "completed"
    _check(store, "b")
    stages = Counter(e.stage for e in store.evaluations("b", errors=False))
    screens = [r for r in seen if r.stage == "screen"]
    # the first screening request measures one candidate alone; later ones carry a batch sized from it
    assert len(screens[0].candidates) == 1 and max(len(r.candidates) for r in screens) > 1
    assert sum(len(r.candidates) for r in screens) == stages["screen"]
    # each candidate of a batch is its own row, with its own key, Optuna trial and seconds
    batch = max(screens, key=lambda r: len(r.candidates))
    rows = {e.key: e for e in store.evaluations("b", stage="screen")}
    mine = [rows[f"{c.key}:screen"] for c in batch.candidates]
    assert [e.trial for e in mine] == [c.number for c in batch.candidates]
    assert len({e.seconds for e in mine}) > 1 and all(e.seconds > 0 for e in mine)
    # the budget holds to within the last batch
    assert info.used_seconds <= 12.0 + max(sum(rows[f"{c.key}:screen"].seconds for c in r.candidates)
                                           for r in screens if all(f"{c.key}:screen" in rows for c in r.candidates))


def test_a_trial_budget_screens_one_candidate_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch)
    store = _new(tmp_path, "t", "12trials", shares={"screen": 1.0, "train": 0.0, "supernet": 0.0, "latency": 0.0})
    run_study(store, "t", executor="local")
    _check(store, "t")
    assert all(len(r.candidates) == 1 for r in seen)
    assert store.study("t").trials_done == 12


def test_a_failed_batch_is_one_error_row_and_its_retry_records_every_candidate(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch)
    store = _new(tmp_path, "f", "12s", shares={"screen": 1.0, "train": 0.0, "supernet": 0.0, "latency": 0.0})
    run_study(store, "f", executor="local", chaos={3: "raise"})
    _check(store, "f")
    failed = [r for r in seen if r.ordinal == 3]
    assert len(failed) == 2 and failed[0] == failed[1]  # the attempt and its retry: the same request
    errors = [e for e in store.evaluations("f") if e.error]
    assert [(e.key, e.arch_hash, e.attempt) for e in errors] == [(f"{failed[0].key}:error:0", None, 0)]
    assert "injected failure" in errors[0].error
    rows = {e.key: e for e in store.evaluations("f", errors=False)}
    assert all(rows[f"{c.key}:screen"].attempt == 1 for c in failed[0].candidates)


def test_stop_then_resume_in_process_counts_nothing_twice(tmp_path: Path) -> None:
    # a trial budget: beside busy processes a 20-second one was spent by the stop, leaving the resume nothing
    store = _new(tmp_path, "r", "30trials")
    calls = {"n": 0}

    def progress(_p: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 12:
            store.request_stop("r")

    run_study(store, "r", executor="local", progress=progress)
    first = store.study("r")
    assert first.status == "stopped" and first.trials_done >= 12
    _check(store, "r")
    run_study(store, "r", executor="local")
    info = store.study("r")
    assert info.status == "completed" and info.trials_done == 30 > first.trials_done
    _check(store, "r")


def test_rea_end_to_end_evolves_from_its_population(tmp_path: Path) -> None:
    """``--strategy rea``: after 32 random trials every new candidate is a mutation of a parent."""
    import optuna

    from nas.search.rea import PARENT_KEY

    store = _new(tmp_path, "e", "38trials", strategy="rea")
    run_study(store, "e", executor="local")
    _check(store, "e")
    study = optuna.load_study(study_name="e", storage=store.optuna_storage())
    parents = [t.system_attrs.get(PARENT_KEY) for t in sorted(study.trials, key=lambda t: t.number)]
    assert all(p is None for p in parents[:32]) and all(p is not None for p in parents[32:])
    evs = store.evaluations("e", errors=False)
    assert len(evs) == 38 and all(e.stage == "train" and "latency_ms" in e.metrics for e in evs)


class _Recheck(_Listed):
    """A test stage: measures the latency of the three best-scored screened candidates again."""

    name = "latency"
    share = "latency"
    stages = ("latency",)

    def candidates(self, plan: Any) -> list[tuple[str, str]]:
        done = {h: m for h, m in plan.store.done(plan.d.name, "screen").items() if "score" in m}
        best = sorted(done, key=lambda h: -done[h]["score"])[:3]
        return [(h, plan.store.architecture(h)["spec"]) for h in best]


def test_a_new_stage_and_strategy_are_one_class_and_one_registration(tmp_path: Path) -> None:
    if "test-recheck" not in strategy_names():
        register_strategy(Strategy("test-recheck", "screen, then re-measure the best three", random_sampler,
                                   lambda cfg: [Screen(), _Recheck()], screens=True))
    assert get_strategy("test-recheck").stages(SearchConfig())[1].name == "latency"
    # a budget in trials, not seconds: on a loaded machine 3 s of latency share measured only 2
    store = _new(tmp_path, "n", "40trials", strategy="test-recheck",
                 shares={"screen": 0.7, "latency": 0.3, "train": 0.0, "supernet": 0.0})
    run_study(store, "n", executor="local")
    _check(store, "n")
    lat = store.evaluations("n", stage="latency", errors=False)
    assert len(lat) == 3 and all(e.key.startswith("latency:") for e in lat)
    assert isinstance(_Recheck(), Stage)


def test_requests_are_frozen_and_round_trip_as_json(tmp_path: Path) -> None:
    import dataclasses
    import json

    req = TrialRequest(key="screen:1-4", stage="screen", stages=("screen",),
                       candidates=(Candidate("screen:1", "{}", "a" * 64, 1), Candidate("screen:4", "{}", "b" * 64, 4)),
                       allowance=2.5, fault=("raise", "/tmp/x"), ordinal=3)
    again = TrialRequest.from_dict(json.loads(json.dumps(req.to_dict())))
    assert again == req and again.candidate is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.key = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="candidates or a supernet job"):
        TrialRequest(key="k", stage="screen", stages=("screen",))


def test_a_new_study_never_takes_over_an_old_studys_folder(tmp_path: Path) -> None:
    """A study named like an earlier one (its store deleted, or another store in the same folder)
    gets a folder of its own: the earlier supernet checkpoint is never continued and counted as its."""
    old = tmp_path / "nas_runs" / "s" / "supernet"
    old.mkdir(parents=True)
    (old / "supernet.pt").write_bytes(b"an earlier study's checkpoint")
    store = _new(tmp_path, "s", "5s")
    assert store.study("s").config["workdir"] == str((tmp_path / "nas_runs" / "s.2").resolve())
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    create_study(other, "s", SearchConfig(train_epochs=1), parse_budget("5s"))
    assert other.study("s").config["workdir"] == str((tmp_path / "nas_runs" / "s.3").resolve())
