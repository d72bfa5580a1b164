"""nas.lifecycle: create, run, resume, stop, add budget and summary on a SQLite store, without Ray.

``nas.search.run_study`` is replaced where a run is needed (the lifecycle reaches it only through
``nas.search``): these tests are about the lease, the states, the checks and what is written,
never about a real search (tests/test_search*.py run those).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from nas import lifecycle
from nas.budget import parse_budget
from nas.search import SearchConfig, SearchError, StudyLost
from nas.store import Store

CUDA = torch.cuda.is_available()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("NAS_STORAGE", raising=False)
    monkeypatch.delenv("NAS_CHAOS", raising=False)
    return f"sqlite:///{tmp_path / 'nas.db'}"


@pytest.fixture
def store(url: str) -> Store:
    """A store with study ``s`` (a 30 s budget, 12.5 s used) registered as a Python caller would."""
    with Store(url) as st:
        st.create_study("s", "hybrid_vit", SearchConfig(target="cpu").to_dict(), parse_budget("30s").to_dict())
        st.record_evaluation("s", stage="screen", metrics={"score": 1.0}, seconds=12.5, key="screen:0")
        st.record_evaluation("s", stage="train", metrics={}, seconds=0.5, key="train:0", error="Traceback\nboom")
    return Store(url)


def _snapshot(st: Store, name: str = "s") -> tuple[Any, ...]:
    info = st.study(name)
    return info.status, info.stop_requested, info.budget, info.driver_pid, info.used_seconds, info.trials_done


# --------------------------------------------------------------------------------------------
# create: every check first, all problems in one line, nothing written
# --------------------------------------------------------------------------------------------


def test_create_reports_every_problem_in_one_line_and_writes_nothing(url: str, tmp_path: Path) -> None:
    with pytest.raises(SearchError) as info:
        lifecycle.create(url, budget="abc", name="a/b", workers=0, objectives="latency", data_limit=5, seed=-1,
                         address="nohost", max_params="lots", shares="warp=1")
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("budget 'abc'", "bad study name", "--workers", "--objectives must include accuracy",
                 "--data-limit must be at least 20", "--seed", "--address", "--max-params", "unknown stage 'warp'"):
        assert part in msg, (part, msg)
    assert msg.count("; ") >= 8
    assert _files(tmp_path) == []


def test_a_python_caller_gets_the_checks_the_cli_had(tmp_path: Path) -> None:
    """Bounds the CLI alone used to check are the config's own now."""
    for kwargs, part in (({"data_limit": 5}, "--data-limit"), ({"seed": 2**40}, "--seed"),
                         ({"workers": 100_000}, "--workers"), ({"threads": 10**7}, "--threads"),
                         ({"train_epochs": 10**6}, "--train-epochs"), ({"max_latency_ms": 1e12}, "--max-latency-ms"),
                         ({"address": "localhost:99999"}, "--address"), ({"space": "nb201"}, "benchmark table"),
                         ({"space": "resnet"}, "unknown search space"), ({"target": "tpu"}, "--target")):
        with pytest.raises(SearchError, match=part):
            SearchConfig(**kwargs)
    with pytest.raises(SearchError, match="non-ASCII"):
        SearchConfig.parse(max_params="５M")
    assert SearchConfig.parse(max_params="2.5M", shares="screen=1,train=3", objectives="accuracy,params").max_params \
        == 2_500_000
    assert _files(tmp_path) == []


def test_a_bad_request_found_while_preparing_writes_nothing(url: str, tmp_path: Path) -> None:
    with pytest.raises(SearchError, match=r"nope\.npz"):
        lifecycle.create(url, budget="30s", name="t", data="npz:/nope.npz")
    with pytest.raises(SearchError, match="unknown frame"):
        lifecycle.create(url, budget="30s", name="t", frame="huge")
    assert _files(tmp_path) == []


@pytest.mark.skipif(CUDA, reason="this machine has a GPU: a gpu budget is valid")
def test_a_gpu_budget_without_a_gpu_says_so(url: str, tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="counts GPU time but torch sees no CUDA GPU") as info:
        lifecycle.create(url, budget="3gpu-m", name="t")
    assert "\n" not in str(info.value) and _files(tmp_path) == []
    with pytest.raises(SearchError, match="counts GPU time but --target is cpu"):
        lifecycle.create(url, budget="3gpu-m", name="t", target="cpu")


def test_create_registers_the_study_with_the_target_resolved(url: str, tmp_path: Path) -> None:
    store, info = lifecycle.create(url, budget="2trials", name="c", data_limit=200, strategy="random")
    assert info.status == "created" and info.budget["trials"] == 2
    assert info.config["target"] == ("cuda" if CUDA else "cpu")  # auto: the GPU when torch sees one
    assert info.config["data_limit"] == 200 and info.config["frame_json"]["in_chans"] == 1
    same, info2 = lifecycle.create(store, budget="1cpu-m", data_limit=200, name="d")
    assert same is store and info2.config["target"] == "cpu"  # a cpu budget picks the CPU
    with pytest.raises(SearchError, match="already exists"):
        lifecycle.create(store, budget="1m", name="c", data_limit=200)
    summary = lifecycle.summary(store, "c")
    assert summary.status == "created" and summary.front == [] and summary.stages == {}
    assert summary.used_text == "0/2 trials" and summary.to_dict()["budget"]["total"] == 2


# --------------------------------------------------------------------------------------------
# run: the lease, the states
# --------------------------------------------------------------------------------------------


def test_run_holds_the_lease_and_gives_it_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.search

    seen: dict[str, Any] = {}

    def fake(st: Store, name: str, progress: Any = None, chaos: Any = None) -> list[Any]:
        seen["driver"] = st.live_driver(name)
        seen["chaos"] = chaos
        st.set_status(name, "completed")
        return []

    monkeypatch.setattr(nas.search, "run_study", fake)
    monkeypatch.setenv("NAS_CHAOS", "2:raise")
    result = lifecycle.run(store, "s")
    assert seen["driver"] == (os.getpid(), socket.gethostname()) and seen["chaos"] == {2: "raise"}
    assert result.status == "completed" and store.study("s").driver_pid is None
    assert result.stages["screen"]["done"] == 1 and result.stages["train"]["errors"] == 1
    assert [e.error for e in result.errors] == ["Traceback\nboom"]


@pytest.mark.parametrize(("raised", "expected", "status"), [
    (RuntimeError("worker exploded\nmore"), lifecycle.StudyFailed, "failed"),
    (SearchError("bad input found late"), SearchError, "failed"),
    (StudyLost("the store file was replaced"), StudyLost, "created"),
])
def test_a_failed_run_leaves_a_clear_state_and_no_lease(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                        raised: Exception, expected: type, status: str) -> None:
    import nas.search

    def fake(*_a: Any, **_k: Any) -> Any:
        raise raised

    monkeypatch.setattr(nas.search, "run_study", fake)
    with pytest.raises(expected) as info:
        lifecycle.run(store, "s")
    assert "\n" not in str(info.value)
    if expected is lifecycle.StudyFailed:
        assert "worker exploded" in str(info.value) and "nas resume s" in str(info.value)
    assert store.study("s").status == status and store.study("s").driver_pid is None


def test_run_is_refused_while_another_driver_is_live(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.search

    monkeypatch.setattr(nas.search, "run_study", lambda *a, **k: pytest.fail("ran beside a live driver"))
    assert store.acquire_driver("s", os.getppid(), socket.gethostname())  # a live process, not this one
    before = _snapshot(store)
    with pytest.raises(lifecycle.StudyRunning, match=f"already running \\(pid {os.getppid()}"):
        lifecycle.run(store, "s")
    with pytest.raises(lifecycle.StudyRunning):
        lifecycle.resume(store, "s", "+10s")
    assert _snapshot(store) == before


# --------------------------------------------------------------------------------------------
# resume, add budget, stop
# --------------------------------------------------------------------------------------------


def test_check_resume_refusals_change_nothing(store: Store) -> None:
    before = _snapshot(store)
    store.set_status("s", "completed")
    with pytest.raises(SearchError, match=r"is complete; give it more budget, e.g. \+1m"):
        lifecycle.check_resume(store, "s")
    for add, pattern in (("10s", "starts with '\\+'"), ("+5trials", "cannot add"), ("+abc", "abc"),
                         ("+0s", "more than zero")):
        with pytest.raises(SearchError, match=pattern):
            lifecycle.check_resume(store, "s", add)
    store.set_budget("s", parse_budget("10s").to_dict())  # 13 s used of 10
    store.set_status("s", "stopped")
    with pytest.raises(SearchError, match=r"used 13.0/10 device-s; \+1s more still leaves nothing.*more than 3.0 s"):
        lifecycle.check_resume(store, "s", "+1s", need_budget_left=True)
    assert lifecycle.check_resume(store, "s", "+1s") == parse_budget("11s")  # the CLI lets a resume finish the study
    assert lifecycle.check_resume(store, "s", "+5s", need_budget_left=True) == parse_budget("15s")
    with pytest.raises(SearchError, match="no study 'nope'"):
        lifecycle.check_resume(store, "nope")
    assert _snapshot(store)[3:] == before[3:]  # no lease taken, nothing counted


def test_add_budget_in_the_studys_unit(store: Store) -> None:
    assert lifecycle.add_budget(store, "s", "+30s") == parse_budget("60s")
    assert store.study("s").budget["seconds"] == 60.0
    with pytest.raises(SearchError, match="cannot add"):
        lifecycle.add_budget(store, "s", "+3trials")
    assert store.study("s").budget["seconds"] == 60.0


def test_resume_adds_budget_clears_a_stop_and_runs(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.search

    store.set_status("s", "stopped")
    store.request_stop("s")
    ran: list[Any] = []

    def fake(st: Store, name: str, **_k: Any) -> list[Any]:
        ran.append((st.study(name).budget["seconds"], st.study(name).stop_requested))
        st.set_status(name, "completed")
        return []

    monkeypatch.setattr(nas.search, "run_study", fake)
    started: list[str] = []
    result = lifecycle.resume(store, "s", "+30s", started=lambda info: started.append(info.status))
    assert ran == [(60.0, False)] and started == ["stopped"] and result.status == "completed"
    assert store.study("s").driver_pid is None


def test_stop_marks_a_study_without_driver_stopped(store: Store) -> None:
    res = lifecycle.stop(store, "s")  # created, nobody drives it
    assert res.action == "marked" and res.status == "stopped" and "marked stopped" in res.message
    info = store.study("s")
    assert info.status == "stopped" and not info.stop_requested and info.driver_pid is None
    again = lifecycle.stop(store, "s")
    assert again.action == "nothing" and "nothing to stop" in again.message
    assert again.to_dict()["action"] == "nothing"


def test_stop_asks_a_live_driver_and_marks_nothing_behind_its_back(store: Store) -> None:
    store.set_status("s", "running")
    assert store.acquire_driver("s", os.getpid(), socket.gethostname())  # a live driver: this process
    res = lifecycle.stop(store, "s")
    assert res.action == "requested" and res.driver_pid == os.getpid() and "stop requested" in res.message
    info = store.study("s")
    assert info.status == "running" and info.stop_requested and info.driver_pid == os.getpid()


# --------------------------------------------------------------------------------------------
# stores, hints, frames
# --------------------------------------------------------------------------------------------


def test_storage_comes_from_the_flag_then_the_environment_then_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAS_STORAGE", raising=False)
    assert lifecycle.storage_url() == "sqlite:///nas.db"
    monkeypatch.setenv("NAS_STORAGE", "sqlite:////tmp/env.db")
    assert lifecycle.storage_url() == "sqlite:////tmp/env.db"
    assert lifecycle.storage_url("sqlite:////tmp/flag.db") == "sqlite:////tmp/flag.db"


def test_hints_name_the_store_unless_it_is_the_default() -> None:
    assert lifecycle.command("show", "s") == "nas show s"
    assert lifecycle.command("show", "s", url="sqlite:///nas.db") == "nas show s"
    assert lifecycle.command("best", "s", "--json", url="sqlite:////x/y.db") == \
        "nas best s --json --storage sqlite:////x/y.db"
    assert "hunter2" not in lifecycle.command("show", "s", url="postgresql+psycopg://u:hunter2@h:5432/db")
    assert lifecycle.increment_hint(parse_budget("5trials")) == "+10trials"
    assert lifecycle.increment_hint(parse_budget("3gpu-h")) == "+1gpu-m"


def test_opening_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="no store"):
        lifecycle.open_store(f"sqlite:///{tmp_path / 'missing.db'}")
    assert _files(tmp_path) == []


def test_frames_resolve_as_the_study_and_the_supernet_need_them(store: Store) -> None:
    digits = lifecycle.load_dataset("digits", limit=20)
    tiny = lifecycle.resolve_frame("auto", digits)  # digits: 8px, one channel
    assert tiny.in_chans == 1 and tiny.num_classes == 10 and tiny.img_size == 16
    assert lifecycle.resolve_frame("auto", digits, img_size=32).img_size == 32
    for bad, pattern in (("huge", "unknown frame"), ("/nonexistent/frame.json", "unknown frame")):
        with pytest.raises(SearchError, match=pattern):
            lifecycle.resolve_frame(bad, digits)
    with pytest.raises(SearchError, match="invalid frame"):
        lifecycle.resolve_frame("tiny", digits, img_size=2)
    assert lifecycle.frame_sizes(store.study("s")) == {"num_classes": 10, "img_size": 32, "in_chans": 3}
    with pytest.raises(SearchError, match="nope"):
        lifecycle.load_dataset("npz:/nope.npz")
