"""Orchestration overhead and worker utilisation of the search's own executor (Ray Tune + store).

Three modes, each measured side by side in one process:

- ``--mode trial`` (default): per-trial overhead. The same N real evaluations (the ``latency``
  stage of one digits architecture, its repeat count tuned so one call takes ``--trial-seconds``)
  run directly through ``workers.evaluate.evaluate`` and through ``workers.ray_pool.run_trials``
  with a plan that records every trial in a SQLite store, alternating, ``--rounds`` times.
- ``--mode screen``: worker utilisation of screening. A real study that only screens (digits,
  staged strategy, all of the budget in the screen share, 2 workers) runs with one candidate per
  request (``Screen.MAX_BATCH = 1``: before batching) and with the adaptive batch (after),
  alternating, ``--rounds`` times. Utilisation = the sum of evaluate-seconds / (workers x wall).
- ``--mode demo``: the same two ways on the ``make demo`` search (3cpu-m, 2 workers, every stage).

    python bench/overhead.py [--mode trial|screen|demo] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nas.budget import parse_budget
from nas.search import Driver, SearchConfig, create_study, load_data, make_frame, run_study
from nas.search.stages import Screen
from nas.store import Store
from workers.evaluate import EvalConfig, evaluate
from workers.ray_pool import init_ray, run_trials, shutdown_ray
from workers.request import FINISH, Candidate, TrialError, TrialRequest, TrialResult


class ListPlan:
    """A plan of fixed requests, recorded by the search's own driver; notes when each is recorded."""

    def __init__(self, driver: Driver, requests: list[TrialRequest]) -> None:
        self.d, self.todo, self.marks = driver, list(requests), []  # type: list[float]

    def next(self, running: int) -> TrialRequest | str:
        return self.todo.pop(0) if self.todo else FINISH

    def started(self, request: TrialRequest, attempt: int) -> None:
        self.d.started(request, attempt)

    def finished(self, result: TrialResult) -> None:
        self.d.record_result(result)
        self.marks.append(time.perf_counter())

    def failed(self, error: TrialError) -> None:
        self.d.record_error(error)


def trial_mode(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    store = Store(f"sqlite:///{tmp / 'nas.db'}")
    create_study(store, "overhead", SearchConfig(strategy="random"), parse_budget("100000trials"))
    data = load_data(SearchConfig())
    frame = make_frame(SearchConfig(), data.in_chans, data.num_classes, data.img_size)
    spec = frame.random(3)
    # calibrate the latency repeats so that one evaluate() takes about --trial-seconds
    probe = statistics.median(evaluate(spec, "latency", data, config=EvalConfig(latency_repeats=200)).seconds
                              for _ in range(3))
    cfg = EvalConfig(latency_repeats=max(10, int(200 * args.trial_seconds / probe)))
    evaluate(spec, "latency", data, config=cfg)
    t0 = time.perf_counter()
    init_ray(num_cpus=1)
    ray_start = time.perf_counter() - t0
    import ray

    ref = ray.put(data)
    driver = Driver(store, "overhead")
    direct, tuned, per_trial, steady, start = [], [], [], [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.trials):
            evaluate(spec, "latency", data, config=cfg)
        direct.append(time.perf_counter() - t0)
        reqs = [TrialRequest(key=f"r{r}:{i}", stage="latency", stages=("latency",), eval=cfg,
                             candidates=(Candidate(f"r{r}:{i}", spec.to_json(), spec.hash),))
                for i in range(args.trials)]
        before = driver.used_seconds
        plan = ListPlan(driver, reqs)
        t0 = time.perf_counter()
        run_trials(plan, name=f"overhead{r}", data_ref=ref, workers=1, storage_path=tmp / "tune")
        tuned.append(time.perf_counter() - t0)
        per_trial.append((driver.used_seconds - before) / args.trials)
        steady.append((plan.marks[-1] - plan.marks[0]) / (len(plan.marks) - 1))
        start.append(plan.marks[0] - t0 - per_trial[-1])
        print(f"round {r}: direct {direct[-1]:.2f} s, Ray Tune + store {tuned[-1]:.2f} s "
              f"({args.trials} trials; mean trial {per_trial[-1]:.3f} s in the worker)", flush=True)
    shutdown_ray()
    rows = store.evaluations("overhead", errors=False)
    assert len(rows) == args.rounds * args.trials, f"{len(rows)} rows recorded"
    d, t = statistics.median(direct), statistics.median(tuned)
    st, dt = statistics.median(steady), d / args.trials
    out = {"trials": args.trials, "rounds": args.rounds, "direct_ms": 1e3 * dt, "tune_ms": 1e3 * t / args.trials,
           "steady_overhead_pct": 100 * (st - dt) / dt, "start_s": statistics.median(start),
           "whole_overhead_pct": 100 * (t - d) / d, "rows": len(rows), "ray_start_s": ray_start}
    print()
    print("| | figure |")
    print("|---|---|")
    print(f"| trials per round | {args.trials} (1 at a time), {args.rounds} rounds, median round |")
    print(f"| evaluate() direct, per trial | {out['direct_ms']:.0f} ms |")
    print(f"| Ray Tune + store, per trial | {out['tune_ms']:.0f} ms |")
    print(f"| overhead per trial, steady state (trial k to k+1, recorded) | {(st - dt) * 1e3:.0f} ms = "
          f"**{out['steady_overhead_pct']:.1f}%** (target <= 5%) |")
    print(f"| experiment start (worker processes, once per search) | {out['start_s']:.1f} s |")
    print(f"| overhead per trial, whole round incl. the start | {(t - d) / args.trials * 1e3:.0f} ms = "
          f"{out['whole_overhead_pct']:.1f}% |")
    print(f"| rows recorded | {len(rows)} of {args.rounds * args.trials} |")
    print(f"| Ray start-up (once per driver) | {ray_start:.1f} s |")
    return out


def _study_utilisation(url: str, name: str, cfg: SearchConfig, budget: str, batched: bool) -> dict[str, Any]:
    """Run one study (Ray already started) and measure its workers' utilisation."""
    store = Store(url)
    create_study(store, name, cfg, parse_budget(budget))
    ticks: list[float] = []
    saved = Screen.MAX_BATCH
    Screen.MAX_BATCH = saved if batched else 1
    try:
        t0 = time.perf_counter()
        run_study(store, name, progress=lambda _p: ticks.append(time.perf_counter()))
        wall = time.perf_counter() - t0
    finally:
        Screen.MAX_BATCH = saved
    evs = store.evaluations(name)
    work = sum(e.seconds for e in evs)
    # steady state: from the first recorded result to the last (the start - data, the cost probe,
    # the workers' processes, the first candidate measured alone - is a one-off per study)
    first = evs[0].id
    steady_work = sum(e.seconds for e in evs if e.id != first)
    steady_wall = ticks[-1] - ticks[0] if len(ticks) > 1 else math.nan
    by_stage: dict[str, float] = {}
    for e in evs:
        by_stage[e.stage] = by_stage.get(e.stage, 0.0) + e.seconds
    screens = [e for e in evs if e.stage == "screen" and e.error is None]
    return {"batched": batched, "wall_s": wall, "work_s": work, "utilisation": work / (cfg.workers * wall),
            "start_s": ticks[0] - t0 if ticks else math.nan,
            "steady_utilisation": min(1.0, steady_work / (cfg.workers * steady_wall)),
            "evaluations": len(evs), "screened": len(screens), "used_s": store.study(name).used_seconds,
            "mean_candidate_s": statistics.mean(e.seconds for e in screens) if screens else 0.0,
            "by_stage_s": by_stage}


def study_mode(args: argparse.Namespace, tmp: Path, demo: bool) -> dict[str, Any]:
    workers = 2
    if demo:
        cfg, budget = SearchConfig(workers=workers, seed=0), "3cpu-m"
    else:
        cfg = SearchConfig(workers=workers, seed=0, shares={"screen": 1.0, "supernet": 0.0, "latency": 0.0,
                                                             "train": 0.0})
        budget = f"{args.screen_seconds}s"
    init_ray(num_cpus=workers)
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for batched in (False, True):  # alternating, so load on the machine falls on both alike
            url = f"sqlite:///{tmp / f'u{r}{int(batched)}.db'}"
            res = _study_utilisation(url, "u", SearchConfig.from_dict({**cfg.to_dict(), "seed": r}), budget, batched)
            runs.append({"round": r, **res})
            print(f"round {r} {'after (batched)' if batched else 'before (1 per request)'}: utilisation "
                  f"{100 * res['utilisation']:.1f}%, steady {100 * res['steady_utilisation']:.1f}% after a "
                  f"{res['start_s']:.1f} s start ({res['work_s']:.1f} evaluate-s on {workers} workers in "
                  f"{res['wall_s']:.1f} s wall; {res['screened']} screened, mean {res['mean_candidate_s']:.2f} s)",
                  flush=True)
    shutdown_ray()
    before = [x["utilisation"] for x in runs if not x["batched"]]
    after = [x["utilisation"] for x in runs if x["batched"]]
    print()
    print(f"| {'make demo search (3cpu-m)' if demo else f'screening ({budget})'}, {workers} workers | before "
          f"(1 candidate per request) | after (adaptive batch) |")
    print("|---|---|---|")
    print(f"| worker utilisation, whole study, median of {args.rounds} | {100 * statistics.median(before):.1f}% | "
          f"**{100 * statistics.median(after):.1f}%** (target >= 85%) |")
    for key, label in (("steady_utilisation", "worker utilisation, first result to last"),):
        b = statistics.median(x[key] for x in runs if not x["batched"])
        a = statistics.median(x[key] for x in runs if x["batched"])
        print(f"| {label}, median | {100 * b:.1f}% | {100 * a:.1f}% |")
    for key, label in (("start_s", "start: run_study to its first result (s)"), ("screened", "candidates screened"),
                       ("wall_s", "wall seconds"),
                       ("used_s", "budget used (device-s)")):
        b = statistics.median(x[key] for x in runs if not x["batched"])
        a = statistics.median(x[key] for x in runs if x["batched"])
        print(f"| {label}, median | {b:.1f} | {a:.1f} |")
    return {"mode": "demo" if demo else "screen", "budget": budget, "workers": workers, "runs": runs,
            "utilisation_before": statistics.median(before), "utilisation_after": statistics.median(after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("trial", "screen", "demo"), default="trial")
    ap.add_argument("--trials", type=int, default=30, help="trial mode: trials per round")
    ap.add_argument("--trial-seconds", type=float, default=1.0, help="trial mode: seconds per trial")
    ap.add_argument("--screen-seconds", type=int, default=60, help="screen mode: the screening budget")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="nas-overhead-"))
    if args.mode == "trial":
        out = trial_mode(args, tmp)
    else:
        out = study_mode(args, tmp, demo=args.mode == "demo")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
