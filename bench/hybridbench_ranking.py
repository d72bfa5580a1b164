"""Ranking on HybridBench: how well each training-free score, ParZC and the supernet order
hybrid_vit architectures by their trained accuracy.

    .venv/bin/python bench/hybridbench_ranking.py [--table bench/data/hybridbench_c10_v1.csv] [--json out.json]

Target: ``test_acc_mean`` (mean over the seeds trained) of every row of the committed table. For
each score: Kendall tau and Spearman rho against it, and tau as a fraction of the noise ceiling
(tau between the two training seeds on the architectures trained twice: no predictor can honestly
beat the agreement of the ground truth with itself).

Scores:
- every zero-cost proxy column (``zc_*``), params and FLOPs; non-finite values rank last;
- the screening score the search uses today (``EvalConfig.score``, nwot);
- rank aggregations fixed in advance (not picked on this table): AZ-NAS's (Lee & Ham, CVPR 2024:
  expressivity, progressivity, trainability and FLOPs, sum of log relative ranks) and the same
  aggregation over params with nwot, synflow or DSS;
- ParZC (Dong et al. 2024) fitted on 50 and 100 HybridBench labels, scored on the remaining rows
  (mean of 5 random splits), also with the mixer fractions and log FLOPs below as architecture
  columns (``ParZC.fit(arch=)``), and ParZC fitted on NAS-Bench-201 cells only (transfer: its labels
  from ../shared/data/nb201_cifar10.csv, its features from the same CIFAR-10 batch recipe);
- the supernet's inherited accuracy (``supernet_acc``), when the table has it, and every supernet
  attempt's (the committed ``hybridbench_c10_v1_supernet.json``, and any in hybridbench.py's cache),
  and each recipe trained with two seeds (``X`` and ``X_s1``) at the mean of its two ranks;
- a predictor fitted on labels: the search's Gaussian process (``predictors.online.OnlineGP``, as
  its guided train stage uses) on the architecture's mixer fractions (the share of blocks with each
  token and channel mixer: ``ArchSpec.mixer_fractions``) and log FLOPs, alone and with one more
  score (a supernet's inherited accuracy, nwot), fitted on 25, 50 and 100 labels and scored on the
  remaining rows (mean of ``--gp-splits`` random splits; the first five are ParZC's splits).

For each score also: the bootstrap standard error of tau over the rows, and Kendall's partial tau
given FLOPs (how much the score knows beyond model size: the search screens by a score AND latency,
so a score that only restates size adds little to the front).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictors.metrics import kendall_tau, spearman  # noqa: E402
from predictors.zero_cost import rank_aggregate  # noqa: E402

DEFAULT_TABLE = ROOT / "bench" / "data" / "hybridbench_c10_v1.csv"
DEFAULT_SUPERNETS = ROOT / "bench" / "data" / "hybridbench_c10_v1_supernet.json"
SHARED = ROOT.parent / "shared" / "data"
SCREEN_SCORE = "zc_nwot"  # workers.evaluate.EvalConfig.score's default, what staged screening ranks by


def read_table(path: Path) -> list[dict[str, Any]]:
    out = []
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            rec: dict[str, Any] = {}
            for k, v in row.items():
                if v == "":
                    continue
                try:
                    rec[k] = float(v)
                except ValueError:
                    rec[k] = v
            out.append(rec)
    return out


def finite_last(values: list[float]) -> np.ndarray:
    """Scores with every non-finite value replaced by one below the finite minimum (ranked last)."""
    s = np.array(values, dtype=np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        s[bad] = (s[~bad].min() - 1.0) if (~bad).any() else 0.0
    return s


def bootstrap_se(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> float:
    """Standard error of Kendall's tau between ``x`` and ``y``: its spread over ``resamples``
    resamplings of the pairs with replacement (nan for 0 resamples)."""
    if not resamples:
        return math.nan
    pick = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    return float(np.std([kendall_tau(x[i], y[i]) for i in pick]))


def paired_difference(a: np.ndarray, b: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """tau(a, y) - tau(b, y), and its standard error over ``resamples`` resamplings of the rows with
    replacement, both scores on the same rows each time (paired: the rows' shared difficulty cancels)."""
    diff = kendall_tau(a, y) - kendall_tau(b, y)
    if not resamples:
        return diff, math.nan
    pick = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))
    return diff, float(np.std([kendall_tau(a[i], y[i]) - kendall_tau(b[i], y[i]) for i in pick]))


def noise_ceiling(rows: list[dict[str, Any]], resamples: int = 0) -> tuple[float, float, int, float]:
    """Tau, rho, count and tau's bootstrap standard error between the two seeds' accuracies."""
    both = [r for r in rows if "test_acc_s0" in r and "test_acc_s1" in r]
    a, b = np.array([r["test_acc_s0"] for r in both]), np.array([r["test_acc_s1"] for r in both])
    return kendall_tau(a, b), spearman(a, b), len(both), bootstrap_se(a, b, resamples, seed=1)


def partial_tau(t_xy: float, t_xz: float, t_yz: float) -> float:
    """Kendall's partial tau of x and y given z (Kendall 1942): (t_xy - t_xz t_yz) / sqrt((1 - t_xz^2)(1 - t_yz^2))."""
    den = math.sqrt(max(0.0, (1 - t_xz ** 2) * (1 - t_yz ** 2)))
    return (t_xy - t_xz * t_yz) / den if den > 0 else math.nan


def held_out(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split ``seed`` of ``n`` rows: (the ``n_train`` labelled rows, the rest), the same
    split for every predictor fitted on labels."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_train], order[n_train:]


def parzc_splits(nodes: list[np.ndarray], acc: np.ndarray, n_train: int, splits: int,
                 arch: np.ndarray | None = None) -> list[float]:
    """Kendall tau on the held-out rows of ParZC fitted on ``n_train`` labelled rows, per random
    split; ``arch``: architecture-level columns added to its tokens (``ParZC.fit(arch=)``)."""
    from predictors.parzc import ParZC

    taus = []
    for seed in range(splits):
        tr, te = held_out(len(acc), n_train, seed)
        model = ParZC(seed=seed).fit([nodes[i] for i in tr], acc[tr], arch=None if arch is None else arch[tr])
        mean, _ = model.predict([nodes[i] for i in te], arch=None if arch is None else arch[te])
        taus.append(kendall_tau(mean, acc[te]))
    return taus


def nb201_parzc(args: argparse.Namespace) -> Any:
    """ParZC fitted on ``--nb201-n`` seeded NAS-Bench-201 cells: node-wise features on one
    class-balanced batch of 64 CIFAR-10 training images (seed 0, as HybridBench's), labels from
    ../shared/data/nb201_cifar10.csv. Features are cached as JSON lines (a rerun is quick)."""
    from nas.data import load, one_batch
    from predictors.parzc import ParZC, node_features
    from search_spaces.nb201 import NB201Space, enumerate_specs, load_labels

    labels = load_labels(str(SHARED / "nb201_cifar10.csv"))
    specs = enumerate_specs()
    cells = [specs[i] for i in sorted(random.Random(0).sample(range(len(specs)), args.nb201_n))]
    cache = Path(args.nb201_cache) / f"nb201_parzc_nodes_n{args.nb201_n}_b64_s0.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["arch"]] = np.array(rec["nodes"], dtype=np.float32)
    todo = [c for c in cells if c.to_string() not in done]
    if todo:
        ds = load(f"imagefolder:{SHARED / 'cifar10-jpeg.tar.gz'}", split="train", limit=64, img_size=32, seed=0)
        x, y = one_batch(ds, 64, seed=0)
        space = NB201Space()
        with cache.open("a") as fh:
            for i, c in enumerate(todo, 1):
                torch.manual_seed(0)
                nodes = node_features(space.build(c), x, y)
                fh.write(json.dumps({"arch": c.to_string(), "nodes": nodes.tolist()}) + "\n")
                done[c.to_string()] = nodes
                if i % 100 == 0:
                    print(f"  NB201 features {i}/{len(todo)}", flush=True)
    archs = [c.to_string() for c in cells]
    return ParZC(seed=0).fit([done[a] for a in archs], np.array([labels[a] for a in archs]))


def hybrid_nodes(rows: list[dict[str, Any]], cache: Path) -> list[np.ndarray] | None:
    """ParZC node matrices of the rows from hybridbench.py's proxy cache (None if any is missing)."""
    found = {}
    for f in cache.glob("proxies_*/*.json"):
        rec = json.loads(f.read_text())
        if "parzc_nodes" in rec:
            found[rec["hash"]] = np.array(rec["parzc_nodes"], dtype=np.float32)
    if not all(r["hash"] in found for r in rows):
        return None
    return [found[r["hash"]] for r in rows]


def mixer_features(rows: list[dict[str, Any]]) -> np.ndarray:
    """Per row: the share of its blocks with each token mixer, then each channel mixer (the mixers
    any row uses, in sorted order), and log FLOPs: the search's own encoding
    (``nas.search.guided.mixer_encoding``)."""
    from nas.search.guided import mixer_encoding

    return mixer_encoding([r["spec"] for r in rows], [r["flops"] for r in rows])


def gp_splits(x: np.ndarray, acc: np.ndarray, n_train: int, splits: int) -> list[float]:
    """Kendall tau on the held-out rows of ``OnlineGP`` fitted on ``n_train`` labelled rows, per
    random split (split k is ParZC's split k)."""
    from predictors.online import OnlineGP

    taus = []
    for seed in range(splits):
        tr, te = held_out(len(acc), n_train, seed)
        mean, _ = OnlineGP().fit(x[tr], 100 * acc[tr]).predict(x[te])
        taus.append(kendall_tau(mean, acc[te]))
    return taus


def seed_ensembles(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each supernet recipe trained with two seeds (``supernet X`` and ``supernet X_s1``), every
    architecture at the mean of its two ranks: how much tau the one seed's noise costs."""
    return {f"{name} + {name[9:]}_s1 (mean rank)":
            np.array(rank_aggregate({"s0": scores[name], "s1": scores[f"{name}_s1"]}, how="mean"))
            for name in scores if name.startswith("supernet ") and f"{name}_s1" in scores}


def mixer_bias(rows: list[dict[str, Any]], acc: np.ndarray,
               scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per score and lead token mixer: the mean of (the score's rank - the truth's rank) / rows over
    the rows that mixer leads; positive where the score places the family higher than it trained."""
    from scipy.stats import rankdata

    truth = rankdata(acc) / len(acc)
    out: dict[str, dict[str, float]] = {}
    for name, s in scores.items():
        res = rankdata(s) / len(s) - truth
        out[name] = {m: float(np.mean([d for d, r in zip(res, rows) if r["lead_token_mixer"] == m]))
                     for m in sorted({r["lead_token_mixer"] for r in rows})}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(DEFAULT_TABLE))
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache" / "hybridbench"),
                    help="hybridbench.py's cache (ParZC's node-wise features)")
    ap.add_argument("--nb201-cache", default=str(ROOT / ".bench_cache"))
    ap.add_argument("--nb201-n", type=int, default=500,
                    help="NB201 cells ParZC's transfer model is fitted on (0: no transfer model)")
    ap.add_argument("--splits", type=int, default=5, help="ParZC: random splits")
    ap.add_argument("--gp-splits", type=int, default=20, help="the Gaussian process on labels: random splits")
    ap.add_argument("--supernets", default=str(DEFAULT_SUPERNETS),
                    help="every supernet attempt's inherited accuracies, by variant and spec hash")
    ap.add_argument("--no-parzc", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples for the standard error of tau (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    rows = [r for r in read_table(Path(args.table)) if "test_acc_mean" in r]
    acc = np.array([r["test_acc_mean"] for r in rows])
    ceil_tau, ceil_rho, n_both, ceil_se = noise_ceiling(rows, args.bootstrap)
    print(f"HybridBench: {len(rows)} architectures, test accuracy {acc.min():.4f}-{acc.max():.4f} "
          f"(std {acc.std():.4f})")
    print(f"noise ceiling: tau {ceil_tau:.3f} (se {ceil_se:.3f}), rho {ceil_rho:.3f} between two training seeds "
          f"on {n_both} architectures\n")

    scores: dict[str, np.ndarray] = {}
    for k in sorted(rows[0]):
        if k.startswith("zc_") or k in ("params", "flops", "supernet_acc"):
            if all(k in r for r in rows):
                scores[k] = finite_last([r[k] for r in rows])
    # every supernet variant hybridbench.py trained (each attempt's tau): the committed ones, then its cache
    committed = json.loads(Path(args.supernets).read_text()) if Path(args.supernets).is_file() else {}
    for key, inherited in committed.items():
        variant, ft = key.split("/ft")
        if all(r["hash"] in inherited for r in rows):
            scores[f"supernet {variant}" + (f", {ft} fine-tuning steps" if ft != "0" else "")] = \
                np.array([inherited[r["hash"]] for r in rows])
    for f in sorted(Path(args.cache).glob("supernet_*/*/inherited_ft*.json")):
        inherited = json.loads(f.read_text())
        ft = f.stem.split("_ft")[-1]
        name = f"supernet {f.parent.name}" + (f", {ft} fine-tuning steps" if ft != "0" else "")
        # a committed attempt keeps its figures (the cache's "base" may have been retrained since)
        if name not in scores and all(r["hash"] in inherited for r in rows):
            scores[name] = np.array([inherited[r["hash"]] for r in rows])
    scores.update(seed_ensembles(scores))
    if SCREEN_SCORE in scores:
        scores[f"search screening today ({SCREEN_SCORE[3:]})"] = scores[SCREEN_SCORE]
    combos = {"rank agg: params+nwot": ("params", "zc_nwot"),
              "rank agg: params+synflow": ("params", "zc_synflow"),
              "rank agg: params+nwot+synflow": ("params", "zc_nwot", "zc_synflow"),
              "rank agg: params+dss": ("params", "zc_dss"),
              "AZ-NAS (expr+prog+train+flops)": ("zc_az_expressivity", "zc_az_progressivity",
                                                 "zc_az_trainability", "flops")}
    for name, cols in combos.items():
        if all(c in scores for c in cols):
            scores[name] = np.array(rank_aggregate({c: scores[c] for c in cols}))

    results: dict[str, dict[str, float]] = {}
    t_flops = kendall_tau(scores["flops"], acc) if "flops" in scores else math.nan
    for name, s in scores.items():
        tau, rho = kendall_tau(s, acc), spearman(s, acc)
        results[name] = {"tau": tau, "rho": rho, "of_ceiling": tau / ceil_tau if ceil_tau > 0 else math.nan,
                         "tau_se": bootstrap_se(s, acc, args.bootstrap, seed=0),
                         "partial_tau_given_flops": partial_tau(tau, kendall_tau(s, scores["flops"]), t_flops)
                         if "flops" in scores else math.nan}

    feats = mixer_features(rows)
    extra = {"": None, " + nwot": "zc_nwot", " + supernet_acc": "supernet_acc",
             " + supernet nodistill": "supernet nodistill", " + supernet spos4": "supernet spos4"}
    for n_train in (25, 50, 100):
        for suffix, col in extra.items():
            if len(rows) - n_train < 10 or (col is not None and col not in scores):
                continue
            x = feats if col is None else np.column_stack([feats, scores[col]])
            taus = gp_splits(x, acc, n_train, args.gp_splits)
            t = statistics.fmean(taus)
            results[f"GP on mixers + FLOPs{suffix}, {n_train} labels"] = {
                "tau": t, "rho": math.nan, "of_ceiling": t / ceil_tau, "per_split": taus,
                "tau_se": statistics.stdev(taus) / math.sqrt(len(taus)) if len(taus) > 1 else math.nan}

    if not args.no_parzc:
        nodes = hybrid_nodes(rows, Path(args.cache))
        if nodes is None:
            print("ParZC: node-wise features missing for some rows; run `bench/hybridbench.py proxies` first")
        else:
            for n_train in (50, 100):
                if len(rows) - n_train < 10:
                    continue
                archs: dict[str, np.ndarray | None] = {"": None, " + mixers + FLOPs": feats}
                if "supernet nodistill" in scores:
                    archs[" + mixers + FLOPs + supernet nodistill"] = np.column_stack(
                        [feats, scores["supernet nodistill"]])
                for suffix, arch in archs.items():
                    taus = parzc_splits(nodes, acc, n_train, args.splits, arch)
                    t = statistics.fmean(taus)
                    results[f"ParZC{suffix}, {n_train} HybridBench labels"] = {
                        "tau": t, "rho": math.nan, "of_ceiling": t / ceil_tau, "per_split": taus}
            if args.nb201_n > 0:
                model = nb201_parzc(args)
                mean, _ = model.predict(nodes)
                t = kendall_tau(mean, acc)
                results[f"ParZC, NB201 only ({args.nb201_n} cells)"] = {
                    "tau": t, "rho": spearman(mean, acc), "of_ceiling": t / ceil_tau}

    print(f"{'score':<52} {'Kendall tau':>11} {'(se)':>6} {'Spearman':>9} {'tau / ceiling':>14} {'tau | flops':>12}")
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["tau"]):
        rho = "" if math.isnan(r["rho"]) else f"{r['rho']:.3f}"
        se = "" if math.isnan(r.get("tau_se", math.nan)) else f"{r['tau_se']:.3f}"
        pt = "" if math.isnan(r.get("partial_tau_given_flops", math.nan)) else f"{r['partial_tau_given_flops']:.3f}"
        print(f"{name:<52} {r['tau']:11.3f} {se:>6} {rho:>9} {r['of_ceiling']:14.2f} {pt:>12}")
    print(f"\n(se): bootstrap standard error of tau over the rows ({args.bootstrap} resamples); for the GP rows the "
          f"standard error of the mean over its {args.gp_splits} splits. tau | flops: Kendall's partial tau given "
          "FLOPs, what a score knows beyond model size.")
    attempts = [k for k in scores if k.startswith("supernet ") and k != "supernet base"]
    if "supernet base" in scores and attempts:
        print("\nsupernet attempts against base, paired on the same rows: tau difference (paired bootstrap se)")
        for name in sorted(attempts, key=lambda k: -results[k]["tau"]):
            d, se = paired_difference(scores[name], scores["supernet base"], acc, args.bootstrap, seed=0)
            results[name]["tau_minus_base"], results[name]["tau_minus_base_se"] = d, se
            print(f"  {name[9:]:<38} {d:+.3f} ({se:.3f})")
    bias = mixer_bias(rows, acc, {k: scores[k] for k in ("supernet_acc", "supernet nodistill", "supernet spos4")
                                  if k in scores})
    if bias:
        print("\nwhere a score misplaces whole mixer families: mean of (its rank - the truth's rank) / rows, "
              "by the row's lead token mixer")
        for name, by in bias.items():
            print(f"  {name}: " + ", ".join(f"{m} {v:+.2f}" for m, v in sorted(by.items(), key=lambda kv: -kv[1])))
    if args.json:
        ceiling = {"tau": ceil_tau, "tau_se": ceil_se, "rho": ceil_rho, "n": n_both}
        Path(args.json).write_text(json.dumps({"n": len(rows), "noise_ceiling": ceiling, "results": results}, indent=1))


if __name__ == "__main__":
    main()
