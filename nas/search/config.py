"""A study's set-up: its config (every check a Python caller gets too), search space and data.

``prepare_study`` validates a new study without writing anything; ``create_study`` registers it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nas.budget import Budget, BudgetError, parse_budget
from nas.store import Store, validate_study_name

STRATEGIES = ("staged", "nsga2", "random")
OBJECTIVES = {"accuracy": ("accuracy", "max"), "latency": ("latency_ms", "min"), "params": ("params", "min"),
              "flops": ("flops", "min")}
DEFAULT_SHARES = {"screen": 0.15, "supernet": 0.35, "latency": 0.1, "train": 0.4}
PRECISION_CHOICES = ("any", "fp32", "bf16", "fp16", "int8", "fp8")


class SearchError(ValueError):
    """A search request that cannot run (one line: what was wrong and what to do)."""


class StudyLost(RuntimeError):
    """The driver can no longer keep its results: the store was deleted or replaced, or another
    driver took the study over. Nothing more is written; the study is not "completed"."""


@dataclass(frozen=True)
class SearchConfig:
    """Everything a study needs to run again (stored as the study's config JSON)."""

    space: str = "hybrid_vit"
    data: str = "digits"
    data_limit: int | None = None
    objectives: tuple[str, ...] = ("accuracy", "latency")
    target: str = "cpu"
    precision: str = "fp32"
    max_params: int | None = None
    max_latency_ms: float | None = None
    img_size: int | None = None
    frame: str = "auto"
    strategy: str = "staged"
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    workers: int = 1
    threads: int = 1
    address: str | None = None
    seed: int = 0
    train_epochs: int = 4
    supernet_epochs: int | None = None  # None: as many as the supernet's budget share allows
    max_supernet_epochs: int = 30
    score: str = "nwot"
    parzc: str | None = None
    supernet: str | None = None  # an already trained supernet checkpoint to use instead of training one
    workdir: str = ""
    max_failures: int = 2

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "objectives", tuple(self.objectives))
        if self.space != "hybrid_vit":
            raise SearchError(f"nas search runs on space hybrid_vit only, not {self.space!r}")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise SearchError("objectives must be a list of distinct names, e.g. accuracy,latency")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise SearchError(f"unknown objective {o!r}; choose from {', '.join(OBJECTIVES)}")
        if "accuracy" not in self.objectives:
            raise SearchError("objectives must include accuracy, e.g. accuracy,latency")
        if self.target not in ("cpu", "cuda"):
            raise SearchError(f"target must be cpu or cuda, got {self.target!r}")
        if self.precision not in PRECISION_CHOICES:
            raise SearchError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise SearchError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("workers", "threads", "train_epochs", "max_supernet_epochs", "max_failures"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "max_failures" else 1):
                raise SearchError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.max_params is not None and self.max_params < 1:
            raise SearchError(f"max-params must be positive, got {self.max_params}")
        if self.max_latency_ms is not None and not (self.max_latency_ms > 0 and math.isfinite(self.max_latency_ms)):
            raise SearchError(f"max-latency-ms must be a positive number, got {self.max_latency_ms}")
        if self.img_size is not None and not 8 <= self.img_size <= 1024:
            raise SearchError(f"img-size must be between 8 and 1024, got {self.img_size}")
        shares = dict(self.shares)
        bad = sorted(set(shares) - set(DEFAULT_SHARES))
        if bad:
            raise SearchError(f"unknown stage {bad[0]!r} in shares; stages are {', '.join(DEFAULT_SHARES)}")
        if any(not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)) for v in shares.values()):
            raise SearchError("stage shares must be non-negative numbers")
        full = {k: float(shares.get(k, 0.0)) for k in DEFAULT_SHARES}
        total = sum(full.values())
        if total <= 0 or full["train"] + full["screen"] <= 0:
            raise SearchError("stage shares must give screen or train a positive share")
        set_(self, "shares", {k: v / total for k, v in full.items()})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objectives"] = list(self.objectives)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_shares(text: str) -> dict[str, float]:
    """``screen=0.2,supernet=0.3,latency=0.1,train=0.4`` -> shares (normalised by SearchConfig)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise SearchError(f"cannot read stage share {part!r}; use e.g. screen=0.2,train=0.8") from None
    if not out:
        raise SearchError("empty --stages; use e.g. screen=0.2,supernet=0.3,latency=0.1,train=0.4")
    return out


def parse_count(text: str, what: str) -> int:
    """``5M``, ``500k``, ``2.5M``, ``123456`` -> an integer count."""
    raw = str(text).strip().lower().replace("_", "")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(raw[-1:], 1.0)
    num = raw[:-1] if raw[-1:] in "kmgb" else raw
    try:
        value = float(num) * mult
    except ValueError:
        raise SearchError(f"cannot read {what} {text!r}; use e.g. 5M, 500k or 250000") from None
    if not math.isfinite(value) or value < 1:
        raise SearchError(f"{what} must be at least 1, got {text!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# the search space of a study: a supernet frame, a sub-space of hybrid_vit
# --------------------------------------------------------------------------------------------


def _precisions(cfg: SearchConfig) -> tuple[str, ...]:
    from predictors.precision import supported_precisions

    if cfg.precision != "any":
        return (cfg.precision,)
    return tuple(supported_precisions(cfg.target)) or ("fp32",)


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
        raise SearchError(f"unknown frame {name!r}; use auto, {', '.join(sorted(FRAMES))} or a frame JSON file")
    try:
        return replace(frame_from_json(path.read_text()), **over)
    except ValueError as e:
        raise SearchError(f"frame {path}: {e}") from None


# --------------------------------------------------------------------------------------------
# creating a study (validation first, nothing written on bad input)
# --------------------------------------------------------------------------------------------


def default_workdir(url: str, study: str) -> str:
    """Where a study keeps its files (supernet checkpoint, Tune logs): next to a SQLite file."""
    base = Path(".")
    if url.startswith("sqlite:///"):
        base = Path(url[len("sqlite:///"):]).resolve().parent
    return str((base / "nas_runs" / study).resolve())


def load_data(cfg: SearchConfig) -> Any:
    """The training split of ``cfg.data``, resized, split into train/validation for the workers."""
    from nas.data import load
    from workers.evaluate import split_train_val

    try:
        ds = load(cfg.data, "train", limit=cfg.data_limit, img_size=None, seed=cfg.seed)
        native = int(ds.x.shape[2])
        img = cfg.img_size or max(16, native)
        if img != native:
            ds = load(cfg.data, "train", limit=cfg.data_limit, img_size=img, seed=cfg.seed)
    except (ValueError, OSError) as e:
        raise SearchError(f"data {cfg.data!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return split_train_val(ds.x, ds.y, val_fraction=0.2, seed=cfg.seed, num_classes=ds.num_classes)


def check_target(target: str) -> None:
    import torch

    if target == "cuda" and not torch.cuda.is_available():
        raise SearchError("--target cuda needs a CUDA GPU and a CUDA build of torch; use --target cpu here")


MAX_WORKERS = 1024
MAX_TRAIN_EPOCHS = 1000


def max_threads() -> int:
    """The most torch threads a trial may ask for: 4 per core, and at least 256."""
    return max(256, 4 * (os.cpu_count() or 1))


def prepare_study(name: str, cfg: SearchConfig, budget: Budget, url: str) -> dict[str, Any]:
    """Check everything about a new study that needs no store (data, frame, target, precision,
    limits) and return the config to store. Writes nothing."""
    from predictors.precision import PrecisionError, check_precision

    validate_study_name(name)
    if budget.device == "gpu" and cfg.target != "cuda":
        raise SearchError(f"budget {budget} counts GPU time but --target is {cfg.target}; use e.g. 3cpu-m or 3m")
    check_target(cfg.target)
    for p in _precisions(cfg):
        try:
            check_precision(p, cfg.target)
        except PrecisionError as e:
            raise SearchError(f"--precision {p} cannot run on --target {cfg.target}: {e}") from None
    for what, value, high in (("workers", cfg.workers, MAX_WORKERS), ("threads", cfg.threads, max_threads()),
                              ("train-epochs", cfg.train_epochs, MAX_TRAIN_EPOCHS)):
        if value > high:
            raise SearchError(f"--{what} {value} is more than the {high:,} allowed; ask for fewer")
    if cfg.supernet and not (Path(cfg.supernet) / "supernet.pt").is_file() and not Path(cfg.supernet).is_file():
        raise SearchError(f"no supernet checkpoint at {cfg.supernet}; train one with `nas supernet train`")
    if cfg.parzc and not Path(cfg.parzc).is_file():
        raise SearchError(f"no ParZC predictor at {cfg.parzc}; save one with ParZC.save(PATH)")
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
    conf = cfg.to_dict()
    conf["workdir"] = cfg.workdir or default_workdir(url, name)
    conf["frame_json"] = frame.to_dict()
    conf["progress"] = {}
    return conf


def create_study(store: Store, name: str, cfg: SearchConfig, budget: Budget,
                 conf: dict[str, Any] | None = None) -> None:
    """Register study ``name`` (status ``created``) after :func:`prepare_study`'s checks."""
    if store.get_study(name) is not None:
        raise SearchError(f"study {name!r} already exists; resume it with `nas resume {name}` or pick another --study")
    conf = conf or prepare_study(name, cfg, budget, store.url)
    store.create_study(name, cfg.space, conf, budget.to_dict())


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
