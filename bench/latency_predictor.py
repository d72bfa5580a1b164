"""Latency predictor against measurement: lookup table + calibration on unseen hybrid_vit archs.

    .venv/bin/python bench/latency_predictor.py                       # CPU: fp32, batch 8, 32px, 1 thread
    python bench/latency_predictor.py --device cuda                  # GPU: bf16, batch 64, 224px

Builds the per-piece table from the calibration architectures, fits the calibration on their
whole-model latencies, then predicts ``--test`` unseen random architectures (pieces they add are
measured into the table on the spot, as in a search) and measures each of them ``--runs`` times
(runs interleaved across architectures, so slow drift of the machine hits all alike). Prints
MAPE, the share within +-5% / +-10%, Kendall tau, and the repeatability of measurement (CV of
one architecture's repeated runs). Imports only torch, numpy and the project (runs on a bare GPU
node). Anchors: nn-Meter 99% of mobile CNNs within +-10%; HAT-style predictors 4-6% MAPE.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictors.latency import build_lut, device_fingerprint, measure, parse_device  # noqa: E402
from predictors.metrics import kendall_tau  # noqa: E402
from search_spaces import get_space  # noqa: E402
from search_spaces.hybrid_vit import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 8 on cpu")
    ap.add_argument("--img-size", type=int, default=None, help="default: 224 on cuda, 32 on cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    ap.add_argument("--calib", type=int, default=20)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3, help="whole-model measurements per test arch")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--out", default=None, help="write per-arch results (JSON) here")
    args = ap.parse_args()

    dev = parse_device(args.device)
    gpu = dev.type == "cuda"
    precision = args.precision or ("bf16" if gpu else "fp32")
    batch = args.batch or (64 if gpu else 8)
    img = args.img_size or (224 if gpu else 32)
    threads = None if gpu else args.threads
    torch.set_num_threads(args.threads if not gpu else torch.get_num_threads())
    space = get_space("hybrid_vit").with_choices(precisions=(precision,))
    calib = [space.random(args.seed + i) for i in range(args.calib)]
    test = [space.random(args.seed + 100_000 + i) for i in range(args.test)]
    fp = device_fingerprint(dev, threads=threads)
    print(f"device {fp['name']} key {fp['key']}  {precision}  batch {batch}  {img}px  threads {threads}")
    print(json.dumps(fp, sort_keys=True))

    def whole(spec):  # type: ignore[no-untyped-def]
        return measure(build(spec, 1000, img), (3, img, img), dev, precision, batch_size=batch, warmup=args.warmup,
                       repeats=args.repeats, threads=threads, cuda_graph=args.cuda_graph)

    t0 = time.perf_counter()
    pred = build_lut(space, dev, precision, img, batch, specs=calib, threads=threads, num_classes=1000)
    t_lut = time.perf_counter() - t0
    n_calib_pieces = len(pred.table)
    calib_ms = [whole(s).median_ms for s in calib]
    fit = pred.fit(calib, calib_ms)
    t_fit = time.perf_counter() - t0
    print(f"table: {n_calib_pieces} pieces from {len(calib)} calibration archs in {t_lut:.0f}s; "
          f"fit a={fit['a']:.3f} b={fit['b']:.4f} c={fit['c']:.4f} ms, calibration MAPE {fit['mape']:.2f}% "
          f"({t_fit:.0f}s)")

    missing = len(pred.missing(test))
    predicted = [pred.predict(s) for s in test]
    t_pred = time.perf_counter() - t0 - t_fit
    print(f"predicted {len(test)} unseen archs; {missing} new pieces measured into the table "
          f"({len(pred.table)} in all) in {t_pred:.0f}s")

    runs = np.zeros((len(test), args.runs))
    inrun_cv = np.zeros((len(test), args.runs))
    for r in range(args.runs):  # interleaved: run r of every arch, then run r + 1
        for i, s in enumerate(test):
            res = whole(s)
            runs[i, r], inrun_cv[i, r] = res.median_ms, res.cv
    measured = np.median(runs, axis=1)
    repeat_cv = runs.std(axis=1) / runs.mean(axis=1)
    p = np.asarray(predicted)
    err = np.abs(p - measured) / measured
    print(f"measured in {time.perf_counter() - t0 - t_fit - t_pred:.0f}s; latency range "
          f"{measured.min():.3f}..{measured.max():.3f} ms (median {np.median(measured):.3f})")
    print()
    print(f"{'unseen archs':<34}{len(test)}")
    print(f"{'MAPE':<34}{100 * err.mean():.2f}%")
    print(f"{'median APE':<34}{100 * np.median(err):.2f}%")
    print(f"{'within +-5%':<34}{100 * np.mean(err <= 0.05):.0f}%")
    print(f"{'within +-10%':<34}{100 * np.mean(err <= 0.10):.0f}%")
    print(f"{'Kendall tau (pred vs measured)':<34}{kendall_tau(p, measured):.3f}")
    cv50, cv90 = 100 * np.median(repeat_cv), 100 * np.percentile(repeat_cv, 90)
    print(f"{'repeat CV, median (p90)':<34}{cv50:.2f}% ({cv90:.2f}%)")
    print(f"{'in-run CV, median':<34}{100 * np.median(inrun_cv):.2f}%")
    noise = np.abs(runs[:, :1] - measured[:, None]).mean(axis=1) / measured
    print(f"{'one run vs median-of-runs MAPE':<34}{100 * noise.mean():.2f}%  (the noise floor)")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "fingerprint": fp, "precision": precision, "batch": batch, "img_size": img, "fit": fit,
            "archs": [{"hash": s.hash, "short": s.short(), "predicted_ms": float(a), "runs_ms": list(map(float, b))}
                      for s, a, b in zip(test, p, runs)]}, indent=1))


if __name__ == "__main__":
    main()
