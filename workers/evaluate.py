"""One evaluation of one architecture on one device: a pure function, no store; no Ray but for DDP training.

``evaluate(spec, stage, data, device, config=..., report=...) -> Evaluation`` runs one stage of the
staged search on one architecture and returns its metrics, the device-seconds it used and the
device's fingerprint. The stages (``STAGES``):

- ``screen``: zero-cost proxies on one class-balanced training batch (Abdelfattah et al. 2021,
  Mellor et al. 2021; ``predictors.zero_cost``), a ParZC score when a trained ParZC is given
  (Dong et al. 2024), parameters, FLOPs and a quick latency measurement;
- ``supernet``: validation accuracy with weights inherited from a trained supernet (single-path
  one-shot, Guo et al. 2020, 4 random subnets a step; ``predictors.supernet.study_recipe``);
- ``latency``: a careful latency measurement on the target device (``predictors.latency``);
- ``train``: short training from scratch, validation accuracy after every epoch through ``report``
  (which can stop it: ASHA, Li et al. 2020); with ``train_workers`` > 1 data parallel on that many
  Ray Train workers (``workers.ray_train``, the one use of Ray here). With an ``allowance`` in seconds it stops at the
  optimisation step where the allowance runs out and reports what it did: ``steps``, fractional
  ``epochs``, ``budget_stop`` = 1, and the accuracy at that point only when the validation pass
  still fits (else none).

Seconds are device-seconds, the unit of the budget (``8gpu-h``): a train stage on ``train_workers``
= N devices is charged N times its wall-clock seconds (in ``seconds`` and in every epoch report),
and its ``allowance`` in device-seconds gives it N times fewer wall-clock seconds.

Screening also times one training step of the candidate on its batch (``probe_step_s``): the driver
costs later stages of the same architecture from it before any of them has run.

Accuracies are on a validation split carved out of the training data (``split_train_val``): the
test split stays untouched by the search.

Data. A split is either in memory (:class:`Split`: tensors ``x``, ``y``) or streaming
(:class:`StreamSplit`: a dataset with ``labels``, ``take`` and ``loader``, such as
``nas.stream.StreamDataset``, and the indices of the split's images); :func:`split_dataset` makes
either from what ``nas.data.open_dataset`` returns. Both kinds have ``len()``, ``y`` and
``take(positions) -> (x, y)``, and every stage takes both: ``predictors.supernet`` trains and
evaluates on either (a streaming split is decoded batch by batch, a batch ahead), with the same
batches, augmentation and results as in memory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from search_spaces._runtime import retain_freed_memory

__all__ = [
    "STAGES",
    "EvalConfig",
    "EvalData",
    "Evaluation",
    "EvaluationError",
    "StreamSplit",
    "evaluate",
    "head",
    "split_dataset",
    "split_train_val",
]

STAGES = ("screen", "supernet", "latency", "train")


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (one line, what to change)."""


@dataclass(frozen=True, eq=False)
class Split:
    """Images ``x`` (N, C, H, W, normalised) and labels ``y`` (N,)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, sel: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``sel`` (positions in this split) and their labels, as one batch."""
        return self.x[sel], self.y[sel]

    @property
    def in_chans(self) -> int:
        return int(self.x.shape[1])

    @property
    def img_size(self) -> int:
        return int(self.x.shape[2])


@dataclass(frozen=True, eq=False)
class StreamSplit:
    """Images ``indices`` of a streaming dataset ``source`` (``labels``, ``take``, ``loader``,
    ``in_chans``, ``img_size``): decoded batch by batch, never all in memory."""

    source: Any
    indices: Tensor  # int64, into source

    @property
    def y(self) -> Tensor:
        return self.source.labels[self.indices]

    @property
    def labels(self) -> Tensor:
        """Every label of the split, without decoding (the streaming interface's name for ``y``)."""
        return self.y

    @property
    def in_chans(self) -> int:
        return int(self.source.in_chans)

    @property
    def img_size(self) -> int:
        return int(self.source.img_size)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def take(self, sel: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``sel`` (positions in this split) as one batch, evaluation transform."""
        return self.source.take(self.indices[sel])

    def loader(self, batch_size: int, **kw: Any) -> Any:
        return self.source.loader(self.indices, batch_size, **kw)


def head(split: Split | StreamSplit, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of ``split`` (all when fewer) and their labels, as one batch."""
    return split.take(torch.arange(min(int(n), len(split))))


@dataclass(frozen=True, eq=False)
class EvalData:
    """What the workers see: a training split and a validation split of the same images."""

    train: Split | StreamSplit
    val: Split | StreamSplit
    num_classes: int

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, StreamSplit)

    @property
    def in_chans(self) -> int:
        return self.train.in_chans

    @property
    def img_size(self) -> int:
        return self.train.img_size


def _stratified(y: Tensor, val_fraction: float, seed: int, num_classes: int | None) -> tuple[int, Tensor, Tensor]:
    if not 0.0 < val_fraction < 1.0:
        raise EvaluationError(f"val_fraction must be in (0, 1), got {val_fraction}")
    k = num_classes or int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    val_idx, train_idx = [], []
    for c in range(k):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(len(idx) * val_fraction) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr = torch.cat(train_idx).sort().values
    va = torch.cat(val_idx).sort().values
    if len(va) == 0 or len(tr) == 0:
        raise EvaluationError(f"{len(y)} images are too few for a train/validation split")
    return k, tr, va


def split_train_val(x: Tensor, y: Tensor, val_fraction: float = 0.2, seed: int = 0,
                    num_classes: int | None = None) -> EvalData:
    """A class-stratified, seeded split of the training images into train and validation."""
    k, tr, va = _stratified(y, val_fraction, seed, num_classes)
    return EvalData(Split(x[tr], y[tr]), Split(x[va], y[va]), k)


def split_dataset(ds: Any, val_fraction: float = 0.2, seed: int = 0) -> EvalData:
    """:func:`split_train_val` of what ``nas.data.open_dataset`` returns: in-memory splits for an
    ``ImageDataset`` (the same as ``split_train_val(ds.x, ds.y, ...)``), :class:`StreamSplit` s of
    the same images for a streaming one."""
    if not getattr(ds, "streaming", False):
        return split_train_val(ds.x, ds.y, val_fraction=val_fraction, seed=seed, num_classes=ds.num_classes)
    k, tr, va = _stratified(ds.labels, val_fraction, seed, ds.num_classes)
    return EvalData(StreamSplit(ds, tr), StreamSplit(ds, va), k)


@dataclass(frozen=True)
class EvalConfig:
    """How each stage evaluates (JSON-native, sent to every worker)."""

    proxies: tuple[str, ...] = ("nwot", "synflow", "snip")
    score: str = "nwot"  # the screening score: a proxy name, or "parzc" with ``parzc`` set
    parzc: str | None = None  # path of a saved ParZC predictor
    proxy_batch: int = 64
    supernet: str | None = None  # checkpoint directory of a trained supernet
    calib_batches: int = 8
    latency_batch: int = 1
    screen_repeats: int = 10
    latency_repeats: int = 50
    train_epochs: int = 3
    train_batch: int = 64
    train_lr: float = 2e-3
    threads: int = 1
    train_workers: int = 1  # > 1: the train stage trains on that many Ray Train workers (DDP; workers.ray_train)
    seed: int = 0
    weights_dir: str | None = None  # train stage: keep the fp32 weights of fully trained models here
    space: str = "hybrid_vit"
    # a tabular benchmark in place of training (workers.benchmark): labels CSV and its accuracy
    # column, latency CSV and its device column, simulated seconds of a mean training
    benchmark: str | None = None
    benchmark_column: str | None = None
    benchmark_latency: str | None = None
    device_column: str | None = None
    benchmark_train_s: float = 1000.0
    proxy_cache: str | None = None  # a folder: zero-cost scores shared across studies (benchmark screening)

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxies", tuple(self.proxies))
        if self.score != "parzc" and self.score not in self.proxies:
            object.__setattr__(self, "proxies", (*self.proxies, self.score))
        if self.score == "parzc" and not self.parzc:
            raise EvaluationError("score 'parzc' needs a trained ParZC: pass parzc=PATH")
        for name in ("proxy_batch", "latency_batch", "screen_repeats", "latency_repeats", "train_epochs",
                     "train_batch", "threads", "train_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EvaluationError(f"{name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["proxies"] = list(self.proxies)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation produced: ``metrics`` (finite floats), device-seconds used, fingerprint."""

    spec_hash: str
    stage: str
    metrics: dict[str, float]
    seconds: float
    device: dict[str, Any] = field(default_factory=dict)
    params: int | None = None
    flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# per-process caches (a Ray worker is reused across trials)
# --------------------------------------------------------------------------------------------

_FINGERPRINTS: dict[tuple[str, int], dict[str, Any]] = {}
_SUPERNETS: dict[tuple[str, float, str], Any] = {}
_PARZC: dict[tuple[str, float], Any] = {}


def fingerprint(device: str, threads: int) -> dict[str, Any]:
    """The device fingerprint stored with an evaluation (``device`` as parse_device gives it),
    without the readings that change from call to call (clocks, temperature); cached per process."""
    from predictors.latency import device_fingerprint

    key = (device, threads)
    if key not in _FINGERPRINTS:
        fp = device_fingerprint(device, threads=threads if device == "cpu" else None)
        _FINGERPRINTS[key] = {k: v for k, v in fp.items() if not k.startswith("clock_") and k != "temperature_c"}
    return _FINGERPRINTS[key]


def _ckpt_file(path: str) -> Path:
    p = Path(path)
    return p / "supernet.pt" if p.is_dir() else p


def _supernet(path: str, device: str) -> Any:
    from predictors.supernet import load_checkpoint

    f = _ckpt_file(path)
    if not f.is_file():
        raise EvaluationError(f"no supernet checkpoint at {f}; train one with `nas supernet train`")
    key = (str(f.resolve()), f.stat().st_mtime, device)
    if key not in _SUPERNETS:
        _SUPERNETS.clear()
        net, _ = load_checkpoint(f)
        _SUPERNETS[key] = net.to(device).eval()
    return _SUPERNETS[key]


def _parzc(path: str) -> Any:
    from predictors.parzc import ParZC

    f = Path(path)
    if not f.is_file():
        raise EvaluationError(f"no ParZC predictor at {f}; train one with predictors.parzc.ParZC.fit/save")
    key = (str(f.resolve()), f.stat().st_mtime)
    if key not in _PARZC:
        _PARZC[key] = ParZC.load(f)
    return _PARZC[key]


# --------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------


def _balanced_batch(split: Split | StreamSplit, n: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    per = max(1, n // num_classes)
    idx = []
    for c in range(num_classes):
        cls = (split.y == c).nonzero().flatten()
        idx.append(cls[torch.randperm(len(cls), generator=gen)[:per]])
    sel = torch.cat(idx)
    sel = sel[torch.randperm(len(sel), generator=gen)]
    return split.take(sel)


def _latency(model: nn.Module, data: EvalData, device: str, precision: str, cfg: EvalConfig,
             repeats: int) -> dict[str, float]:
    from predictors.latency import measure

    r = measure(model, (data.in_chans, data.img_size, data.img_size), device, precision=precision,
                batch_size=cfg.latency_batch, warmup=max(3, repeats // 5), repeats=repeats,
                threads=cfg.threads if device == "cpu" else None)
    out = {"latency_ms": r.median_ms, "latency_p90_ms": r.p90_ms, "latency_cv": r.cv}
    if r.peak_mem_mb is not None:
        out["peak_mem_mb"] = r.peak_mem_mb
    return out


def _screen(spec: Any, model: nn.Module, data: EvalData, device: str, cfg: EvalConfig) -> dict[str, float]:
    from predictors.zero_cost import compute

    x, y = _balanced_batch(data.train, cfg.proxy_batch, data.num_classes, cfg.seed)
    names = [p for p in cfg.proxies if p not in ("params", "flops")]
    if cfg.score == "parzc":
        from predictors.parzc import GLOBAL_PROXIES, PROXIES, node_features

        names = sorted({*names, *PROXIES, *GLOBAL_PROXIES})
        result = compute(model, x, y, names=names, per_layer=True)
        mean, std = _parzc(str(cfg.parzc)).predict([node_features(model, x, y, result=result)])
        metrics = {"parzc": float(mean[0]), "parzc_std": float(std[0])}
    else:
        result = compute(model, x, y, names=names)
        metrics = {}
    for name in names:
        v = result.get(name)
        if isinstance(v, (int, float)):
            metrics[f"zc.{name}"] = float(v)
    metrics["score"] = metrics["parzc"] if cfg.score == "parzc" else metrics.get(f"zc.{cfg.score}", float("nan"))
    metrics["probe_step_s"] = _probe_step(model, x, y)
    metrics.update(_latency(model, data, device, spec.precision, cfg, cfg.screen_repeats))
    return metrics


def _probe_step(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Seconds of one forward/backward of ``model`` on the screening batch (the train stage's batch
    size): the per-architecture unit the driver's cost model scales by steps and images."""
    was = model.training
    model.train()
    t = time.perf_counter()
    nn.functional.cross_entropy(model(x), y).backward()
    seconds = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    model.train(was)
    return seconds


def _supernet_accuracy(spec: Any, data: EvalData, device: str, cfg: EvalConfig) -> dict[str, float]:
    from predictors.supernet import evaluate_subnet

    if not cfg.supernet:
        raise EvaluationError("stage 'supernet' needs a trained supernet: set EvalConfig.supernet")
    net = _supernet(cfg.supernet, device)
    frame = net.frame
    try:
        frame.check(spec)
    except ValueError as e:
        raise EvaluationError(f"architecture is outside the supernet's frame: {e}") from None
    acc = evaluate_subnet(net, spec, data.val, calib=data.train, calib_batches=cfg.calib_batches,
                          batch_size=256, device=device)
    return {"accuracy": acc}


def trained_weights_file(weights_dir: str | Path, spec_hash: str) -> Path:
    """Where the train stage keeps the fp32 state dict of a trained ``spec_hash`` (its last training)."""
    return Path(weights_dir) / f"{spec_hash}.pt"


def save_trained(model: nn.Module, spec_hash: str, weights_dir: str | Path, epochs: float | None = None,
                 of: int | None = None) -> Path:
    """Write ``model``'s state dict (fp32, CPU) atomically to :func:`trained_weights_file`, and how far
    it was trained (``epochs`` of ``of``) beside it: a model ASHA or the allowance stopped early is
    kept too, since its accuracy may put it on the front (and an export should carry these weights)."""
    from predictors._io import atomic_write

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = atomic_write(trained_weights_file(weights_dir, spec_hash), lambda f: torch.save(state, f))
    if epochs is not None:
        note = json.dumps({"epochs": epochs, "of": of}).encode()
        atomic_write(path.with_suffix(".json"), lambda f: f.write(note))
    return path


def trained_epochs(weights_dir: str | Path, spec_hash: str) -> tuple[float, int] | None:
    """(epochs trained, epochs planned) of the kept weights of ``spec_hash``; None when not recorded."""
    try:
        note = json.loads(trained_weights_file(weights_dir, spec_hash).with_suffix(".json").read_text())
        return float(note["epochs"]), int(note["of"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_devices(stage: str, supernet_workers: int, train_workers: int) -> int:
    """Devices a trial of ``stage`` holds: a supernet training or a train stage on N Ray Train workers
    holds N (one each), every other trial one. The budget's device-seconds are wall-clock seconds
    times this."""
    if stage == "supernet_train":
        return max(1, int(supernet_workers))
    return max(1, int(train_workers)) if stage == "train" else 1


def _train(spec: Any, data: EvalData, device: str, cfg: EvalConfig,
           report: Callable[[int, dict[str, float]], bool | None] | None, t0: float,
           allowance: float | None = None, devices: int = 1) -> dict[str, float]:
    """The train stage; ``allowance`` in wall-clock seconds, ``devices`` the devices it holds (its
    reports are in device-seconds)."""
    from predictors.precision import activation_dtype, to_precision
    from predictors.supernet import TrainConfig, accuracy, train_standalone

    tcfg = TrainConfig(batch_size=cfg.train_batch, lr=cfg.train_lr, warmup_epochs=min(1.0, cfg.train_epochs / 3),
                       augment=False, seed=cfg.seed)
    last: dict[str, float] = {}
    passes: list[float] = []  # seconds of each validation pass so far
    n_val, bs = len(data.val), min(cfg.train_batch, len(data.train))

    def val_cost(step_s: float) -> float:
        """A validation pass: as measured, or before the first one, half a training step per batch
        (forward only, larger batches)."""
        return max(passes) if passes else 0.5 * step_s * math.ceil(n_val / bs)

    def before_step(step: int, step_s: float) -> bool:
        if allowance is None:
            return False
        left = allowance - (time.perf_counter() - t0)
        # the step, the validation pass at an epoch end (or at the stop), and what follows the loop
        return left < 1.5 * step_s + val_cost(step_s) + 0.02

    def on_epoch(epoch: int, model: nn.Module) -> bool | None:
        t = time.perf_counter()
        acc = accuracy(model, data.val, batch_size=256)
        passes.append(time.perf_counter() - t)
        last.update({"accuracy": acc, "epochs": float(epoch)})
        if report is not None and report(epoch, {**last, "seconds": devices * (time.perf_counter() - t0)}):
            last["early_stop"] = 1.0  # a scheduler (ASHA) stopped it here
            return True
        return None

    if cfg.train_workers > 1:  # data parallel on Ray Train; the callbacks still run here (workers.ray_train)
        from workers.ray_train import train_standalone_ray

        model = train_standalone_ray(spec, data.train, cfg.train_epochs, config=tcfg, num_classes=data.num_classes,
                                     num_workers=cfg.train_workers, device=device, threads=cfg.threads,
                                     on_epoch=on_epoch, before_step=before_step).to(device)
    else:
        model = train_standalone(spec, data.train, cfg.train_epochs, config=tcfg, num_classes=data.num_classes,
                                 device=device, on_epoch=on_epoch, before_step=before_step)
    st = model.train_state  # type: ignore[attr-defined]
    if st.stopped:  # the allowance ran out mid-training: report what was done
        spe = max(1, st.steps_per_epoch)
        last.update({"steps": float(st.step), "epochs": st.step / spe, "budget_stop": 1.0})
        if st.step % spe:  # mid-epoch: an accuracy at this point only if a validation pass still fits
            last.pop("accuracy", None)
            left = float(allowance or 0.0) - (time.perf_counter() - t0)
            if st.step and left >= val_cost(st.seconds / st.step):
                last["accuracy"] = accuracy(model.eval(), data.val, batch_size=256)
        if cfg.weights_dir and "accuracy" in last:  # the weights that scored it
            save_trained(model, spec.hash, cfg.weights_dir, last["epochs"], cfg.train_epochs)
        return last
    last["steps"] = float(st.step)
    if cfg.weights_dir and "accuracy" in last:  # fully trained, or stopped by ASHA at an epoch's end
        save_trained(model, spec.hash, cfg.weights_dir, last["epochs"], cfg.train_epochs)
    if spec.precision != "fp32" and last.get("epochs") == cfg.train_epochs:
        q = to_precision(model, spec.precision, device, inplace=True)
        last["accuracy_fp32"] = last["accuracy"]
        last["accuracy"] = accuracy(q, data.val, batch_size=256, dtype=activation_dtype(spec.precision))
    return last


def evaluate(spec: Any, stage: str, data: EvalData, device: str = "cpu", *, config: EvalConfig | None = None,
             report: Callable[[int, dict[str, float]], bool | None] | None = None,
             allowance: float | None = None) -> Evaluation:
    """Run ``stage`` on ``spec`` and return its :class:`Evaluation` (metrics, seconds, fingerprint).

    ``report(epoch, metrics)`` is called after each training epoch of the ``train`` stage; returning
    True stops the training there. ``allowance``: the device-seconds the ``train`` stage may use,
    checked before every optimisation step (see the module docstring). Raises
    :class:`EvaluationError` for a request that cannot run."""
    from predictors.latency import parse_device
    from search_spaces.counting import count_flops, count_params
    from search_spaces.hybrid_vit import build

    cfg = config or EvalConfig()
    if stage not in STAGES:
        raise EvaluationError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if cfg.benchmark:
        from workers.benchmark import evaluate_benchmark

        return evaluate_benchmark(spec, stage, data, cfg)
    dev = str(parse_device(device))
    devices = stage_devices(stage, 1, cfg.train_workers)  # a wall-clock second is this many device-seconds
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if dev == "cpu":
        torch.set_num_threads(cfg.threads)
        retain_freed_memory()  # no page faults on each step's activations (search_spaces/_runtime.py)
    try:
        model = build(spec, num_classes=data.num_classes, img_size=data.img_size, in_chans=data.in_chans,
                      seed=cfg.seed)
        params = count_params(model)
        flops = count_flops(model, (1, data.in_chans, data.img_size, data.img_size)) if stage == "screen" else None
        if stage == "screen":
            model = model.to(dev)
            metrics = _screen(spec, model, data, dev, cfg)
        elif stage == "supernet":
            metrics = _supernet_accuracy(spec, data, dev, cfg)
        elif stage == "latency":
            metrics = _latency(model.eval(), data, dev, spec.precision, cfg, cfg.latency_repeats)
        else:
            n_params = float(params)  # in every per-epoch report too: a scheduler may stop the run there
            metrics = _train(spec, data, dev, cfg,
                             None if report is None else lambda e, m: report(e, {**m, "params": n_params}), t0,
                             None if allowance is None else allowance / devices, devices)
        metrics["params"] = float(params)
        if flops is not None:
            metrics["flops"] = float(flops)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
    finally:
        if dev == "cpu":
            torch.set_num_threads(prev_threads)
    seconds = (time.perf_counter() - t0) * devices
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return Evaluation(spec_hash=spec.hash, stage=stage, metrics=clean, seconds=seconds,
                      device=fingerprint(dev, cfg.threads), params=params, flops=flops)
