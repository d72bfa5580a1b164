"""Search quality on a benchmark table, over many seeds: staged search against NSGA-II, random
search and regularized evolution (REA) on NAS-Bench-201 (Dong & Yang, ICLR 2020) with HELP's
measured latencies (Lee et al., NeurIPS 2021).

In benchmark mode (``nas search --space nb201 --benchmark LABELS``) a training is a table look-up
(accuracy from the labels CSV) charged a simulated cost, latency comes from the latency CSV's
device column, and the staged strategy's screening computes real zero-cost proxies on the data
(cached under ``--proxy-cache`` and charged at their measured cost). Each (strategy, seed) is one
study, run once with a budget of ``--budget-factor x max(--trainings) x --train-seconds`` simulated
seconds (a training's cost scales with its cell's FLOPs: some slack lets each run reach N), in its
own SQLite store ``--workdir/<device>/<strategy>-s<seed>.db`` (a completed study found there is
read back, not rerun; an unfinished one is continued). Then the first N trainings of each run,
in the order the store recorded them, are judged for every N of ``--trainings`` against the
table's true front:

- ``hv_ratio``: hypervolume of (accuracy max, latency min) of the found architectures over that
  of the table's true front; reference point: the table's 10th-percentile accuracy and
  90th-percentile latency on the device column.
- ``best_acc_at_median_latency``: best accuracy found with latency <= the table's median latency
  (null when none; the mean ignores those and ``..._nan`` counts them).
- ``trainings_to_95pct_hv``: the smallest n <= N whose first n trainings reach hv_ratio >= 0.95;
  never reached: infinite, written as the string ``"inf"`` in the JSON (also the median's value
  when at least half the seeds never got there). Any NaN is written as ``null``.
- p-values: paired one-sided exact Wilcoxon signed-rank tests over seeds, H1: staged > baseline
  on hv_ratio (``bench/_tabular_stats.py``).

A run that trained fewer than N is judged on all its trainings (``short`` in ``per_seed``).
Accuracies and latencies are read from the table by architecture (the stored accuracy must
equal the table's); a "training" is one successful train evaluation of the store (a repeated
architecture counts again but adds nothing).

    python bench/search_quality_tabular.py --labels ../shared/data/nb201_cifar10.csv \\
        --latency ../shared/data/nb201_latency_help.csv --device titan_rtx_256_ms \\
        --strategies staged,nsga2,random,rea --seeds 20 --trainings 50,100,200 --json out.json

JSON: ``{strategy: {str(N): {hv_ratio_mean, hv_ratio_std, best_acc_at_median_latency_mean,
best_acc_at_median_latency_nan, best_acc_mean, best_acc_std, trainings_to_95pct_hv_median,
short_runs, seeds, per_seed: [...]}}, "p_values": {"staged_vs_<baseline>": {str(N): p}},
"meta": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tabular_stats as ts
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("staged", "nsga2", "random", "rea")
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# the search-space field names of the benchmark mode in SearchConfig
CORE_FIELDS = ("benchmark", "benchmark_column", "benchmark_latency", "device_column", "proxy_cache",
               "benchmark_train_s")
# the NAS-Bench-201 paper's figures (Dong & Yang, ICLR 2020; CIFAR-10 test accuracy, %, mean +- std
# over runs of 12,000 s of simulated time): what the single-objective table is set next to
PAPER = {"rea": (93.92, 0.30), "random": (93.70, 0.36)}
PAPER_OPTIMUM = 94.37


class BenchError(Exception):
    """Bad input or a store that does not fit this benchmark: one line for the user, exit 2."""


# ------------------------------------------------------------------------------ one run (a process)


def _same(stored: Any, mine: Any) -> bool:
    """Stored config value equals ours, paths compared resolved (``kind:PATH`` data specs too)."""
    if stored == mine:
        return True
    if isinstance(stored, (int, float)) and isinstance(mine, (int, float)):
        return math.isclose(float(stored), float(mine), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(stored, str) and isinstance(mine, str):
        def norm(text: str) -> str:
            kind, sep, rest = text.partition(":")
            if sep and "/" not in kind and len(kind) > 1:
                return f"{kind}:{os.path.realpath(rest)}"
            return os.path.realpath(text)

        return norm(stored) == norm(mine)
    return False


def _check_stored(info: Any, cfg_kwargs: dict[str, Any], budget_s: float, db: str) -> None:
    """A study already in the store must be the one this invocation would create."""
    ignore = {"workers", "proxy_cache"}  # do not change results
    for key, mine in cfg_kwargs.items():
        if key in ignore or key not in info.config:
            continue
        if not _same(info.config[key], mine):
            raise BenchError(f"{db} holds study {info.name!r} made with {key}={info.config[key]!r}, not {mine!r}: "
                             "use another --workdir or delete that file")
    stored_s = info.budget.get("seconds")
    if stored_s is None or not math.isclose(float(stored_s), budget_s, rel_tol=1e-9):
        raise BenchError(f"{db} holds study {info.name!r} with budget {info.budget.get('text', stored_s)}, not "
                         f"{budget_s:g} s (budget factor x max trainings x train seconds): use another --workdir or "
                         "delete that file")


def _arch_string(spec: Any) -> str:
    if isinstance(spec, str):
        spec = json.loads(spec)
    if not isinstance(spec, dict) or "arch" not in spec:
        raise BenchError(f"stored architecture spec has no 'arch' key: {str(spec)[:80]!r}")
    return str(spec["arch"])


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Create (or continue, or read back) one study and return what the judge needs: the trained
    architectures in record order with their stored metrics, and the screening totals. Runs in a
    worker process; imports torch and nas here, with one torch thread."""
    import torch

    torch.set_num_threads(1)
    from nas.budget import parse_budget
    from nas.search import SearchConfig, create_study, run_study
    from nas.store import Store

    t0 = time.perf_counter()
    name, db = job["name"], job["db"]
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{db}")
    budget = parse_budget(job["budget"])
    info = store.get_study(name)
    if info is None:
        create_study(store, name, SearchConfig(**job["config"]), budget)
    else:
        _check_stored(info, job["config"], float(budget.seconds or 0.0), db)
    info = store.study(name)
    cached = info.status == "completed"
    if not cached:
        pid, host = os.getpid(), socket.gethostname()
        if not store.acquire_driver(name, pid, host):
            raise BenchError(f"study {name!r} in {db} is being run by another live process")
        try:
            run_study(store, name, executor="local")
        except BaseException:
            with contextlib.suppress(Exception):
                store.set_status(name, "failed")
            raise
        finally:
            with contextlib.suppress(Exception):
                store.release_driver(name, pid, host)
        info = store.study(name)
    arch_of: dict[str, str] = {}
    trained = []
    for ev in store.evaluations(name, stage="train", errors=False):
        if ev.arch_hash is None:
            continue
        if ev.arch_hash not in arch_of:
            row = store.architecture(ev.arch_hash)
            if row is None:
                raise BenchError(f"{db}: trained architecture {ev.arch_hash[:12]} is not in the store")
            arch_of[ev.arch_hash] = _arch_string(row["spec"])
        trained.append({"arch": arch_of[ev.arch_hash], "accuracy": ev.metrics.get("accuracy"),
                        "latency_ms": ev.metrics.get("latency_ms"), "seconds": ev.seconds})
    screened = store.evaluations(name, stage="screen", errors=False)
    return {
        "strategy": job["strategy"], "seed": job["seed"], "name": name, "db": db, "status": info.status,
        "cached": cached, "trained": trained,
        "screened": len({e.arch_hash for e in screened if e.arch_hash is not None}),
        "screen_rows": len(screened), "screen_seconds": float(sum(e.seconds for e in screened)),
        "used_seconds": float(info.used_seconds), "wall_s": time.perf_counter() - t0,
    }


def run_one_safe(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_one`, with a failure returned as ``{"error": "Type: first line"}`` (only plain
    values cross the process boundary)."""
    try:
        return run_one(job)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return {"error": f"{type(e).__name__}: {first}"}


# ----------------------------------------------------------------------------------- the judge


def judge(result: dict[str, Any], table: ts.Table, trainings: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per N, the per-seed record of one run (see ``ts.evaluate_run``) plus its screening totals.
    BenchError if a trained architecture is not in the table or its stored accuracy is not the
    table's (to 1e-6)."""
    order = []
    lat_mismatch = 0
    for t in result["trained"]:
        i = table.index.get(t["arch"])
        if i is None:
            raise BenchError(f"{result['name']}: trained arch {t['arch']!r} is not in the table")
        stored = t.get("accuracy")
        if stored is not None and abs(float(stored) - table.acc[i]) > 1e-6:
            hint = " (a fraction, not percent?)" if abs(100 * float(stored) - table.acc[i]) < 1e-4 else ""
            raise BenchError(f"{result['name']}: stored accuracy {stored} of {t['arch']} is not the table's "
                             f"{table.acc[i]}{hint}")
        lat = t.get("latency_ms")
        if lat is not None and abs(float(lat) - table.lat[i]) > 1e-6:
            lat_mismatch += 1
        order.append(i)
    extra = {"seed": result["seed"], "screened": result["screened"], "screen_seconds": result["screen_seconds"],
             "used_seconds": result["used_seconds"], "status": result["status"],
             "stored_latency_mismatches": lat_mismatch}
    return {n: {**extra, **rec} for n, rec in ts.evaluate_run(order, table, trainings).items()}


# ----------------------------------------------------------------------------------- front end


def _default_train_seconds() -> float:
    from nas.search import SearchConfig

    return float(SearchConfig.__dataclass_fields__["benchmark_train_s"].default)


def check_core(strategies: Sequence[str]) -> None:
    """BenchError unless this checkout's ``nas search`` has the benchmark mode and the strategies."""
    try:
        from nas.search import SearchConfig, strategy_names
    except ImportError as e:
        raise BenchError(f"cannot import nas.search: {e}") from None
    missing = [f for f in CORE_FIELDS if f not in SearchConfig.__dataclass_fields__]
    if missing:
        raise BenchError(f"this checkout's SearchConfig has no benchmark mode yet (missing {', '.join(missing)})")
    unknown = [s for s in strategies if s not in strategy_names()]
    if unknown:
        raise BenchError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(strategy_names())}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, help="labels CSV: index,arch,<label column>")
    ap.add_argument("--latency", required=True, help="latency CSV: index,arch,<one column per device>")
    ap.add_argument("--device", required=True, help="latency column, e.g. titan_rtx_256_ms")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, required=True, help="number of seeds: 0 .. N-1")
    ap.add_argument("--trainings", required=True, help="comma-separated training counts, e.g. 50,100,200")
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    ap.add_argument("--data", default=f"imagefolder:{SHARED_CIFAR}" if SHARED_CIFAR.is_file() else None,
                    help="data spec for the proxies (default: the shared CIFAR-10 JPEGs when present)")
    ap.add_argument("--data-limit", type=int, default=1000)
    ap.add_argument("--proxy-cache", default=".bench_cache/proxies")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="mean simulated seconds per training (default: SearchConfig().benchmark_train_s)")
    ap.add_argument("--workdir", default=".bench_cache/tabular_runs")
    ap.add_argument("--budget-factor", type=float, default=1.5,
                    help="budget = factor x max(--trainings) x train seconds: a training's simulated cost scales "
                         "with its cell's FLOPs (0.14-4x the mean), so a run needs some slack to reach N trainings")
    ap.add_argument("--label-column", default="cifar10_test_acc")
    args = ap.parse_args(argv)
    if args.data is None:
        ap.error(f"--data is required ({SHARED_CIFAR} is not here); e.g. imagefolder:PATH/cifar10-jpeg.tar.gz")
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        args.trainings = sorted({int(t) for t in args.trainings.split(",") if t.strip()})
    except ValueError:
        ap.error(f"--trainings must be comma-separated whole numbers, got {args.trainings!r}")
    if not args.trainings or args.trainings[0] < 1:
        ap.error("--trainings needs at least one count, each at least 1")
    args.strategies = list(dict.fromkeys(s.strip() for s in args.strategies.split(",") if s.strip()))
    if not args.strategies or {"meta", "p_values"} & set(args.strategies):
        ap.error("--strategies must name strategies, e.g. staged,nsga2,random,rea")
    if not (math.isfinite(args.budget_factor) and args.budget_factor >= 1.0):
        ap.error(f"--budget-factor must be at least 1, got {args.budget_factor}")
    if args.train_seconds is not None and not (math.isfinite(args.train_seconds) and args.train_seconds > 0):
        ap.error(f"--train-seconds must be a positive number, got {args.train_seconds}")
    return args


def make_jobs(args: argparse.Namespace, train_s: float) -> list[dict[str, Any]]:
    budget_s = args.budget_factor * max(args.trainings) * train_s
    jobs = []
    for seed in range(args.seeds):
        for strat in args.strategies:
            name = f"{strat}-s{seed}"
            config = {"space": "nb201", "data": args.data, "data_limit": args.data_limit,
                      "benchmark": str(Path(args.labels).resolve()), "benchmark_column": args.label_column,
                      "benchmark_latency": str(Path(args.latency).resolve()), "device_column": args.device,
                      "strategy": strat, "seed": seed, "proxy_cache": str(Path(args.proxy_cache).resolve()),
                      "benchmark_train_s": train_s, "workers": 1}
            jobs.append({"strategy": strat, "seed": seed, "name": name, "config": config, "budget": f"{budget_s!r}s",
                         "db": str((Path(args.workdir) / args.device / f"{name}.db").resolve())})
    return jobs


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def run_all(jobs: list[dict[str, Any]], n_procs: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job, ``n_procs`` at a time (spawned processes; in this process when 1), printing a
    line as each finishes. Returns (results, failure lines)."""
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    total = len(jobs)

    def report(job: dict[str, Any], res: dict[str, Any]) -> None:
        k = len(results) + len(failures) + 1
        if "error" in res:
            line = f"{job['name']}: FAILED {res['error']}"
            failures.append(line)
            print(f"[{k}/{total}] {line}", flush=True)
            return
        results.append(res)
        how = "read back" if res["cached"] else f"{res['wall_s']:.1f} s wall"
        print(f"[{k}/{total}] {res['name']}: {len(res['trained'])} trainings, {res['screened']} screened "
              f"({res['screen_seconds']:.1f} s), {res['used_seconds']:.0f} s used, {res['status']}, {how}", flush=True)

    if n_procs == 1:
        _init_worker()
        for job in jobs:
            report(job, run_one_safe(job))
        return results, failures
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=n_procs, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        pending: dict[Future[dict[str, Any]], dict[str, Any]] = {pool.submit(run_one_safe, j): j for j in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    exc = fut.exception()  # the process itself died (BrokenProcessPool)
                    report(job, {"error": f"{type(exc).__name__}: {exc}"} if exc else fut.result())
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results, failures


# ----------------------------------------------------------------------------------- reporting


def _fmt(v: float, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def print_tables(summary: dict[str, dict[str, dict[str, Any]]], p_values: dict[str, dict[str, float]],
                 meta: dict[str, Any], strategies: Sequence[str], trainings: Sequence[int]) -> None:
    print()
    print(f"{meta['device']} / {meta['label_column']}: true front of {meta['true_front_size']} architectures, "
          f"HV {meta['true_hv']:.3f} from the reference point ({meta['reference_point'][0]:.2f} %, "
          f"{meta['reference_point'][1]:.3f} ms); median latency {meta['median_latency_ms']:.3f} ms, table optimum "
          f"under it {meta['table_best_acc_at_median_latency']:.2f} %")
    print(f"{meta['seeds']} seeds, {meta['train_seconds']:g} simulated s per training, budget "
          f"{meta['budget_seconds']:g} s per run; p: one-sided exact Wilcoxon signed-rank, staged > that strategy")
    print()
    print("| strategy | trainings | HV ratio (mean ± std) | best acc @ median lat (mean) | trainings to 95% HV "
          "(median) | short runs | p (staged >) |")
    print("|---|---|---|---|---|---|---|")
    for strat in strategies:
        for n in trainings:
            s = summary.get(strat, {}).get(str(n))
            if s is None:
                continue
            p = p_values.get(f"staged_vs_{strat}", {}).get(str(n))
            nan = f" ({s['best_acc_at_median_latency_nan']} none)" if s["best_acc_at_median_latency_nan"] else ""
            print(f"| {strat} | {n} | {_fmt(s['hv_ratio_mean'])} ± {_fmt(s['hv_ratio_std'])} | "
                  f"{_fmt(s['best_acc_at_median_latency_mean'], '.2f')}{nan} | "
                  f"{_fmt(s['trainings_to_95pct_hv_median'], '.0f')} | {s['short_runs']}/{s['seeds']} | "
                  f"{_fmt(p, '.4f') if p is not None else '—'} |")
    n_max = max(trainings)
    print()
    print(f"Single objective: best {meta['label_column']} found within {n_max} trainings (%, mean ± std over seeds), "
          "next to the NAS-Bench-201 paper's figures")
    print()
    print(f"| strategy | this benchmark ({n_max} trainings × {meta['train_seconds']:g} s) | "
          "paper: Dong & Yang, ICLR 2020, CIFAR-10 test (12,000 s simulated; different budget) |")
    print("|---|---|---|")
    for strat in strategies:
        s = summary.get(strat, {}).get(str(n_max))
        if s is None:
            continue
        paper = PAPER.get(strat)
        print(f"| {strat} | {_fmt(s['best_acc_mean'], '.2f')} ± {_fmt(s['best_acc_std'], '.2f')} | "
              f"{f'{paper[0]:.2f} ± {paper[1]:.2f}' if paper else '—'} |")
    print(f"| table optimum | {meta['table_best_acc']:.2f} | {PAPER_OPTIMUM:.2f} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        table = ts.load_table(args.labels, args.latency, args.label_column, args.device)
        check_core(args.strategies)
    except (ValueError, BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_s = args.train_seconds if args.train_seconds is not None else _default_train_seconds()
    jobs = make_jobs(args, train_s)
    print(f"{len(jobs)} runs ({len(args.strategies)} strategies × {args.seeds} seeds), {args.jobs} at a time; "
          f"stores under {Path(args.workdir) / args.device}", flush=True)
    results, failures = run_all(jobs, args.jobs)

    per_seed: dict[str, dict[int, list[dict[str, Any]]]] = {s: {n: [] for n in args.trainings}
                                                            for s in args.strategies}
    for res in sorted(results, key=lambda r: (r["strategy"], r["seed"])):
        try:
            judged = judge(res, table, args.trainings)
        except BenchError as e:
            failures.append(f"not judged: {e}")
            print(f"NOT JUDGED: {e}", flush=True)
            continue
        for n, rec in judged.items():
            per_seed[res["strategy"]][n].append(rec)
    summary = {s: {str(n): ts.summarise(recs) for n, recs in by_n.items() if recs} for s, by_n in per_seed.items()}
    p_values = ts.paired_p_values(per_seed, reference="staged")

    front = ts.true_front(table)
    med = ts.median_latency(table)
    runs_of = {s: [r for r in results if r["strategy"] == s] for s in args.strategies}

    def mean_of(strat: str, key: str) -> float:
        vals = [float(len(r[key])) if isinstance(r[key], list) else float(r[key]) for r in runs_of[strat]]
        return float(np.mean(vals)) if vals else math.nan

    meta = {
        "device": args.device, "label_column": args.label_column,
        "labels": str(Path(args.labels).resolve()), "latency": str(Path(args.latency).resolve()),
        "table_size": len(table), "reference_point": list(ts.reference_point(table)),
        "true_hv": ts.true_hv(table), "true_front_size": int(front.size),
        "true_front": [{"arch": table.arch[i], "acc": float(table.acc[i]), "latency_ms": float(table.lat[i])}
                       for i in front],
        "median_latency_ms": med, "table_best_acc_at_median_latency": ts.best_acc_under(np.arange(len(table)), table),
        "table_best_acc": float(table.acc.max()),
        "seeds": args.seeds, "seed_list": list(range(args.seeds)), "trainings": args.trainings,
        "train_seconds": train_s, "budget_seconds": args.budget_factor * max(args.trainings) * train_s,
        "data": args.data, "data_limit": args.data_limit, "workdir": str(Path(args.workdir).resolve()),
        "strategies": {s: {"runs": len(runs_of[s]), "screened_mean": mean_of(s, "screened"),
                           "screen_seconds_mean": mean_of(s, "screen_seconds"),
                           "trainings_mean": mean_of(s, "trained"), "used_seconds_mean": mean_of(s, "used_seconds"),
                           "wall_s_mean": mean_of(s, "wall_s")}
                       for s in args.strategies},
        "failures": failures, "wall_s": time.perf_counter() - t_start,
        "json_conventions": "inf (never reached) is the string 'inf'; NaN (none) is null",
        "paper_anchors": {"source": "Dong & Yang, NAS-Bench-201, ICLR 2020, CIFAR-10 test accuracy, 12,000 s "
                          "simulated time", "rea": list(PAPER["rea"]), "random": list(PAPER["random"]),
                          "optimum": PAPER_OPTIMUM},
    }
    out = {**summary, "p_values": p_values, "meta": meta}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(ts.json_safe(out), indent=1, allow_nan=False) + "\n")
    print_tables(summary, p_values, meta, args.strategies, args.trainings)
    print()
    print(f"wrote {args.json}")
    if failures:
        print(f"{len(failures)} run(s) failed or were not judged:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
