"""Which candidates the staged search trains next, measured on HybridBench's ground truth.

hybrid_vit's staged search trains the supernet's best candidates first (the non-dominated order of
inherited accuracy and latency), then, while budget is left, refill rounds of 8 more. This replays
that loop on the committed table (``bench/data/hybridbench_c10_v1.csv``), where every candidate's
trained accuracy is known, and compares two ways of picking the refill rounds:

- ``supernet``: the supernet's order, continued (the search's picks before session 12);
- ``guided``: the search's picks now (``nas.search.guided.refill_order``): once
  ``GUIDE_AFTER`` candidates are trained, expected hypervolume improvement under a GP of the
  trained accuracies on mixer fractions, log FLOPs and inherited accuracy, 8 at a time with
  kriging believer (``guided_order``);
- ``control``: the same GP given log FLOPs and inherited accuracy only, which tells whether the
  labels help through the mixer families or through the batch picking itself.

Each seed draws a pool of ``--pool`` rows (a screened front's worth); every policy trains the same
first 24 (the search's first pass). After each round it scores the trained candidates by
(trained accuracy up, CPU latency at batch 1 down): the hypervolume as a share of the whole pool's
(reference point: the pool's median accuracy and 90th-percentile latency, the region a user
wants), and the share of the pool's true Pareto front already trained. Differences are paired by
seed, with their standard errors.

    .venv/bin/python bench/hybridbench_guided.py                 # spos4 and spos4_s1, 20 seeds
    .venv/bin/python bench/hybridbench_guided.py --variants nodistill --seeds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hybridbench_ranking import DEFAULT_SUPERNETS, DEFAULT_TABLE, read_table  # noqa: E402

from nas.search._driver import FIRST_TRAIN, REFILL, _nd_order  # noqa: E402
from nas.search.guided import GUIDE_AFTER, REF_QUANTILES, guided_order, hybrid_features  # noqa: E402
from predictors.metrics import hypervolume, pareto_front  # noqa: E402

FIRST = FIRST_TRAIN  # the planned pass's training: the top of the supernet's order
POLICIES = ("supernet", "guided", "control")


def pool_reference(acc: np.ndarray, lat: np.ndarray, pool: list[int]) -> tuple[list[float], float]:
    """The reference point the replays score a pool by (its median accuracy, 90th-percentile
    latency: the region a user wants) and the hypervolume of the whole pool's front above it."""
    ref = [float(np.median(acc[pool])), float(np.percentile(lat[pool], 90))]
    return ref, hypervolume(np.c_[acc[pool], lat[pool]], ref, [False, True])


def replay(pool: list[int], policy: str, sup: np.ndarray, acc: np.ndarray, lat: np.ndarray, x: np.ndarray,
           budget: int, guide_after: int = GUIDE_AFTER) -> dict[int, tuple[float, float]]:
    """Train ``pool``'s rows as ``policy`` picks them, FIRST then rounds of REFILL, up to ``budget``;
    per round (trained count): (hypervolume share, share of the true front trained)."""
    order = _nd_order([(i, [sup[i], lat[i]]) for i in pool], [False, True])
    ref, whole = pool_reference(acc, lat, pool)
    true_front = {pool[i] for i in pareto_front(np.c_[acc[pool], lat[pool]], minimize=[False, True])}
    trained = list(order[:FIRST])
    out: dict[int, tuple[float, float]] = {}
    while len(trained) < min(budget, len(pool)):
        todo = [i for i in order if i not in trained]
        if policy == "supernet" or len(trained) < guide_after:
            picks = todo[:REFILL]
        else:
            ref_lat = float(np.percentile(lat[trained + todo], REF_QUANTILES[1]))
            idx = guided_order(x[trained], 100 * acc[trained], lat[trained], x[todo], lat[todo], ref_lat, REFILL)
            picks = [todo[j] for j in idx]
        trained += picks
        hv = hypervolume(np.c_[acc[trained], lat[trained]], ref, [False, True])
        out[len(trained)] = (hv / whole, len(true_front & set(trained)) / len(true_front))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(DEFAULT_TABLE))
    ap.add_argument("--supernets", default=str(DEFAULT_SUPERNETS), help="inherited accuracies per supernet attempt")
    ap.add_argument("--variants", default="spos4,spos4_s1", help="supernet attempts, comma-separated")
    ap.add_argument("--pool", type=int, default=120, help="rows in each seed's pool")
    ap.add_argument("--budget", type=int, default=80, help="trainings per replay")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--guide-after", type=int, default=GUIDE_AFTER,
                    help="trainings before the GP picks (the search's nas.search.guided.GUIDE_AFTER)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    rows = read_table(Path(args.table))
    if args.pool > len(rows) or args.pool <= FIRST:
        ap.error(f"--pool must be between {FIRST + 1} and the table's {len(rows)} rows")
    if args.guide_after < 2:
        ap.error(f"--guide-after must be at least 2 (a GP needs labels), got {args.guide_after}")
    supernets = json.loads(Path(args.supernets).read_text())
    acc = np.array([r["test_acc_mean"] for r in rows], dtype=float)
    lat = np.array([r["lat_cpu_b1_ms"] for r in rows], dtype=float)
    specs = [r["spec"] for r in rows]
    flops = [r["flops"] for r in rows]
    result: dict[str, Any] = {"pool": args.pool, "budget": args.budget, "seeds": args.seeds, "first": FIRST,
                              "refill": REFILL, "guide_after": args.guide_after, "variants": {}}
    for variant in args.variants.split(","):
        key = variant if "/" in variant else f"{variant}/ft0"
        if key not in supernets:
            ap.error(f"no supernet {variant!r} in {args.supernets}; it has: "
                     f"{', '.join(sorted({k.split('/')[0] for k in supernets}))}")
        sup = np.array([supernets[key][r["hash"]] for r in rows], dtype=float)
        guided = hybrid_features(specs, list(sup), flops)
        feats = {"supernet": guided, "guided": guided, "control": guided[:, -2:]}  # control: log FLOPs, inherited
        curves: dict[str, list[dict[int, tuple[float, float]]]] = {p: [] for p in POLICIES}
        for seed in range(args.seeds):
            pool = sorted(np.random.default_rng(seed).choice(len(rows), args.pool, replace=False).tolist())
            for p in POLICIES:
                curves[p].append(replay(pool, p, sup, acc, lat, feats[p], args.budget, args.guide_after))
        counts = sorted(curves["supernet"][0])
        res: dict[str, Any] = {}
        for p in POLICIES:
            for m, name in enumerate(("hv", "front")):
                res[f"{p}_{name}"] = {n: float(np.mean([c[n][m] for c in curves[p]])) for n in counts}
                if p != "supernet":
                    diff = {n: np.array([c[n][m] - b[n][m] for c, b in zip(curves[p], curves["supernet"])])
                            for n in counts}
                    res[f"{p}_{name}_diff"] = {n: [float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))]
                                               for n, v in diff.items()}
        result["variants"][variant] = res
        print(f"supernet {variant}: pool {args.pool} of {len(rows)}, {args.seeds} seeds; hypervolume share "
              f"(front share) after n trainings")
        print(f"  {'n':>4} " + " ".join(f"{p:>15}" for p in POLICIES) + "  guided - supernet (se)"
              "     control - supernet (se)")
        for n in counts:
            cells = " ".join(f"{res[f'{p}_hv'][n]:.3f} ({res[f'{p}_front'][n]:.2f})".rjust(15) for p in POLICIES)
            dg, dc = res["guided_hv_diff"][n], res["control_hv_diff"][n]
            print(f"  {n:>4} {cells}  {dg[0]:+.4f} ({dg[1]:.4f})        {dc[0]:+.4f} ({dc[1]:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
