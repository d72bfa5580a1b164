"""Supernet ranking: inherited-weight accuracy against standalone training, Kendall tau.

    .venv/bin/python bench/supernet_rank.py                  # CPU: CIFAR-10 subset, 2 processes
    python bench/supernet_rank.py --device cuda --train-limit 0 --test-limit 0 --epochs 30   # GPU: full CIFAR-10

Trains one supernet of the ``small`` frame (32x32, 3 stages) with the sandwich rule and in-place
distillation, and, side by side in a second process, ``--n`` subnets standalone with the same
recipe (optimizer, learning-rate schedule, augmentation, batch; labels only). The supernet gets
more epochs (40 against 15 by default) since each of its steps trains one draw out of ~10^13
subnets, as one-shot methods do (OFA, BigNAS train the supernet several times longer). The subnets are drawn from the
frame so that every token mixer and every channel mixer of it leads some of them (round-robin on
stage 0). Then each subnet's accuracy with inherited weights (BatchNorm recalibrated on training
images) is read from the supernet. Prints both accuracies per subnet, Kendall tau and Spearman
rho between them, the seconds per subnet evaluation and the wall time.

Every registered token mixer takes part by default, on CPU too. Until issue 21 the Mamba-style
``ssm`` and ``gated_linear`` mixers were left out on CPU, when their pure-PyTorch scans cost
6-30x an attention block per step; ``--exclude ssm,gated_linear`` reproduces those runs. Anchor:
one-shot NAS usually reaches tau 0.3-0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictors.metrics import kendall_tau, spearman  # noqa: E402
from predictors.supernet import TrainConfig, accuracy, evaluate_subnet, train_standalone, train_supernet  # noqa: E402
from search_spaces.hybrid_vit import build  # noqa: E402
from search_spaces.spec import ArchSpec  # noqa: E402
from search_spaces.supernet import SupernetFrame, get_frame  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _load(args: argparse.Namespace, split: str):  # type: ignore[no-untyped-def]
    from nas.data import load

    limit = args.train_limit if split == "train" else args.test_limit
    return load(args.data, split, limit=limit or None, img_size=32, seed=0)


def _frame(args: argparse.Namespace) -> SupernetFrame:
    frame = get_frame("small")
    drop = {m for m in args.exclude.split(",") if m}
    stages = tuple(replace(sf, token_mixers=tuple(t for t in sf.token_mixers if t not in drop)) for sf in frame.stages)
    return replace(frame, stages=stages)


def pick_subnets(frame: SupernetFrame, n: int, seed: int) -> list[ArchSpec]:
    """``n`` distinct subnets; the i-th has stage 0 led by the i-th token and channel mixer (round-robin)."""
    tms, cms = frame.stages[0].token_mixers, frame.stages[0].channel_mixers
    out: list[ArchSpec] = []
    s = seed * 100_000
    for i in range(n):
        tm, cm = tms[i % len(tms)], cms[(i // len(tms) + i) % len(cms)]
        while True:
            spec = frame.random(s)
            s += 1
            if spec.stages[0].mixers()[0] == (tm, cm) and spec.hash not in {o.hash for o in out}:
                out.append(spec)
                break
    return out


def _job(kind: str, payload: dict) -> dict:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    args = argparse.Namespace(**payload["args"])
    frame = SupernetFrame.from_dict(payload["frame"])
    cfg = TrainConfig(**payload["cfg"])
    train = _load(args, "train")
    t0 = time.perf_counter()
    if kind == "supernet":
        train_supernet(frame, train, args.epochs, config=cfg, out=args.out, device=args.device,
                       meta={"data": args.data, "train_limit": args.train_limit})
        return {"kind": kind, "seconds": time.perf_counter() - t0}
    spec = ArchSpec.from_dict(payload["spec"])
    model = train_standalone(spec, train, args.standalone_epochs or args.epochs, config=cfg,
                             num_classes=frame.num_classes, device=args.device)
    torch.save(model.state_dict(), _weights(args, spec))
    return {"kind": kind, "hash": spec.hash, "seconds": time.perf_counter() - t0}


def _weights(args: argparse.Namespace, spec: ArchSpec) -> Path:
    return Path(args.out) / "standalone" / f"{spec.hash[:16]}.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"imagefolder:{DEFAULT_DATA}")
    ap.add_argument("--train-limit", type=int, default=5000, help="class-balanced training subset (0: all)")
    ap.add_argument("--test-limit", type=int, default=0, help="class-balanced test subset (0: all 10,000)")
    ap.add_argument("--epochs", type=int, default=40, help="supernet epochs")
    ap.add_argument("--standalone-epochs", type=int, default=15, help="0: the same as --epochs")
    ap.add_argument("--n", type=int, default=20, help="subnets to rank")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--exclude", default="", help="token mixers left out, comma-separated (default: none)")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: training and evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out/supernet_rank", help="checkpoint and results directory")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    frame = _frame(args)
    cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, distill=not args.no_distill, seed=args.seed)
    specs = pick_subnets(frame, args.n, args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"frame small: {len(frame.stages)} stages, token mixers {', '.join(frame.stages[0].token_mixers)}; "
          f"excluded: {args.exclude or 'none'}; ~10^{frame.size():.1f} subnets")
    print(f"data {args.data}: train {args.train_limit or 'all'} / test {args.test_limit or 'all'} images "
          f"(class-balanced), 32x32; {args.epochs} supernet epochs, "
          f"{args.standalone_epochs or args.epochs} standalone epochs, batch {args.batch_size}")
    payload = {"args": vars(args), "frame": frame.to_dict(), "cfg": asdict(cfg)}
    # standalone results are kept per (subnet, recipe, data) so an interrupted run resumes
    cache_path = Path(args.out) / "standalone.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    recipe = json.dumps([payload["cfg"], args.standalone_epochs or args.epochs, args.data, args.train_limit],
                        sort_keys=True)
    (Path(args.out) / "standalone").mkdir(exist_ok=True)
    results = {h: r for h, r in cache.get(recipe, {}).items() if _weights(args, ArchSpec.from_dict(r["spec"])).exists()}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        sup = pool.submit(_job, "supernet", payload)
        futs = [pool.submit(_job, "standalone", {**payload, "spec": s.to_dict()}) for s in specs
                if s.hash not in results]
        by_hash = {s.hash: s for s in specs}
        for f in futs:
            r = f.result()
            results[r["hash"]] = {**r, "spec": by_hash[r["hash"]].to_dict()}
            cache[recipe] = results
            cache_path.write_text(json.dumps(cache))
            print(f"  standalone {len(results)}/{len(specs)} trained ({r['seconds']:.0f} s)", flush=True)
        sup_r = sup.result()
    print(f"supernet trained in {sup_r['seconds']:.0f} s (0 s: resumed from a finished checkpoint)")

    from predictors.supernet import load_checkpoint

    net, _ = load_checkpoint(args.out)
    net.eval()
    train, test = _load(args, "train"), _load(args, "test")
    inherited, secs = [], []
    for s in specs:
        t0 = time.perf_counter()
        inherited.append(evaluate_subnet(net, s, test, calib=train, device=args.device))
        secs.append(time.perf_counter() - t0)
    standalone = []
    for s in specs:  # the standalone models are scored here, on the very images the subnets are
        model = build(s, num_classes=frame.num_classes, img_size=frame.img_size, in_chans=frame.in_chans)
        model.load_state_dict(torch.load(_weights(args, s), weights_only=True))
        standalone.append(accuracy(model.eval(), test))
    print(f"\n{'#':>2}  {'standalone':>10}  {'inherited':>9}  subnet")
    for i, (s, a, b) in enumerate(zip(specs, standalone, inherited)):
        print(f"{i:>2}  {a:>10.3f}  {b:>9.3f}  {s.short()}")
    tau, rho = kendall_tau(inherited, standalone), spearman(inherited, standalone)
    secs_sorted = sorted(secs)
    print(f"\nKendall tau {tau:.3f}, Spearman rho {rho:.3f} over {len(specs)} subnets")
    print(f"standalone accuracy {min(standalone):.3f}-{max(standalone):.3f}; "
          f"inherited {min(inherited):.3f}-{max(inherited):.3f}")
    print(f"subnet evaluation (extract + BN recalibration + {len(test)} test images): "
          f"median {secs_sorted[len(secs) // 2]:.2f} s, max {secs_sorted[-1]:.2f} s")
    print(f"wall time {time.perf_counter() - t_start:.0f} s on {os.cpu_count()} cores, {args.workers} processes")
    (Path(args.out) / "results.json").write_text(json.dumps({
        "tau": tau, "spearman": rho, "eval_seconds": secs, "standalone": standalone, "inherited": inherited,
        "specs": [s.to_dict() for s in specs], "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
