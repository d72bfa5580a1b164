"""Whether the train stage's early stopping (ASHA) keeps the right candidates, measured on HybridBench.

Until session 13 the staged search trained its final candidates from scratch under ASHA
(asynchronous successive halving; Li et al., "A System for Massively Parallel Hyperparameter
Tuning", MLSys 2020): at rungs ``grace``, ``grace * eta``, ... epochs, a training below the top
``1/eta`` of those recorded there stops. That pays only if an early epoch's accuracy predicts the
last one. HybridBench recorded every training's learning curve (accuracy on 2,000 class-balanced
test images after each of its 10 epochs, ``bench/data/hybridbench_c10_v1_runs.jsonl``), so this
replays the stage on those curves with the search's own scheduler (``workers.request.Asha``) and
compares it, at equal cost, with training every candidate to the end.

The replay: each seed draws a pool of ``--pool`` rows and orders them as the search does (the
supernet's non-dominated order of inherited accuracy and CPU latency; ``--order random`` for a
random order). ``--workers`` workers take candidates in that order; an epoch costs a tenth of the
architecture's measured seconds (its seed-0 training, ``train_seconds_s0``). Each epoch's curve
value is reported to the judge, and the study ends when the next epoch would overrun the budget
(``--budgets``: shares of the cost of training the whole pool).

What the study delivers is every candidate with an accuracy, at its last epoch's: the final one
for a finished training, the one it stopped at otherwise. Every accuracy here is the curve's, on
the same 2,000 images, so that a stopped training's noisier estimate is not scored against
finished ones on 10,000. Scores, per budget:
- the hypervolume of the delivered (accuracy up, CPU latency at batch 1 down) front, as a share
  of the pool's (reference point: the pool's median accuracy and 90th-percentile latency, as in
  ``hybridbench_guided.py``);
- the best delivered accuracy's shortfall against the pool's best.
Differences against ``none`` (no early stopping) are paired by seed, with standard errors.

``--short-runs`` (default ``bench/data/hybridbench_c10_v1_e5_runs.jsonl``, when it exists) asks
the other way to spend less per candidate: the same recipe with fewer epochs and its own
schedule. It prints how well those runs rank seed 1's 10-epoch accuracy on the rows they cover,
against seed 0's 10-epoch run (the noise ceiling), with the paired bootstrap standard error; and
beside them the same epoch of seed 0's 10-epoch curve and the ``--variant`` supernet.

Policies:
- ``none``: every training runs to the end (the search's default since session 13);
- ``g<grace>e<eta>``: the search's scheduler with that grace and eta (``g1e2`` is the search's
  ``--early-stop asha``);
- ``p<grace>e<eta>``: the same rungs ranked by non-dominated sorting of (accuracy, latency), after
  MO-ASHA (Schmucker et al., "Multi-objective Asynchronous Successive Halving", 2021), so that a
  fast, less accurate candidate is not stopped for being small.

    .venv/bin/python bench/hybridbench_asha.py                       # 9 policies, 20 seeds
    .venv/bin/python bench/hybridbench_asha.py --policies none,g1e2,g2e3 --json out.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hybridbench import runs_file  # noqa: E402
from hybridbench_guided import pool_reference  # noqa: E402
from hybridbench_ranking import DEFAULT_SUPERNETS, DEFAULT_TABLE, paired_difference, read_table  # noqa: E402

from nas.search._driver import _nd_order  # noqa: E402
from predictors.metrics import hypervolume, kendall_tau  # noqa: E402
from workers.request import Asha  # noqa: E402

DEFAULT_POLICIES = "none,g1e2,g2e2,g3e2,g4e2,g5e2,g3e3,p1e2,p3e2"
DEFAULT_SHORT = ROOT / "bench" / "data" / "hybridbench_c10_v1_e5_runs.jsonl"


class ParetoAsha(Asha):
    """ASHA's rungs, each ranked by non-dominated sorting of (accuracy up, latency down), then
    accuracy within a front (a simple form of MO-ASHA, Schmucker et al. 2021): a training stops
    unless it lands in the first ``1/eta`` of that order, itself included."""

    def __init__(self, max_t: int, grace: int, eta: int, latency: dict[str, float]) -> None:
        super().__init__(max_t, grace=grace, eta=eta)
        self.latency = latency

    def below(self, before: dict[str, float], key: str, accuracy: float) -> bool:
        rung = {**before, key: accuracy}
        order = _nd_order([(k, [a, self.latency[k]]) for k, a in rung.items()], [False, True])
        return order.index(key) >= math.ceil(len(rung) / self.eta)


def parse_policy(name: str, epochs: int) -> tuple[str, int, int] | None:
    """``none`` -> None; ``g<grace>e<eta>`` / ``p<grace>e<eta>`` -> (kind, grace, eta), with
    1 <= grace < epochs and eta >= 2."""
    if name == "none":
        return None
    try:
        g, e = name[1:].split("e")
        grace, eta = int(g), int(e)
    except ValueError:
        raise ValueError(f"policy {name!r} is not none, g<grace>e<eta> or p<grace>e<eta>, e.g. g2e2") from None
    if not (name[:1] in ("g", "p") and 1 <= grace < epochs and eta >= 2):
        raise ValueError(f"policy {name!r}: grace must be 1..{epochs - 1} and eta at least 2")
    return name[0], grace, eta


def replay(order: list[int], curves: np.ndarray, lat: np.ndarray, epoch_s: np.ndarray, budget: float,
           policy: tuple[str, int, int] | None, workers: int) -> tuple[dict[int, float], float, int]:
    """Train ``order``'s rows epoch by epoch on ``workers`` asynchronous workers until ``budget``
    seconds are spent. Returns (delivered accuracy per row that has one, seconds spent, trainings
    stopped by the judge). A training the budget interrupts keeps its last finished epoch."""
    epochs = curves.shape[1]
    judge: Asha | None = None
    if policy is not None:
        kind, grace, eta = policy
        judge = (Asha(epochs, grace=grace, eta=eta) if kind == "g" else
                 ParetoAsha(epochs, grace, eta, {str(r): float(lat[r]) for r in order}))
    delivered: dict[int, float] = {}
    spent, stopped = 0.0, 0
    queue = list(order)
    # each worker's next epoch end: (time, worker, row, epoch)
    events: list[tuple[float, int, int, int]] = []

    def start(now: float, w: int) -> None:
        if queue:
            row = queue.pop(0)
            heapq.heappush(events, (now + epoch_s[row], w, row, 1))

    for w in range(workers):
        start(0.0, w)
    while events:
        now, w, row, ep = heapq.heappop(events)
        if spent + epoch_s[row] > budget:  # the budget cannot pay this epoch: the study ends here
            break
        spent += epoch_s[row]
        acc = float(curves[row, ep - 1])
        if ep == epochs:
            delivered[row] = acc
            start(now, w)
        elif judge is not None and judge.report(str(row), ep, acc):
            delivered[row], stopped = acc, stopped + 1
            start(now, w)
        else:
            delivered[row] = acc  # what the study holds if the budget ends before its next epoch
            heapq.heappush(events, (now + epoch_s[row], w, row, ep + 1))
    return delivered, spent, stopped


def score(delivered: dict[int, float], pool: list[int], final: np.ndarray, lat: np.ndarray,
          reference: tuple[list[float], float]) -> tuple[float, float]:
    """(hypervolume share of the delivered front, best delivered accuracy's shortfall to the pool's
    best); ``reference``: the pool's :func:`hybridbench_guided.pool_reference`."""
    ref, whole = reference
    rows = sorted(delivered)
    pts = np.c_[[delivered[r] for r in rows], lat[rows]] if rows else np.zeros((0, 2))
    hv = hypervolume(pts, ref, [False, True]) if rows else 0.0
    best = max(delivered.values()) if delivered else float(final[pool].min())
    return hv / whole, float(final[pool].max()) - best


def short_runs(path: Path, rows: list[dict[str, Any]], curves: np.ndarray, sup: np.ndarray,
               resamples: int = 2000) -> dict[str, Any]:
    """How trainings of fewer epochs (``path``: runs of one shorter recipe, seed 0) rank seed 1's
    10-epoch accuracy, beside seed 0's 10-epoch run, its curve at the same epoch and the supernet."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_hash = {r["hash"]: r for r in runs if r["seed"] == 0}
    idx = [i for i, r in enumerate(rows) if r["hash"] in by_hash and "test_acc_s1" in r]
    if len(idx) < 3:
        raise ValueError(f"{path} covers {len(idx)} rows with a second seed; at least 3 are needed")
    epochs = {int(by_hash[rows[i]["hash"]]["recipe"]["epochs"]) for i in idx}
    if len(epochs) != 1 or not 1 <= next(iter(epochs)) <= curves.shape[1]:
        raise ValueError(f"{path} must hold runs of one recipe of 1-{curves.shape[1]} epochs, has {sorted(epochs)}")
    e = next(iter(epochs))
    short = np.array([by_hash[rows[i]["hash"]]["test_acc"] for i in idx], dtype=float)
    full = np.array([rows[i]["test_acc_s0"] for i in idx], dtype=float)
    truth = np.array([rows[i]["test_acc_s1"] for i in idx], dtype=float)
    diff, se = paired_difference(short, full, truth, resamples, seed=0)
    return {"rows": len(idx), "epochs": e, "tau_short": kendall_tau(short, truth),
            "tau_full": kendall_tau(full, truth), "diff": [diff, se],
            "tau_curve_same_epoch": kendall_tau(curves[idx, e - 1], truth),
            "tau_supernet": kendall_tau(sup[idx], truth),
            "seconds_short": float(sum(by_hash[rows[i]["hash"]]["train_seconds"] for i in idx))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(DEFAULT_TABLE))
    ap.add_argument("--supernets", default=str(DEFAULT_SUPERNETS), help="inherited accuracies per supernet attempt")
    ap.add_argument("--variant", default="spos4", help="the supernet whose order the candidates arrive in")
    ap.add_argument("--order", choices=("supernet", "random"), default="supernet")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="none and g<grace>e<eta>, comma-separated")
    ap.add_argument("--pool", type=int, default=120, help="rows in each seed's pool")
    ap.add_argument("--budgets", default="0.1,0.2,0.3,0.5",
                    help="budgets as shares of the cost of training the whole pool, comma-separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--short-runs", default=str(DEFAULT_SHORT) if DEFAULT_SHORT.is_file() else None,
                    help="runs of a shorter recipe (seed 0) to compare with the 10-epoch ones")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    table = Path(args.table)
    rows = read_table(table)
    by_hash = {r["hash"]: i for i, r in enumerate(rows)}
    runs = [json.loads(line) for line in runs_file(table).read_text().splitlines() if line.strip()]
    seed0 = {r["hash"]: r for r in runs if r["seed"] == 0 and r["hash"] in by_hash}
    if len(seed0) != len(rows):
        ap.error(f"{runs_file(table)} has seed-0 curves for {len(seed0)} of the table's {len(rows)} rows; "
                 "run bench/hybridbench.py table first")
    curves = np.array([seed0[r["hash"]]["curve"] for r in rows], dtype=float)
    epochs = curves.shape[1]
    try:
        policies = {p: parse_policy(p, epochs) for p in args.policies.split(",")}
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if "none" not in policies:
        ap.error("--policies must include none, the reference the others are paired against")
    if not all(0 < b <= 1 for b in budgets):
        ap.error(f"--budgets must be shares in (0, 1], got {args.budgets}")
    if not len(rows) >= args.pool >= 2:
        ap.error(f"--pool must be between 2 and the table's {len(rows)} rows, got {args.pool}")
    if args.seeds < 2:
        ap.error(f"--seeds must be at least 2 (the paired standard errors need two), got {args.seeds}")
    if args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    supernets = json.loads(Path(args.supernets).read_text())
    key = args.variant if "/" in args.variant else f"{args.variant}/ft0"
    if key not in supernets:
        ap.error(f"no supernet {args.variant!r} in {args.supernets}; it has: "
                 f"{', '.join(sorted({k.split('/')[0] for k in supernets}))}")
    sup = np.array([supernets[key][r["hash"]] for r in rows], dtype=float)
    final = curves[:, -1]  # the accuracy a finished training delivers, on the curve's images
    lat = np.array([r["lat_cpu_b1_ms"] for r in rows], dtype=float)
    epoch_s = np.array([r["train_seconds_s0"] for r in rows], dtype=float) / epochs
    full = np.array([r["test_acc_s0"] for r in rows], dtype=float)
    taus = [kendall_tau(curves[:, k], full) for k in range(epochs)]
    print(f"Kendall tau of each epoch's accuracy (2,000 test images) with the final one (10,000), "
          f"{len(rows)} trainings: " + ", ".join(f"{k + 1}: {t:.2f}" for k, t in enumerate(taus)))

    res: dict[str, Any] = {"pool": args.pool, "seeds": args.seeds, "workers": args.workers, "order": args.order,
                           "variant": args.variant, "epochs": epochs, "tau_epoch_final": taus, "budgets": {}}
    if args.short_runs:
        try:
            sh = short_runs(Path(args.short_runs), rows, curves, sup)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--short-runs {args.short_runs}: {e}")
        res["short_runs"] = sh
        print(f"Trainings of {sh['epochs']} epochs ({sh['rows']} rows, seed 0, {Path(args.short_runs).name}) "
              f"rank seed 1's "
              f"{epochs}-epoch accuracy at tau {sh['tau_short']:.3f}, against {sh['tau_full']:.3f} for seed 0's "
              f"{epochs}-epoch run (paired {sh['diff'][0]:+.3f}, se {sh['diff'][1]:.3f}); epoch {sh['epochs']} of "
              f"that run {sh['tau_curve_same_epoch']:.3f}; supernet {args.variant} {sh['tau_supernet']:.3f}")
    for b in budgets:
        per: dict[str, list[tuple[float, float, float, int, int]]] = {p: [] for p in policies}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            pool = sorted(rng.choice(len(rows), args.pool, replace=False).tolist())
            if args.order == "supernet":
                order = _nd_order([(i, [sup[i], lat[i]]) for i in pool], [False, True])
            else:
                order = [pool[i] for i in rng.permutation(len(pool))]
            cost = b * float(epoch_s[pool].sum()) * epochs
            reference = pool_reference(final, lat, pool)  # one pool, every policy
            for name, pol in policies.items():
                got, spent, stopped = replay(order, curves, lat, epoch_s, cost, pol, args.workers)
                hv, short = score(got, pool, final, lat, reference)
                per[name].append((hv, short, spent / cost, len(got), stopped))
        out: dict[str, Any] = {}
        ref = per["none"]
        print(f"\nbudget {b:g} of the pool's full cost ({args.pool} rows, {args.seeds} seeds, {args.order} order):")
        print(f"  {'policy':>7} {'hv share':>9} {'best short':>11} {'trained':>8} {'stopped':>8}"
              f"   hv - none (se)      best short - none (se)")
        for name, vals in per.items():
            a = np.array(vals, dtype=float)
            d_hv = a[:, 0] - np.array(ref)[:, 0]
            d_sh = a[:, 1] - np.array(ref)[:, 1]
            se = math.sqrt(len(a))
            out[name] = {"hv": float(a[:, 0].mean()), "best_short": float(a[:, 1].mean()),
                         "spent_share": float(a[:, 2].mean()), "trained": float(a[:, 3].mean()),
                         "stopped": float(a[:, 4].mean()),
                         "hv_diff": [float(d_hv.mean()), float(d_hv.std(ddof=1) / se)],
                         "best_short_diff": [float(d_sh.mean()), float(d_sh.std(ddof=1) / se)]}
            o = out[name]
            print(f"  {name:>7} {o['hv']:9.3f} {o['best_short']:11.4f} {o['trained']:8.1f} {o['stopped']:8.1f}"
                  f"   {o['hv_diff'][0]:+.4f} ({o['hv_diff'][1]:.4f})   {o['best_short_diff'][0]:+.4f} "
                  f"({o['best_short_diff'][1]:.4f})")
        res["budgets"][f"{b:g}"] = out
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
