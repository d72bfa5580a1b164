"""Per-trial orchestration overhead: Ray Tune workers plus the SQL store, against calling
``workers.evaluate.evaluate`` directly, on trials of about one second.

The trial is a real evaluation (the ``latency`` stage of one digits architecture, its repeat count
tuned so that one call takes ``--trial-seconds``). Both paths run the same N trials one at a time
and are measured side by side in one process, alternating, ``--rounds`` times. The Tune path is the
search's own: ``workers.ray_tune.run_trials`` with a budget gate that records every trial in a
SQLite store in one transaction. Ray's start-up and the experiment's start (worker processes,
once per search: a whole study is one Tune experiment) are one-offs, reported apart from the
steady per-trial overhead.

    python bench/overhead.py [--trials 30] [--trial-seconds 1.0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nas.budget import parse_budget
from nas.search import Driver as _Driver
from nas.search import SearchConfig, create_study
from nas.search._driver import _Gate
from nas.store import Store
from workers.evaluate import EvalConfig, evaluate
from workers.ray_tune import ListSearcher, init_ray, run_trials, shutdown_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--trial-seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="nas-overhead-"))
    url = f"sqlite:///{tmp / 'nas.db'}"
    store = Store(url)
    create_study(store, "overhead", SearchConfig(strategy="random"), parse_budget("100000trials"))
    from nas.search import load_data, make_frame

    data = load_data(SearchConfig())
    frame = make_frame(SearchConfig(), data.in_chans, data.num_classes, data.img_size)
    spec = frame.random(3)

    # calibrate the latency repeats so that one evaluate() takes about --trial-seconds
    probe = statistics.median(evaluate(spec, "latency", data, config=EvalConfig(latency_repeats=200)).seconds
                              for _ in range(3))
    reps = max(10, int(200 * args.trial_seconds / probe))
    cfg = EvalConfig(latency_repeats=reps)
    evaluate(spec, "latency", data, config=cfg)

    t0 = time.perf_counter()
    init_ray(num_cpus=1)
    ray_start = time.perf_counter() - t0
    import ray

    ref = ray.put(data)
    driver = _Driver(store, "overhead")
    common = {"device": "cpu", "threads": 1, "eval": cfg.to_dict()}
    direct, tuned, per_trial, steady, start = [], [], [], [], []

    class Timed(_Gate):  # the search's own gate, plus when each trial's result was recorded
        def finished(self, trial: object) -> None:
            super().finished(trial)
            marks.append(time.perf_counter())

    for r in range(args.rounds):
        t0 = time.perf_counter()
        used = 0.0
        for _ in range(args.trials):
            used += evaluate(spec, "latency", data, config=cfg).seconds
        direct.append(time.perf_counter() - t0)
        configs = [{"spec": spec.to_json(), "spec_hash": spec.hash, "number": None, "key": f"r{r}:{i}",
                    "stages": ["latency"]} for i in range(args.trials)]
        before = driver.used_seconds
        marks: list[float] = []
        t0 = time.perf_counter()
        run_trials(name=f"overhead{r}", searcher=ListSearcher(configs), gate=Timed(driver, "latency", 1e12),
                   data_ref=ref, common=common, workers=1, storage_path=tmp / "tune")
        tuned.append(time.perf_counter() - t0)
        per_trial.append((driver.used_seconds - before) / args.trials)
        steady.append((marks[-1] - marks[0]) / (len(marks) - 1))
        start.append(marks[0] - t0 - per_trial[-1])
        print(f"round {r}: direct {direct[-1]:.2f} s, Ray Tune + store {tuned[-1]:.2f} s "
              f"({args.trials} trials; mean trial {per_trial[-1]:.3f} s in the worker)", flush=True)
    shutdown_ray()
    rows = store.evaluations("overhead", errors=False)
    assert len(rows) == args.rounds * args.trials, f"{len(rows)} rows recorded"
    d, t = statistics.median(direct), statistics.median(tuned)
    over = (t - d) / args.trials
    st = statistics.median(steady)
    dt = d / args.trials
    print()
    print("| | figure |")
    print("|---|---|")
    print(f"| trials per round | {args.trials} (1 at a time), {args.rounds} rounds, median round |")
    print(f"| evaluate() direct, per trial | {d / args.trials * 1e3:.0f} ms |")
    print(f"| Ray Tune + store, per trial | {t / args.trials * 1e3:.0f} ms |")
    print(f"| overhead per trial, steady state (trial k to k+1, recorded) | {(st - dt) * 1e3:.0f} ms = "
          f"**{100 * (st - dt) / dt:.1f}%** (target <= 5%) |")
    print(f"| experiment start (worker processes, once per search) | {statistics.median(start):.1f} s |")
    print(f"| overhead per trial, whole round incl. the start | {over * 1e3:.0f} ms = {100 * (t - d) / d:.1f}% |")
    print(f"| rows recorded | {len(rows)} of {args.rounds * args.trials} |")
    print(f"| Ray start-up (once per driver) | {ray_start:.1f} s |")


if __name__ == "__main__":
    main()
