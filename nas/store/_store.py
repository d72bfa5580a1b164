"""The SQL store of studies: one SQLite file or PostgreSQL database, shared with Optuna's RDB storage.

Every write is one transaction. On SQLite, writes start with ``BEGIN IMMEDIATE`` (the write lock
is taken up front and waited for up to ``busy_timeout``), because a deferred transaction that
reads and then writes fails at once with "database is locked" when another process committed in
between, and WAL mode cannot wait that out. Reads use a plain ``BEGIN``. On PostgreSQL, writes
that decide on what they read lock the study row (``SELECT ... FOR UPDATE``); counters are
``UPDATE ... SET x = x + :d``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, delete, event, func, select, text, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from .models import (
    VERSION_TABLE,
    ArchitectureModel,
    DeviceModel,
    EvaluationModel,
    ExportModel,
    FrontModel,
    InflightModel,
    MetricModel,
    StudyModel,
    utcnow,
)

if TYPE_CHECKING:
    import optuna

__all__ = [
    "STATUSES",
    "EvaluationRow",
    "Store",
    "StoreError",
    "StoreLost",
    "StudyInfo",
    "default_url",
    "device_key",
    "mask_url",
    "validate_study_name",
    "validate_url",
]

STATUSES = ("created", "running", "stopping", "stopped", "completed", "failed", "interrupted")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_URL_FORMS = "use sqlite:///PATH/TO/nas.db, postgresql://USER:PASS@HOST:PORT/DB or postgresql+psycopg://..."
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)  # used with fullmatch: no trailing newline
_HASH = re.compile(r"^[0-9a-f]{64}$")
_DEVICE_KEY = re.compile(r"^[0-9a-f]{16}$")
_BUSY_TIMEOUT_MS = 30_000
_PG_MIGRATION_LOCK = 0x6E61_735F_6462  # "nas_db": pg_advisory_lock key of the first upgrade


_MAX_MESSAGE = 300


class StoreError(ValueError):
    """A store that cannot be opened or a request it cannot serve: one line, what and what to do.

    The message is kept to one line of at most ~300 characters (a long echoed value is cut)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


class StoreLost(StoreError):
    """The store's file was deleted or replaced while it was open: what is written now is lost."""


# A driver beats every HEARTBEAT_S from its own thread. Another host takes a lease over only after
# LEASE_STALE_S without a beat: a wide margin, so that a loaded machine or a slow database never
# looks like a dead driver. On the same host the holder's pid decides (see ``_lease_free``).
HEARTBEAT_S = 5.0
LEASE_STALE_S = 120.0


def one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` on one line (line breaks become spaces) and cut to ``limit`` characters with "…"."""
    flat = " ".join(text.split()) if ("\n" in text or "\r" in text) else text
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _clip(value: Any, n: int = 80) -> str:
    """``repr(value)`` cut to about ``n`` characters, for echoing user input in messages."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def default_url() -> str:
    """The store used when none is given: ``nas.db`` in the working directory."""
    return "sqlite:///nas.db"


def validate_url(url: str) -> str:
    """The normalised URL (``postgresql://`` becomes ``postgresql+psycopg://``); no connection is made.

    Accepted: ``sqlite:///FILE`` (its directory must exist; in-memory databases are refused, a
    store is shared between processes), ``postgresql://`` and ``postgresql+psycopg://``."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"empty store URL: {_URL_FORMS}")
    url = url.strip()
    if len(url) > 4096 or not url.isprintable():
        raise StoreError(f"cannot read store URL {_clip(mask_url(url))}: too long or has control characters; "
                         f"{_URL_FORMS}")
    try:
        parsed = make_url(url)
        port = parsed.port
    except (ArgumentError, ValueError, TypeError):  # e.g. a non-numeric port: int() fails inside make_url
        raise StoreError(f"cannot read store URL {_clip(url.rpartition('@')[2])}: {_URL_FORMS}") from None
    if port is not None and not 1 <= port <= 65535:
        raise StoreError(f"store URL {_clip(mask_url(url))} has port {port}; a port is 1-65535")
    driver = parsed.drivername
    if driver == "sqlite":
        db = parsed.database
        if not db or db == ":memory:" or db.startswith("file:"):
            raise StoreError(f"store URL {_clip(url)} names no database file: {_URL_FORMS}")
        try:
            parent = Path(db).expanduser().resolve().parent
            ok = parent.is_dir()
            Path(db).expanduser().exists()  # raises for a name too long
        except (OSError, RuntimeError, ValueError) as e:
            raise StoreError(f"cannot use SQLite store path {_clip(db)}: "
                             f"{getattr(e, 'strerror', None) or _one_line(e)}") from None
        if not ok:
            raise StoreError(f"directory {_clip(str(parent))} of the SQLite store does not exist: create it or use "
                             "another path")
        return url
    if driver in ("postgresql", "postgresql+psycopg"):
        if not parsed.database:
            raise StoreError(f"store URL {_clip(mask_url(url))} names no database: {_URL_FORMS}")
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise StoreError(f"unsupported store URL scheme {_clip(driver)}: {_URL_FORMS}")


def validate_study_name(name: Any) -> str:
    """``name`` if it is a study name (1-64 of letters, digits, ``_.-``, starting alphanumeric)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(f"bad study name {_clip(name)}: use 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


def device_key(fingerprint: Mapping[str, Any]) -> str:
    """The 16-hex key of a device fingerprint.

    A fingerprint that carries its own 16-hex ``key`` (``predictors.latency.device_fingerprint``
    hashes only the identity fields, not the current clocks) keeps it; otherwise the first 16 hex
    of the sha256 of its canonical JSON."""
    own = fingerprint.get("key")
    if isinstance(own, str) and _DEVICE_KEY.match(own):
        return own
    return hashlib.sha256(_json(dict(fingerprint), "device fingerprint").encode()).hexdigest()[:16]


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and pages)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return "<unreadable URL>"


def _json(obj: Any, what: str) -> str:
    """Canonical JSON (sorted keys, no spaces, ASCII, no NaN), as the specs use."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON (numbers, strings, lists, dicts; no NaN): {e}") from None


def _dict(obj: Any, what: str) -> str:
    if not isinstance(obj, Mapping):
        raise StoreError(f"{what} must be a dict, got {type(obj).__name__}")
    return _json(dict(obj), what)


def _label(value: Any, what: str, n: int = 64) -> str:
    if not isinstance(value, str) or not value or len(value) > n:
        raise StoreError(f"{what} must be a non-empty string of at most {n} characters, got {value!r}")
    return value


def _seconds(value: Any) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"seconds must be a number, got {value!r}") from None
    if not math.isfinite(s) or s < 0:
        raise StoreError(f"seconds must be finite and >= 0, got {value!r}")
    return s


def _utc(dt: datetime | None) -> datetime | None:
    return None if dt is None else dt.replace(tzinfo=timezone.utc)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 checks without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    except OSError:
        return True  # cannot tell: assume alive, the heartbeat will go stale
    return True


def _pid_started_after(pid: int, when: datetime) -> bool:
    """Whether process ``pid`` on this host started after ``when`` (naive UTC): then it is not the
    process that wrote a heartbeat at ``when``, only one that reuses its pid. False if unknown."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                    if ln.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    started = datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), timezone.utc).replace(tzinfo=None)
    return (started - when).total_seconds() > 2.0  # clock-tick rounding and btime's whole seconds


def _lease_free(row: StudyModel, pid: int | None, host: str | None, now: datetime, stale_after: float) -> bool:
    """Whether the driver lease in ``row`` may be taken by ``(pid, host)``: nobody holds it, the
    holder is the caller, or the holder is dead. On this host a holder is dead only when its pid is
    gone (or now belongs to a process started after the last heartbeat), however old its heartbeat:
    a live driver whose stage blocks must never lose its lease. On another host, where the pid
    cannot be checked, only a heartbeat older than ``stale_after`` seconds counts as dead."""
    if row.driver_pid is None or row.heartbeat_at is None:
        return True
    if pid is not None and row.driver_pid == pid and row.driver_host == host:
        return True
    if row.driver_host == socket.gethostname():
        return not _pid_alive(row.driver_pid) or _pid_started_after(row.driver_pid, row.heartbeat_at)
    return (now - row.heartbeat_at).total_seconds() > stale_after


def _one_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyInfo:
    """A study as stored (times are aware UTC datetimes)."""

    id: int
    name: str
    space: str
    config: dict[str, Any]
    budget: dict[str, Any]
    used_seconds: float
    trials_done: int
    status: str
    stage: str | None
    stop_requested: bool
    driver_pid: int | None
    driver_host: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def _from(cls, row: StudyModel) -> StudyInfo:
        return cls(
            id=row.id, name=row.name, space=row.space, config=json.loads(row.config),
            budget=json.loads(row.budget), used_seconds=float(row.used_seconds), trials_done=int(row.trials_done),
            status=row.status, stage=row.stage, stop_requested=bool(row.stop_requested),
            driver_pid=row.driver_pid, driver_host=row.driver_host, heartbeat_at=_utc(row.heartbeat_at),
            created_at=_utc(row.created_at), updated_at=_utc(row.updated_at),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (times as ISO 8601 strings)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("heartbeat_at", "created_at", "updated_at"):
            out[k] = _iso(out[k])
        return out


@dataclass(frozen=True)
class EvaluationRow:
    """One recorded evaluation with its metrics; ``study`` is the study's name."""

    id: int
    study: str
    arch_hash: str | None
    stage: str
    trial: int | None
    attempt: int
    metrics: dict[str, float]
    device_key: str | None
    seconds: float
    error: str | None
    key: str | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (``created_at`` as an ISO 8601 string)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["metrics"] = dict(self.metrics)
        out["created_at"] = _iso(self.created_at)
        return out


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


def _sqlite_events(engine: Engine, wal: bool = True) -> None:
    """pysqlite: WAL, busy timeout, foreign keys; SQLAlchemy emits BEGIN (IMMEDIATE for writes).

    ``wal=False`` leaves the journal mode alone (opening a store without creating it)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # no implicit BEGIN from the driver: we emit our own
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")  # first: the next pragmas may wait
            cur.execute("PRAGMA foreign_keys = ON")
            # switching a fresh file to WAL does not wait on the busy handler: two processes opening
            # it at once get "database is locked" straight away, so retry (the switch takes ~ms)
            for attempt in range(100 if wal else 0):
                try:
                    if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        cur.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 99:
                        raise
                    time.sleep(0.01 + 0.04 * random.random())
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("nas_write") else "BEGIN")


def _check_sqlite_store(url: str) -> None:
    """StoreError unless the SQLite file of ``url`` exists and holds a hybrid-NAS store; read-only."""
    path = Path(make_url(url).database or "").expanduser()
    if not path.is_file():
        raise StoreError(f"no store at {_clip(str(path))}: run `nas search` first or pass --storage")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (VERSION_TABLE,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise StoreError(f"cannot open store {_clip(str(path))}: {_one_line(e)}; is it a hybrid-NAS store?") from None
    if not found:
        raise StoreError(f"{_clip(str(path))} is not a hybrid-NAS store (no {VERSION_TABLE} table); pass the "
                         "--storage that `nas search` wrote")


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class Store:
    """The study store at ``url``: opened, connected and migrated to the newest schema.

    Opening is safe from many processes at once (the first upgrade runs under a lock).

    ``create=False`` opens only an existing hybrid-NAS store (the verbs that read or change a
    study, never create one): a missing file, an empty or foreign database is refused with a
    StoreError, and nothing is written on the way: no tables, no migration, no journal-mode switch.
    """

    def __init__(self, url: str | None = None, *, create: bool = True) -> None:
        self.url = validate_url(url if url is not None else default_url())
        self._sqlite = self.url.startswith("sqlite")
        self._create = create
        if self._sqlite:
            if not create:
                _check_sqlite_store(self.url)
            engine = create_engine(self.url, connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000})
            _sqlite_events(engine, wal=create)
        else:
            try:
                engine = create_engine(self.url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
            except (ImportError, NoSuchModuleError) as e:
                raise StoreError(f"PostgreSQL driver missing ({e}): pip install 'psycopg[binary]'") from None
        self.engine: Engine = engine
        try:
            self._migrate()
        except DBAPIError as e:
            engine.dispose()
            raise StoreError(f"cannot open store {mask_url(self.url)}: {_one_line(e)}") from None
        except BaseException:
            engine.dispose()
            raise
        self._identity = self._file_identity()  # what _check_file compares every write with

    # ---- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Release the connections (the store stays usable; it reconnects on demand)."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({mask_url(self.url)!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its URL (to Ray workers, say); unpickling reconnects."""
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])  # type: ignore[misc]

    def _migrate(self) -> None:
        """Upgrade to head; skipped without locking when already there (the common reopen)."""
        from alembic import command
        from alembic.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = _alembic_config(self.url)
        script = ScriptDirectory.from_config(cfg)
        heads = set(script.get_heads())
        known = {r.revision for r in script.walk_revisions()}

        def current(conn: Connection) -> set[str]:
            revs = set(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads())
            if not revs and not self._create:
                raise StoreError(f"{mask_url(self.url)} is not a hybrid-NAS store (no {VERSION_TABLE} table); pass "
                                 "the --storage that `nas search` wrote")
            if revs - known:
                raise StoreError(f"store {mask_url(self.url)} has schema {', '.join(sorted(revs - known))}, newer than "
                                 f"this hybrid-nas knows ({', '.join(sorted(heads))}): upgrade hybrid-nas")
            return revs

        for attempt in range(5):
            try:
                with self.engine.connect() as conn:
                    if current(conn) == heads:
                        return
                    conn.rollback()  # end the read: the upgrade below starts its own (write) transaction
                    if not self._sqlite:
                        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                        conn.commit()
                    try:
                        conn.execution_options(nas_write=True)  # SQLite: BEGIN IMMEDIATE holds off the others
                        with conn.begin():
                            if current(conn) != heads:  # another process may have just done it
                                cfg.attributes["connection"] = conn
                                command.upgrade(cfg, "head")
                    finally:
                        if not self._sqlite:
                            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                            conn.commit()
                return
            except DBAPIError as e:  # SQLite only: a lock that outlasted the busy timeout; try again
                if not self._sqlite or "locked" not in str(e.orig) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        """One transaction (committed on success, rolled back on any exception). A write checks,
        before and after it commits, that a SQLite store is still the file it opened."""
        if write:
            self._check_file()
        with self.engine.connect() as conn:
            if write:
                conn.execution_options(nas_write=True)
            with Session(bind=conn, expire_on_commit=False, autoflush=True) as session, session.begin():
                yield session
        if write:
            self._check_file()

    def _file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of a SQLite store's file; None when it is gone (or not a file store)."""
        db = make_url(self.url).database
        if not self._sqlite or not db or db == ":memory:":
            return None
        try:
            st = os.stat(db)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def check(self) -> None:
        """Raise :class:`StoreLost` if this store's SQLite file was deleted or replaced since it was opened."""
        self._check_file()

    def _check_file(self) -> None:
        """Raise :class:`StoreLost` when the SQLite file this store opened was deleted or replaced:
        an open connection would go on writing to the unlinked file, and every result would be
        lost without a word. Opening notes the file's identity."""
        if not self._sqlite:
            return
        now = self._file_identity()
        known = self.__dict__.setdefault("_identity", now)  # a Store made without __init__ (tests)
        if known is not None and now != known:
            what = "deleted" if now is None else "replaced by another file"
            raise StoreLost(f"store {mask_url(self.url)} was {what} while in use; results written since "
                            f"then are lost; restore the file or start again")

    def _insert(self, model: type) -> Any:
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(model)

    @staticmethod
    def _study(session: Session, name: str, *, for_update: bool = False) -> StudyModel:
        row = StudyModel.find(session, name, for_update=for_update)
        if row is None:
            raise StoreError(f"no study named {name!r} in the store: check the name (nas studies lists them)")
        return row

    def _study_id(self, session: Session, name: str) -> int:
        sid = session.scalar(select(StudyModel.id).where(StudyModel.name == name))
        if sid is None:
            raise StoreError(f"no study named {name!r} in the store: check the name (nas studies lists them)")
        return sid

    # ---- Optuna -------------------------------------------------------------------------

    def optuna_storage(self) -> optuna.storages.RDBStorage:
        """Optuna's RDB storage on the same database (its tables and ``alembic_version`` sit beside ours)."""
        import optuna

        kwargs: dict[str, Any] = {"connect_args": {"timeout": _BUSY_TIMEOUT_MS / 1000}} if self._sqlite else {}
        # Optuna creates its tables on first use and then stamps ``alembic_version`` without a lock,
        # so two drivers opening a fresh store at once can both insert the stamp: the loser's
        # IntegrityError means the schema is now there, and a second open just reads it.
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs)
            except (IntegrityError, OperationalError):
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # ---- studies ------------------------------------------------------------------------

    def create_study(self, name: str, space: str, config: dict[str, Any], budget: dict[str, Any]) -> StudyInfo:
        """A new study in state ``created``; StoreError if the name is taken."""
        validate_study_name(name)
        row = StudyModel(name=name, space=_label(space, "space"), config=_dict(config, "config"),
                         budget=_dict(budget, "budget"), used_seconds=0.0, trials_done=0, status="created",
                         stop_requested=False)
        try:
            with self._session(write=True) as s:
                if StudyModel.find(s, name) is not None:
                    raise StoreError(f"study {name!r} already exists: resume it or choose another name")
                s.add(row)
                s.flush()
                return StudyInfo._from(row)
        except IntegrityError:  # created by another process between our check and insert
            raise StoreError(f"study {name!r} already exists: resume it or choose another name") from None

    def get_study(self, name: str) -> StudyInfo | None:
        """The study named ``name``, or None."""
        with self._session() as s:
            row = StudyModel.find(s, name)
            return None if row is None else StudyInfo._from(row)

    def study(self, name: str) -> StudyInfo:
        """The study named ``name``; StoreError if there is none."""
        with self._session() as s:
            return StudyInfo._from(self._study(s, name))

    def studies(self) -> list[StudyInfo]:
        """All studies, oldest first."""
        with self._session() as s:
            rows = s.scalars(select(StudyModel).order_by(StudyModel.created_at, StudyModel.id)).all()
            return [StudyInfo._from(r) for r in rows]

    def _update(self, name: str, **values: Any) -> None:
        with self._session(write=True) as s:
            res = s.execute(update(StudyModel).where(StudyModel.name == name).values(**values))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise StoreError(f"no study named {name!r} in the store: check the name (nas studies lists them)")

    def set_status(self, name: str, status: str, stage: str | None = None) -> None:
        """Set the status (one of STATUSES) and, when given, the stage (None keeps the current stage)."""
        if status not in STATUSES:
            raise StoreError(f"bad study status {status!r}: use one of {', '.join(STATUSES)}")
        values: dict[str, Any] = {"status": status, "updated_at": utcnow()}
        if stage is not None:
            values["stage"] = _label(stage, "stage")
        self._update(name, **values)

    def set_budget(self, name: str, budget: dict[str, Any]) -> None:
        """Replace the study's budget."""
        self._update(name, budget=_dict(budget, "budget"), updated_at=utcnow())

    def set_config(self, name: str, config: dict[str, Any]) -> None:
        """Replace the study's config."""
        self._update(name, config=_dict(config, "config"), updated_at=utcnow())

    def request_stop(self, name: str) -> None:
        """Ask the study's driver to stop (it polls ``stop_requested``)."""
        self._update(name, stop_requested=True, updated_at=utcnow())

    def clear_stop(self, name: str) -> None:
        """Withdraw a stop request (done on resume)."""
        self._update(name, stop_requested=False, updated_at=utcnow())

    def stop_requested(self, name: str) -> bool:
        """Whether a stop was requested for the study."""
        with self._session() as s:
            flag = s.scalar(select(StudyModel.stop_requested).where(StudyModel.name == name))
            if flag is None:
                raise StoreError(f"no study named {name!r} in the store: check the name (nas studies lists them)")
            return bool(flag)

    def delete_study(self, name: str) -> None:
        """Remove the study and its evaluations, metrics, front and exports (architectures and devices stay)."""
        with self._session(write=True) as s:
            sid = self._study_id(s, name)
            evals = select(EvaluationModel.id).where(EvaluationModel.study_id == sid).scalar_subquery()
            s.execute(delete(MetricModel).where(MetricModel.evaluation_id.in_(evals)))
            s.execute(delete(EvaluationModel).where(EvaluationModel.study_id == sid))
            s.execute(delete(FrontModel).where(FrontModel.study_id == sid))
            s.execute(delete(ExportModel).where(ExportModel.study_id == sid))
            s.execute(delete(InflightModel).where(InflightModel.study_id == sid))
            s.execute(delete(StudyModel).where(StudyModel.id == sid))

    # ---- driver lease -------------------------------------------------------------------

    def acquire_driver(self, name: str, pid: int, host: str, stale_after: float = LEASE_STALE_S) -> bool:
        """Take the study's driver lease (one driver per study); False if a live driver holds it.

        Free when nobody holds it, the holder is ``(pid, host)`` itself, or the holder is dead by
        ``_lease_free``'s rule: its pid is gone (same host) or its heartbeat is older than
        ``stale_after`` seconds (another host)."""
        pid, host = int(pid), _label(host, "host", 255)
        with self._session(write=True) as s:
            row = self._study(s, name, for_update=True)
            now = utcnow()
            if not _lease_free(row, pid, host, now, stale_after):
                return False
            row.driver_pid, row.driver_host, row.heartbeat_at, row.updated_at = pid, host, now, now
            return True

    def live_driver(self, name: str, stale_after: float = LEASE_STALE_S) -> tuple[int, str] | None:
        """``(pid, host)`` of the study's driver while its lease is live, else None; reads only.

        Live is what :meth:`acquire_driver` will not take over from another process."""
        with self._session() as s:
            row = self._study(s, name)
            if _lease_free(row, None, None, utcnow(), stale_after):
                return None
            return int(row.driver_pid), str(row.driver_host)  # type: ignore[arg-type]

    def heartbeat(self, name: str, pid: int, host: str | None = None) -> bool:
        """Refresh the lease of driver ``pid`` (on ``host`` if given) and the ``alive_at`` of its
        in-flight trials; False if it no longer holds the lease."""
        cond = [StudyModel.name == name, StudyModel.driver_pid == int(pid)]
        if host is not None:
            cond.append(StudyModel.driver_host == host)
        now = utcnow()
        with self._session(write=True) as s:
            held = s.execute(update(StudyModel).where(*cond).values(heartbeat_at=now)).rowcount == 1  # type: ignore[attr-defined]
            if held:
                sid = select(StudyModel.id).where(StudyModel.name == name).scalar_subquery()
                s.execute(update(InflightModel).where(InflightModel.study_id == sid).values(alive_at=now))
            return held

    def release_driver(self, name: str, pid: int, host: str | None = None) -> bool:
        """Give the lease back if driver ``pid`` (on ``host`` if given) holds it; whether it did."""
        cond = [StudyModel.name == name, StudyModel.driver_pid == int(pid)]
        if host is not None:
            cond.append(StudyModel.driver_host == host)
        with self._session(write=True) as s:
            res = s.execute(update(StudyModel).where(*cond).values(
                driver_pid=None, driver_host=None, heartbeat_at=None, updated_at=utcnow()))
            return res.rowcount == 1  # type: ignore[attr-defined]

    # ---- in-flight trials ---------------------------------------------------------------

    def start_inflight(self, study: str, key: str, *, stage: str, arch_hash: str | None = None,
                       trial: int | None = None, attempt: int = 0,
                       architectures: Sequence[Mapping[str, Any]] = ()) -> None:
        """Note that the trial ``key`` was launched (replacing an earlier attempt's note), with the
        architectures it evaluates (each the keyword arguments of :meth:`add_architecture`), in one
        transaction. :meth:`record_evaluation` with ``inflight=key`` clears it in the same transaction."""
        key, stage = _label(key, "trial key", 255), _label(stage, "stage")
        arch_stmts = [self._arch_stmt(**a) for a in architectures]
        now = utcnow()
        with self._session(write=True) as s:
            for stmt in arch_stmts:
                s.execute(stmt)
            sid = self._study_id(s, study)
            s.execute(delete(InflightModel).where(InflightModel.study_id == sid, InflightModel.key == key))
            s.add(InflightModel(study_id=sid, key=key, stage=stage, arch_hash=arch_hash,
                                trial=None if trial is None else int(trial), attempt=int(attempt),
                                started_at=now, alive_at=now))

    def inflight(self, study: str) -> list[dict[str, Any]]:
        """The study's trials launched and not recorded: ``{key, stage, arch_hash, trial, attempt,
        started_at, seconds}``, where ``seconds`` is how long each ran until its driver's last heartbeat."""
        with self._session() as s:
            sid = self._study_id(s, study)
            rows = s.scalars(select(InflightModel).where(InflightModel.study_id == sid)
                             .order_by(InflightModel.started_at)).all()
            return [{"key": r.key, "stage": r.stage, "arch_hash": r.arch_hash, "trial": r.trial,
                     "attempt": int(r.attempt), "started_at": _iso(_utc(r.started_at)),
                     "seconds": max(0.0, (r.alive_at - r.started_at).total_seconds())} for r in rows]

    def end_inflight(self, study: str, key: str) -> None:
        """Forget the in-flight note of trial ``key`` (it was recorded, or will not be)."""
        with self._session(write=True) as s:
            sid = self._study_id(s, study)
            s.execute(delete(InflightModel).where(InflightModel.study_id == sid, InflightModel.key == key))

    # ---- architectures and devices ------------------------------------------------------

    def add_architecture(self, spec_hash: str, space: str, spec_json: str | Mapping[str, Any],
                         params: int | None = None, flops: int | None = None) -> None:
        """Record an architecture once (concurrent-safe; later calls only fill in missing params/flops).

        ``spec_hash`` must be the sha256 of the spec's canonical JSON, as ``spec.hash`` is."""
        stmt = self._arch_stmt(spec_hash, space, spec_json, params, flops)
        with self._session(write=True) as s:
            s.execute(stmt)

    def _arch_stmt(self, spec_hash: str, space: str, spec_json: str | Mapping[str, Any],
                   params: int | None = None, flops: int | None = None) -> Any:
        """The upsert of one architecture (checked: the hash must be the spec's)."""
        if not isinstance(spec_hash, str) or not _HASH.match(spec_hash):
            raise StoreError(f"bad architecture hash {spec_hash!r}: expected 64 lowercase hex (spec.hash)")
        if isinstance(spec_json, str):
            try:
                spec_obj = json.loads(spec_json)
            except ValueError:
                raise StoreError(f"spec of architecture {spec_hash[:12]} is not JSON: pass spec.to_json()") from None
        else:
            spec_obj = dict(spec_json)
        canonical = _json(spec_obj, "architecture spec")
        if hashlib.sha256(canonical.encode("ascii")).hexdigest() != spec_hash:
            raise StoreError(f"hash {spec_hash[:12]}... is not the sha256 of the spec's canonical JSON: "
                             "pass spec.hash with spec.to_json()")
        values = {"hash": spec_hash, "space": _label(space, "space"), "spec": canonical,
                  "params": None if params is None else int(params), "flops": None if flops is None else int(flops),
                  "created_at": utcnow()}
        stmt = self._insert(ArchitectureModel).values(**values)
        return stmt.on_conflict_do_update(
            index_elements=["hash"],
            set_={"params": func.coalesce(ArchitectureModel.params, stmt.excluded.params),
                  "flops": func.coalesce(ArchitectureModel.flops, stmt.excluded.flops)})

    def architecture(self, spec_hash: str) -> dict[str, Any] | None:
        """``{"hash", "space", "spec" (dict), "params", "flops", "created_at"}`` or None."""
        with self._session() as s:
            row = ArchitectureModel.find(s, spec_hash)
            if row is None:
                return None
            return {"hash": row.hash, "space": row.space, "spec": json.loads(row.spec), "params": row.params,
                    "flops": row.flops, "created_at": _iso(_utc(row.created_at))}

    def _device_stmt(self, fingerprint: Mapping[str, Any]) -> tuple[str, Any]:
        if not isinstance(fingerprint, Mapping):
            raise StoreError(f"device fingerprint must be a dict, got {type(fingerprint).__name__}")
        key = device_key(fingerprint)
        kind = str(fingerprint.get("kind", "cpu"))
        kind = "cuda" if kind in ("cuda", "gpu") else "benchmark" if kind == "benchmark" else "cpu"
        name = str(fingerprint.get("name") or kind)[:255]
        stmt = self._insert(DeviceModel).values(key=key, kind=kind, name=name,
                                                fingerprint=_json(dict(fingerprint), "device fingerprint"))
        return key, stmt.on_conflict_do_nothing(index_elements=["key"])

    def add_device(self, fingerprint: dict[str, Any]) -> str:
        """Record a device once (the first fingerprint seen for a key is kept); its key."""
        key, stmt = self._device_stmt(fingerprint)
        with self._session(write=True) as s:
            s.execute(stmt)
        return key

    def devices(self) -> list[dict[str, Any]]:
        """All devices: ``{"key", "kind", "name", "fingerprint" (dict)}``."""
        with self._session() as s:
            return [{"key": d.key, "kind": d.kind, "name": d.name, "fingerprint": json.loads(d.fingerprint)}
                    for d in s.scalars(select(DeviceModel).order_by(DeviceModel.key))]

    # ---- evaluations --------------------------------------------------------------------

    def record_evaluation(
        self, study: str, *, stage: str, metrics: Mapping[str, float], seconds: float,
        arch_hash: str | None = None, device: Mapping[str, Any] | None = None, error: str | None = None,
        trial: int | None = None, attempt: int = 0, key: str | None = None, count_seconds: bool = True,
        inflight: str | None = None,
    ) -> int:
        """Record one evaluation in one transaction; its id.

        Inserts the evaluation, its metrics and its device (if given), adds ``seconds`` to the
        study's ``used_seconds`` (if ``count_seconds``) and 1 to ``trials_done`` (if ``error`` is
        None). A ``key`` already recorded for the study makes this a no-op that returns the
        existing id, so a retried result is never counted twice. Non-finite metric values (NaN,
        inf) are skipped: the metric is absent rather than stored as a number no query can
        compare. ``arch_hash`` must have been added with ``add_architecture``. ``inflight``: the
        in-flight note (:meth:`start_inflight`) this result ends, deleted in the same transaction."""
        row = dict(stage=stage, metrics=metrics, seconds=seconds, arch_hash=arch_hash, device=device, error=error,
                   trial=trial, attempt=attempt, key=key, count_seconds=count_seconds)
        return self.record_evaluations(study, [row], inflight=inflight)[0]

    def record_evaluations(self, study: str, rows: Sequence[Mapping[str, Any]], *,
                           inflight: str | None = None,
                           architectures: Sequence[Mapping[str, Any]] = ()) -> list[int]:
        """Record several evaluations (each the keyword arguments of :meth:`record_evaluation`
        but ``inflight``) in one transaction, with the in-flight note they end and the
        architectures they need (each the keyword arguments of :meth:`add_architecture`): a
        batch of screening candidates is kept whole or not at all. Their ids, in order."""
        checked = [self._checked_row(**r) for r in rows]
        arch_stmts = [self._arch_stmt(**a) for a in architectures]
        try:
            with self._session(write=True) as s:
                for stmt in arch_stmts:
                    s.execute(stmt)
                sid = self._study_id(s, study)
                if inflight is not None:
                    s.execute(delete(InflightModel).where(InflightModel.study_id == sid,
                                                          InflightModel.key == inflight))
                ids: list[int] = []
                used = 0.0
                done = 0
                for r in checked:
                    if r["key"] is not None:
                        prior = s.scalar(select(EvaluationModel.id).where(
                            EvaluationModel.study_id == sid, EvaluationModel.key == r["key"]))
                        if prior is not None:
                            ids.append(int(prior))
                            continue
                    if r["arch_hash"] is not None and ArchitectureModel.find(s, r["arch_hash"]) is None:
                        raise StoreError(f"architecture {r['arch_hash']!r} is not in the store: "
                                         "add_architecture() it first")
                    if r["dev_stmt"] is not None:
                        s.execute(r["dev_stmt"])
                    ev = EvaluationModel(study_id=sid, arch_hash=r["arch_hash"], stage=r["stage"], trial=r["trial"],
                                         attempt=r["attempt"], device_key=r["dev_key"], seconds=r["seconds"],
                                         error=r["error"], key=r["key"])
                    s.add(ev)
                    s.flush()
                    s.add_all([MetricModel(evaluation_id=ev.id, metric=m, value=v) for m, v in r["values"].items()])
                    s.flush()
                    used += r["seconds"] if r["count_seconds"] else 0.0
                    done += 1 if r["error"] is None else 0
                    ids.append(int(ev.id))
                s.execute(update(StudyModel).where(StudyModel.id == sid).values(
                    used_seconds=StudyModel.used_seconds + used, trials_done=StudyModel.trials_done + done,
                    updated_at=utcnow()))
                return ids
        except IntegrityError:
            if len(checked) != 1 or checked[0]["key"] is None:
                if len(checked) > 1:  # one key raced by another writer: record them one by one
                    for a in architectures:
                        self.add_architecture(**a)
                    return [self.record_evaluation(study, **r) for r in rows]
                raise
            # the same key committed by another process between our check and insert: theirs counts
            with self._session() as s:
                prior = s.scalar(select(EvaluationModel.id).join(StudyModel).where(
                    StudyModel.name == study, EvaluationModel.key == checked[0]["key"]))
            if prior is None:
                raise
            return [int(prior)]

    def _checked_row(
        self, *, stage: str, metrics: Mapping[str, float], seconds: float, arch_hash: str | None = None,
        device: Mapping[str, Any] | None = None, error: str | None = None, trial: int | None = None,
        attempt: int = 0, key: str | None = None, count_seconds: bool = True,
    ) -> dict[str, Any]:
        """One evaluation's arguments validated (StoreError on bad input), before any write."""
        stage = _label(stage, "stage")
        secs = _seconds(seconds)
        if not isinstance(metrics, Mapping):
            raise StoreError(f"metrics must be a dict of name -> float, got {type(metrics).__name__}")
        values: dict[str, float] = {}
        for m, v in metrics.items():
            _label(m, "metric name")
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise StoreError(f"metric {m!r} must be a number, got {v!r}") from None
            if math.isfinite(fv):
                values[m] = fv
        if error is not None and not isinstance(error, str):
            error = str(error)
        if key is not None:
            key = _label(key, "evaluation key", 255)
        try:  # plain ints: numpy integers from a worker would not bind on PostgreSQL
            trial_ = None if trial is None else int(trial)
            attempt = int(attempt)
        except (TypeError, ValueError):
            raise StoreError(f"trial and attempt must be integers, got {trial!r} and {attempt!r}") from None
        dev_key, dev_stmt = self._device_stmt(device) if device is not None else (None, None)
        return {"stage": stage, "seconds": secs, "values": values, "error": error, "key": key, "trial": trial_,
                "attempt": attempt, "dev_key": dev_key, "dev_stmt": dev_stmt, "arch_hash": arch_hash,
                "count_seconds": bool(count_seconds)}

    def evaluations(self, study: str, stage: str | None = None, arch_hash: str | None = None,
                    errors: bool = True) -> list[EvaluationRow]:
        """The study's evaluations in the order they were recorded (``errors=False`` leaves out failed ones)."""
        with self._session() as s:
            sid = self._study_id(s, study)
            q = select(EvaluationModel).where(EvaluationModel.study_id == sid)
            if stage is not None:
                q = q.where(EvaluationModel.stage == stage)
            if arch_hash is not None:
                q = q.where(EvaluationModel.arch_hash == arch_hash)
            if not errors:
                q = q.where(EvaluationModel.error.is_(None))
            rows = s.scalars(q.order_by(EvaluationModel.id)).all()
            mets = self._metrics(s, sid, stage, arch_hash)
            return [EvaluationRow(id=r.id, study=study, arch_hash=r.arch_hash, stage=r.stage, trial=r.trial,
                                  attempt=r.attempt, metrics=mets.get(r.id, {}), device_key=r.device_key,
                                  seconds=float(r.seconds), error=r.error, key=r.key,
                                  created_at=_utc(r.created_at))  # type: ignore[arg-type]
                    for r in rows]

    @staticmethod
    def _metrics(s: Session, sid: int, stage: str | None, arch_hash: str | None = None) -> dict[int, dict[str, float]]:
        q = (select(MetricModel.evaluation_id, MetricModel.metric, MetricModel.value)
             .join(EvaluationModel, EvaluationModel.id == MetricModel.evaluation_id)
             .where(EvaluationModel.study_id == sid))
        if stage is not None:
            q = q.where(EvaluationModel.stage == stage)
        if arch_hash is not None:
            q = q.where(EvaluationModel.arch_hash == arch_hash)
        out: dict[int, dict[str, float]] = {}
        for eid, metric, value in s.execute(q):
            out.setdefault(eid, {})[metric] = float(value)
        return out

    def done(self, study: str, stage: str) -> dict[str, dict[str, float]]:
        """arch_hash -> metrics of the latest successful evaluation of ``stage`` (what resume skips)."""
        with self._session() as s:
            sid = self._study_id(s, study)
            rows = s.execute(select(EvaluationModel.id, EvaluationModel.arch_hash).where(
                EvaluationModel.study_id == sid, EvaluationModel.stage == stage,
                EvaluationModel.error.is_(None), EvaluationModel.arch_hash.is_not(None),
            ).order_by(EvaluationModel.id)).all()
            mets = self._metrics(s, sid, stage)
            return {h: mets.get(eid, {}) for eid, h in rows}  # later ids overwrite earlier ones

    def used(self, study: str) -> tuple[float, int]:
        """``(used_seconds, trials_done)`` of the study."""
        with self._session() as s:
            row = s.execute(select(StudyModel.used_seconds, StudyModel.trials_done)
                            .where(StudyModel.name == study)).one_or_none()
            if row is None:
                raise StoreError(f"no study named {study!r} in the store: check the name (nas studies lists them)")
            return float(row[0]), int(row[1])

    # ---- front and exports --------------------------------------------------------------

    def set_front(self, study: str, rows: list[dict[str, Any]]) -> None:
        """Replace the study's front with ``rows`` (each ``{"arch_hash", "rank", "metrics"}``), atomically."""
        models: list[FrontModel] = []
        seen: set[str] = set()
        for r in rows:
            h = r.get("arch_hash") if isinstance(r, Mapping) else None
            if not isinstance(h, str) or h in seen:
                raise StoreError(f"front row {r!r} needs a unique arch_hash, rank and metrics")
            seen.add(h)
            rank = r.get("rank")
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise StoreError(f"front row for {h[:12]} needs an integer rank, got {rank!r}")
            models.append(FrontModel(arch_hash=h, rank=rank, metrics=_dict(r.get("metrics", {}), "front metrics")))
        with self._session(write=True) as s:
            sid = self._study(s, study, for_update=True).id
            known = set(s.scalars(select(ArchitectureModel.hash).where(ArchitectureModel.hash.in_(seen)))) if seen \
                else set()
            if seen - known:
                raise StoreError(f"front architecture {sorted(seen - known)[0]!r} is not in the store: "
                                 "add_architecture() it first")
            s.execute(delete(FrontModel).where(FrontModel.study_id == sid))
            for m in models:
                m.study_id = sid
            s.add_all(models)

    def front(self, study: str) -> list[dict[str, Any]]:
        """The front by rank, then hash: ``{"arch_hash", "rank", "metrics", "space", "spec", "params", "flops"}``."""
        with self._session() as s:
            sid = self._study_id(s, study)
            rows = s.execute(
                select(FrontModel, ArchitectureModel).join(ArchitectureModel)
                .where(FrontModel.study_id == sid).order_by(FrontModel.rank, FrontModel.arch_hash)).all()
            return [{"arch_hash": f.arch_hash, "rank": f.rank, "metrics": json.loads(f.metrics), "space": a.space,
                     "spec": json.loads(a.spec), "params": a.params, "flops": a.flops} for f, a in rows]

    def add_export(self, study: str, arch_hash: str, path: str | os.PathLike[str], fmt: str) -> int:
        """Record that ``arch_hash`` of ``study`` was exported to ``path`` as ``fmt``; the export's id."""
        with self._session(write=True) as s:
            sid = self._study_id(s, study)
            if ArchitectureModel.find(s, arch_hash) is None:
                raise StoreError(f"architecture {arch_hash!r} is not in the store: add_architecture() it first")
            row = ExportModel(study_id=sid, arch_hash=arch_hash, path=os.fspath(path), format=_label(fmt, "format", 16))
            s.add(row)
            s.flush()
            return int(row.id)

    def exports(self, study: str) -> list[dict[str, Any]]:
        """The study's exports, oldest first: ``{"id", "arch_hash", "path", "format", "created_at"}``."""
        with self._session() as s:
            sid = self._study_id(s, study)
            rows = s.scalars(select(ExportModel).where(ExportModel.study_id == sid).order_by(ExportModel.id)).all()
            return [{"id": r.id, "arch_hash": r.arch_hash, "path": r.path, "format": r.format,
                     "created_at": _iso(_utc(r.created_at))} for r in rows]
