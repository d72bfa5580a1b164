"""Peak memory of a staged search's Ray workers: streaming data against in-memory data (issue 19).

    .venv/bin/python bench/stream_search_rss.py [--data imagefolder:ARCHIVE] [--budget 6cpu-m]
        [--modes on,off] [--data-limit N] [--json out.json]

For each mode this runs ``nas search`` (staged strategy, ``--workers 1``, a private local Ray on
127.0.0.1) as a subprocess with ``HYBRID_NAS_STREAM`` set to the mode: ``on`` streams the training
images (each worker holds the archive's path and index arrays and decodes batch by batch), ``off``
decodes them into float32 tensors that the driver ships to the workers with ``ray.put``.

Memory is sampled from /proc by this parent every ``--interval`` seconds over the process tree of
the search (the driver, the Ray processes it started, and the Ray worker processes those start):
per process, VmRSS (``/proc/PID/status``) and Pss (``/proc/PID/smaps_rollup``: shared pages split
among the processes that map them, e.g. the object store's shared memory). A Ray worker is a
process whose command line starts with ``ray::`` (the trial actors, ``ray::_Worker``, the ASHA
judge, idle pool workers), Ray's per-node agents excepted. The table gives, per mode, the peak
RSS and PSS of the largest worker, the peak of the sum over the workers, the driver's peak, and
the evaluations the study recorded by stage. This is our own sampling, not Ray's memory monitor.

Both modes share a data cache (``--cache``, default a temporary folder: the archive's layout, its
decompressed .tar and, for the in-memory path, the decoded arrays), filled by the first mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import processes, rss_pss_kb, tree

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = f"imagefolder:{ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"
NAS = str(Path(sys.executable).parent / "nas")


_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's own per-node agents, not workers


def _kind(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return "driver"
    if cmd.startswith("ray::") and cmd.split()[0] not in _AGENTS:
        return "worker"
    return "ray-infra"  # raylet, gcs_server, agents, log monitor, the reaper


def run_mode(args: argparse.Namespace, mode: str, work: Path) -> dict[str, Any]:
    """One search with HYBRID_NAS_STREAM=mode, its process tree sampled until it exits."""
    db = work / f"{mode}.db"
    cmd = [NAS, "search", "--space", "hybrid_vit", "--budget", args.budget, "--data", args.data,
           "--workers", "1", "--strategy", "staged", "--target", "cpu", "--storage", f"sqlite:///{db}",
           "--study", f"rss-{mode}", "--json"]
    if args.data_limit:
        cmd += ["--data-limit", str(args.data_limit)]
    env = {**os.environ, "HYBRID_NAS_STREAM": mode, "HYBRID_NAS_CACHE": args.cache, "PYTHONPATH": str(ROOT),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work,
                            start_new_session=True)
    per: dict[int, dict[str, Any]] = {}  # pid -> kind, cmd, peak rss/pss (kB)
    peak_workers_rss = peak_workers_pss = 0
    try:
        while proc.poll() is None:
            procs = processes()
            sum_rss = sum_pss = 0
            for pid in tree(proc.pid, procs):
                rss, pss = rss_pss_kb(pid)
                cmdline = procs.get(pid, (0, ""))[1]
                rec = per.setdefault(pid, {"kind": _kind(pid, proc.pid, cmdline), "cmd": cmdline[:80],
                                           "rss_kb": 0, "pss_kb": 0})
                if _kind(pid, proc.pid, cmdline) == "worker":  # an actor renames its process once it runs
                    rec["kind"], rec["cmd"] = "worker", cmdline[:80]
                rec["rss_kb"], rec["pss_kb"] = max(rec["rss_kb"], rss), max(rec["pss_kb"], pss)
                if rec["kind"] == "worker":
                    sum_rss, sum_pss = sum_rss + rss, sum_pss + pss
            peak_workers_rss, peak_workers_pss = max(peak_workers_rss, sum_rss), max(peak_workers_pss, sum_pss)
            if time.perf_counter() - t0 > args.timeout:
                os.killpg(proc.pid, signal.SIGTERM)  # only the search we started (its own session)
                break
            time.sleep(args.interval)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-3:]
        raise SystemExit(f"search with HYBRID_NAS_STREAM={mode} failed (exit {proc.returncode}): {tail}")
    workers = [r for r in per.values() if r["kind"] == "worker"]
    driver = next(r for r in per.values() if r["kind"] == "driver")
    sys.path.insert(0, str(ROOT))
    from collections import Counter

    from nas.store import Store

    evs = Store(f"sqlite:///{db}").evaluations(f"rss-{mode}", errors=False)
    stages = dict(Counter(e.stage for e in evs))
    seconds = {k: sum(e.seconds for e in evs if e.stage == k) for k in stages}
    return {
        "mode": mode, "wall_s": wall, "workers": len(workers),
        "worker_peak_rss_mb": max((r["rss_kb"] for r in workers), default=0) / 1024,
        "worker_peak_pss_mb": max((r["pss_kb"] for r in workers), default=0) / 1024,
        "workers_sum_peak_rss_mb": peak_workers_rss / 1024, "workers_sum_peak_pss_mb": peak_workers_pss / 1024,
        "driver_peak_rss_mb": driver["rss_kb"] / 1024, "driver_peak_pss_mb": driver["pss_kb"] / 1024,
        "evaluations": stages, "stage_seconds": seconds,
        "processes": sorted(({"pid": pid, **r, "rss_mb": r["rss_kb"] / 1024, "pss_mb": r["pss_kb"] / 1024}
                             for pid, r in per.items()), key=lambda r: -r["rss_mb"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--budget", default="6cpu-m")
    ap.add_argument("--modes", default="on,off", help="HYBRID_NAS_STREAM values to compare")
    ap.add_argument("--data-limit", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a search is stopped")
    ap.add_argument("--cache", default=None, help="data cache folder (default: a temporary one, removed after)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "stream_search_rss.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nas-rss-"))
    own_cache = args.cache is None
    args.cache = args.cache or str(tmp / "cache")
    results = []
    try:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            work = tmp / mode
            work.mkdir()
            results.append(run_mode(args, mode, work))
            r = results[-1]
            print(f"HYBRID_NAS_STREAM={mode}: {r['wall_s']:.0f} s, worker peak RSS {r['worker_peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp / "on", ignore_errors=True)
        shutil.rmtree(tmp / "off", ignore_errors=True)
        if own_cache:
            shutil.rmtree(tmp, ignore_errors=True)
    head = ("stream", "workers", "worker peak RSS MB", "worker peak PSS MB", "sum RSS MB", "sum PSS MB",
            "driver RSS MB", "wall s", "evaluations")
    rows = [(r["mode"], str(r["workers"]), f"{r['worker_peak_rss_mb']:.0f}", f"{r['worker_peak_pss_mb']:.0f}",
             f"{r['workers_sum_peak_rss_mb']:.0f}", f"{r['workers_sum_peak_pss_mb']:.0f}",
             f"{r['driver_peak_rss_mb']:.0f}", f"{r['wall_s']:.0f}",
             " ".join(f"{k}={v}" for k, v in sorted(r["evaluations"].items()))) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print(f"staged search on {args.data}, budget {args.budget}, 1 worker (peaks sampled from /proc every "
          f"{args.interval} s)")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"data": args.data, "budget": args.budget, "results": results},
                                              indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
