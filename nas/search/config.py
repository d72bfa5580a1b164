"""A study's set-up: its config (every check a Python caller gets too), search space and data.

``SearchConfig(...)`` checks every field and reports all that is wrong in one ``SearchError``;
``SearchConfig.parse`` also reads the command-line forms (``max_params="5M"``,
``shares="screen=0.2,train=0.8"``, ``objectives="accuracy,latency"``). ``prepare_study`` runs the
checks that need the data, the device or the network, without writing anything; ``create_study``
registers the study.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nas.budget import Budget, BudgetError, parse_budget
from nas.store import Store, validate_study_name

OBJECTIVES = {"accuracy": ("accuracy", "max"), "latency": ("latency_ms", "min"), "params": ("params", "min"),
              "flops": ("flops", "min")}
DEFAULT_SHARES = {"screen": 0.15, "supernet": 0.35, "latency": 0.1, "train": 0.4}
PRECISION_CHOICES = ("any", "fp32", "bf16", "fp16", "int8", "fp8")
TARGETS = ("auto", "cpu", "cuda")
#: early stopping of the staged search's train stage: none, or ASHA (Li et al. 2020). none since session
#: 13: on HybridBench's learning curves an early epoch hardly predicts the last (bench/hybridbench_asha.py)
EARLY_STOP = ("none", "asha")
MAX_WORKERS = 1024
MAX_TRAIN_EPOCHS = 1000
MAX_SEED = 2**32 - 1
MIN_DATA_LIMIT, MAX_DATA_LIMIT = 20, 10_000_000
MAX_SCREEN_BATCH = 32  # candidates one screening request carries at most


class SearchError(ValueError):
    """A search request that cannot run (one line: what was wrong and what to do)."""


class StudyLost(RuntimeError):
    """The driver can no longer keep its results: the store was deleted or replaced, or another
    driver took the study over. Nothing more is written; the study is not "completed"."""


def _clip(value: Any, n: int = 40) -> str:
    """``repr(value)`` cut to about ``n`` characters (a long bad value is never echoed whole)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def max_threads() -> int:
    """The most torch threads a trial may ask for: 4 per core, and at least 256."""
    return max(256, 4 * (os.cpu_count() or 1))


def _int_problem(flag: str, value: Any, low: int, high: int) -> str | None:
    """Why ``value`` is not an integer in ``[low, high]`` (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{flag} must be an integer, got {_clip(value)}"
    if not low <= value <= high:
        shown = str(value) if len(str(value)) <= 24 else str(value)[:20] + "…"
        return (f"{flag} must be at least {low:,}, got {shown}" if value < low and high >= 10**6 else
                f"{flag} must be between {low:,} and {high:,}, got {shown}")
    return None


def _address_problem(address: Any) -> str | None:
    if address is None or address == "auto":
        return None
    text = str(address)
    host, _, port = text.rpartition(":")
    if not isinstance(address, str) or not text.isascii() or not host or not (
            port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return f"--address must be auto or HOST:PORT (port 1-65535), got {_clip(address)}"
    return None


@dataclass(frozen=True)
class SearchConfig:
    """Everything a study needs to run again (stored as the study's config JSON).

    Field ``x_y`` is the command line's ``--x-y`` (``shares`` is ``--stages``); every error
    message names the option that way."""

    space: str = "hybrid_vit"
    data: str = "digits"
    data_limit: int | None = None
    objectives: tuple[str, ...] = ("accuracy", "latency")
    target: str = "auto"  # auto: the GPU when torch sees one, else the CPU (resolved by prepare_study)
    precision: str = "fp32"
    max_params: int | None = None
    max_latency_ms: float | None = None
    img_size: int | None = None
    frame: str = "auto"
    strategy: str = "staged"
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    workers: int = 1
    threads: int = 1
    supernet_workers: int = 1  # Ray Train (DDP) workers of the supernet training; 1: one process; 0: auto
    train_workers: int = 1  # Ray Train (DDP) workers of each train-stage training; 1: one process
    gpus_per_trial: float = 1.0  # GPUs a trial holds on --target cuda; below 1, small trials share a GPU
    address: str | None = None
    seed: int = 0
    train_epochs: int = 4
    early_stop: str = "none"  # the train stage's early stopping: none or asha
    supernet_epochs: int | None = None  # None: as many as the supernet's budget share allows
    max_supernet_epochs: int = 30
    score: str = "nwot"
    parzc: str | None = None
    supernet: str | None = None  # an already trained supernet checkpoint to use instead of training one
    workdir: str = ""
    max_failures: int = 2
    # a tabular benchmark in place of training (space nb201; see workers/benchmark.py)
    benchmark: str | None = None  # labels CSV: arch and an accuracy column
    benchmark_column: str | None = None  # its accuracy column (default: the one column ending in _acc)
    benchmark_latency: str | None = None  # latency CSV: arch and one column per device
    device_column: str | None = None  # the device's column in it, e.g. titan_rtx_256_ms
    benchmark_train_s: float = 1000.0  # simulated device-seconds of training the mean cell
    proxy_cache: str | None = None  # a folder that shares zero-cost scores across benchmark studies
    screen_max: int | None = None  # candidates a screening round takes at most (benchmark default 1000)
    # candidates per screening request; None sizes it by their measured seconds, which the machine's
    # load moves, so only a fixed count makes a seeded benchmark search repeat itself cell for cell
    screen_batch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.objectives, (list, tuple)):
            object.__setattr__(self, "objectives", tuple(self.objectives))
        problems = list(self._problems())
        if problems:
            raise SearchError("; ".join(problems))
        full = {k: float(self.shares.get(k, 0.0)) for k in DEFAULT_SHARES}
        total = sum(full.values())
        object.__setattr__(self, "shares", {k: v / total for k, v in full.items()})

    def _problems(self) -> Iterator[str]:
        """Every problem of this config, one short sentence each."""
        from search_spaces import list_spaces

        known = list_spaces()
        if self.space not in known:
            yield f"unknown search space {_clip(self.space)}; choose one of: {', '.join(known)}"
        elif self.space == "nb201" and not self.benchmark:
            yield ("nas search runs nb201 only against its benchmark table: pass --benchmark LABELS.csv "
                   "--benchmark-latency LATENCY.csv --device-column COLUMN")
        elif self.space != "nb201" and self.benchmark:
            yield f"--benchmark is a NAS-Bench-201 table; use it with --space nb201, not {_clip(self.space)}"
        yield from self._benchmark_problems()
        if not isinstance(self.data, str) or not self.data.strip() or len(self.data) > 4096 \
                or not self.data.isprintable():
            yield (f"--data {_clip(self.data)} is not a dataset; use digits, cifar10:PATH, imagefolder:PATH or "
                   "npz:PATH")
        objs = self.objectives if isinstance(self.objectives, tuple) else ()
        if not objs or len(set(objs)) != len(objs):
            yield "--objectives must be distinct names, e.g. accuracy,latency"
        unknown = [o for o in objs if o not in OBJECTIVES]
        if unknown:
            yield f"unknown objective {_clip(unknown[0])} in --objectives; choose from {', '.join(OBJECTIVES)}"
        elif objs and "accuracy" not in objs:
            yield "--objectives must include accuracy, e.g. accuracy,latency"
        from nas.search.strategy import strategy_names  # the registry (a new strategy is one file)

        for flag, value, choices in (("--target", self.target, TARGETS), ("--precision", self.precision,
                                     PRECISION_CHOICES), ("--strategy", self.strategy, strategy_names()),
                                    ("--early-stop", self.early_stop, EARLY_STOP)):
            if value not in choices:
                yield f"{flag} must be one of {', '.join(choices)}, got {_clip(value)}"
        bounds: list[tuple[str, Any, int, int]] = [
            ("--workers", self.workers, 1, MAX_WORKERS), ("--threads", self.threads, 1, max_threads()),
            ("--supernet-workers", self.supernet_workers, 0, MAX_WORKERS),  # 0: auto
            ("--train-workers", self.train_workers, 1, MAX_WORKERS),
            ("--train-epochs", self.train_epochs, 1, MAX_TRAIN_EPOCHS), ("--seed", self.seed, 0, MAX_SEED),
            ("--max-supernet-epochs", self.max_supernet_epochs, 1, MAX_TRAIN_EPOCHS),
            ("--max-failures", self.max_failures, 0, 1000)]
        for flag, value, low, high in (("--data-limit", self.data_limit, MIN_DATA_LIMIT, MAX_DATA_LIMIT),
                                       ("--img-size", self.img_size, 8, 1024),
                                       ("--supernet-epochs", self.supernet_epochs, 1, MAX_TRAIN_EPOCHS),
                                       ("--max-params", self.max_params, 1, 10**15),
                                       ("--screen-batch", self.screen_batch, 1, MAX_SCREEN_BATCH)):
            if value is not None:
                bounds.append((flag, value, low, high))
        for flag, value, low, high in bounds:
            problem = _int_problem(flag, value, low, high)
            if problem:
                yield problem
        g = self.gpus_per_trial
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (math.isfinite(g) and 0 < g <= 1):
            yield (f"--gpus-per-trial must be a fraction in (0, 1] (0.25: four trials share a GPU), got {_clip(g)}; "
                   "for several GPUs, train data parallel on GPUs of their own (--supernet-workers, "
                   "--train-workers)")
        lat = self.max_latency_ms
        if lat is not None and not (isinstance(lat, (int, float)) and math.isfinite(lat) and 0 < lat < 1e9):
            yield f"--max-latency-ms must be a positive number of milliseconds, got {_clip(lat)}"
        if not isinstance(self.frame, str) or not self.frame:
            yield "--frame must be auto, tiny, small or a frame JSON file"
        problem = _address_problem(self.address)
        if problem:
            yield problem
        yield from _share_problems(self.shares)

    def _benchmark_problems(self) -> Iterator[str]:
        for flag, value in (("--benchmark", self.benchmark), ("--benchmark-latency", self.benchmark_latency),
                            ("--benchmark-column", self.benchmark_column), ("--device-column", self.device_column),
                            ("--proxy-cache", self.proxy_cache)):
            if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 4096):
                yield f"{flag} must be a path or a column name, got {_clip(value)}"
        if not self.benchmark:
            extra = [f for f, v in (("--benchmark-latency", self.benchmark_latency),
                                    ("--device-column", self.device_column)) if v is not None]
            if extra:
                yield f"{extra[0]} needs --benchmark LABELS.csv"
            return
        if not self.benchmark_latency or not self.device_column:
            yield "a benchmark search needs --benchmark-latency LATENCY.csv and --device-column COLUMN too"
        t = self.benchmark_train_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and 0 < t < 1e9):
            yield f"--benchmark-train-seconds must be a positive number, got {_clip(t)}"
        for flag, value in (("--max-params", self.max_params), ("--supernet", self.supernet), ("--parzc", self.parzc)):
            if value is not None:
                yield f"{flag} is not used by a benchmark search; leave it out"
        if self.screen_max is not None:
            problem = _int_problem("--screen-max", self.screen_max, 1, MAX_DATA_LIMIT)
            if problem:
                yield problem

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objectives"] = list(self.objectives)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        """A stored config; its target is concrete (``prepare_study`` stores the resolved one; a
        config stored without a target predates ``auto`` and meant the CPU; ``auto`` stored by a
        caller that skipped ``prepare_study`` is resolved here). One stored without ``early_stop``
        predates the choice and ran ASHA, so a resumed study goes on as it began."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["target"] = resolve_target(values.get("target", "cpu"))
        values.setdefault("early_stop", "asha")
        return cls(**values)

    @classmethod
    def parse(cls, **values: Any) -> SearchConfig:
        """A config from command-line forms: ``max_params="5M"``, ``shares="screen=0.2,train=0.8"``,
        ``objectives="accuracy,latency"`` (parsed values pass as they are). Every problem, of the
        texts and of the config, is reported in one SearchError joined by "; "."""
        problems = []
        readers = {"max_params": lambda t: parse_count(t, "--max-params"), "shares": parse_shares,
                   "supernet_workers": _read_supernet_workers,
                   "objectives": lambda t: tuple(o.strip() for o in t.split(",") if o.strip())}
        for key, read in readers.items():
            if isinstance(values.get(key), str):
                try:
                    values[key] = read(values[key])
                except SearchError as e:
                    problems.append(str(e))
                    values.pop(key)
        try:
            cfg = cls(**values)
        except SearchError as e:
            problems.append(str(e))
        if problems:
            raise SearchError("; ".join(problems))
        return cfg


def _read_supernet_workers(text: str) -> int:
    """``auto`` -> 0 (resolved by :func:`prepare_study`), else the integer."""
    if text.strip() == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise SearchError(f"--supernet-workers must be auto or a number of workers (1 or more), got {_clip(text)}")
    return n


def _share_problems(shares: Any) -> Iterator[str]:
    if not isinstance(shares, dict):
        yield "--stages must map stages to shares, e.g. screen=0.2,train=0.8"
        return
    bad = sorted(set(shares) - set(DEFAULT_SHARES), key=str)
    if bad:
        yield f"unknown stage {_clip(bad[0])} in --stages; stages are {', '.join(DEFAULT_SHARES)}"
    elif any(isinstance(v, bool) or not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v))
             for v in shares.values()):
        yield "--stages shares must be non-negative numbers"
    elif float(shares.get("train", 0)) + float(shares.get("screen", 0)) <= 0:
        yield "--stages must give screen or train a positive share"


def _ascii(flag: str, text: str) -> None:
    """Numbers are written with ASCII digits (Python alone would read '３０' as 30)."""
    if not text.isascii():
        raise SearchError(f"{flag} {_clip(text)} has non-ASCII characters; write numbers with 0-9")


def parse_shares(text: str) -> dict[str, float]:
    """``screen=0.2,supernet=0.3,latency=0.1,train=0.4`` -> shares (normalised by SearchConfig)."""
    _ascii("--stages", text)
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise SearchError(f"cannot read stage share {_clip(part)}; use e.g. screen=0.2,train=0.8") from None
    if not out:
        raise SearchError("empty --stages; use e.g. screen=0.2,supernet=0.3,latency=0.1,train=0.4")
    return out


def parse_count(text: str, what: str) -> int:
    """``5M``, ``500k``, ``2.5M``, ``123456`` -> an integer count."""
    _ascii(what, str(text))
    raw = str(text).strip().lower().replace("_", "")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(raw[-1:], 1.0)
    num = raw[:-1] if raw[-1:] in "kmgb" else raw
    try:
        value = float(num) * mult
    except ValueError:
        raise SearchError(f"cannot read {what} {_clip(text)}; use e.g. 5M, 500k or 250000") from None
    if not math.isfinite(value) or value < 1 or value > 1e15:
        raise SearchError(f"{what} must be between 1 and 1e15, got {_clip(text)}")
    return int(value)


# --------------------------------------------------------------------------------------------
# the search space of a study: a supernet frame, a sub-space of hybrid_vit
# --------------------------------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_target(target: str, budget: Budget | None = None) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a budget that names a device
    (``3cpu-m``, ``8gpu-h``) picks that device. ``cpu`` and ``cuda`` stay as they are."""
    if target != "auto":
        return target
    if budget is not None and budget.device is not None:
        return "cuda" if budget.device == "gpu" else "cpu"
    return "cuda" if _cuda() else "cpu"


def _precisions(cfg: SearchConfig) -> tuple[str, ...]:
    from predictors.precision import supported_precisions

    if cfg.precision != "any":
        return (cfg.precision,)
    return tuple(supported_precisions(resolve_target(cfg.target))) or ("fp32",)


def make_frame(cfg: SearchConfig, in_chans: int, num_classes: int, img_size: int) -> Any:
    """The study's search space: a named frame (or a JSON file) adapted to the data and precision."""
    from search_spaces.supernet import FRAMES, frame_from_json, get_frame

    name = cfg.frame
    if name == "auto":
        name = "tiny" if img_size <= 16 else "small"
    over = {"in_chans": in_chans, "num_classes": num_classes, "img_size": img_size, "precisions": _precisions(cfg)}
    if name in FRAMES:
        return get_frame(name, **over)
    path = Path(name)
    if not path.is_file():
        raise SearchError(f"unknown frame {_clip(name)}; use auto, {', '.join(sorted(FRAMES))} or a frame JSON file")
    try:
        return replace(frame_from_json(path.read_text()), **over)
    except (ValueError, RecursionError) as e:
        raise SearchError(f"frame {path}: {e or 'nested too deeply'}") from None


# --------------------------------------------------------------------------------------------
# creating a study (validation first, nothing written on bad input)
# --------------------------------------------------------------------------------------------


def default_workdir(url: str, study: str) -> str:
    """Where a new study keeps its files (supernet checkpoint, trained weights): ``nas_runs/NAME``
    next to a SQLite file, or ``nas_runs/NAME.2``, ``.3``, ... when that folder exists: it belongs
    to an earlier study of that name (a deleted store, another store in the same folder), and its
    supernet checkpoint would otherwise be continued, and its seconds counted, as this study's."""
    base = Path(".")
    if url.startswith("sqlite:///"):
        base = Path(url[len("sqlite:///"):]).resolve().parent
    root = (base / "nas_runs").resolve()
    path, n = root / study, 1
    while path.exists():
        n += 1
        path = root / f"{study}.{n}"
    return str(path)


def load_data(cfg: SearchConfig) -> Any:
    """The training split of ``cfg.data`` at the study's image size (``cfg.img_size``, else the
    native side but at least 16), split into train/validation for the workers: in memory, or
    streaming for a large image folder (``nas.data.open_dataset`` decides by size;
    ``$HYBRID_NAS_STREAM`` overrides). The images are read once: the native side is known up front
    for digits and CIFAR-10, and otherwise the data opens at its native size and is read again,
    resized, only when that side is below 16 pixels (small images: a cheap second read)."""
    from nas.data import open_dataset, parse_data
    from workers.evaluate import split_dataset

    # a benchmark's proxies take one fixed batch whatever the study's seed (workers/benchmark.py)
    seed = 0 if cfg.benchmark else cfg.seed
    try:
        img = cfg.img_size
        native = _NATIVE.get(parse_data(cfg.data).kind)
        if img is None and native is not None:
            img = max(16, native)
        ds = open_dataset(cfg.data, "train", limit=cfg.data_limit, img_size=img, seed=seed)
        if img is None:
            size = ds.img_size  # (H, W) for images that are not square: the rule reads their height
            if (int(size[0]) if isinstance(size, tuple) else int(size)) < 16:
                del ds
                ds = open_dataset(cfg.data, "train", limit=cfg.data_limit, img_size=16, seed=seed)
    except (ValueError, OSError) as e:
        raise SearchError(f"data {_clip(cfg.data)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return split_dataset(ds, 0.2, seed)


_NATIVE = {"digits": 8, "cifar10": 32}  # native sides known without reading the data


def check_target(target: str) -> None:
    if resolve_target(target) == "cuda" and not _cuda():
        raise SearchError("--target cuda needs a CUDA GPU and a CUDA build of torch; use --target cpu here")


def _check_budget_device(budget: Budget, cfg: SearchConfig, target: str) -> None:
    """A budget that counts one kind of device must be spent on that kind."""
    if budget.device == "gpu" and target != "cuda":
        raise SearchError(f"budget {budget} counts GPU time but --target is {cfg.target}; use --target cuda (or "
                          f"auto) on a GPU, or a time budget such as 3cpu-m or 3m")
    if budget.device == "gpu" and not _cuda():
        raise SearchError(f"budget {budget} counts GPU time but torch sees no CUDA GPU here; use a CPU budget such "
                          "as 3cpu-m or a plain time budget such as 3m")
    if budget.device == "cpu" and target == "cuda":
        raise SearchError(f"budget {budget} counts CPU time but the trials run on the GPU (--target cuda); use a "
                          "GPU budget such as 2gpu-h or a plain time budget such as 2h")


def _reachable(address: str | None) -> None:
    """A Ray head at HOST:PORT must accept a connection (ray.init would wait for minutes)."""
    import socket

    if address is None or address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SearchError(f"no Ray cluster answers at {_clip(address)} ({e.strerror or e}); start one with "
                          "`ray start --head` or leave out --address") from None


def prepare_study(name: str, cfg: SearchConfig, budget: Budget, url: str) -> dict[str, Any]:
    """Check everything about a new study that needs no store (target, budget unit, precision,
    data, frame, supernet, predictor, cluster) and return the config to store, with the target
    resolved (``auto`` becomes ``cpu`` or ``cuda``). Writes nothing."""
    from predictors.precision import PrecisionError, check_precision

    validate_study_name(name)
    if cfg.benchmark:
        return _prepare_benchmark(name, cfg, budget, url)
    target = resolve_target(cfg.target, budget)
    _check_budget_device(budget, cfg, target)
    check_target(target)
    if cfg.gpus_per_trial != 1.0 and target != "cuda":
        raise SearchError(f"--gpus-per-trial applies to trials on a GPU, and this study runs on {target}; "
                          "leave it out or use --target cuda")
    cfg = replace(cfg, target=target)
    for p in _precisions(cfg):
        try:
            check_precision(p, target)
        except PrecisionError as e:
            raise SearchError(f"--precision {p} cannot run on --target {target}: "
                              f"{str(e).replace('--device', '--target')}") from None
    _reachable(cfg.address)
    gpus = 0
    if target == "cuda" and not cfg.address:  # a cluster's GPUs are counted when the study joins it
        import torch

        gpus = torch.cuda.device_count()
    if cfg.supernet_workers == 0:  # auto; on a cluster (GPUs unknown here, 0) one process
        cfg = replace(cfg, supernet_workers=auto_supernet_workers(cfg, gpus))
    if gpus:
        check_gpu_pool(cfg, gpus)
    if cfg.supernet and not (Path(cfg.supernet) / "supernet.pt").is_file() and not Path(cfg.supernet).is_file():
        raise SearchError(f"no supernet checkpoint at {_clip(cfg.supernet)}; train one with `nas supernet train`")
    if cfg.parzc and not Path(cfg.parzc).is_file():
        raise SearchError(f"no ParZC predictor at {_clip(cfg.parzc)}; save one with ParZC.save(PATH)")
    if cfg.parzc:  # load it now: a damaged file must fail here, not as 0 evaluations of a "completed" study
        from predictors.parzc import ParZC

        try:
            ParZC.load(cfg.parzc)
        except (ValueError, OSError) as e:
            raise SearchError(f"--parzc: {e}") from None
    net = None
    if cfg.supernet:
        from predictors.supernet import SupernetError, load_checkpoint

        try:
            net, _ = load_checkpoint(cfg.supernet)
        except (SupernetError, OSError) as e:
            raise SearchError(f"--supernet: {e}") from None
    data = load_data(cfg)
    frame = make_frame(cfg, data.in_chans, data.num_classes, data.img_size)
    if net is not None:  # its subnets must be the study's: same data shape, the frame inside the supernet's
        theirs = net.frame
        if (theirs.in_chans, theirs.num_classes) != (frame.in_chans, frame.num_classes):
            raise SearchError(f"--supernet takes {theirs.in_chans} channels / {theirs.num_classes} classes; "
                              f"the data has {frame.in_chans} / {frame.num_classes}")
        try:
            for corner in (frame.smallest(), frame.largest()):
                theirs.check(replace(corner, precision=theirs.precisions[0]))
        except ValueError as e:
            raise SearchError(f"--supernet does not cover this study's frame ({e}); pass its --frame") from None
        for i, (mine, sup) in enumerate(zip(frame.stages, theirs.stages)):
            for field_ in ("widths", "heads", "mlp_ratios", "token_mixers", "channel_mixers"):
                extra = sorted(set(getattr(mine, field_)) - set(getattr(sup, field_)), key=str)
                if extra:
                    raise SearchError(f"--supernet does not cover this study's frame: stage {i} {field_} "
                                      f"{extra[:4]} are not in it; pass its --frame")
    if cfg.max_params is not None:
        small = param_count(frame.smallest(__import__("random").Random(0)), frame)
        if small > cfg.max_params:
            raise SearchError(f"--max-params {cfg.max_params:,} is below the smallest architecture of the space "
                              f"({small:,} parameters); raise it")
    return _conf(cfg, name, url, frame)


def _conf(cfg: SearchConfig, name: str, url: str, frame: Any) -> dict[str, Any]:
    """The config a new study stores: its fields, its folder, its frame and an empty progress."""
    conf = cfg.to_dict()
    conf["workdir"] = cfg.workdir or default_workdir(url, name)
    conf["frame_json"] = frame.to_dict()
    conf["progress"] = {}
    return conf


def _prepare_benchmark(name: str, cfg: SearchConfig, budget: Budget, url: str) -> dict[str, Any]:
    """``prepare_study`` of a benchmark search: the tables, the data of the proxies' batch (3-channel
    images), a budget in simulated device-seconds or trials; the proxies run on this CPU."""
    from search_spaces.nb201 import NB201Frame
    from workers.benchmark import BenchmarkError, load_table

    if budget.device is not None:
        raise SearchError(f"a benchmark search spends simulated device-seconds, not {budget.device} time; use a "
                          f"plain budget such as {int(30 * cfg.benchmark_train_s)}s (30 trainings of the mean cell) "
                          "or 500trials")
    if cfg.target == "cuda":
        raise SearchError("a benchmark search computes its proxies on the CPU; leave out --target")
    try:
        table = load_table(cfg.benchmark or "", cfg.benchmark_column, cfg.benchmark_latency or "",
                           cfg.device_column)
    except BenchmarkError as e:
        raise SearchError(str(e)) from None
    data = load_data(cfg)
    if data.in_chans != 3:
        raise SearchError(f"the NB201 network takes RGB images; --data {_clip(cfg.data)} has {data.in_chans} "
                          "channel(s): pass cifar10:PATH or imagefolder:PATH")
    cfg = replace(cfg, target="cpu", benchmark_column=table.column, device_column=table.device)
    return _conf(cfg, name, url, NB201Frame(num_classes=data.num_classes, img_size=data.img_size))


def create_study(store: Store, name: str, cfg: SearchConfig, budget: Budget,
                 conf: dict[str, Any] | None = None) -> None:
    """Register study ``name`` (status ``created``) after :func:`prepare_study`'s checks."""
    if store.get_study(name) is not None:
        raise SearchError(f"study {name!r} already exists; resume it with `nas resume {name}` or pick another --study")
    conf = conf or prepare_study(name, cfg, budget, store.url)
    store.create_study(name, cfg.space, conf, budget.to_dict())
    if not cfg.workdir:  # claim the folder now, so that a study created next picks another
        Path(conf["workdir"]).mkdir(parents=True, exist_ok=True)


def param_count(spec: Any, frame: Any) -> int:
    import torch

    from search_spaces.counting import count_params
    from search_spaces.hybrid_vit import HybridViT

    with torch.device("meta"):
        model = HybridViT(spec, num_classes=frame.num_classes, img_size=frame.img_size, in_chans=frame.in_chans)
    return count_params(model)


# --------------------------------------------------------------------------------------------
# the driver

def parse_budget_arg(text: str, increment: bool = False) -> Budget:
    try:
        return parse_budget(text, increment=increment)
    except BudgetError as e:
        raise SearchError(str(e)) from None


def gpus_needed(cfg: SearchConfig) -> int:
    """GPUs a study on ``--target cuda`` holds at its peak: the trial pool's ``--workers`` actors keep
    ``--gpus-per-trial`` each for the whole study (Ray packs fractions within one GPU, so at 0.4 two
    share a GPU, not two and a half), and Ray Train workers take a whole GPU each on top: the
    supernet's ``--supernet-workers`` (it trains alone), or ``--train-workers`` for every trial that
    trains side by side. 0 on other targets."""
    return _pool_gpus(cfg) + ddp_workers(cfg) if cfg.target == "cuda" else 0


def ddp_workers(cfg: SearchConfig) -> int:
    """Ray Train workers a study runs at its peak, beside the trial pool's actors: the supernet's
    (it trains alone) or every train-stage trial's, whichever is more; 0 without data parallelism.
    Each takes a device of its own: a CPU, or a GPU on ``--target cuda``."""
    return max(cfg.supernet_workers if cfg.supernet_workers > 1 else 0,
               max(cfg.workers, 1) * cfg.train_workers if cfg.train_workers > 1 else 0)


def _pool_gpus(cfg: SearchConfig) -> int:
    per_gpu = max(1, math.floor(1.0 / cfg.gpus_per_trial + 1e-9))
    return math.ceil(max(cfg.workers, 1) / per_gpu)


def auto_supernet_workers(cfg: SearchConfig, gpus: int) -> int:
    """``--supernet-workers auto``: on ``--target cuda``, one Ray Train worker on every GPU of the
    machine that the trial pool does not hold (the supernet trains alone, so train-stage workers
    never run beside it); elsewhere one process. On CPU a data-parallel supernet is not the default
    because the budget pays N device-seconds a second for it, and N CPU workers are not N times
    faster than one process (they share memory bandwidth); give ``--supernet-workers N`` to trade
    budget for wall-clock time."""
    if cfg.target != "cuda":
        return 1
    return max(1, int(gpus) - _pool_gpus(cfg))


def check_gpu_pool(cfg: SearchConfig, available: float, where: str = "this machine") -> None:
    """Refuse a study whose GPUs (:func:`gpus_needed`) exceed ``available``: Ray would wait for them
    for ever, with the study shown running."""
    need = gpus_needed(cfg)
    if need > available + 1e-9:
        parts = [f"--workers {max(cfg.workers, 1)} at --gpus-per-trial {cfg.gpus_per_trial:g}"]
        if cfg.supernet_workers > 1:
            parts.append(f"--supernet-workers {cfg.supernet_workers}")
        if cfg.train_workers > 1:
            parts.append(f"--train-workers {cfg.train_workers} per trial")
        raise SearchError(f"{', '.join(parts)} need {need} GPUs and {where} has {available:g}; use fewer workers, "
                          "a smaller --gpus-per-trial, or a larger cluster")


def trial_resources(cfg: SearchConfig) -> dict[str, float]:
    """What one trial asks Ray for: a CPU, and on a GPU target ``--gpus-per-trial`` of a GPU (Ray
    packs trials of fractional GPUs onto one device, e.g. four screening trials at 0.25)."""
    return {"cpu": 1, "gpu": cfg.gpus_per_trial} if cfg.target == "cuda" else {"cpu": 1}
