"""nas.store: one reusable suite (``StoreSuite``) run against SQLite and a real PostgreSQL server.

As Optuna tests its storages: every backend subclasses the suite and supplies a ``url`` fixture
(a fresh, empty database per test).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from nas.store import (
    STATUSES,
    Store,
    StoreError,
    default_url,
    device_key,
    validate_study_name,
    validate_url,
)
from nas.store.models import VERSION_TABLE, Base, EvaluationModel, StudyModel, utcnow

HOST = socket.gethostname()
CPU = {"kind": "cpu", "name": "Test CPU", "cores": 2}
GPU = {"kind": "cuda", "name": "Test GPU", "memory_mb": 80000, "sm_clock_mhz": 1410}
TABLES = {"nas_studies", "nas_architectures", "nas_devices", "nas_evaluations", "nas_metrics", "nas_front",
          "nas_exports", "nas_inflight"}


def arch(i: int) -> tuple[str, str]:
    """(hash, canonical JSON) of a toy spec, hashed the way ``spec.hash`` is."""
    text = json.dumps({"depth": i, "mixer": "pool"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), text


def secs(worker: int, i: int) -> float:
    """Multiples of 1/4: their float sum is exact in any order, so totals can be compared with ==."""
    return 0.25 * ((7 * i + worker) % 13 + 1)


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def orphan_metrics(store: Store) -> int:
    with store.engine.connect() as c:
        return c.execute(sa.text(
            "SELECT count(*) FROM nas_metrics m LEFT JOIN nas_evaluations e ON e.id = m.evaluation_id "
            "WHERE e.id IS NULL")).scalar_one()


# ---- child processes (module level: 'spawn' imports them by name) ---------------------------


def _record_many(url: str, study: str, worker: int, n: int, barrier: Any) -> None:
    barrier.wait()  # open the fresh database at the same moment as the other worker
    store = Store(url)
    try:
        store.create_study(study, "hybrid_vit", {}, {"trials": 10_000})
    except StoreError:
        pass  # the other worker created it
    h, spec = arch(0)
    store.add_architecture(h, "hybrid_vit", spec, params=10)  # both add it: must not collide
    for i in range(n):
        store.record_evaluation(study, stage="zc", metrics={"score": i / n, "worker": float(worker)},
                                seconds=secs(worker, i), arch_hash=h if i % 2 else None, device=CPU,
                                trial=i, key=f"w{worker}-{i}")
        if i % 10 == 0:  # both workers report the same result: it must count once
            store.record_evaluation(study, stage="zc", metrics={"score": 1.0, "worker": 0.0}, seconds=1.0,
                                    key=f"shared-{i}")
    store.close()


def _record_forever(url: str, study: str, ready: Any) -> None:
    store = Store(url)
    h, spec = arch(1)
    store.add_architecture(h, "hybrid_vit", spec)
    i = 0
    while True:
        store.record_evaluation(study, stage="zc", metrics={"a": float(i), "b": 1.0, "c": 2.0},
                                seconds=secs(0, i), arch_hash=h, device=CPU,
                                error="worker crashed" if i % 3 == 0 else None)
        i += 1
        if i == 30:
            ready.set()


# ---- the suite ------------------------------------------------------------------------------


class StoreSuite:
    """Every backend runs these; subclasses provide ``url`` (a fresh, empty database)."""

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    def store(self, url: str):
        with Store(url) as s:
            yield s

    # -- schema ----------------------------------------------------------------------------

    def test_migrations_create_tables_and_version_table(self, store: Store) -> None:
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        names = set(sa.inspect(store.engine).get_table_names())
        assert TABLES | {VERSION_TABLE} <= names
        assert "alembic_version" not in names  # Optuna's version table is not ours to create
        with store.engine.connect() as c:
            assert c.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == \
                ["v0.2.0_inflight"]
            # the migration and the models agree: autogenerate would find nothing to do
            ctx = MigrationContext.configure(c, opts={
                "version_table": VERSION_TABLE, "compare_type": True,
                "include_name": lambda name, type_, _p: type_ != "table" or name.startswith("nas_")})
            assert compare_metadata(ctx, Base.metadata) == []

    def test_a_v0_1_store_upgrades_and_keeps_its_studies(self, url: str) -> None:
        from alembic import command

        from nas.store._store import _alembic_config

        command.upgrade(_alembic_config(url), "v0.1.0_initial")  # a store written by the first release
        eng = sa.create_engine(url)
        with eng.begin() as c:
            c.execute(sa.text("INSERT INTO nas_studies (name, space, config, budget, used_seconds, trials_done, "
                              "status, stop_requested, created_at, updated_at) VALUES ('old', 'nb201', '{}', '{}', "
                              "1.5, 0, 'stopped', false, :t, :t)"), {"t": utcnow()})
        eng.dispose()
        with Store(url) as store:
            assert store.get_study("old").used_seconds == 1.5  # type: ignore[union-attr]
            store.start_inflight("old", "train:x", stage="train")
            assert [r["key"] for r in store.inflight("old")] == ["train:x"]
            store.record_evaluation("old", stage="train", metrics={}, seconds=2.0, key="train:x:train",
                                    inflight="train:x")
            assert store.inflight("old") == [] and store.used("old") == (3.5, 1)

    def test_reopen_runs_no_migration(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        with Store(url) as s:
            s.create_study("kept", "nb201", {"seed": 1}, {"trials": 5})
        import alembic.command

        def boom(*_a: Any, **_k: Any) -> None:
            raise AssertionError("upgrade ran on an up-to-date store")

        monkeypatch.setattr(alembic.command, "upgrade", boom)
        with Store(url) as s:
            assert s.get_study("kept").config == {"seed": 1}  # type: ignore[union-attr]
            with s.engine.connect() as c:
                assert c.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one() == 1

    # -- studies ---------------------------------------------------------------------------

    def test_study_crud_and_duplicate_name(self, store: Store) -> None:
        a = store.create_study("alpha", "hybrid_vit", {"img": 32, "proxies": ["snip"]}, {"seconds": 3600.0})
        assert (a.name, a.space, a.status, a.stage, a.used_seconds, a.trials_done, a.stop_requested) == \
            ("alpha", "hybrid_vit", "created", None, 0.0, 0, False)
        assert a.config == {"img": 32, "proxies": ["snip"]} and a.budget == {"seconds": 3600.0}
        assert a.created_at.tzinfo is not None
        json.dumps(a.to_dict())  # JSON-native
        store.create_study("beta", "nb201", {}, {"trials": 10})
        assert [s.name for s in store.studies()] == ["alpha", "beta"]
        assert store.get_study("alpha") == a
        assert store.get_study("nope") is None
        with pytest.raises(StoreError, match="already exists") as e:
            store.create_study("alpha", "nb201", {}, {})
        one_line(e)
        with pytest.raises(StoreError, match="bad study name"):
            store.create_study("-bad", "nb201", {}, {})
        with pytest.raises(StoreError, match="JSON"):
            store.create_study("gamma", "nb201", {"x": float("nan")}, {})
        with pytest.raises(StoreError, match="no study named 'nope'"):
            store.set_status("nope", "running")
        assert [s.name for s in store.studies()] == ["alpha", "beta"]  # the failed creates left nothing

    def test_status_budget_config_and_stop_flags(self, store: Store) -> None:
        store.create_study("s", "hybrid_vit", {"a": 1}, {"seconds": 10.0})
        before = store.get_study("s")
        store.set_status("s", "running", stage="screening")
        store.set_status("s", "stopping")  # no stage given: the stage stays
        info = store.get_study("s")
        assert (info.status, info.stage) == ("stopping", "screening")  # type: ignore[union-attr]
        assert info.updated_at >= before.updated_at  # type: ignore[union-attr]
        with pytest.raises(StoreError, match="bad study status 'paused'") as e:
            store.set_status("s", "paused")
        assert all(st in one_line(e) for st in STATUSES)
        store.set_budget("s", {"seconds": 20.0, "device": "gpu"})
        store.set_config("s", {"a": 2})
        info = store.get_study("s")
        assert info.budget == {"seconds": 20.0, "device": "gpu"} and info.config == {"a": 2}  # type: ignore[union-attr]
        assert store.stop_requested("s") is False
        store.request_stop("s")
        assert store.stop_requested("s") is True and store.get_study("s").stop_requested  # type: ignore[union-attr]
        store.clear_stop("s")
        assert store.stop_requested("s") is False
        with pytest.raises(StoreError):
            store.stop_requested("nope")

    # -- driver lease ----------------------------------------------------------------------

    def test_driver_lease(self, store: Store) -> None:
        store.create_study("s", "nb201", {}, {})
        me, other = os.getpid(), os.getppid()  # both alive
        assert store.acquire_driver("s", me, HOST)
        assert not store.acquire_driver("s", other, HOST)  # held by a live driver
        assert store.acquire_driver("s", me, HOST)  # the holder may re-acquire
        info = store.get_study("s")
        assert (info.driver_pid, info.driver_host) == (me, HOST) and info.heartbeat_at is not None  # type: ignore[union-attr]
        assert store.heartbeat("s", me) and not store.heartbeat("s", other)
        assert not store.heartbeat("s", me, host="elsewhere")
        assert not store.release_driver("s", other)
        assert store.release_driver("s", me)
        info = store.get_study("s")
        assert (info.driver_pid, info.driver_host, info.heartbeat_at) == (None, None, None)  # type: ignore[union-attr]
        assert store.acquire_driver("s", other, HOST)

    def test_driver_lease_dead_pid_and_stale_heartbeat(self, store: Store) -> None:
        store.create_study("s", "nb201", {}, {})
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        assert store.acquire_driver("s", dead.pid, HOST)
        assert store.acquire_driver("s", os.getpid(), HOST, stale_after=3600)  # its pid is gone on this host
        # a driver on another host cannot be checked by pid: only a stale heartbeat frees its lease
        store.create_study("t", "nb201", {}, {})
        assert store.acquire_driver("t", 4242, "other-host")
        assert not store.acquire_driver("t", os.getpid(), HOST)
        with store.engine.begin() as c:
            c.execute(sa.update(StudyModel).where(StudyModel.name == "t")
                      .values(heartbeat_at=utcnow() - timedelta(seconds=120)))
        assert not store.acquire_driver("t", os.getpid(), HOST, stale_after=600)
        assert store.acquire_driver("t", os.getpid(), HOST, stale_after=30)
        assert not store.heartbeat("t", 4242)  # the old driver learns it lost the lease
        assert store.get_study("t").driver_pid == os.getpid()  # type: ignore[union-attr]

    # -- architectures, devices, evaluations -----------------------------------------------

    def test_architectures_and_devices(self, store: Store) -> None:
        h, spec = arch(3)
        store.add_architecture(h, "hybrid_vit", spec)
        store.add_architecture(h, "hybrid_vit", spec, params=5_000_000_000, flops=7)  # fills in what was missing
        store.add_architecture(h, "hybrid_vit", json.loads(spec), params=1)  # idempotent: params stay
        a = store.architecture(h)
        assert a is not None and (a["space"], a["spec"], a["params"], a["flops"]) == \
            ("hybrid_vit", json.loads(spec), 5_000_000_000, 7)
        assert store.architecture("0" * 64) is None
        with pytest.raises(StoreError, match="not the sha256"):
            store.add_architecture("f" * 64, "hybrid_vit", spec)
        with pytest.raises(StoreError, match="64 lowercase hex"):
            store.add_architecture(h[:10], "hybrid_vit", spec)
        k = store.add_device(CPU)
        assert k == device_key(CPU) == hashlib.sha256(
            json.dumps(CPU, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
        assert store.add_device(CPU) == k and store.add_device({**GPU, "key": "0123456789abcdef"}) == "0123456789abcdef"
        assert [(d["key"], d["kind"], d["name"]) for d in store.devices()] == \
            [("0123456789abcdef", "cuda", "Test GPU"), (k, "cpu", "Test CPU")]

    def test_record_evaluation_counts_exactly(self, store: Store) -> None:
        store.create_study("s", "hybrid_vit", {}, {"seconds": 100.0})
        h, spec = arch(0)
        store.add_architecture(h, "hybrid_vit", spec)
        metrics = {"acc": 0.123456789012345, "latency_ms": 3.25, "bad": float("nan"), "worse": float("inf")}
        e1 = store.record_evaluation("s", stage="zc", metrics=metrics, seconds=1.5, arch_hash=h, device=GPU,
                                     trial=0, key="t0")
        e2 = store.record_evaluation("s", stage="zc", metrics={}, seconds=2.25, arch_hash=h, error="CUDA OOM",
                                     trial=1, attempt=2)
        e3 = store.record_evaluation("s", stage="supernet", metrics={"loss": 0.5}, seconds=4.0)
        e4 = store.record_evaluation("s", stage="zc", metrics={"acc": 0.2}, seconds=8.0, arch_hash=h,
                                     count_seconds=False)
        assert e1 < e2 < e3 < e4
        assert store.used("s") == (1.5 + 2.25 + 4.0, 3)  # the error row spends time but is no trial
        # the same key again: no new row, nothing counted twice
        assert store.record_evaluation("s", stage="zc", metrics={"acc": 0.9}, seconds=99.0, arch_hash=h,
                                       key="t0") == e1
        assert store.used("s") == (7.75, 3)
        rows = store.evaluations("s")
        assert [r.id for r in rows] == [e1, e2, e3, e4]
        r1 = rows[0]
        assert r1.metrics == {"acc": 0.123456789012345, "latency_ms": 3.25}  # non-finite values skipped
        assert (r1.study, r1.arch_hash, r1.stage, r1.trial, r1.attempt, r1.device_key, r1.seconds, r1.error,
                r1.key) == ("s", h, "zc", 0, 0, device_key(GPU), 1.5, None, "t0")
        assert (rows[1].error, rows[1].attempt, rows[2].arch_hash) == ("CUDA OOM", 2, None)
        json.dumps([r.to_dict() for r in rows])
        assert [r.id for r in store.evaluations("s", stage="zc", errors=False)] == [e1, e4]
        assert [r.id for r in store.evaluations("s", arch_hash=h)] == [e1, e2, e4]
        assert [d["key"] for d in store.devices()] == [device_key(GPU)]
        with pytest.raises(StoreError, match="add_architecture"):
            store.record_evaluation("s", stage="zc", metrics={}, seconds=1.0, arch_hash=arch(9)[0])
        with pytest.raises(StoreError, match="no study named"):
            store.record_evaluation("nope", stage="zc", metrics={}, seconds=1.0)
        with pytest.raises(StoreError, match="seconds"):
            store.record_evaluation("s", stage="zc", metrics={}, seconds=float("nan"))
        assert store.used("s") == (7.75, 3) and len(store.evaluations("s")) == 4

    def test_a_batch_is_recorded_whole_or_not_at_all(self, store: Store) -> None:
        """A screening batch: each candidate its own row, key and seconds, in one transaction with
        the in-flight note it ends; a bad row refuses the whole batch; a repeat counts nothing."""
        store.create_study("s", "hybrid_vit", {}, {"seconds": 100.0})
        hashes = []
        for i in range(3):
            h, spec = arch(i)
            store.add_architecture(h, "hybrid_vit", spec)
            hashes.append(h)
        store.start_inflight("s", "screen.batch:0", stage="screen")
        rows = [dict(stage="screen", metrics={"score": float(i)}, seconds=0.25 * (i + 1), arch_hash=h, trial=i,
                     key=f"screen:{i}:screen", device=GPU) for i, h in enumerate(hashes)]
        bad = [*rows[:2], dict(stage="screen", metrics={}, seconds=1.0, arch_hash=arch(9)[0], key="x")]
        with pytest.raises(StoreError, match="add_architecture"):
            store.record_evaluations("s", bad, inflight="screen.batch:0")
        assert store.used("s") == (0.0, 0) and store.evaluations("s") == [] and len(store.inflight("s")) == 1
        ids = store.record_evaluations("s", rows, inflight="screen.batch:0")
        assert len(set(ids)) == 3 and store.used("s") == (1.5, 3) and store.inflight("s") == []
        got = store.evaluations("s")
        assert [(r.key, r.seconds, r.trial, r.metrics["score"]) for r in got] == [
            (f"screen:{i}:screen", 0.25 * (i + 1), i, float(i)) for i in range(3)]
        assert store.record_evaluations("s", rows) == ids and store.used("s") == (1.5, 3)

    def test_done_front_exports_and_delete(self, store: Store) -> None:
        store.create_study("s", "hybrid_vit", {}, {})
        store.create_study("other", "hybrid_vit", {}, {})
        (h0, s0), (h1, s1), (h2, s2) = arch(0), arch(1), arch(2)
        for h, spec in ((h0, s0), (h1, s1), (h2, s2)):
            store.add_architecture(h, "hybrid_vit", spec, params=100)
        store.record_evaluation("s", stage="zc", metrics={"snip": 1.0}, seconds=1.0, arch_hash=h0)
        store.record_evaluation("s", stage="zc", metrics={"snip": 2.0}, seconds=1.0, arch_hash=h0)  # latest wins
        store.record_evaluation("s", stage="zc", metrics={}, seconds=1.0, arch_hash=h0, error="nan loss")
        store.record_evaluation("s", stage="zc", metrics={}, seconds=1.0, arch_hash=h1, error="oom")
        store.record_evaluation("s", stage="latency", metrics={"ms": 3.0}, seconds=1.0, arch_hash=h2)
        store.record_evaluation("s", stage="zc", metrics={"snip": 5.0}, seconds=1.0)  # study-level: no arch
        store.record_evaluation("other", stage="zc", metrics={"snip": 9.0}, seconds=1.0, arch_hash=h2)
        assert store.done("s", "zc") == {h0: {"snip": 2.0}}
        assert store.done("s", "latency") == {h2: {"ms": 3.0}}
        assert store.done("s", "train") == {}

        store.set_front("s", [{"arch_hash": h2, "rank": 1, "metrics": {"acc": 0.7}},
                              {"arch_hash": h1, "rank": 0, "metrics": {"acc": 0.9}},
                              {"arch_hash": h0, "rank": 1, "metrics": {"acc": 0.8}}])
        front = store.front("s")
        assert [(f["arch_hash"], f["rank"]) for f in front] == [(h1, 0), *sorted([(h0, 1), (h2, 1)])]
        assert front[0]["metrics"] == {"acc": 0.9} and front[0]["spec"] == json.loads(s1)
        assert front[0]["params"] == 100 and front[0]["space"] == "hybrid_vit"
        with pytest.raises(StoreError, match="not in the store"):  # atomic: the old front stays
            store.set_front("s", [{"arch_hash": h0, "rank": 0, "metrics": {}},
                                  {"arch_hash": arch(7)[0], "rank": 1, "metrics": {}}])
        assert len(store.front("s")) == 3
        store.set_front("s", [{"arch_hash": h0, "rank": 0, "metrics": {"acc": 0.8}}])
        assert [f["arch_hash"] for f in store.front("s")] == [h0]
        assert store.front("other") == []

        x1 = store.add_export("s", h0, "/tmp/model.py", "py")
        x2 = store.add_export("s", h0, "/tmp/model.onnx", "onnx")
        assert x1 < x2
        assert [(x["id"], x["path"], x["format"], x["arch_hash"]) for x in store.exports("s")] == \
            [(x1, "/tmp/model.py", "py", h0), (x2, "/tmp/model.onnx", "onnx", h0)]

        store.delete_study("s")
        assert store.get_study("s") is None and [s.name for s in store.studies()] == ["other"]
        assert store.architecture(h0) is not None  # architectures and devices are shared: kept
        assert len(store.evaluations("other")) == 1 and orphan_metrics(store) == 0
        with store.engine.connect() as c:
            for table in ("nas_evaluations", "nas_front", "nas_exports"):
                assert c.execute(sa.text(f"SELECT count(*) FROM {table} WHERE study_id = 1")).scalar_one() == 0
        with pytest.raises(StoreError):
            store.delete_study("s")

    def test_numpy_values_pickle_and_newer_schema(self, url: str, store: Store) -> None:
        import pickle

        import numpy as np

        store.create_study("s", "nb201", {}, {})
        h, spec = arch(0)
        store.add_architecture(h, "nb201", spec, params=np.int64(12), flops=np.int64(34))
        eid = store.record_evaluation("s", stage="zc", metrics={"acc": np.float32(0.5)}, seconds=np.float64(2.0),
                                      arch_hash=h, trial=np.int64(3), attempt=np.int32(1))
        (row,) = store.evaluations("s")
        assert (row.id, row.trial, row.attempt, row.metrics, row.seconds) == (eid, 3, 1, {"acc": 0.5}, 2.0)
        assert store.acquire_driver("s", np.int64(os.getpid()), HOST) and store.heartbeat("s", np.int64(os.getpid()))
        again = pickle.loads(pickle.dumps(store))  # e.g. sent to a Ray worker
        assert again.url == store.url and again.used("s") == (2.0, 1)
        again.close()
        with store.engine.begin() as c:  # a newer hybrid-nas migrated this store further
            c.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'v9.0.0_future'"))
        with pytest.raises(StoreError, match=r"v9\.0\.0_future.*upgrade hybrid-nas") as e:
            Store(url)
        one_line(e)

    # -- Optuna ----------------------------------------------------------------------------

    def test_optuna_storage_coexists(self, url: str) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with Store(url) as store:
            store.create_study("s", "hybrid_vit", {}, {})
            storage = store.optuna_storage()
            study = optuna.create_study(storage=storage, study_name="s")
            study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0) ** 2, n_trials=3)
            storage.engine.dispose()
            names = set(sa.inspect(store.engine).get_table_names())
            assert {"alembic_version", VERSION_TABLE, "studies", "trials"} | TABLES <= names
        with Store(url) as store:
            assert store.get_study("s") is not None
            with store.engine.connect() as c:
                ours = c.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
                theirs = c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
            assert ours == ["v0.2.0_inflight"] and len(theirs) == 1 and theirs != ours
            loaded = optuna.load_study(study_name="s", storage=store.optuna_storage())
            assert len(loaded.trials) == 3 and loaded.best_value == min(t.value for t in study.trials)

    def test_store_opens_a_database_optuna_made(self, url: str) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(validate_url(url))
        optuna.create_study(storage=storage, study_name="first").optimize(lambda t: 1.0, n_trials=1)
        storage.engine.dispose()
        with Store(url) as store:
            store.create_study("s", "nb201", {}, {})
            assert len(optuna.load_study(study_name="first", storage=store.optuna_storage()).trials) == 1

    def test_drivers_opening_optuna_on_a_fresh_store_at_once(self, url: str) -> None:
        """Optuna stamps its alembic_version unlocked: four openers at once all succeed, one stamp.

        Before the retry in ``optuna_storage`` this failed 30 times in 40 on SQLite (CI saw it as
        two ``nas search`` runs on one fresh store, one dying with a UNIQUE constraint error).
        """
        import threading

        with Store(url) as store:
            for _ in range(3):
                barrier = threading.Barrier(4)
                errors: list[Exception] = []
                storages: list[Any] = []

                def open_optuna(barrier: Any, storages: list[Any], errors: list[Exception]) -> None:
                    barrier.wait()
                    try:
                        storages.append(store.optuna_storage())
                    except Exception as e:
                        errors.append(e)

                threads = [threading.Thread(target=open_optuna, args=(barrier, storages, errors)) for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                assert errors == [] and len(storages) == 4
                for s in storages:
                    s.engine.dispose()
            with store.engine.connect() as c:
                assert len(c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()) == 1

    # -- processes -------------------------------------------------------------------------

    def test_two_processes_open_fresh_and_record_concurrently(self, url: str) -> None:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(2)
        n = 150
        procs = [ctx.Process(target=_record_many, args=(url, "race", w, n, barrier)) for w in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        with Store(url) as store:
            rows = store.evaluations("race")
            shared = n // 10
            assert len(rows) == 2 * n + shared and len({r.key for r in rows}) == 2 * n + shared
            expected = sum(secs(w, i) for w in (1, 2) for i in range(n)) + shared * 1.0
            assert store.used("race") == (expected, 2 * n + shared)
            assert sum(r.seconds for r in rows) == expected
            assert all(r.metrics["worker"] in (0.0, 1.0, 2.0) and len(r.metrics) == 2 for r in rows)
            assert len(store.studies()) == 1 and len(store.devices()) == 1

    def test_sigkill_while_recording_leaves_store_consistent(self, url: str) -> None:
        with Store(url) as store:
            store.create_study("k", "hybrid_vit", {}, {})
        ctx = mp.get_context("spawn")
        for round_ in range(3):  # three kills at different moments: more chances to land mid-transaction
            ready = ctx.Event()
            p = ctx.Process(target=_record_forever, args=(url, "k", ready))
            p.start()
            try:
                assert ready.wait(60), "the recording process did not get going"
                time.sleep(0.013 * round_)
            finally:
                os.kill(p.pid, signal.SIGKILL)
                p.join(30)
            assert p.exitcode == -signal.SIGKILL
        with Store(url) as store:
            rows = store.evaluations("k")
            assert len(rows) >= 90
            used_seconds, trials_done = store.used("k")
            assert used_seconds == sum(r.seconds for r in rows)
            assert trials_done == sum(r.error is None for r in rows)
            assert all(len(r.metrics) == 3 for r in rows)  # each evaluation with all of its metrics
            assert orphan_metrics(store) == 0


class TestSQLite(StoreSuite):
    @pytest.fixture
    def url(self, tmp_path: Any) -> str:
        return f"sqlite:///{tmp_path / 'nas.db'}"

    def test_sqlite_pragmas(self, store: Store) -> None:
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


class TestPostgres(StoreSuite):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url

    def test_same_key_raced_by_another_writer_counts_once(self, store: Store) -> None:
        """The writer that loses the race on (study, key) returns the winner's id and counts nothing."""
        import threading

        sid = store.create_study("s", "nb201", {}, {}).id
        with store.engine.connect() as other:  # a second writer, mid-transaction with the same key
            won = other.execute(sa.insert(EvaluationModel).values(
                study_id=sid, stage="zc", attempt=0, seconds=5.0, key="k", created_at=utcnow())).inserted_primary_key[0]
            other.execute(sa.update(StudyModel).where(StudyModel.id == sid).values(
                used_seconds=StudyModel.used_seconds + 5.0, trials_done=StudyModel.trials_done + 1))
            got: list[int] = []
            t = threading.Thread(target=lambda: got.append(store.record_evaluation(
                "s", stage="zc", metrics={"a": 1.0}, seconds=7.0, key="k")))
            t.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # wait until our insert blocks on the uncommitted duplicate
                with store.engine.connect() as c:  # a fresh transaction: pg_stat_activity is snapshotted per one
                    waiting = c.execute(sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")).scalar_one()
                if waiting:
                    break
                time.sleep(0.02)
            assert waiting, "record_evaluation never blocked on the other writer's key"
            other.commit()
            t.join(20)
        assert got == [won]
        assert store.used("s") == (5.0, 1)
        assert [(r.id, r.metrics) for r in store.evaluations("s")] == [(won, {})]

    def test_bad_credentials_and_missing_database(self, url: str) -> None:
        base = url.rsplit("/", 1)[0]
        with pytest.raises(StoreError, match="cannot open store") as e:
            Store(base.replace("postgres@", "nobody@") + "/postgres")
        assert "nobody" in one_line(e)
        with pytest.raises(StoreError, match="does_not_exist") as e:
            Store(base + "/does_not_exist")
        one_line(e)


# ---- URLs and names (no database needed) ----------------------------------------------------


def test_urls(tmp_path: Any) -> None:
    assert default_url() == "sqlite:///nas.db" and validate_url(default_url()) == "sqlite:///nas.db"
    assert validate_url("postgresql://u:p%40ss@db:5432/nas") == "postgresql+psycopg://u:p%40ss@db:5432/nas"
    assert validate_url("postgresql+psycopg://u@db/nas") == "postgresql+psycopg://u@db/nas"
    for bad in ("ftp://host/nas.db", "mysql://u@h/db", "postgres://u@h/db", "sqlite://", "sqlite:///:memory:",
                "not a url", ""):
        with pytest.raises(StoreError) as e:
            validate_url(bad)
        assert "sqlite:///" in one_line(e) and "postgresql://" in str(e.value), bad
    with pytest.raises(StoreError, match="does not exist") as e:
        Store(f"sqlite:///{tmp_path / 'missing' / 'nas.db'}")
    one_line(e)
    assert not (tmp_path / "missing").exists()


def test_postgres_on_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    t = time.perf_counter()
    with pytest.raises(StoreError, match="cannot open store") as e:
        Store(f"postgresql://nas:secret@127.0.0.1:{port}/nas")
    msg = one_line(e)
    assert str(port) in msg and "secret" not in msg  # says where, never the password
    assert time.perf_counter() - t < 15


def test_study_names() -> None:
    for good in ("a", "cifar10-run.2", "X_" + "y" * 62):
        assert validate_study_name(good) == good
    for bad in ("", "-x", ".x", "a b", "a/b", "y" * 65, None, 3):
        with pytest.raises(StoreError, match="bad study name"):
            validate_study_name(bad)


def test_real_specs_roundtrip(tmp_path: Any) -> None:
    from search_spaces import get_space
    from search_spaces._space import RandomTrial

    with Store(f"sqlite:///{tmp_path / 'nas.db'}") as store:
        for name in ("hybrid_vit", "nb201"):
            spec = get_space(name).sample(RandomTrial(0))
            store.add_architecture(spec.hash, name, spec.to_json())
            assert store.architecture(spec.hash)["spec"] == json.loads(spec.to_json())  # type: ignore[index]


def test_store_imports_no_ray_torch_or_optuna() -> None:
    code = "import sys, nas.store; print(','.join(m for m in ('torch', 'ray', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
