"""The study lifecycle: one API for the ``nas`` CLI, the dashboard and Python callers.

    from nas import lifecycle

    store, info = lifecycle.create("sqlite:///nas.db", budget="3cpu-m", data="digits", workers=2)
    result = lifecycle.run(store, info.name)        # holds the driver lease; a Summary with the front
    lifecycle.stop(store, info.name)                # graceful: the running driver notices
    lifecycle.resume(store, info.name, add="+1cpu-m")
    lifecycle.summary(store, info.name).front

Every refusal is a :class:`~nas.search.SearchError` (a ValueError) with one line saying what was
wrong and what to do, raised before anything is written. The search core is reached only through
``nas.search``'s public API (looked up at call time, so tests can replace ``run_study``).

The store comes from ``--storage`` / ``storage=``, else ``$NAS_STORAGE``, else ``sqlite:///nas.db``.
Every verb resolves devices, data and frames the same way (:func:`resolve_target`,
:func:`load_dataset`, :func:`resolve_frame`); the jobs beside a study (proxies, latency, the
supernet, exports) are :mod:`nas.jobs`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nas.budget import Budget, BudgetError
from nas.search import SearchError, StudyLost
from nas.store import Store, StoreError, StudyInfo, default_url, mask_url, validate_study_name, validate_url

__all__ = ["ENV_STORAGE", "Stopped", "StudyFailed", "StudyRunning", "Summary", "add_budget", "best_accuracy",
           "budget_text", "chaos_from_env", "check_resume", "command", "create", "find_study", "frame_sizes",
           "front", "increment_hint", "load_dataset", "open_store", "parse_increment", "resolve_frame",
           "resolve_target", "resume", "run", "stop", "storage_url", "summary"]

ENV_STORAGE = "NAS_STORAGE"


class StudyRunning(SearchError):
    """The study has a live driver (another process holds its lease)."""


class StudyFailed(RuntimeError):
    """A run ended with an unexpected error; stored results are kept and ``resume`` continues it."""


# --------------------------------------------------------------------------------------------
# stores and studies
# --------------------------------------------------------------------------------------------


def storage_url(storage: str | None = None) -> str:
    """The store URL to use: ``storage`` if given, else ``$NAS_STORAGE``, else the default."""
    if storage is not None:
        return storage
    return os.environ.get(ENV_STORAGE) or default_url()


def open_store(storage: str | Store | None = None, *, create: bool = False) -> Store:
    """The store at ``storage`` (see :func:`storage_url`). Without ``create`` only an existing
    hybrid-NAS store opens, and nothing is created, migrated or switched to WAL on the way."""
    if isinstance(storage, Store):
        return storage
    try:  # a missing SQLite file is refused by Store(create=False) itself
        return Store(validate_url(storage_url(storage)), create=create)
    except StoreError as e:
        raise SearchError(str(e)) from None


def command(*words: str, url: str | None = None) -> str:
    """``nas WORDS``, with ``--storage URL`` when ``url`` is not the default store (password masked)."""
    extra = ["--storage", mask_url(url)] if url and url != default_url() else []
    return " ".join(["nas", *words, *extra])


def find_study(store: Store, name: str) -> StudyInfo:
    """Study ``name`` of ``store``; a SearchError for a bad or unknown name (naming a few that exist)."""
    try:
        validate_study_name(name)
    except StoreError as e:
        raise SearchError(str(e)) from None
    info = store.get_study(name)
    if info is None:
        names = [s.name for s in store.studies()][-5:]
        hint = (f"; studies here: {', '.join(names)}" if names else
                f"; `{command('studies', url=store.url)}` lists them")
        raise SearchError(f"no study {name!r} in {mask_url(store.url)}{hint}")
    return info


def _budget(info: StudyInfo) -> Budget:
    try:
        return Budget.from_dict(info.budget)
    except (BudgetError, TypeError, ValueError):
        raise SearchError(f"study {info.name!r} has an unreadable budget {info.budget!r}") from None


def budget_text(info: StudyInfo) -> str:
    """Used against total, as ``nas studies`` shows it (``179.7/180 cpu-s``, ``6/6 trials``; a
    benchmark study's seconds are simulated: ``29,871.3/30,000 simulated device-s``)."""
    return simulated(info, _budget(info).used_text(info.used_seconds, info.trials_done))


def simulated(info: StudyInfo, text: str) -> str:
    """``text`` (a budget's used/total) marked as simulated for a benchmark study."""
    return text.replace(" device-s", " simulated device-s") if info.config.get("benchmark") else text


def benchmark_source(config: Mapping[str, Any]) -> str | None:
    """Where a benchmark study's figures come from (``accuracy from LABELS:COL, latency from
    LATENCY:DEVICE``); None for a study that trains."""
    if not config.get("benchmark"):
        return None
    from pathlib import Path

    return (f"accuracy from {Path(config['benchmark']).name}:{config.get('benchmark_column')}, latency from "
            f"{Path(config.get('benchmark_latency') or '').name}:{config.get('device_column')}")


def increment_hint(budget: Budget, short: float = 0.0, training_s: float | None = None) -> str:
    """A budget to add in the study's own unit (``+10trials``, ``+1cpu-m``), more than ``short``;
    for a benchmark study (``training_s``: simulated seconds of a mean training) ten trainings."""
    if training_s and budget.kind == "seconds":
        return f"+{int(short + 10 * training_s)}s"
    if budget.kind == "trials":
        return f"+{int(short) + 10}trials"
    unit = f"{budget.device}-" if budget.device else ""
    return f"+{int(short) + 30}{unit}s" if short > 0 else f"+1{unit}m"


# --------------------------------------------------------------------------------------------
# create and run
# --------------------------------------------------------------------------------------------


def create(storage: str | Store | None = None, *, budget: str | Budget, name: str | None = None,
           config: Any = None, **options: Any) -> tuple[Store, StudyInfo]:
    """Check and register a new study; ``(store, info)``.

    ``config`` is a SearchConfig, or leave it out and pass its fields as ``options`` (command-line
    forms such as ``max_params="5M"`` or ``shares="screen=0.2,train=0.8"`` are read). ``name``
    defaults to ``SPACE-DATE-TIME``. The budget, the name, the store URL and every field are
    checked first and all their problems reported in one SearchError; then the data, device,
    frame and cluster (:func:`nas.search.prepare_study`). Nothing is written, and no store file
    created, until every check has passed."""
    import nas.search as search

    problems: list[str] = []
    bud = cfg = url = None
    try:
        bud = budget if isinstance(budget, Budget) else search.parse_budget_arg(budget)
    except SearchError as e:
        problems.append(str(e))
    try:
        cfg = config if config is not None else search.SearchConfig.parse(**options)
    except SearchError as e:
        problems.append(str(e))
    except TypeError as e:  # an option SearchConfig does not have
        problems.append(f"unknown search option: {e}")
    if name is None:
        name = f"{getattr(cfg, 'space', options.get('space', 'study'))}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        validate_study_name(name)
    except StoreError as e:
        problems.append(str(e))
    try:
        url = storage.url if isinstance(storage, Store) else validate_url(storage_url(storage))
    except StoreError as e:
        problems.append(str(e))
    if problems:
        raise SearchError("; ".join(problems))
    assert bud is not None and cfg is not None and url is not None
    try:
        conf = search.prepare_study(name, cfg, bud, url)  # data, device, frame: still nothing written
    except StoreError as e:
        raise SearchError(str(e)) from None
    store = open_store(storage, create=True)
    try:
        search.create_study(store, name, cfg, bud, conf)
    except StoreError as e:
        raise SearchError(str(e)) from None
    return store, store.study(name)


def chaos_from_env() -> dict[int, str]:
    """``NAS_CHAOS="3:raise,5:kill"``: fail the first attempt of those trials (reliability tests)."""
    out: dict[int, str] = {}
    for part in filter(None, os.environ.get("NAS_CHAOS", "").split(",")):
        n, _, kind = part.partition(":")
        if kind not in ("raise", "kill") or not n.strip().isdigit():
            raise SearchError(f"NAS_CHAOS entry {part!r} must be ORDINAL:raise or ORDINAL:kill")
        out[int(n)] = kind
    return out


def _running(store: Store, name: str, live: tuple[int, str] | None = None) -> StudyRunning:
    info = store.study(name)
    pid, host = live or (info.driver_pid, info.driver_host)
    return StudyRunning(f"study {name!r} is already running (pid {pid} on {host}); stop it with "
                        f"`{command('stop', name, url=store.url)}` or wait for it")


def run(store: Store, name: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
        chaos: dict[int, str] | None = None, handle_signals: bool = True) -> Summary:
    """Run (or continue) study ``name`` until its budget is spent or a stop is requested.

    Holds the driver lease for the run (StudyRunning when a live driver has it) and gives it back
    after. In the main thread Ctrl-C and SIGTERM ask for a graceful stop meanwhile (a second Ctrl-C
    aborts). ``chaos`` defaults to ``$NAS_CHAOS``. Raises SearchError (bad input found while running:
    status ``failed``), StudyLost (the store went away or another driver took over: nothing more
    written), KeyboardInterrupt (status ``interrupted``) or StudyFailed (status ``failed``)."""
    import nas.search as search
    from workers.ray_pool import shutdown_ray

    chaos = chaos_from_env() if chaos is None else chaos
    find_study(store, name)
    pid, host = os.getpid(), socket.gethostname()
    if not store.acquire_driver(name, pid, host):
        raise _running(store, name)
    handlers = None
    if handle_signals and threading.current_thread() is threading.main_thread():
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        search.install_stop_handlers(store, name)
    try:
        search.run_study(store, name, progress=progress, chaos=chaos)
    except StudyLost:  # the store is gone or another driver owns the study: write nothing more
        raise
    except SearchError:
        store.set_status(name, "failed")
        raise
    except KeyboardInterrupt:
        store.set_status(name, "interrupted")
        raise
    except Exception as e:
        store.set_status(name, "failed")
        first = str(e).splitlines()[0] if str(e) else ""
        raise StudyFailed(f"study {name!r} failed: {type(e).__name__}: {first}; stored results are kept, continue "
                          f"with `{command('resume', name, url=store.url)}`") from e
    finally:
        with contextlib.suppress(StoreError):  # a store that is gone has no lease to give back
            store.release_driver(name, pid, host)
        shutdown_ray()
        for sig, handler in (handlers or {}).items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
    return summary(store, name)


# --------------------------------------------------------------------------------------------
# resume, add budget, stop
# --------------------------------------------------------------------------------------------


def parse_increment(add: str | Budget | None) -> Budget | None:
    """A budget to add: ``"+2gpu-h"`` (the ``+`` is required) or a Budget; None stays None."""
    import nas.search as search

    return search.parse_budget_arg(add, increment=True) if isinstance(add, str) else add


def _nothing_to_run(name: str, info: StudyInfo, budget: Budget, added: Budget | None) -> str:
    """Why a resume would run nothing (its budget, even with ``added``, is spent), and what to add."""
    used = budget.used_text(info.used_seconds, info.trials_done)
    if budget.kind == "trials":
        short = float(max(0, info.trials_done - int(budget.trials or 0)))
        need = f"more than {int(short)} trials"
    else:
        short = max(0.0, info.used_seconds - float(budget.seconds or 0))
        need = f"more than {short:,.1f} {budget.device + '-s' if budget.device else 's'}"
    with_add = f"+{added} more still leaves nothing to spend" if added else "nothing is left to spend"
    return (f"study {name!r} has used {used}; {with_add}, so a resume would run nothing: add {need}, e.g. "
            f"{increment_hint(budget, short)}")


def check_resume(store: Store, name: str, add: str | Budget | None = None, *,
                 need_budget_left: bool = False) -> Budget:
    """The study's budget after adding ``add`` (``"+2gpu-h"`` or a Budget), if a resume may start
    now; writes nothing. Refused: a bad or mismatched ``add`` (SearchError), a live driver
    (StudyRunning), a completed study without ``add``, and with ``need_budget_left`` a budget that
    would still be spent (so a resume would run nothing)."""
    added = parse_increment(add)
    info = find_study(store, name)
    current = _budget(info)
    try:
        new = current + added if added is not None else current
    except BudgetError as e:
        raise SearchError(str(e)) from None
    live = store.live_driver(name)
    if live is not None:  # a live driver first: its own budget is its business
        raise _running(store, name, live)
    if info.status == "completed" and added is None:
        raise SearchError(f"study {name!r} is complete; give it more budget, e.g. {increment_hint(current)}")
    if need_budget_left and new.exhausted(info.used_seconds, info.trials_done):
        raise SearchError(_nothing_to_run(name, info, current, added))
    return new


def add_budget(store: Store, name: str, add: str | Budget) -> Budget:
    """Add ``add`` (``"+1cpu-m"``, ``"+10trials"`` or a Budget, in the study's unit) to the study's
    budget; the new budget. A running driver reads its budget when it starts: the addition counts
    from the next run or resume."""
    added = parse_increment(add)
    assert added is not None
    info = find_study(store, name)
    try:
        new = _budget(info) + added
    except BudgetError as e:
        raise SearchError(str(e)) from None
    store.set_budget(name, new.to_dict())
    return new


def resume(store: Store, name: str, add: str | Budget | None = None, *,
           progress: Callable[[dict[str, Any]], None] | None = None, chaos: dict[int, str] | None = None,
           started: Callable[[StudyInfo], None] | None = None) -> Summary:
    """Continue a stopped, crashed or finished study, with ``add`` more budget if given; nothing
    stored is lost or counted twice. The lease is taken before anything is written, so a resume
    refused because a driver is live changes nothing (not its pending stop, not its budget).
    ``started(info)`` is called once the study is ready to run. Raises as :func:`run`."""
    new = check_resume(store, name, add)
    pid, host = os.getpid(), socket.gethostname()
    if not store.acquire_driver(name, pid, host):
        raise _running(store, name)
    try:
        if add is not None:
            store.set_budget(name, new.to_dict())
        store.clear_stop(name)
        if started is not None:
            started(store.study(name))
    except BaseException:
        with contextlib.suppress(StoreError):
            store.release_driver(name, pid, host)
        raise
    return run(store, name, progress=progress, chaos=chaos)


@dataclass(frozen=True)
class Stopped:
    """What :func:`stop` did: ``action`` is ``nothing`` (not running), ``requested`` (the live
    driver finishes its trials in flight and stops) or ``marked`` (no live driver: marked stopped)."""

    study: str
    action: str
    status: str
    driver_pid: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "action": self.action, "status": self.status, "driver_pid": self.driver_pid,
                "message": self.message}


def stop(store: Store, name: str, *, force: bool = False) -> Stopped:
    """Ask study ``name`` to stop gracefully: its running driver notices, lets the trials in flight
    finish and keeps them; a study without a live driver is marked ``stopped`` at once. A study
    that is not running or created is left alone unless ``force`` (a resume still starting)."""
    info = find_study(store, name)
    if info.status not in ("running", "created") and not force:
        return Stopped(name, "nothing", info.status, None, f"study {name} is {info.status}; nothing to stop")
    store.request_stop(name)
    live = store.live_driver(name)
    pid, host = os.getpid(), socket.gethostname()
    if live is None and store.acquire_driver(name, pid, host):  # no live driver: mark it directly
        store.set_status(name, "stopped")
        store.clear_stop(name)
        store.release_driver(name, pid, host)
        return Stopped(name, "marked", "stopped", None, f"study {name} had no live driver; marked stopped")
    live = live or store.live_driver(name)
    driver = live[0] if live else store.study(name).driver_pid
    return Stopped(name, "requested", info.status, driver,
                   f"stop requested; the driver of {name} (pid {driver}) finishes its trials in flight")


# --------------------------------------------------------------------------------------------
# what a study holds
# --------------------------------------------------------------------------------------------


def front(store: Store, name: str) -> list[dict[str, Any]]:
    """The stored Pareto front, most accurate first: rank, hash, short form, metrics, params, flops
    and the full spec. A front ranked by screening keeps its value as ``score``, never as accuracy."""
    from search_spaces import spec_from_json

    out = []
    space = store.study(name).space
    for row in store.front(name):
        spec = spec_from_json(row["spec"] if isinstance(row["spec"], str) else json.dumps(row["spec"]), space)
        metrics = dict(row["metrics"])
        if metrics.get("source") == "screen" and "accuracy" in metrics:  # stored before screening had its own key
            metrics.setdefault("score", metrics.pop("accuracy"))
            metrics.pop("accuracy", None)
        out.append({"rank": row["rank"], "hash": row["arch_hash"], "short": spec.short(), "metrics": metrics,
                    "params": row.get("params"), "flops": row.get("flops"), "spec": spec.to_dict()})
    return out


@dataclass(frozen=True)
class Summary:
    """A study at a glance: its row, budget, per-stage counts and device-seconds, last errors, front."""

    study: StudyInfo
    budget: Budget
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[Any] = field(default_factory=list)
    front: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.study.status

    @property
    def used_text(self) -> str:
        return simulated(self.study, self.budget.used_text(self.study.used_seconds, self.study.trials_done))

    def to_dict(self) -> dict[str, Any]:
        b = self.budget
        return {"study": self.study.to_dict(), "budget": {
                    "text": str(b), "kind": b.kind, "used": self.study.trials_done if b.kind == "trials" else
                    self.study.used_seconds, "total": b.trials if b.kind == "trials" else b.seconds,
                    "used_text": self.used_text, "exhausted": b.exhausted(self.study.used_seconds,
                                                                          self.study.trials_done)},
                "stages": self.stages, "errors": [e.to_dict() for e in self.errors], "front": self.front}


def best_accuracy(store: Store, name: str) -> float | None:
    """The best accuracy on the study's front (None before any architecture was trained)."""
    return max((r["metrics"]["accuracy"] for r in front(store, name) if "accuracy" in r["metrics"]), default=None)


def summary(store: Store, name: str, *, errors: int = 20) -> Summary:
    """Study ``name``: status, budget used/total, per-stage done/errors/device-seconds, the last
    ``errors`` failed evaluations and the front."""
    info = find_study(store, name)
    stages: dict[str, dict[str, float]] = {}
    failed = []
    for ev in store.evaluations(name):
        st = stages.setdefault(ev.stage, {"done": 0, "errors": 0, "seconds": 0.0})
        st["done" if ev.error is None else "errors"] += 1
        st["seconds"] += ev.seconds
        if ev.error:
            failed.append(ev)
    return Summary(info, _budget(info), stages, failed[-errors:] if errors else [], front(store, name))


# --------------------------------------------------------------------------------------------
# devices, data and frames (the study verbs and `nas supernet train|eval`)
# --------------------------------------------------------------------------------------------


def resolve_target(target: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else unchanged."""
    if target != "auto":
        return target
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_dataset(source: str, split: str = "train", *, limit: int | None = None, img_size: int | None = None,
                 seed: int = 0) -> Any:
    """``nas.data.load`` with its refusals as one-line SearchErrors."""
    from nas.data import load

    try:
        return load(source, split=split, limit=limit, img_size=img_size, seed=seed)
    except (ValueError, OSError) as e:
        raise SearchError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def resolve_frame(frame: str, data: Any, img_size: int | None = None) -> Any:
    """A supernet frame: ``auto`` (``tiny`` at 16px and below, else ``small``), ``tiny`` or ``small``
    adapted to the data's channels and classes (and ``img_size``), or a frame JSON file (checked)."""
    from pathlib import Path

    from search_spaces.supernet import FRAMES, frame_from_json, get_frame

    try:
        if frame == "auto":
            frame = "tiny" if (img_size or int(data.x.shape[-1])) <= 16 else "small"
        if frame in FRAMES:
            over: dict[str, Any] = {"in_chans": data.in_chans, "num_classes": data.num_classes}
            if img_size:
                over["img_size"] = img_size
            return get_frame(frame, **over)
        path = Path(frame)
        if not path.is_file():
            raise SearchError(f"unknown frame {frame[:80]!r}; pass auto, {', '.join(sorted(FRAMES))} or a frame "
                              "JSON file")
        return frame_from_json(path.read_text())
    except (ValueError, RecursionError) as e:
        if isinstance(e, SearchError):
            raise
        raise SearchError(f"invalid frame: {e or 'nested too deeply'}") from None


def frame_sizes(info: StudyInfo | Mapping[str, Any]) -> dict[str, int]:
    """The build sizes of a study's frame (what its trials and exports use): classes, image side, channels."""
    conf = info.config if isinstance(info, StudyInfo) else info
    frame = conf.get("frame_json") or {}
    return {"num_classes": int(frame.get("num_classes", 10)), "img_size": int(frame.get("img_size", 32)),
            "in_chans": int(frame.get("in_chans", 3))}
