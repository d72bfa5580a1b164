"""Peak memory and throughput: the streaming loader against the in-memory loader, side by side.

    .venv/bin/python bench/data_stream.py [--data imagefolder:ARCHIVE] [--sizes 10000,30000,60000]
        [--workers 2] [--batch 256] [--batches 0] [--json out.json]

Each (loader, size) runs in a fresh subprocess that opens the data and iterates one training epoch
(or ``--batches`` batches) with augmentation: ``memory`` = ``nas.data.load`` (decoded, normalised
float32 tensors) then ``ImageDataset.loader(train=True)``; ``stream`` = ``open_dataset(stream=True)``
then ``StreamDataset.loader(train=True)`` with ``--workers`` DataLoader workers. A size above the
train split's (50,000 for CIFAR-10) takes the rest from the test split.

Memory is that of the whole process tree (the child and its DataLoader workers), sampled every
``--interval`` seconds from /proc by this parent: the sum of VmRSS (pages shared between a parent
and its forked workers are counted once per process, so this over-counts) and the sum of Pss from
/proc/PID/smaps_rollup (shared pages split between the processes that map them: the tree's real
footprint). The peak of each sum is reported, and the child's own ru_maxrss as a cross-check.

Caches (archive layout, statistics, the decompressed .tar, the in-memory path's decoded uint8
arrays) are filled by an unmeasured warm-up child first, so both paths are measured as a study
sees them on its second use of a dataset; they live in a temporary folder unless ``--cache``.
images/s counts the iteration only; ``open_s`` is the time to open (load) the data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import rss_pss_kb, tree

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = f"imagefolder:{ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"


# ---------------------------------------------------------------------------------------------
# the child: open, iterate, report


def _parts(source: str, size: int) -> list[tuple[str, int]]:
    """(split, limit) pairs making up ``size`` images: the train split first, then the test split."""
    from nas.data import _Folder, parse_data

    spec = parse_data(source)
    if spec.kind != "imagefolder":
        return [("train", size)]
    folder = _Folder(Path(str(spec.path)))
    n_train = len(folder.splits["train"].labels)
    parts = [("train", min(size, n_train))]
    if size > n_train:
        parts.append(("test", min(size - n_train, len(folder.splits["test"].labels))))
    return parts


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from nas.data import load, open_dataset

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sets = []
    for split, limit in _parts(args.data, args.size):
        if args.mode == "memory":
            sets.append(load(args.data, split, limit=limit, img_size=args.img_size, seed=0))
        else:
            sets.append(open_dataset(args.data, split, limit=limit, img_size=args.img_size, seed=0, stream=True))
    open_s = time.perf_counter() - t0
    if args.warmup:
        return {"open_s": open_s}
    t1 = time.perf_counter()
    images = batches = 0
    checksum = 0.0
    for ds in sets:
        for x, y in ds.loader(batch_size=args.batch, train=True, seed=0, epoch=0, num_workers=args.workers):
            images += len(y)
            batches += 1
            checksum += float(x[:, :, 0, 0].sum())  # touch the data
            if args.batches and batches >= args.batches:
                break
        if args.batches and batches >= args.batches:
            break
    iter_s = time.perf_counter() - t1
    return {
        "images": images,
        "batches": batches,
        "open_s": open_s,
        "iter_s": iter_s,
        "images_per_s": images / iter_s if iter_s > 0 else float("nan"),
        "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "n": sum(len(ds) for ds in sets),
        "checksum": checksum,
    }


# ---------------------------------------------------------------------------------------------
# the parent: run children, sample the process tree


def _sample(pid: int) -> tuple[int, int, int]:
    """(sum of VmRSS, sum of Pss, processes) over the tree of ``pid``, in kB."""
    pids = tree(pid)
    mem = [rss_pss_kb(p) for p in pids]
    return sum(m[0] for m in mem), sum(m[1] for m in mem), len(pids)


def run_child(args: argparse.Namespace, mode: str, size: int, warmup: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--size", str(size), "--data", args.data,
           "--workers", str(args.workers), "--batch", str(args.batch), "--batches", str(args.batches),
           "--threads", str(args.threads)]
    if args.img_size:
        cmd += ["--img-size", str(args.img_size)]
    if warmup:
        cmd.append("--warmup")
    env = {**os.environ, "HYBRID_NAS_CACHE": args.cache, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak_rss = peak_pss = procs = 0
    while proc.poll() is None:
        rss, pss, n = _sample(proc.pid)
        peak_rss, peak_pss, procs = max(peak_rss, rss), max(peak_pss, pss), max(procs, n)
        time.sleep(args.interval)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} at {size} failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update({"mode": mode, "size": size, "peak_tree_rss_mb": peak_rss / 1024, "peak_tree_pss_mb": peak_pss / 1024,
                "max_processes": procs})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--sizes", default="10000,30000,60000")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streaming loader")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=0, help="stop after this many batches (0: one epoch)")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    ap.add_argument("--modes", default="memory,stream")
    ap.add_argument("--cache", default=None, help="data cache folder (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tmp = None
    if args.cache is None:
        tmp = tempfile.mkdtemp(prefix="bench-data-stream-")
        args.cache = tmp
    rows: list[dict[str, Any]] = []
    try:
        for mode in modes:  # fill the caches first (unmeasured): the largest size covers the smaller ones' stats
            for size in sizes:
                w = run_child(args, mode, size, warmup=True)
                print(f"warm-up {mode:6s} {size:>6d}: open {w['open_s']:.1f} s", flush=True)
        for size in sizes:
            for mode in modes:
                r = run_child(args, mode, size)
                rows.append(r)
                print(f"{mode:6s} {size:>6d}: peak tree RSS {r['peak_tree_rss_mb']:.0f} MB, PSS "
                      f"{r['peak_tree_pss_mb']:.0f} MB, {r['images_per_s']:.0f} img/s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"data {args.data}; batch {args.batch}, {args.workers} DataLoader workers (stream), "
          f"{'one epoch' if not args.batches else f'{args.batches} batches'}, train augmentation, "
          f"img_size {args.img_size or 'native'}")
    head = (f"{'images':>7} | {'memory RSS':>10} {'PSS':>7} {'img/s':>7} {'open s':>7} | "
            f"{'stream RSS':>10} {'PSS':>7} {'img/s':>7} {'open s':>7}")
    print(head)
    print("-" * len(head))
    for size in sizes:
        cells = []
        for mode in ("memory", "stream"):
            r = next((r for r in rows if r["size"] == size and r["mode"] == mode), None)
            cells.append("" if r is None else f"{r['peak_tree_rss_mb']:>8.0f}MB {r['peak_tree_pss_mb']:>5.0f}MB "
                                              f"{r['images_per_s']:>7.0f} {r['open_s']:>7.1f}")
        n = next((r["n"] for r in rows if r["size"] == size), size)
        print(f"{n:>7} | {cells[0]:>34} | {cells[1]:>34}")
    print("RSS: peak of the sum of VmRSS over the process tree (shared pages counted per process); "
          "PSS: peak of the sum of Pss (shared pages split)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()
                                                          if k not in ("child", "size", "warmup", "mode")},
                                               "results": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
