"""Search quality at an equal budget: hypervolume of accuracy against latency for the staged
search, and the baselines with short training: plain NSGA-II, regularized evolution (REA) and
random search.

Each strategy runs as a real study (``nas.search.run_study``, Ray Tune workers, SQLite store) on
the same space, data, budget and seed. The fronts are then judged by one common protocol, so that
no strategy is judged by its own estimates: every front architecture is retrained from scratch for
``--ref-epochs`` on the whole training split and scored on the held-out TEST split (never seen by
any search), and its latency is measured again, in this process, one architecture after another.
The hypervolume is taken over (test accuracy, latency) with both scaled to [0, 1] over every
judged architecture of the run and the reference point 10% beyond the worst ("normalised"), and
also over (test error, latency / slowest) with the reference point (1, 1.1) ("raw").

    python bench/search_quality.py [--budget 3cpu-m] [--data digits] [--seeds 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nas.budget import parse_budget
from nas.data import load
from nas.search import SearchConfig, create_study, parse_shares, run_study
from nas.store import Store
from predictors.latency import measure
from predictors.metrics import hypervolume
from predictors.supernet import TrainConfig, accuracy, train_standalone
from search_spaces import ArchSpec
from workers.ray_pool import init_ray, shutdown_ray

STRATEGIES = ("staged", "nsga2", "rea", "random")


def ground_truth(spec: ArchSpec, train: Any, test: Any, epochs: int, seed: int) -> tuple[float, float]:
    """Test accuracy after ``epochs`` of training from scratch, and median latency (batch 1)."""
    cfg = TrainConfig(batch_size=64, lr=2e-3, warmup_epochs=1.0, augment=False, seed=seed)
    model = train_standalone(spec, train, epochs, config=cfg, num_classes=int(train.y.max()) + 1)
    acc = accuracy(model, test, batch_size=256)
    lat = measure(model, tuple(train.x.shape[1:]), "cpu", precision=spec.precision, batch_size=1, warmup=10,
                  repeats=100, threads=1).median_ms
    return acc, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="3cpu-m")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seeds", default="0", help="comma-separated search seeds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train-epochs", type=int, default=4, help="short training inside every strategy")
    ap.add_argument("--ref-epochs", type=int, default=8, help="the common judging protocol")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--out", default="", help="directory for the stores (default: a temp dir)")
    ap.add_argument("--stages", default="", help="budget shares of the staged search, e.g. screen=0.1,train=0.6")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="nas-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    budget = parse_budget(args.budget)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    init_ray(num_cpus=args.workers)
    fronts: dict[tuple[str, int], list[dict[str, Any]]] = {}
    evals: dict[tuple[str, int], int] = {}
    wall: dict[tuple[str, int], float] = {}
    for seed in seeds:
        for strat in strategies:
            url = f"sqlite:///{out / f'{strat}-{seed}.db'}"
            store = Store(url)
            name = f"{strat}-{seed}"
            if store.get_study(name) is None:
                extra = {"shares": parse_shares(args.stages)} if args.stages and strat == "staged" else {}
                create_study(store, name, SearchConfig(data=args.data, strategy=strat, seed=seed,
                                                       workers=args.workers, train_epochs=args.train_epochs,
                                                       **extra), budget)
            t0 = time.perf_counter()
            if store.study(name).status != "completed":
                run_study(store, name)
            wall[(strat, seed)] = time.perf_counter() - t0
            fronts[(strat, seed)] = store.front(name)
            info = store.study(name)
            evals[(strat, seed)] = info.trials_done
            print(f"{name}: {info.trials_done} evaluations, {info.used_seconds:.0f} device-s, "
                  f"front of {len(fronts[(strat, seed)])}, wall {wall[(strat, seed)]:.0f} s", flush=True)
    shutdown_ray()

    # the common judge
    cfg = SearchConfig(data=args.data)
    from nas.search import load_data

    img = load_data(cfg).img_size
    train = load(args.data, "train", img_size=img)
    test = load(args.data, "test", img_size=img)
    cache_file = out / "ground_truth.json"
    cache: dict[str, list[float]] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    for rows in fronts.values():
        for r in rows:
            h = r["arch_hash"]
            if h not in cache:
                spec = ArchSpec.from_json(r["spec"] if isinstance(r["spec"], str) else json.dumps(r["spec"]))
                cache[h] = list(ground_truth(spec, train, test, args.ref_epochs, seed=0))
                cache_file.write_text(json.dumps(cache))
    judged = [cache[r["arch_hash"]] for rows in fronts.values() for r in rows]
    a_lo, a_hi = min(v[0] for v in judged), max(v[0] for v in judged)
    l_lo, l_hi = min(v[1] for v in judged), max(v[1] for v in judged)
    hv: dict[tuple[str, int], float] = {}
    hv_raw: dict[tuple[str, int], float] = {}
    for key, rows in fronts.items():
        vals = [cache[r["arch_hash"]] for r in rows]
        # normalised: both objectives scaled to [0, 1] over every judged architecture of the run,
        # reference point 10% beyond the worst (the usual multi-objective NAS convention)
        pts = [[(a_hi - a) / max(a_hi - a_lo, 1e-12), (t - l_lo) / max(l_hi - l_lo, 1e-12)] for a, t in vals]
        hv[key] = hypervolume(pts, ref=[1.1, 1.1], minimize=[True, True]) if pts else 0.0
        raw = [[1.0 - a, t / l_hi] for a, t in vals]  # error and latency / slowest, reference (1, 1.1)
        hv_raw[key] = hypervolume(raw, ref=[1.0, 1.1], minimize=[True, True]) if raw else 0.0

    print()
    print(f"budget {budget} per strategy on {args.data}, {args.workers} workers, short training "
          f"{args.train_epochs} epochs; judged by {args.ref_epochs}-epoch retraining on the test split")
    print()
    print("| strategy | seed | evaluations | front size | best test acc | fastest ms | HV normalised | HV raw |")
    print("|---|---|---|---|---|---|---|---|")
    for (strat, seed), rows in fronts.items():
        accs = [cache[r["arch_hash"]][0] for r in rows]
        lats = [cache[r["arch_hash"]][1] for r in rows]
        print(f"| {strat} | {seed} | {evals[(strat, seed)]} | {len(rows)} | {max(accs, default=0):.4f} | "
              f"{min(lats, default=0):.3f} | {hv[(strat, seed)]:.4f} | {hv_raw[(strat, seed)]:.4f} |")
    mean = {s: statistics.mean(hv[(s, sd)] for sd in seeds) for s in strategies}
    raw = {s: statistics.mean(hv_raw[(s, sd)] for sd in seeds) for s in strategies}
    print()
    for base, target in (("random", 1.2), ("nsga2", 1.1)):
        if "staged" in mean and base in mean and mean[base] > 0:
            print(f"staged / {base}: **{mean['staged'] / mean[base]:.3f}x** normalised, "
                  f"{raw['staged'] / raw[base]:.3f}x raw (target >= {target}x)")


if __name__ == "__main__":
    main()
