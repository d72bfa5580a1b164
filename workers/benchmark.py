"""A tabular benchmark in place of training: the evaluator of ``nas search --benchmark``.

On a space whose every architecture was trained and measured by someone else (NAS-Bench-201,
Dong & Yang, ICLR 2020; device latencies from HELP, Lee et al., NeurIPS 2021), a search can be
run with many seeds in minutes and scored against the true Pareto front. The stages:

- ``train``: the table's accuracy. It charges a **simulated** cost: ``train_s`` device-seconds
  times the cell's forward FLOPs over the mean FLOPs of the space, so a training of the mean
  cell costs ``train_s`` and the costs of all cells average to it.
- ``latency``: the table's latency on the chosen device column, at no cost (a lookup).
- ``screen``: **real** zero-cost proxies on one real, fixed, class-balanced batch of the study's
  data, computed here and charged their measured seconds; plus the table's latency (as the
  latency stage gives it). The network's initial weights and the batch do not depend on the study
  seed, so a score is a property of the architecture, and a cache (``proxy_cache``) shares it
  across studies. A cached score is charged the seconds it took when it was computed.

Every evaluation's device fingerprint names the table (``kind`` = ``benchmark``), and its
metrics carry ``benchmark`` = 1, so the store, ``nas best`` and the dashboard can say that an
accuracy was looked up, not trained here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchmarkError", "BenchmarkTable", "evaluate_benchmark", "load_table", "screen_batch_digest"]

#: the seed of the proxies' batch and of the networks' initial weights (fixed: see the module docstring)
PROXY_SEED = 0


class BenchmarkError(ValueError):
    """A benchmark table that cannot be used (one line: what is wrong and what to pass)."""


@dataclass(frozen=True, eq=False)
class BenchmarkTable:
    """Accuracy and latency of every architecture, by its cell string."""

    labels: str
    column: str
    latency: str
    device: str
    accuracy: dict[str, float]
    latency_ms: dict[str, float]

    @property
    def name(self) -> str:
        return f"{Path(self.labels).name}:{self.column} x {Path(self.latency).name}:{self.device}"


def _read(path: str, flag: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV that ``load_table`` found on disk."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkError(f"{flag} {path}: cannot read it as CSV ({e})") from None
    if "arch" not in header:
        raise BenchmarkError(f"{flag} {path}: no 'arch' column (header: {','.join(header[:8]) or '(empty)'})")
    return header, rows


def _column(header: list[str], column: str | None, flag: str, path: str, suffix: str) -> str:
    if column is None:
        found = [c for c in header if c.endswith(suffix)]
        if len(found) != 1:
            raise BenchmarkError(f"{flag} {path}: name the column to use, one of {', '.join(found) or '(none)'}")
        return found[0]
    if column not in header:
        choices = [c for c in header if c not in ("index", "arch")]
        raise BenchmarkError(f"column {column!r} is not in {path}; choose one of {', '.join(choices)}")
    return column


def _values(rows: list[dict[str, str]], column: str, path: str) -> dict[str, float]:
    from search_spaces.nb201 import NB201Spec

    out: dict[str, float] = {}
    for i, row in enumerate(rows, start=2):
        try:
            arch = NB201Spec.from_string(row.get("arch") or "").to_string()
            value = float(row.get(column) or "")
        except ValueError as e:
            raise BenchmarkError(f"{path}:{i}: {str(e).splitlines()[0]}") from None
        if not math.isfinite(value):
            raise BenchmarkError(f"{path}:{i}: {column} is not a finite number")
        if arch in out:
            raise BenchmarkError(f"{path}:{i}: duplicate arch {arch}")
        out[arch] = value
    return out


@lru_cache(maxsize=8)
def _load(labels: str, column: str | None, latency: str, device: str | None,
          mtimes: tuple[float, float]) -> BenchmarkTable:
    header, rows = _read(labels, "--benchmark")
    column = _column(header, column, "--benchmark-column", labels, "_acc")
    acc = _values(rows, column, labels)
    header, rows = _read(latency, "--benchmark-latency")
    if device is None:
        raise BenchmarkError(f"--device-column is needed: one of {', '.join(c for c in header if c.endswith('_ms'))}")
    device = _column(header, device, "--device-column", latency, "_ms")
    lat = _values(rows, device, latency)
    if any(v <= 0 for v in lat.values()):
        raise BenchmarkError(f"{latency}: {device} has latencies <= 0")
    missing = set(acc) ^ set(lat)
    if missing:
        raise BenchmarkError(f"{labels} and {latency} list different architectures ({len(missing)} in one only, "
                             f"e.g. {sorted(missing)[0]})")
    return BenchmarkTable(labels, column, latency, device, acc, lat)


def load_table(labels: str, column: str | None, latency: str, device: str | None) -> BenchmarkTable:
    """The benchmark's table (cached per process while the files are unchanged); BenchmarkError
    with what to pass when a file, a column or a row is wrong."""
    stamps = []
    for path, flag in ((labels, "--benchmark"), (latency, "--benchmark-latency")):
        try:
            stamps.append(os.stat(path).st_mtime)
        except OSError:
            raise BenchmarkError(f"{flag} {path}: no such file; pass the CSV") from None
    return _load(str(labels), column, str(latency), device, (stamps[0], stamps[1]))


# --------------------------------------------------------------------------------------------
# the proxies' cache: one JSON line per architecture, per (batch, proxies)
# --------------------------------------------------------------------------------------------

_CACHES: dict[str, dict[str, dict[str, Any]]] = {}


def screen_batch_digest(x: torch.Tensor, y: torch.Tensor, proxies: tuple[str, ...]) -> str:
    """What a cached score depends on besides the architecture: the batch and the proxies."""
    h = hashlib.sha256()
    h.update(x.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(y.detach().to(torch.int64).contiguous().numpy().tobytes())
    h.update(",".join(proxies).encode())
    h.update(f"seed={PROXY_SEED};torch={torch.__version__.split('+')[0]}".encode())
    return h.hexdigest()[:16]


def _cache_file(root: str, digest: str) -> Path:
    return Path(root) / f"nb201-{digest}.jsonl"


def _cache(root: str, digest: str) -> dict[str, dict[str, Any]]:
    """The cached scores of one (batch, proxies), read once per process (lines another process is
    still writing are skipped)."""
    f = _cache_file(root, digest)
    key = str(f)
    if key not in _CACHES:
        out: dict[str, dict[str, Any]] = {}
        if f.is_file():
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    out[row["hash"]] = row
                except (ValueError, KeyError, TypeError):
                    continue
        _CACHES[key] = out
    return _CACHES[key]


def _cache_put(root: str, digest: str, row: dict[str, Any]) -> None:
    """Append one line (one write of under 4 KiB with O_APPEND: whole, even beside another writer)."""
    f = _cache_file(root, digest)
    f.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(f, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    _cache(root, digest)[row["hash"]] = row


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------


def _proxies(spec: Any, data: Any, cfg: Any) -> tuple[dict[str, float], float]:
    """Zero-cost scores of ``spec`` on the fixed batch: (metrics, the seconds they took or took
    when first computed)."""
    from predictors.zero_cost import compute
    from search_spaces.nb201 import NB201Space
    from workers.evaluate import _balanced_batch

    names = tuple(p for p in cfg.proxies if p not in ("params", "flops"))
    x, y = _balanced_batch(data.train, cfg.proxy_batch, data.num_classes, PROXY_SEED)
    digest = screen_batch_digest(x, y, names) if cfg.proxy_cache else ""
    if cfg.proxy_cache:
        hit = _cache(cfg.proxy_cache, digest).get(spec.hash)
        if hit is not None:
            return dict(hit["metrics"]), float(hit["seconds"])
    t = time.perf_counter()
    model = NB201Space().build(spec, num_classes=data.num_classes)  # fixed initial weights (seed 0)
    result = compute(model, x, y, names=list(names), inplace=True)  # the model is thrown away after
    metrics = {f"zc.{n}": float(result[n]) for n in names
               if isinstance(result.get(n), (int, float)) and math.isfinite(result[n])}
    seconds = time.perf_counter() - t
    if cfg.proxy_cache:
        _cache_put(cfg.proxy_cache, digest, {"hash": spec.hash, "arch": spec.to_string(), "metrics": metrics,
                                             "seconds": seconds})
    return metrics, seconds


def evaluate_benchmark(spec: Any, stage: str, data: Any, cfg: Any) -> Any:
    """One stage of ``spec`` against the benchmark ``cfg`` names (see the module docstring)."""
    from search_spaces.nb201 import NB201Spec, nb201_flops, nb201_params
    from workers.evaluate import Evaluation, EvaluationError, fingerprint

    if not isinstance(spec, NB201Spec):
        raise EvaluationError(f"the benchmark evaluator takes NB201 cells, got {type(spec).__name__}")
    table = load_table(cfg.benchmark, cfg.benchmark_column, cfg.benchmark_latency, cfg.device_column)
    arch = spec.to_string()
    if arch not in table.accuracy:
        raise EvaluationError(f"{arch} is not in the benchmark table {table.labels}")
    flops = nb201_flops(spec, num_classes=data.num_classes)
    params = nb201_params(spec, num_classes=data.num_classes)
    metrics: dict[str, float] = {"flops": float(flops), "params": float(params), "benchmark": 1.0,
                                 "latency_ms": table.latency_ms[arch]}
    device: dict[str, Any] = {"kind": "benchmark", "name": table.name, "labels": Path(table.labels).name,
                              "column": table.column, "latency": Path(table.latency).name,
                              "device_column": table.device}
    if stage == "train":
        metrics["accuracy"] = table.accuracy[arch]
        metrics["epochs"] = float(cfg.train_epochs)
        seconds = simulated_train_seconds(spec, cfg.benchmark_train_s, data.num_classes)
    elif stage == "latency":
        seconds = 0.0
    elif stage == "screen":
        zc, seconds = _proxies(spec, data, cfg)
        metrics.update(zc)
        metrics["score"] = zc.get(f"zc.{cfg.score}", float("nan"))
        device = fingerprint("cpu", cfg.threads)  # real seconds on this machine's CPU
    else:
        raise EvaluationError(f"stage {stage!r} has no benchmark evaluation; the benchmark gives screen, latency and "
                              "train")
    clean = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    return Evaluation(spec_hash=spec.hash, stage=stage, metrics=clean, seconds=float(seconds), device=device,
                      params=params, flops=flops)


def simulated_train_seconds(spec: Any, train_s: float, num_classes: int = 10) -> float:
    """The simulated device-seconds of training ``spec``: ``train_s`` x its FLOPs / the mean FLOPs."""
    from search_spaces.nb201 import nb201_flops, nb201_mean_flops

    return float(train_s) * nb201_flops(spec, num_classes=num_classes) / nb201_mean_flops(num_classes)
