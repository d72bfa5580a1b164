"""Ray Tune wiring around :func:`workers.evaluate.evaluate`: trainables, budget gating, retries.

``run_trials`` runs one stage of a search as a Ray Tune experiment. Trials are suggested by any
Tune ``Searcher`` (``OptunaSearch`` with the study in the SQL store, or a fixed list of candidates),
gated by the driver's budget (``Gate``), retried on failure (``FailureConfig``), optionally stopped
early by a scheduler (ASHA for short training). Every finished or failed trial reaches the driver's
``Gate`` (which records it in the store); a trial's config carries the spec JSON and hash.

Local mode binds Ray to 127.0.0.1 without the dashboard; ``address`` joins an existing cluster.
This module imports Ray but not the store: ``nas.search`` drives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.search import Searcher

from workers.evaluate import EvalConfig, EvalData, evaluate, fingerprint

__all__ = [
    "FINISH",
    "LAUNCH",
    "WAIT",
    "Gate",
    "ListSearcher",
    "Plan",
    "TrialError",
    "TrialResult",
    "asha",
    "init_ray",
    "run_trials",
    "shutdown_ray",
]

LAUNCH, WAIT, FINISH = "launch", "wait", "finish"
_TEMP_DIR: str | None = None  # the private local Ray's temp folder (None: joined a cluster, or not started)


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Start a private local Ray on 127.0.0.1 (no dashboard), or join ``address`` ("auto", "HOST:PORT")."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # per-epoch reports lack latency
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C is the driver's graceful stop
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
                 runtime_env={"worker_process_setup_hook": "workers.ray_tune.warm_worker"}, **kw)
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
# the trainable (runs on a worker)
# --------------------------------------------------------------------------------------------


def _fault(config: dict[str, Any]) -> None:
    """Chaos testing: ``config["fault"] = {"kind": "raise"|"kill", "marker": PATH}`` fails the first
    attempt of this trial (the marker file makes the retry succeed)."""
    fault = config.get("fault")
    if not fault:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    if fault["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure in trial {config.get('ordinal')}")


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


def trainable(config: dict[str, Any], data: EvalData | None = None) -> None:
    """Evaluate ``config["spec"]`` for each stage in ``config["stages"]`` and report the result.

    A ``train`` stage reports after every epoch (``accuracy``, ``epochs``); the last report holds
    ``evaluations``: a JSON list of :class:`workers.evaluate.Evaluation` dicts, one per stage.
    ``config["allowance"]`` (device-seconds, set by the driver at launch) bounds the train stage,
    less ``config["reserve"]`` for the stages after it (the latency of the baselines)."""
    import torch

    from search_spaces import spec_from_json

    assert data is not None
    torch.set_num_threads(int(config.get("threads", 1)))
    if config.get("task") == "supernet":
        _fault(config)
        tune.report(_train_supernet(config, data))
        return
    if config.get("cached") is not None:
        tune.report({**config["cached"], "cached": True, "evaluations": "[]", "seconds": 0.0})
        return
    _fault(config)
    spec = spec_from_json(config["spec"], "hybrid_vit")
    cfg = EvalConfig.from_dict(config["eval"])
    _warm_evaluation(config["device"], cfg.threads)
    metrics: dict[str, float] = {}
    evals: list[dict[str, Any]] = []
    used = 0.0

    def report(epoch: int, m: dict[str, float]) -> None:
        from predictors.latency import parse_device

        extra = {"asha_epoch": epoch} if config.get("asha") else {}
        device = fingerprint(str(parse_device(config["device"])), cfg.threads)  # cached: the one evaluate stores
        tune.report({**metrics, **m, **extra, "seconds": used + m["seconds"], "evaluations": json.dumps(evals),
                     "device": json.dumps(device), "final": False})

    allowance = config.get("allowance")
    for stage in config["stages"]:
        left = None if allowance is None else float(allowance) - used - float(config.get("reserve") or 0.0)
        ev = evaluate(spec, stage, data, config["device"], config=cfg,
                      report=report if stage == "train" else None, allowance=left if stage == "train" else None)
        used += ev.seconds
        metrics.update(ev.metrics)
        evals.append(ev.to_dict())
        if left is not None and stage == "train":  # what it was allowed, next to what it used
            evals[-1]["metrics"]["allowance"] = float(left)
    tune.report({**metrics, "seconds": used, "evaluations": json.dumps(evals), "final": True})


def _train_supernet(config: dict[str, Any], data: EvalData) -> dict[str, Any]:
    """Train (or continue training) the study's supernet in ``config["out"]``.

    The schedule (epochs, and steps when less than an epoch fits) is fixed once, from
    ``config["epochs"]`` or from the time ``config["plan_seconds"]`` allows, and kept in
    ``plan.json``. ``config["allowance"]`` (device-seconds) is this trial's hard limit: training
    stops at the step where it runs out and checkpoints there (``complete`` = 0 in the result), and
    the next supernet trial of the study continues from that checkpoint. ``config["counted"]`` is
    the checkpoint's training seconds already recorded by earlier trials, so a crash's lost
    seconds are counted once and a continuation's are not counted twice."""
    from predictors.latency import parse_device
    from predictors.supernet import TrainConfig, train_supernet
    from search_spaces.supernet import frame_from_json

    t0 = time.perf_counter()
    frame = frame_from_json(config["frame"])
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    rgb = data.in_chans == 3
    n = len(data.train.x)
    cfg = TrainConfig(batch_size=64 if n < 5000 else 128, lr=3e-3 if n < 5000 else 2e-3, augment=rgb, flip=rgb,
                      seed=int(config.get("seed", 0)))
    allowance = config.get("allowance")
    plan = out / "plan.json"
    steps: int | None = None
    spe = max(1, n // min(cfg.batch_size, n))
    if plan.is_file():
        saved = json.loads(plan.read_text())
        epochs, steps = int(saved["epochs"]), saved.get("steps")
    elif config.get("epochs"):
        epochs = int(config["epochs"])
    else:  # time a few sandwich steps, then take as many epochs (or steps) as the plan's time holds
        marks: list[float] = []
        train_supernet(frame, data.train, 1, config=cfg, max_steps=4, device=config["device"],
                       progress=lambda st, _loss: marks.append(st.seconds),
                       max_seconds=None if allowance is None else 0.25 * float(allowance))
        per_step = max((marks[-1] - marks[0]) / max(1, len(marks) - 1) if len(marks) > 1 else
                       (marks or [1.0])[0], 1e-9)
        plan_s = float(config.get("plan_seconds", allowance) or 0.0)
        left = plan_s - (time.perf_counter() - t0)
        epochs = int(max(1, min(int(config.get("max_epochs", 30)), left * 0.85 // (per_step * spe))))
        if left * 0.85 < per_step * spe:  # less than an epoch fits: a schedule of the steps that do
            steps = max(1, int(left * 0.85 / per_step))
    plan.write_text(json.dumps({"epochs": epochs, "steps": steps}))
    prior = 0.0  # training time checkpointed by an earlier, interrupted run: used, and not counted yet
    if (out / "supernet.pt").is_file():
        import torch

        ckpt_s = float(torch.load(out / "supernet.pt", map_location="cpu", weights_only=False).get("seconds", 0.0))
        prior = max(0.0, ckpt_s - float(config.get("counted") or 0.0))
    budget_left = None if allowance is None else float(allowance) - (time.perf_counter() - t0) - prior - 0.05
    net = train_supernet(frame, data.train, epochs, config=cfg, out=out, device=config["device"],
                         total_steps=steps, max_seconds=None if budget_left is None else max(0.0, budget_left))
    st = net.train_state  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0 + prior
    ev = {"spec_hash": None, "stage": "supernet_train", "seconds": seconds, "params": None, "flops": None,
          "metrics": {"epochs": float(epochs), "steps": float(st.step), "total_steps": float(st.total_steps),
                      "complete": float(st.step >= st.total_steps), "train_seconds": float(st.seconds),
                      **({"allowance": float(allowance)} if allowance is not None else {}),
                      **({"loss": float(st.history[-1]["loss"])} if st.history else {})},
          "device": fingerprint(str(parse_device(config["device"])), int(config.get("threads", 1)))}
    return {"seconds": seconds, "evaluations": json.dumps([ev]), "final": True}


# --------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    """A finished trial as the driver sees it."""

    config: dict[str, Any]
    result: dict[str, Any]
    evaluations: list[dict[str, Any]]
    stopped_early: bool = False
    attempt: int = 0  # failed attempts before this one (a retry that succeeded is attempt 1, 2, ...)


@dataclass
class TrialError:
    """A failed attempt: its traceback, the driver-measured seconds, and whether it will be retried."""

    config: dict[str, Any]
    error: str
    seconds: float
    attempt: int
    final: bool


class Gate(Protocol):
    """The driver's side of one stage: budget, stop flag and recording."""

    def decide(self, running: int) -> str:
        """LAUNCH a new trial, WAIT (ask again later) or FINISH the stage."""

    def started(self, config: dict[str, Any], attempt: int) -> None:
        """A trial (or its retry) began running on a worker."""

    def finished(self, trial: TrialResult) -> None: ...

    def failed(self, trial: TrialError) -> None: ...


class Plan(Gate, Protocol):
    """A whole search in one Tune experiment: the plan moves from stage to stage by itself.
    ``decide`` is a Gate's; ``searcher()`` is the current stage's searcher; ``exhausted()`` says it
    has no more suggestions; ``on_complete`` sees each result before the searcher does."""

    def searcher(self) -> Searcher: ...

    def exhausted(self) -> None: ...

    def on_complete(self, inner: Searcher, trial_id: str, result: dict[str, Any] | None) -> None: ...


class _OneStage:
    """A Plan of a single stage: one searcher behind one gate."""

    def __init__(self, searcher: Searcher, gate: Gate,
                 on_complete: Callable[[Searcher, str, dict[str, Any] | None], None] | None = None) -> None:
        self._searcher, self.gate, self._on_complete, self.done = searcher, gate, on_complete, False

    def decide(self, running: int) -> str:
        return FINISH if self.done else self.gate.decide(running)

    def searcher(self) -> Searcher:
        return self._searcher

    def exhausted(self) -> None:
        self.done = True

    def on_complete(self, inner: Searcher, trial_id: str, result: dict[str, Any] | None) -> None:
        if self._on_complete is not None:
            self._on_complete(inner, trial_id, result)

    def started(self, config: dict[str, Any], attempt: int) -> None:
        started = getattr(self.gate, "started", None)
        if started is not None:
            started(config, attempt)

    def finished(self, trial: TrialResult) -> None:
        self.gate.finished(trial)

    def failed(self, trial: TrialError) -> None:
        self.gate.failed(trial)


def asha(max_t: int) -> Any:
    """ASHA (Li et al. 2020) over the per-epoch reports of trials whose config sets ``asha``; every
    other trial reports no ``asha_epoch`` and runs untouched, so one experiment can mix stages."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="asha_epoch", metric="accuracy", mode="max", max_t=max(1, max_t),
                         grace_period=1, reduction_factor=2, stop_last_trials=False)


class ListSearcher(Searcher):
    """Suggests a fixed list of configs in order (the candidates of a later stage)."""

    def __init__(self, configs: list[dict[str, Any]], metric: str | None = None, mode: str | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self._todo = list(configs)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._todo:
            return Searcher.FINISHED
        return self._todo.pop(0)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass


class _Gated(Searcher):
    """The experiment's searcher: asks the plan before each suggestion, takes it from the current
    stage's searcher, adds the ``common`` keys, and routes results back to the searcher that made it."""

    def __init__(self, plan: Plan, common: dict[str, Any], attempts: dict[str, int] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.common = common
        self.running: dict[str, Searcher] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.attempts = attempts if attempts is not None else {}  # failed attempts per trial (the recorder's)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    # Tune pickles its searcher and callbacks for its own experiment restore. The driver resumes
    # from the store instead, so these hold only a placeholder (they reference live connections).
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        pass

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for _ in range(64):  # a stage may end at once (nothing left); then the next one is asked
            what = self.plan.decide(len(self.running))
            if what == FINISH and not self.running:
                return Searcher.FINISHED
            if what != LAUNCH:
                return None
            inner = self.plan.searcher()
            out = inner.suggest(trial_id)
            if out is Searcher.FINISHED:
                self.plan.exhausted()
                continue
            if out is None:
                return None
            self.running[trial_id] = inner
            self.configs[trial_id] = {**self.common, **out}
            return self.configs[trial_id]
        return None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.running:
            self.running[trial_id].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """The trial's result is recorded in the store first, then its searcher is told: Tune
        calls the searcher before its callbacks, and Optuna's ``tell`` commits the trial as
        COMPLETE, so a driver killed between the two would leave a COMPLETE trial with no row."""
        inner = self.running.pop(trial_id, None)
        config = self.configs.pop(trial_id, None)
        if inner is None:
            return
        if result and not error and config is not None:
            done = _trial_result(config, result, self.attempts.get(trial_id, 0))
            if done is not None:
                self.plan.finished(done)
        self.plan.on_complete(inner, trial_id, result)
        inner.on_trial_complete(trial_id, result=result, error=error)
        _chaos_pause("NAS_CHAOS_PAUSE_AFTER_TELL")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(trial: Any) -> str:
    """The worker's traceback as Tune wrote it (colour codes removed), last 8,000 characters."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        text = _ANSI.sub("", Path(path).read_text(errors="replace")).strip()
        if text:
            return text[-8000:]
    err = getattr(trial, "error_msg", None) or "the worker died without a traceback"
    return str(err)[-8000:]


def _chaos_pause(var: str) -> None:
    """Reliability tests: where ``$var`` names a file that does not exist yet, create it and stall
    this process, so a test can kill the driver at exactly this point."""
    path = os.environ.get(var)
    if path and not Path(path).exists():
        Path(path).write_text(str(os.getpid()))
        time.sleep(600)


def _trial_result(config: dict[str, Any], res: dict[str, Any], attempt: int) -> TrialResult | None:
    """A finished trial's evaluations from its last report (None when it reported none); a trial
    that ASHA stopped between epochs gets its partial training as the last evaluation."""
    if "evaluations" not in res:
        return None
    evals = json.loads(res.get("evaluations") or "[]")
    early = not res.get("final", True) and not res.get("cached")
    if early:  # stopped by the scheduler between epochs: record the partial training
        m = {k: float(v) for k, v in res.items() if k in ("accuracy", "epochs", "params") and v is not None}
        evals.append({"stage": "train", "metrics": m, "seconds": float(res.get("seconds", 0.0)) -
                      sum(e["seconds"] for e in evals), "device": json.loads(res.get("device") or "{}"),
                      "spec_hash": config.get("spec_hash"), "params": int(m["params"]) if "params" in m
                      else None, "flops": None})
    return TrialResult(dict(config), dict(res), evals, stopped_early=early, attempt=attempt)


class _Recorder(Callback):
    """Tells the plan when a trial starts and hands it every failed attempt (driver process).
    Results are recorded by the searcher (``_Gated``), before Optuna hears of them."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.started: dict[str, float] = {}
        self.attempts: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:  # see _Gated.__getstate__
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.perf_counter()
        self.gate.started(dict(trial.config), self.attempts.get(trial.trial_id, 0))

    def _failed(self, trial: Any, final: bool) -> None:
        attempt = self.attempts.get(trial.trial_id, 0)
        self.attempts[trial.trial_id] = attempt + 1
        seconds = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
        self.gate.failed(TrialError(dict(trial.config), _error_text(trial), seconds, attempt, final))
        self.started[trial.trial_id] = time.perf_counter()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed(trial, final=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed(trial, final=True)


def run_trials(
    *,
    name: str,
    data_ref: Any,
    common: dict[str, Any],
    storage_path: str | Path,
    plan: Plan | None = None,
    searcher: Searcher | None = None,
    gate: Gate | None = None,
    workers: int = 1,
    resources: dict[str, float] | None = None,
    scheduler: Any = None,
    max_failures: int = 2,
    on_complete: Callable[[Searcher, str, dict[str, Any] | None], None] | None = None,
) -> None:
    """One Tune experiment: trials suggested by ``plan`` (or by one ``searcher`` behind one ``gate``)
    until it says FINISH. Worker processes start once per experiment, so a whole search is one.

    ``common`` is merged into every suggested config (eval config, device, threads).
    ``data_ref`` is the :class:`EvalData` the trainable receives (put in the object store once)."""
    if plan is None:
        if searcher is None or gate is None:
            raise ValueError("run_trials needs a plan, or a searcher and a gate")
        plan = _OneStage(searcher, gate, on_complete)
    fn = tune.with_parameters(trainable, data=data_ref)
    fn = tune.with_resources(fn, resources or {"cpu": 1})
    recorder = _Recorder(plan)
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=_Gated(plan, common, recorder.attempts), num_samples=-1,
                                    max_concurrent_trials=workers, scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()), verbose=0, log_to_file=False,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[recorder],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        tuner.fit()
    except Exception:  # Tune's own failure (not a trial's): surface the traceback to the driver
        raise RuntimeError(traceback.format_exc(limit=5)) from None
