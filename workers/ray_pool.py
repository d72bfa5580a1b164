"""The Ray executor: a search plan's requests run on a pool of long-lived Ray worker actors.

``run_trials`` keeps one actor per worker (one CPU, or one GPU, each) busy: before each launch
it asks the plan (:class:`Plan`) for the next :class:`~workers.request.TrialRequest`, the actor
runs it with :func:`workers.request.run_request`, and every finished or failed attempt goes back
to the plan, which records it in the store. A failed attempt is retried up to ``max_failures``
times (a worker process that died is replaced first). Training that allows it is stopped
between epochs by ASHA (asynchronous successive halving, Li et al. 2020), judged by one small
actor all workers report to.

Why not Ray Tune's trial runner: it reuses a finished trial's actor for the next pending trial
and cancels the actor it was starting, and it drops idle actors when no trial is pending. With
trials shorter than a worker's start (2-3 s: a process importing torch) and plans that run one
trial alone at times (the first screening, a careful CPU latency), a second worker then never
came up again: the ``make demo`` search kept 2 workers 47% busy, screening 30-38%.

Local mode binds Ray to 127.0.0.1 without the dashboard; ``address`` joins an existing cluster.
This module imports Ray but not the store: ``nas.search`` drives it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from search_spaces._runtime import release_freed_memory
from workers.evaluate import EvalData, fingerprint
from workers.request import FINISH, Asha, Plan, TrialError, TrialRequest, TrialResult, run_request

__all__ = [
    "Plan",
    "init_ray",
    "run_trials",
    "shutdown_ray",
]

_TEMP_DIR: str | None = None  # the private local Ray's temp folder (None: joined a cluster, or not started)


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Start a private local Ray on 127.0.0.1 (no dashboard), or join ``address`` ("auto", "HOST:PORT")."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # trials are timed in wall-clock device-seconds: at Ray's default worker niceness (15) a trial
    # starved beside any ordinary process and its seconds grew 20-100x (151 s for one CIFAR-10
    # screening trial that takes 6 s); a cluster joined with --address sets this when it starts
    os.environ.setdefault("RAY_worker_niceness", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
                          "logging_level": "ERROR"}
    # ray.init replaces the driver's SIGTERM handler with one that exits the process (it ended in
    # SIGABRT within seconds, the study left `running`); the caller's graceful stop is put back
    main = threading.current_thread() is threading.main_thread()
    term = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            ray.init(address=address, **kw)
            return
        global _TEMP_DIR
        tmp = temp_dir or tempfile.mkdtemp(prefix="nas-ray-")
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tmp, _node_ip_address="127.0.0.1",
                 runtime_env={"worker_process_setup_hook": "workers.ray_pool.warm_worker"}, **kw)
        if temp_dir is None:  # our own folder: removed by shutdown_ray, or by the reaper if we are killed
            _TEMP_DIR = tmp
            subprocess.Popen([sys.executable, str(Path(__file__).with_name("_reaper.py")), str(os.getpid()), tmp],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
    finally:
        if callable(term):
            signal.signal(signal.SIGTERM, term)


def warm_worker() -> None:
    """Runs when Ray starts a worker process: import torch and the evaluation code before a trial
    needs them (each Tune stage starts fresh actor processes; this takes seconds off each)."""
    import torch

    torch.set_num_threads(1)
    import search_spaces.counting
    import search_spaces.hybrid_vit  # noqa: F401


def shutdown_ray() -> None:
    """Stop the local Ray (or leave a joined cluster) and remove the temp folder init_ray made."""
    global _TEMP_DIR
    if ray.is_initialized():
        ray.shutdown()
    if _TEMP_DIR is not None:
        shutil.rmtree(_TEMP_DIR, ignore_errors=True)
        _TEMP_DIR = None



# --------------------------------------------------------------------------------------------
# the workers
# --------------------------------------------------------------------------------------------


_WARMED: set[str] = set()


def _warm_evaluation(device: str, threads: int) -> None:
    """Once per worker process, before the first trial's clock starts: import the evaluation code
    and read the device fingerprint. Process set-up is not the candidate's device time, and on a
    loaded machine it made a worker's first trial cost 10-30x the next (31 s for a digits screening)."""
    if device in _WARMED:
        return
    import predictors.latency
    import predictors.precision
    import predictors.supernet
    import predictors.zero_cost  # noqa: F401
    from predictors.latency import parse_device

    fingerprint(str(parse_device(device)), threads)
    _WARMED.add(device)


DATA_WORKERS_ENV = "HYBRID_NAS_DATA_WORKERS"  # nas.stream.WORKERS_ENV (workers/ does not import nas)


def data_workers(cpus: float) -> int:
    """DataLoader worker processes a trial of ``cpus`` CPUs may start for a streaming split: the CPUs
    beyond the one the trial computes on, at most 4 (0: decode in the trial's own process)."""
    return max(0, min(4, int(cpus) - 1))


class _Worker:
    """One worker process: holds the data, runs requests (reports training epochs to ASHA).

    A streaming split (``nas.stream.StreamDataset``) arrives as its file path and index arrays and
    decodes batch by batch here. Its DataLoader workers would default to half the node's CPUs
    (``os.cpu_count()`` sees every core, not the trial's share), so the trial's CPUs bound them
    through ``$HYBRID_NAS_DATA_WORKERS`` unless the user set it."""

    def __init__(self, data: EvalData, cpus: float = 1.0) -> None:
        self.data = data
        os.environ.setdefault(DATA_WORKERS_ENV, str(data_workers(cpus)))

    def ready(self) -> int:
        return os.getpid()

    def run(self, req: TrialRequest, judge: Any = None) -> TrialResult:
        if req.supernet is None:
            _warm_evaluation(req.device, req.eval.threads)
        report = None
        if req.asha and judge is not None:
            def report(m: dict[str, Any]) -> bool:
                return bool(ray.get(judge.report.remote(req.key, int(m["asha_epoch"]), float(m["accuracy"]))))
        try:
            return run_request(req, self.data, report=report)
        finally:
            # hand the heap's free pages back after a request: a worker lives for many trials, and a
            # dozen screenings of CIFAR-sized candidates left 680 MB resident where 410 MB were in use,
            # under the supernet training's own peak
            release_freed_memory()


# --------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------


def _chaos_pause(var: str) -> None:
    """Reliability tests: where ``$var`` names a file that does not exist yet, create it and stall
    this process, so a test can kill the driver at exactly this point."""
    path = os.environ.get(var)
    if path and not Path(path).exists():
        Path(path).write_text(str(os.getpid()))
        time.sleep(600)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(e: BaseException) -> str:
    """What a failed attempt reports: the worker's traceback (colour codes removed, last 8,000
    characters)."""
    if isinstance(e, ray.exceptions.RayTaskError):
        return _ANSI.sub("", str(e)).strip()[-8000:]
    if isinstance(e, ray.exceptions.RayActorError):
        return f"the worker process died: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return f"{type(e).__name__}: {e}"[-8000:]


@dataclass
class _Slot:
    """A request submitted to a worker: running (``t0`` set) or queued behind the running one."""

    ref: Any
    req: TrialRequest
    attempt: int
    t0: float | None = None


def run_trials(
    plan: Plan,
    *,
    data_ref: Any,
    workers: int = 1,
    resources: dict[str, float] | None = None,
    asha_max_t: int | None = None,
    max_failures: int = 2,
    depth: int = 2,
    poll_s: float = 0.5,
) -> int:
    """Run ``plan`` on ``workers`` worker actors until it says FINISH; the attempts made.

    ``data_ref``: the :class:`EvalData` every worker holds (put in the object store once).
    ``resources``: per worker, ``{"cpu": 1}`` or ``{"cpu": 1, "gpu": 1}``. ``asha_max_t``: the
    training epochs ASHA judges (None: no early stopping). ``depth``: requests a worker holds, the
    running one and those queued behind it, so that it starts the next the moment one ends while
    the driver records the last (the plan counts queued ones as running, so a stage that runs
    alone is never queued behind another). While trials run the plan is asked again every
    ``poll_s`` seconds too (a stop request ends the launches)."""
    res = resources or {"cpu": 1}
    actor_cls = ray.remote(_Worker).options(num_cpus=res.get("cpu", 1), num_gpus=res.get("gpu", 0),
                                            max_restarts=0, max_task_retries=0)
    cpus = float(res.get("cpu", 1))
    pool = [actor_cls.remote(data_ref, cpus) for _ in range(max(1, workers))]
    judge = ray.remote(Asha).options(num_cpus=0).remote(asha_max_t) if asha_max_t else None
    queues: list[deque[_Slot]] = [deque() for _ in pool]
    attempts = 0

    def start(slot: _Slot) -> None:
        nonlocal attempts
        plan.started(slot.req, slot.attempt)
        slot.t0 = time.perf_counter()
        attempts += 1

    def submit(w: int, req: TrialRequest, attempt: int) -> None:
        queues[w].append(_Slot(pool[w].run.remote(req, judge), req, attempt))
        if len(queues[w]) == 1:
            start(queues[w][0])

    def inflight() -> int:
        return sum(len(q) for q in queues)

    try:
        finishing = False
        while True:
            asking = not finishing
            for level in range(max(1, depth)):  # idle workers first, then one more behind each
                for w in range(len(pool)):
                    if not asking or len(queues[w]) != level:
                        continue
                    what = plan.next(inflight())
                    if isinstance(what, str):  # WAIT or FINISH: ask again when a trial ends
                        finishing, asking = what == FINISH, False
                        break
                    submit(w, what, 0)
            heads = {q[0].ref: w for w, q in enumerate(queues) if q}
            if not heads:
                if finishing:
                    return attempts
                time.sleep(0.05)  # WAIT with nothing running: the plan waits on its own clock
                continue
            done, _ = ray.wait(list(heads), num_returns=1, timeout=poll_s)
            for ref in done:
                w = heads[ref]
                slot = queues[w].popleft()
                seconds = time.perf_counter() - (slot.t0 or time.perf_counter())
                try:
                    result: TrialResult = ray.get(ref)
                except Exception as e:  # the request raised, or its worker process died
                    queued: list[_Slot] = []
                    if isinstance(e, ray.exceptions.RayActorError):  # a new process; the queued go there
                        pool[w] = actor_cls.remote(data_ref, cpus)
                        queued, queues[w] = list(queues[w]), deque()
                    final = slot.attempt >= max_failures
                    plan.failed(TrialError(slot.req, _error_text(e), seconds, slot.attempt, final))
                    if not final:
                        submit(w, slot.req, slot.attempt + 1)
                    for q in queued:  # they never started: resubmitted as they were
                        submit(w, q.req, q.attempt)
                else:
                    result.attempt = slot.attempt
                    plan.finished(result)
                    _chaos_pause("NAS_CHAOS_PAUSE_AFTER_TELL")
                if queues[w] and queues[w][0].t0 is None:  # the one queued behind it runs now
                    start(queues[w][0])
            finishing = False  # a finished trial may let the plan go on (the next stage)
    finally:
        for a in pool:
            ray.kill(a, no_restart=True)
        if judge is not None:
            ray.kill(judge, no_restart=True)
