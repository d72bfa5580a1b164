"""Latency on the target device: measurement, device fingerprint, and a per-block predictor.

- :func:`measure` times a model's forward pass at a precision and batch size: CUDA events (after
  synchronising) on a GPU, optionally replaying a CUDA graph; ``time.perf_counter`` with a fixed
  thread count on CPU. It warms up until consecutive windows agree, then reports the median,
  p10/p90, coefficient of variation and peak memory (CUDA: max allocated; CPU: resident-set growth
  over the process before the model was copied), with the device fingerprint.
- :func:`device_fingerprint` identifies the device: through NVML (nvidia-ml-py) on NVIDIA GPUs,
  the processor model, cores and torch threads on CPU. It never fails: no GPU or no NVML gives a
  CPU fingerprint (or torch's view of the GPU).
- :class:`LatencyPredictor` is a lookup table of every distinct piece of a hybrid_vit network
  (stem, downsampling, each block config at its token grid, layout and precision, the head),
  each measured once per device, plus a calibration fitted on a few whole-model measurements
  (the nn-Meter / HAT recipe: Zhang et al., MobiSys 2021, "nn-Meter: Towards Accurate Latency
  Prediction of Deep-Learning Model Inference on Diverse Edge Devices"; Wang et al., ACL 2020,
  "HAT: Hardware-Aware Transformers"). Saved as JSON keyed by the device fingerprint.

Imports only torch, numpy and ``search_spaces`` (nvidia-ml-py if it is installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from predictors._io import atomic_write
from predictors.precision import (
    PrecisionError,
    activation_dtype,
    check_precision,
    supported_precisions,
    to_precision,
)
from search_spaces.hybrid_vit import build, downsample_grid, stem_grid
from search_spaces.registry import get_channel_mixer, get_token_mixer
from search_spaces.spec import ArchSpec, canonical_json

__all__ = ["LatencyError", "LatencyPredictor", "LatencyResult", "build_lut", "device_fingerprint", "measure",
           "parse_device", "piece_keys", "time_callable", "time_pieces"]

LUT_FORMAT = 1


class LatencyError(ValueError):
    """Bad input to a latency measurement or prediction, with what to do instead."""


# --------------------------------------------------------------------------------------------
# device and fingerprint
# --------------------------------------------------------------------------------------------


def parse_device(device: str | torch.device) -> torch.device:
    """``"cpu"`` or ``"cuda[:i]"`` as a torch device; an unavailable GPU is a :class:`LatencyError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LatencyError(f"bad device {device!r} ({e}); use cpu or cuda[:i]") from None
    if dev.type not in ("cpu", "cuda"):
        raise LatencyError(f"device {str(dev)!r} is not supported; use cpu or cuda[:i]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LatencyError(f"device {str(dev)!r} is not available here (no CUDA GPU visible to torch); "
                               "use --target cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise LatencyError(f"device {str(dev)!r} does not exist; this machine has "
                               f"{torch.cuda.device_count()} GPU(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpu_fingerprint(threads: int | None) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    isa = torch.backends.cpu.get_cpu_capability()
    return {
        "kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count() or 1, "usable_cores": usable,
        "torch_threads": int(threads or torch.get_num_threads()), "isa": isa,
        "torch": torch.__version__, "machine": platform.machine(),
    }


def _nvml_fields(dev: torch.device) -> dict[str, Any]:
    """What NVML says about ``dev`` (empty when nvidia-ml-py or the driver library is missing)."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:
        return {}
    out: dict[str, Any] = {"nvml": True}

    def get(name: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
            out[name] = value.decode() if isinstance(value, bytes) else value
        except Exception:
            pass

    try:
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(dev.index or 0)
        get("name", lambda: pynvml.nvmlDeviceGetName(handle))
        get("uuid", lambda: pynvml.nvmlDeviceGetUUID(handle))
        get("driver", pynvml.nvmlSystemGetDriverVersion)
        get("memory_mb", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20)
        get("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
        get("mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        get("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        get("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        get("power_limit_w", lambda: round(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0, 1))
        get("compute_capability", lambda: "{}.{}".format(*pynvml.nvmlDeviceGetCudaComputeCapability(handle)))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


# fields that identify a device for latency purposes (clocks and UUID vary, so they are reported
# but do not change the key: two identical GPUs share a lookup table)
_KEY_FIELDS = ("kind", "name", "compute_capability", "memory_mb", "power_limit_w", "driver", "cuda", "torch",
               "usable_cores", "torch_threads", "isa", "machine")


def device_fingerprint(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Who the device is, as a JSON-able dict with a stable ``key`` (sha256 of the identity fields).

    NVIDIA GPU: name, UUID, driver, memory, SM/memory clocks (max and current), enforced power
    limit and compute capability from NVML, plus torch's CUDA version. CPU (or no GPU, or a GPU
    but no NVML): processor model, cores, torch threads and vector ISA. Never raises."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = torch.device("cpu")
    fp: dict[str, Any]
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        props = torch.cuda.get_device_properties(dev)
        fp = {"kind": "cuda", "index": index, "name": props.name,
              "memory_mb": props.total_memory // 2**20, "compute_capability": f"{props.major}.{props.minor}",
              "cuda": torch.version.cuda, "torch": torch.__version__, "nvml": False}
        fp.update(_nvml_fields(dev))
    else:
        fp = _cpu_fingerprint(threads)
        if dev.type != "cpu":
            fp["requested"] = str(device)
    fp["key"] = hashlib.sha256(canonical_json({k: fp.get(k) for k in _KEY_FIELDS}).encode()).hexdigest()[:16]
    return fp


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _run_timed(fn: Callable[[], Any], dev: torch.device, n: int) -> list[float]:
    """``n`` calls of ``fn``, each timed in ms (CUDA events on a GPU, perf_counter on CPU)."""
    if n <= 0:
        return []
    if dev.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        _sync(dev)
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        _sync(dev)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _warm_up(fn: Callable[[], Any], dev: torch.device, warmup: int, max_warmup: int, tol: float = 0.05) -> int:
    """At least ``warmup`` calls, then windows of calls until two consecutive window medians agree
    within ``tol`` (or ``max_warmup`` calls in all). Returns the number of calls made."""
    done = len(_run_timed(fn, dev, warmup))
    window = max(3, warmup // 2)
    prev = float(np.median(_run_timed(fn, dev, window)))
    done += window
    while done + window <= max_warmup:
        cur = float(np.median(_run_timed(fn, dev, window)))
        done += window
        if abs(cur - prev) <= tol * max(prev, 1e-9):
            break
        prev = cur
    return done


def _cuda_graph(fn: Callable[[], Any], dev: torch.device) -> Callable[[], Any]:
    """Capture ``fn`` (static inputs) into a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class _Threads:
    """Fix torch's CPU thread count for a block, restoring it afterwards."""

    def __init__(self, n: int | None) -> None:
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self) -> int:
        if self.n:
            torch.set_num_threads(self.n)
        return torch.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


def time_callable(fn: Callable[[], Any], device: str | torch.device = "cpu", *, warmup: int = 10,
                  repeats: int = 50, max_warmup: int | None = None, cuda_graph: bool = False,
                  threads: int | None = None, min_time_s: float = 0.0) -> tuple[list[float], int]:
    """Per-call times (ms) of ``fn`` after a warm-up until stable; returns (times, warm-up calls).

    At least ``repeats`` timed calls, more (up to 50x) until they add up to ``min_time_s``, so a
    fast call is not judged on a few microseconds of samples."""
    dev = parse_device(device)
    if repeats < 1 or warmup < 0:
        raise LatencyError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    with _Threads(threads if dev.type == "cpu" else None), torch.no_grad():
        call = _cuda_graph(fn, dev) if cuda_graph and dev.type == "cuda" else fn
        warm = _warm_up(call, dev, warmup, max_warmup if max_warmup is not None else 10 * warmup + 30)
        times = _run_timed(call, dev, repeats)
        while sum(times) < min_time_s * 1e3 and len(times) < 50 * repeats:
            times += _run_timed(call, dev, repeats)
        return times, warm


def time_pieces(pieces: Sequence[tuple[Callable[..., Any], int]], x: torch.Tensor, device: str | torch.device,
                *, warmup: int = 5, repeats: int = 20, threads: int | None = None,
                min_time_s: float = 0.0) -> list[float]:
    """Median ms of each piece of a chain, timed in place: every timed run goes through the whole
    chain (so each piece meets the caches and allocator state the full forward leaves it), with a
    timestamp (CPU) or CUDA event (GPU) between consecutive pieces.

    ``pieces`` are ``(fn, n_args)``: ``fn(y)`` or ``fn(y, hw)``; a piece returning ``(y, hw)``
    updates the grid, one returning a tensor only updates ``y``."""
    dev = parse_device(device)
    n = len(pieces)

    def chain(marks: Callable[[int], None] | None = None) -> None:
        y, hw = x, (0, 0)
        for j, (fn, n_args) in enumerate(pieces):
            if marks is not None:
                marks(j)
            out = fn(y) if n_args == 1 else fn(y, hw)
            y, hw = out if isinstance(out, tuple) else (out, hw)
        if marks is not None:
            marks(n)

    slots: list[Any] = [None] * (n + 1)  # this run's timestamps (CPU) or recorded events (GPU)

    def mark(j: int) -> None:
        if dev.type == "cuda":
            slots[j] = torch.cuda.Event(enable_timing=True)
            slots[j].record()
        else:
            slots[j] = time.perf_counter()

    rows: list[list[float]] = []
    with _Threads(threads if dev.type == "cpu" else None), torch.no_grad():
        _warm_up(chain, dev, warmup, 10 * warmup + 30)
        total = 0.0
        while len(rows) < repeats or (total < min_time_s * 1e3 and len(rows) < 50 * repeats):
            chain(mark)
            if dev.type == "cuda":
                _sync(dev)
                row = [slots[j].elapsed_time(slots[j + 1]) for j in range(n)]
            else:
                row = [(slots[j + 1] - slots[j]) * 1e3 for j in range(n)]
            rows.append(row)
            total += sum(row)
    return [float(v) for v in np.median(np.asarray(rows), axis=0)]


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _PeakRss:
    """Sample the resident set size on a thread (every 0.2 ms) while the block runs."""

    def __enter__(self) -> _PeakRss:
        self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


# --------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement: times in ms over ``repeats`` timed calls after ``warmup`` calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float  # standard deviation / mean of the timed calls
    peak_mem_mb: float | None
    repeats: int
    warmup: int
    batch_size: int
    input_shape: tuple[int, ...]
    device: str
    precision: str
    threads: int | None
    cuda_graph: bool
    fingerprint: dict[str, Any] = field(repr=False)

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size / (self.median_ms / 1e3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["throughput"] = self.throughput
        return d


def _full_shape(input_shape: Sequence[int], batch_size: int | None) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return (batch_size or 1, *shape)
    if len(shape) == 4:
        if batch_size is not None and batch_size != shape[0]:
            raise LatencyError(f"input_shape {shape} has batch {shape[0]} but batch_size={batch_size}; "
                               "give a (C, H, W) shape with batch_size, or a (B, C, H, W) shape alone")
        return shape
    raise LatencyError(f"input_shape must be (C, H, W) or (B, C, H, W), got {shape}")


def measure(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu",
            precision: str = "fp32", batch_size: int | None = None, warmup: int = 10, repeats: int = 50, *,
            threads: int | None = None, cuda_graph: bool = False, max_warmup: int | None = None,
            seed: int = 0) -> LatencyResult:
    """Latency of ``model`` on a random batch of ``input_shape`` at ``precision`` on ``device``.

    The model is copied and converted (see :func:`predictors.precision.to_precision`); ``model``
    itself is not changed. ``threads`` fixes torch's CPU thread count for the measurement (default:
    the current one). ``cuda_graph`` replays a captured CUDA graph (GPU only)."""
    dev = parse_device(device)
    shape = _full_shape(input_shape, batch_size)
    if any(s < 1 for s in shape):
        raise LatencyError(f"input shape must be positive, got {shape}")
    if cuda_graph and dev.type != "cuda":
        raise LatencyError("cuda_graph needs a cuda device")
    rss0 = _rss_bytes() if dev.type == "cpu" else None
    try:
        net = to_precision(model, precision, dev)
    except PrecisionError as e:
        raise LatencyError(str(e)) from None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dev, activation_dtype(precision))
    fp = device_fingerprint(dev, threads=threads)
    with _Threads(threads if dev.type == "cpu" else None) as n_threads, torch.no_grad():
        times, warm = time_callable(lambda: net(x), dev, warmup=warmup, repeats=repeats, max_warmup=max_warmup,
                                    cuda_graph=cuda_graph, threads=threads)
        if dev.type == "cuda":
            _sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            net(x)
            _sync(dev)
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            with _PeakRss() as rss:
                net(x)
            peak = None if rss0 is None else max(0.0, (rss.peak - rss0) / 2**20)
    t = np.asarray(times, dtype=np.float64)
    mean = float(t.mean())
    return LatencyResult(
        median_ms=float(np.median(t)), p10_ms=float(np.percentile(t, 10)), p90_ms=float(np.percentile(t, 90)),
        mean_ms=mean, cv=float(t.std() / mean) if mean > 0 else 0.0, peak_mem_mb=peak, repeats=len(times),
        warmup=warm, batch_size=shape[0], input_shape=shape, device=str(dev), precision=precision,
        threads=n_threads if dev.type == "cpu" else None, cuda_graph=bool(cuda_graph and dev.type == "cuda"),
        fingerprint=fp,
    )


# --------------------------------------------------------------------------------------------
# the predictor: per-piece lookup table + calibration
# --------------------------------------------------------------------------------------------


def _shape(layout: str, c: int, h: int, w: int, prefix: int, batch: int) -> list[int]:
    return [batch, c, h, w] if layout == "nchw" else [batch, prefix + h * w, c]


def piece_keys(spec: ArchSpec, img_size: int, batch_size: int, precision: str, *, in_chans: int = 3,
               num_classes: int = 1000) -> list[dict[str, Any]]:
    """The pieces of ``build(spec)``'s forward pass in the order ``HybridViT.pieces`` yields them,
    each described by what determines its latency (config, input shape and layout, precision)."""
    if not isinstance(spec, ArchSpec):
        raise LatencyError(f"the latency table covers hybrid_vit specs, got {type(spec).__name__}")
    h, w = stem_grid(spec.stem.kind, spec.stem.stride, img_size, img_size)
    if min(h, w) < 1:
        raise LatencyError(f"image size {img_size} is too small for stem stride {spec.stem.stride}")
    prefix = 1 if spec.head.pool == "cls" else 0
    layout = "nlc" if prefix or spec.pos_embed == "learned" else "nchw"
    common = {"batch": batch_size, "precision": precision}
    c = spec.stages[0].width
    keys: list[dict[str, Any]] = [{"op": "stem", **asdict(spec.stem), "pos_embed": spec.pos_embed, "prefix": prefix,
                                   "in": [batch_size, in_chans, img_size, img_size], "width": c, **common}]
    for st in spec.stages:
        if st.downsample != "none" or c != st.width:
            keys.append({"op": "down", "kind": st.downsample, "in": _shape(layout, c, h, w, prefix, batch_size),
                         "width": st.width, **common})
            h, w = downsample_grid(st.downsample, h, w)
            layout = "nchw"
        for tm, cm in st.mixers():
            tm_cls, cm_cls = get_token_mixer(tm), get_channel_mixer(cm)
            keys.append({"op": "block", "token_mixer": tm, "channel_mixer": cm, "width": st.width,
                         "heads": st.heads if tm_cls.uses_heads else 1, "mlp_ratio": st.mlp_ratio, "norm": st.norm,
                         "layer_scale": st.layer_scale is not None, "grid": [h, w],
                         "in": _shape(layout, st.width, h, w, prefix, batch_size), **common})
            for cls in (tm_cls, cm_cls):
                layout = layout if cls.layout == "any" else cls.layout
        c = st.width
    keys.append({"op": "head", "pool": spec.head.pool, "norm": spec.head.norm, "classes": num_classes,
                 "in": _shape(layout, c, h, w, prefix, batch_size), **common})
    return keys


class LatencyPredictor:
    """Latency of hybrid_vit networks on one device at one image size and batch size.

    ``table`` maps each piece (canonical JSON of :func:`piece_keys`) to its median ms, measured
    once on this device; ``predict(spec) = a * sum(pieces) + b * n_pieces + c`` with (a, b, c)
    from :meth:`fit` on whole-model measurements (before ``fit``: the plain sum). ``precision``
    None uses each spec's own precision; a name overrides it. Pieces missing from the table are
    measured on the spot when this process runs on the device the table belongs to."""

    def __init__(self, device: str = "cpu", precision: str | None = None, img_size: int = 224, batch_size: int = 1,
                 *, in_chans: int = 3, num_classes: int = 1000, threads: int | None = None, warmup: int = 5,
                 repeats: int = 20, min_time_s: float = 0.1, fingerprint: dict[str, Any] | None = None) -> None:
        if img_size < 1 or batch_size < 1:
            raise LatencyError(f"img_size and batch_size must be >= 1, got {img_size} and {batch_size}")
        self.device, self.precision, self.img_size, self.batch_size = str(device), precision, img_size, batch_size
        self.in_chans, self.num_classes, self.threads = in_chans, num_classes, threads
        self.warmup, self.repeats, self.min_time_s = warmup, repeats, min_time_s
        self.fingerprint = fingerprint or device_fingerprint(device, threads=threads)
        self.table: dict[str, float] = {}
        self.calibration: tuple[float, float, float] | None = None
        self._live: bool | None = None if fingerprint else True

    # ------------------------------------------------------------------ table
    @property
    def key(self) -> str:
        """The device fingerprint's key this table belongs to."""
        return str(self.fingerprint["key"])

    def _precision(self, spec: ArchSpec) -> str:
        return self.precision or spec.precision

    def keys(self, spec: ArchSpec) -> list[str]:
        """Table keys of the pieces of ``spec``, in forward order."""
        return [canonical_json(k) for k in piece_keys(spec, self.img_size, self.batch_size, self._precision(spec),
                                                       in_chans=self.in_chans, num_classes=self.num_classes)]

    def missing(self, specs: Iterable[ArchSpec]) -> list[str]:
        """Distinct pieces of ``specs`` not in the table yet."""
        out: dict[str, None] = {}
        for spec in specs:
            for k in self.keys(spec):
                if k not in self.table:
                    out[k] = None
        return list(out)

    def can_measure(self) -> bool:
        """Whether this process runs on the device the table belongs to (so it can add pieces)."""
        if self._live is None:
            try:
                parse_device(self.device)
                self._live = device_fingerprint(self.device, threads=self.threads)["key"] == self.key
            except LatencyError:
                self._live = False
        return self._live

    def add(self, specs: Iterable[ArchSpec], progress: Callable[[int, int], None] | None = None) -> int:
        """Measure every piece of ``specs`` not in the table yet; returns how many were measured."""
        specs = list(specs)
        todo = [s for s in specs if any(k not in self.table for k in self.keys(s))]
        if todo and not self.can_measure():
            raise LatencyError(f"{len(self.missing(todo))} piece(s) are not in this latency table, which belongs to "
                               f"{self.fingerprint.get('name')} (key {self.key}); add them on that device, or "
                               "build a table here with build_lut")
        added = 0
        for i, spec in enumerate(todo):
            added += self._measure_pieces(spec)
            if progress is not None:
                progress(i + 1, len(todo))
        return added

    def _measure_pieces(self, spec: ArchSpec) -> int:
        keys = self.keys(spec)
        if all(k in self.table for k in keys):
            return 0
        precision = self._precision(spec)
        dev = parse_device(self.device)
        try:
            net = to_precision(build(spec, self.num_classes, self.img_size, self.in_chans), precision, dev)
        except PrecisionError as e:
            raise LatencyError(str(e)) from None
        x = torch.randn(self.batch_size, self.in_chans, self.img_size, self.img_size)
        x = x.to(dev, activation_dtype(precision))
        with torch.no_grad(), _Threads(self.threads if dev.type == "cpu" else None):
            pieces = net.pieces(x)
        if len(pieces) != len(keys):
            raise AssertionError(f"{len(pieces)} pieces in the network but {len(keys)} table keys for {spec.short()}")
        for (name, _, args), key in zip(pieces, keys):
            want, got = json.loads(key)["in"], list(args[0].shape)
            if got != want:
                raise AssertionError(f"piece {name} of {spec.short()} gets {got}, the table key says {want}")
        medians = time_pieces([(fn, len(args)) for _, fn, args in pieces], x, dev, warmup=self.warmup,
                              repeats=self.repeats, threads=self.threads, min_time_s=self.min_time_s)
        added = 0
        for key, ms in zip(keys, medians):
            if key not in self.table:
                self.table[key] = ms
                added += 1
        return added

    def piece_sum(self, spec: ArchSpec, fill: bool = True) -> tuple[float, int]:
        """(sum of the table's ms over the pieces of ``spec``, number of pieces)."""
        keys = self.keys(spec)
        if fill and any(k not in self.table for k in keys):
            self.add([spec])
        try:
            return sum(self.table[k] for k in keys), len(keys)
        except KeyError:
            raise LatencyError(f"{spec.short()} has pieces that are not in the latency table; "
                               "call add([spec]) on the table's device first") from None

    # ------------------------------------------------------------------ calibration and prediction
    def fit(self, specs: Sequence[ArchSpec], measured_ms: Sequence[float]) -> dict[str, float]:
        """Fit ``ms = a * sum + b * n_pieces + c`` to whole-model measurements, minimising relative
        error (fewer than 4 measurements: the ratio ``a`` alone). Returns the fit and its MAPE."""
        if len(specs) != len(measured_ms) or not specs:
            raise LatencyError(f"fit needs as many measurements as specs (>= 1), got {len(specs)} specs and "
                               f"{len(measured_ms)} measurements")
        y = np.asarray(measured_ms, dtype=np.float64)
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise LatencyError("measured latencies must be positive and finite")
        feats = np.array([self.piece_sum(s) for s in specs], dtype=np.float64)
        a, b, c = float(np.median(y / feats[:, 0])), 0.0, 0.0
        if len(specs) >= 4:
            design = np.column_stack([feats[:, 0], feats[:, 1], np.ones(len(y))]) / y[:, None]
            coef, *_ = np.linalg.lstsq(design, np.ones(len(y)), rcond=None)
            if coef[0] > 0:
                a, b, c = (float(v) for v in coef)
        self.calibration = (a, b, c)
        pred = np.array([self._apply(s, n) for s, n in feats])
        return {"a": a, "b": b, "c": c, "mape": float(np.mean(np.abs(pred - y) / y) * 100)}

    def _apply(self, total: float, n: int) -> float:
        if self.calibration is None:
            return total
        a, b, c = self.calibration
        return max(a * total + b * n + c, 0.05 * a * total)

    def predict(self, spec: ArchSpec, fill: bool = True) -> float:
        """Predicted median latency (ms) of ``spec`` on the table's device."""
        return self._apply(*self.piece_sum(spec, fill=fill))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": LUT_FORMAT, "fingerprint": self.fingerprint, "device": self.device,
                "precision": self.precision, "img_size": self.img_size, "batch_size": self.batch_size,
                "in_chans": self.in_chans, "num_classes": self.num_classes, "threads": self.threads,
                "warmup": self.warmup, "repeats": self.repeats, "min_time_s": self.min_time_s,
                "calibration": list(self.calibration) if self.calibration else None, "table": self.table}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically: a crash never leaves half a file)."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True)
        return atomic_write(path, lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> LatencyPredictor:
        """Read a saved table. With ``device``, refuse a table measured on another device."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise LatencyError(f"cannot read latency table {str(path)!r}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != LUT_FORMAT:
            raise LatencyError(f"{str(path)!r} is not a latency table (format {LUT_FORMAT}); rebuild it with build_lut")
        fp = data["fingerprint"]
        if device is not None:
            here = device_fingerprint(device, threads=data.get("threads"))
            if here["key"] != fp.get("key"):
                raise LatencyError(f"latency table {str(path)!r} was measured on {fp.get('name')} "
                                   f"(key {fp.get('key')}), not on this {here.get('name')} (key {here['key']}); "
                                   "build one here with build_lut")
        pred = cls(data["device"], data["precision"], data["img_size"], data["batch_size"], in_chans=data["in_chans"],
                   num_classes=data["num_classes"], threads=data["threads"], warmup=data["warmup"],
                   repeats=data["repeats"], min_time_s=data["min_time_s"], fingerprint=fp)
        pred.table = {str(k): float(v) for k, v in data["table"].items()}
        pred.calibration = tuple(data["calibration"]) if data["calibration"] else None  # type: ignore[assignment]
        return pred

    def filename(self) -> str:
        """A file name keyed by device fingerprint, precision, image size and batch size."""
        return f"latency-{self.key}-{self.precision or 'spec'}-{self.img_size}px-b{self.batch_size}.json"


def build_lut(space: Any, device: str = "cpu", precision: str | None = "fp32", img_size: int = 224,
              batch_size: int = 1, *, n_archs: int = 100, seed: int = 0, specs: Sequence[ArchSpec] | None = None,
              in_chans: int = 3, num_classes: int = 1000, threads: int | None = None, warmup: int = 5,
              repeats: int = 20, min_time_s: float = 0.1,
              progress: Callable[[int, int], None] | None = None) -> LatencyPredictor:
    """A :class:`LatencyPredictor` whose table holds every piece of ``specs`` (default: ``n_archs``
    random architectures of ``space`` from ``seed``), each measured once on ``device``.

    ``precision`` None keeps each spec's own precision (random ones then draw only precisions
    the device runs natively)."""
    from search_spaces import get_space

    space = get_space(space) if isinstance(space, str) else space
    if space.name != "hybrid_vit":
        raise LatencyError(f"the latency table covers the hybrid_vit space, not {space.name!r}")
    parse_device(device)
    if precision is not None:
        try:
            check_precision(precision, device)
        except PrecisionError as e:
            raise LatencyError(str(e)) from None
    pred = LatencyPredictor(device, precision, img_size, batch_size, in_chans=in_chans, num_classes=num_classes,
                            threads=threads, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
    if specs is None:
        if precision is None:
            space = space.with_choices(precisions=supported_precisions(device))
        specs = [space.random(seed + i) for i in range(n_archs)]
    pred.add(specs, progress=progress)
    return pred
