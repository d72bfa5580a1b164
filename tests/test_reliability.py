"""Nothing lost, nothing repeated (issue 15): the store vanishing under a driver, the driver lease
and its heartbeat thread, the order of our row and Optuna's COMPLETE, a refused resume, SIGTERM,
trials in flight when the driver dies (any stage), retries, and what a run leaves behind.

Each test asserts an invariant that holds at any machine speed: waits are on states in the store
or on disk, never on how long something took."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlalchemy import update

from nas.budget import parse_budget
from nas.search import Driver, SearchConfig, create_study, run_study
from nas.store import Store, StoreLost
from nas.store.models import StudyModel, utcnow

NAS = str(Path(sys.executable).parent / "nas")
WAIT = 300.0  # an upper bound on waiting for a state, not a claim about speed


def _env(tmp: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAS_CHAOS")}
    env["PYTHONUNBUFFERED"] = "1"
    if tmp is not None:
        env["TMPDIR"] = str(tmp)  # where the driver's Ray puts its nas-ray-* folder
    env.update(extra)
    return env


def _until(cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"gave up waiting for {what}")


def _store_when_ready(db: Path, name: str) -> Store:
    _until(db.exists, f"{db} to exist")
    store = Store(f"sqlite:///{db}")
    _until(lambda: store.get_study(name) is not None, f"study {name}")
    return store


def _short_tmp() -> Path:
    """A short temp folder: Ray's unix sockets live under it, and their paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="nt", dir="/tmp"))


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _check_accounting(store: Store, name: str) -> None:
    """used_seconds equals the sum of every recorded row's seconds; no key twice; nothing in flight."""
    info = store.study(name)
    evs = store.evaluations(name)
    assert info.used_seconds == pytest.approx(sum(e.seconds for e in evs), rel=1e-9, abs=1e-9)
    keys = [e.key for e in evs]
    assert len(keys) == len(set(keys))
    assert info.trials_done == len([e for e in evs if e.error is None])
    assert store.inflight(name) == []


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    short = _short_tmp()
    yield short
    shutil.rmtree(short, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the store goes away under a running driver
# --------------------------------------------------------------------------------------------


def test_a_write_to_a_deleted_or_replaced_store_file_raises(tmp_path: Path) -> None:
    db = tmp_path / "nas.db"
    store = Store(f"sqlite:///{db}")
    store.create_study("s", "hybrid_vit", {}, parse_budget("10s").to_dict())
    store.request_stop("s")  # a write: the file is still the one opened
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    os.replace(copy, db)  # same name, another file
    with pytest.raises(StoreLost, match="replaced"):
        store.clear_stop("s")
    store = Store(f"sqlite:///{db}")
    for side in ("", "-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    with pytest.raises(StoreLost, match="deleted"):
        store.record_evaluation("s", stage="screen", metrics={"score": 1.0}, seconds=1.0)
    assert not db.exists()


@contextlib.contextmanager
def _searching(tmp: Path, study: str) -> Iterator[tuple[subprocess.Popen[str], Store]]:
    """A real `nas search` (60 s budget) in ``tmp``, once it has recorded 3 evaluations; killed on the way out."""
    db = tmp / "nas.db"
    proc = subprocess.Popen([NAS, "search", "--budget", "60s", "--study", study, "--storage", f"sqlite:///{db}"],
                            cwd=tmp, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = _store_when_ready(db, study)
        _until(lambda: store.study(study).trials_done >= 3, "3 evaluations")
        yield proc, store
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_deleting_the_store_mid_search_stops_the_driver_with_an_error(tmp: Path) -> None:
    db = tmp / "nas.db"
    with _searching(tmp, "v") as (proc, store):
        store.close()
        for side in ("", "-wal", "-shm"):
            Path(f"{db}{side}").unlink(missing_ok=True)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode not in (0, 2), (proc.returncode, err[-2000:])
    assert "completed" not in out
    last = err.strip().splitlines()[-1]  # (Optuna logs its study's creation above it)
    assert last.startswith("nas: error: ") and "deleted" in last, err[-2000:]


# --------------------------------------------------------------------------------------------
# the driver lease
# --------------------------------------------------------------------------------------------


def _set_heartbeat(store: Store, name: str, ago: float, pid: int | None = None, host: str | None = None) -> None:
    values: dict[str, Any] = {"heartbeat_at": utcnow() - timedelta(seconds=ago)}
    if pid is not None:
        values |= {"driver_pid": pid, "driver_host": host}
    with store._session(write=True) as s:
        s.execute(update(StudyModel).where(StudyModel.name == name).values(**values))


def test_lease_on_this_host_is_taken_only_from_a_dead_pid(tmp_path: Path) -> None:
    import socket

    here = socket.gethostname()
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    store.create_study("s", "hybrid_vit", {}, parse_budget("10s").to_dict())
    holder = subprocess.Popen(["sleep", "300"])
    try:
        _until(lambda: _alive(holder.pid), "the holder to run")
        time.sleep(2.5)  # the holder started before its last heartbeat, as a real driver does
        _set_heartbeat(store, "s", ago=0.5, pid=holder.pid, host=here)
        time.sleep(0.5)  # now the heartbeat is stale by any measure below, but the pid lives
        assert not store.acquire_driver("s", os.getpid(), here, stale_after=0.1)
        assert store.live_driver("s", stale_after=0.1) == (holder.pid, here)
    finally:
        holder.kill()
        holder.wait()
    assert store.acquire_driver("s", os.getpid(), here, stale_after=3600.0)  # now it is dead, however fresh

    # a pid that a process started after the last heartbeat reuses is not the holder
    late = subprocess.Popen(["sleep", "300"])
    try:
        _set_heartbeat(store, "s", ago=3600.0, pid=late.pid, host=here)
        assert store.live_driver("s") is None
        assert store.acquire_driver("s", os.getpid(), here)
    finally:
        late.kill()
        late.wait()


def test_lease_on_another_host_needs_a_stale_heartbeat(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    store.create_study("s", "hybrid_vit", {}, parse_budget("10s").to_dict())
    _set_heartbeat(store, "s", ago=60.0, pid=12345, host="elsewhere")
    assert not store.acquire_driver("s", os.getpid(), "here")  # 60 s is within the wide default margin
    assert store.live_driver("s") == (12345, "elsewhere")
    _set_heartbeat(store, "s", ago=10_000.0)
    assert store.live_driver("s") is None
    assert store.acquire_driver("s", os.getpid(), "here")


def test_heartbeat_thread_keeps_the_lease_while_a_stage_blocks(tmp_path: Path) -> None:
    """A stage that blocks for longer than the stale limit: the driver's own thread keeps beating,
    so a driver on another host is refused; when the lease is taken anyway, the driver stops."""
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, "b", SearchConfig(), parse_budget("30s"))
    d = Driver(store, "b")
    assert store.acquire_driver("b", d.pid, d.host)
    d.start_heartbeat(every=0.1)
    try:
        stale = 1.0
        time.sleep(3 * stale)  # the stage blocks; nothing in this thread beats
        beat = store.study("b").heartbeat_at
        assert beat is not None
        assert not store.acquire_driver("b", 1, "other-host", stale_after=stale)
        assert not d.stop_requested()
        _set_heartbeat(store, "b", ago=0.0, pid=1, host="other-host")  # taken over regardless
        _until(lambda: d.lost is not None, "the driver to notice")
        assert "another driver" in d.lost and d.stop_requested()
    finally:
        d.stop_heartbeat()
    assert store.study("b").driver_pid == 1  # the old driver never took it back


def test_a_refused_resume_keeps_a_pending_stop(tmp_path: Path) -> None:
    import socket

    url = f"sqlite:///{tmp_path / 'nas.db'}"
    store = Store(url)
    create_study(store, "r", SearchConfig(), parse_budget("30s"))
    assert store.acquire_driver("r", os.getpid(), socket.gethostname())  # a live driver: this process
    store.request_stop("r")
    for extra in ([], ["--budget", "+10s"]):
        out = subprocess.run([NAS, "resume", "r", "--storage", url, *extra], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=WAIT)
        assert out.returncode == 2 and "already running" in out.stderr, out.stderr[-2000:]
        info = store.study("r")
        assert info.stop_requested, "a refused resume withdrew the pending stop"
        assert info.budget == parse_budget("30s").to_dict()


# --------------------------------------------------------------------------------------------
# real drivers: SIGTERM, SIGKILL, the Optuna window
# --------------------------------------------------------------------------------------------


def test_sigterm_inside_a_write_of_the_main_thread_asks_for_a_stop(tmp_path: Path) -> None:
    """The signal lands while the main thread holds a SQLite write (CI met it: the handler's own
    write waited on its thread's transaction for the busy timeout, then aborted the study with
    exit 130). The stop request must be stored once the write ends, and nothing is interrupted."""
    from sqlalchemy import text

    from nas.search import install_stop_handlers

    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, "w", SearchConfig(), parse_budget("30s"))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handlers(store, "w")
    try:
        with store._session(write=True) as s:
            s.execute(text("update nas_studies set name = name"))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, inside the transaction
        _until(lambda: store.stop_requested("w"), "the stop request to be stored")
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_sigterm_stops_gracefully_and_leaves_no_temp_folder(tmp: Path) -> None:
    with _searching(tmp, "t") as (proc, store):
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, (proc.returncode, err[-2000:])
    info = store.study("t")
    assert info.status == "stopped" and not info.stop_requested and info.driver_pid is None
    _check_accounting(store, "t")
    study = optuna.load_study(study_name="t", storage=store.url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert not list(tmp.glob("nas-ray-*")), "the run left its Ray temp folder"


def test_sigkill_of_the_driver_in_supernet_training_is_counted_and_reaped(tmp: Path) -> None:
    """Only the driver is killed (its Ray is not): the reaper ends Ray's processes and removes the
    temp folder; the resume records the supernet training in flight as interrupted, counting the
    device time it ran; a retry that succeeds is stored with its attempt number."""
    db = tmp / "nas.db"
    url = f"sqlite:///{db}"
    proc = subprocess.Popen([NAS, "search", "--budget", "30s", "--study", "k", "--storage", url, "--train-epochs",
                             "1"], cwd=tmp, env=_env(tmp, NAS_HEARTBEAT_S="0.5"),  # in-flight time shows sooner
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = _store_when_ready(db, "k")
        row = _until(lambda: [r for r in store.inflight("k") if r["stage"] == "supernet_train" and r["seconds"] > 0],
                     "supernet training in flight past a heartbeat")[0]
        # the driver's Ray processes name its temp folder; so does the reaper itself (its argument),
        # which removes the folder as its last act and may still be exiting when the test looks
        cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                    for p in _descendants(proc.pid)}
        ray_procs = {p for p, cmd in cmdlines.items() if tmp.as_posix() in cmd and "_reaper.py" not in cmd}
        assert ray_procs and list(tmp.glob("nas-ray-*"))
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as an OOM killer would
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    _until(lambda: not list(tmp.glob("nas-ray-*")), "the reaper to remove the temp folder")
    assert not [p for p in ray_procs if _alive(p)], "Ray processes outlived the reaper"
    assert store.study("k").status == "running"  # nobody marked it: the driver died

    out = subprocess.run([NAS, "resume", "k", "--storage", url, "--json"], cwd=tmp, env=_env(tmp),
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    interrupted = [e for e in store.evaluations("k") if (e.error or "").startswith("interrupted")]
    sup = [e for e in interrupted if e.stage == "supernet_train"]
    assert len(sup) == 1 and sup[0].seconds >= row["seconds"] > 0
    _check_accounting(store, "k")
    assert not list(tmp.glob("nas-ray-*"))


def test_no_optuna_trial_is_complete_without_our_row(tmp: Path) -> None:
    """The driver is killed right after Optuna's tell: the trial's own row must already be there."""
    db = tmp / "nas.db"
    url = f"sqlite:///{db}"
    marker = tmp / "told"
    proc = subprocess.Popen([NAS, "search", "--budget", "12s", "--study", "o", "--storage", url],
                            cwd=tmp, env=_env(tmp, NAS_CHAOS_PAUSE_AFTER_TELL=str(marker)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until(marker.exists, "the first tell")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    store = Store(url)
    study = optuna.load_study(study_name="o", storage=url)
    complete = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    rows = {e.trial for e in store.evaluations("o", errors=False) if e.stage == "screen"}
    assert set(complete) <= rows, f"COMPLETE in Optuna without a row: {sorted(set(complete) - rows)}"
    out = subprocess.run([NAS, "resume", "o", "--storage", url], cwd=tmp, env=_env(tmp), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr[-2000:]
    _check_accounting(store, "o")
    study = optuna.load_study(study_name="o", storage=url)
    complete = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = {e.trial for e in store.evaluations("o", errors=False) if e.stage == "screen"}
    assert set(complete) <= rows


# --------------------------------------------------------------------------------------------
# in process: a retried trial's attempt
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    from workers.ray_pool import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield
    shutdown_ray()


def test_a_successful_retry_is_stored_with_its_attempt(ray_session: None, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'nas.db'}")
    create_study(store, "a", SearchConfig(strategy="random", train_epochs=1), parse_budget("4trials"))
    run_study(store, "a", chaos={2: "raise"})
    evs = store.evaluations("a")
    failed = [e for e in evs if e.error is not None]
    assert len(failed) == 1 and failed[0].attempt == 0
    retried = [e for e in evs if e.error is None and e.trial == failed[0].trial]
    assert len(retried) == 1 and retried[0].attempt == 1
    assert all(e.attempt == 0 for e in evs if e.error is None and e.trial != failed[0].trial)
    _check_accounting(store, "a")
