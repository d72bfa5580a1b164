"""Training a weight-sharing supernet and reading subnet accuracies from it.

- :func:`train_supernet`: the sandwich rule (Yu et al. 2019, "Universally Slimmable Networks and
  Improved Training Techniques"; BigNAS, Yu et al. 2020): every step trains the largest subnet,
  the smallest and ``n_random`` random ones, accumulating their gradients into one update, with
  optional in-place distillation (the largest subnet's soft predictions teach the others).
  Checkpoints are atomic and resume exactly: all randomness of a step (its subnets, its
  augmentation) derives from ``(seed, step)`` and the data order from ``(seed, epoch)``.
  ``TrainConfig(sampling="fair")`` replaces the random subnets by FairNAS's strictly fair paths
  (Chu et al. 2021, "FairNAS: Rethinking Evaluation Fairness of Weight Sharing Neural
  Architecture Search"): see :func:`fair_paths`. ``TrainConfig(sampling="single_path")`` drops the
  sandwich's two ends and trains ``n_random`` uniformly random subnets per step (single-path
  one-shot, Guo et al. 2020, "Single Path One-Shot Neural Architecture Search with Uniform
  Sampling"), so no subnet size gets more updates than another.
- :func:`evaluate_subnet`: extract the subnet, recalibrate its BatchNorm statistics on training
  images (shared statistics are wrong for any one subnet; OFA/BigNAS do the same), convert it
  to the precision its spec carries, and measure top-1 accuracy; optionally after a few
  fine-tuning steps of the extracted subnet (:func:`finetune`).
- :func:`train_standalone`: the same recipe for one plain model (the reference the supernet's
  ranking is judged against).

Distributed data parallel (DDP semantics, Li et al., VLDB 2020, "PyTorch Distributed: Experiences
on Accelerating Data Parallel Training"): when ``torch.distributed`` is initialised with world size
W (``workers.ray_train`` runs it under Ray Train), :func:`train_supernet` trains every rank on its
slice of each global batch (``cfg.batch_size`` is the global batch, so the run equals the
single-process one up to float rounding) and sums the shards' gradients after all the sandwich
passes of a step (:func:`_sync_gradients`). Every rank draws the same subnets from ``(seed, step)``
and the step checks that they did; BatchNorm normalises with the global batch's statistics
(:func:`_batch_norm_over_ranks`). Rank 0 alone writes checkpoints; every rank resumes from rank 0's.
:func:`train_standalone` trains one model the same way (the same shards, gradient sum and
BatchNorm); its callbacks run on rank 0, and every rank takes its stop decision (:func:`_all_agree`:
the other ranks contribute False).

Both training loops take an allowance in seconds (``max_seconds``, ``before_step``) and check it
before every optimisation step, so a budget is held to one step, not one epoch; the supernet
checkpoints where it stops and continues from there.

Data. Every function takes either kind (duck-typed, plain torch; this module never imports ``nas``):

- in memory: ``x`` (N, C, H, W float tensor) and ``y`` (N int64) attributes, such as
  ``nas.data.ImageDataset`` or ``workers.evaluate.Split``;
- streaming: ``len()``, ``labels`` (or ``y``: every label, int64), ``take(indices) -> (x, y)`` (those
  images, evaluation transform), ``in_chans`` and ``img_size``, such as ``nas.stream.StreamDataset``
  or ``workers.evaluate.StreamSplit``.

A streaming step fetches exactly the images the in-memory step indexes (order from ``(seed, epoch)``)
with ``take``, and augments them with the same :func:`augment` draws from ``(seed, step)``, so the
two runs agree to float tolerance (``take`` equals the in-memory tensors to 1e-5) and resume the
same way. Under ``torch.distributed`` a rank fetches only its shard of the global batch. The next
batch is fetched in one background thread while the current step runs (:class:`_Prefetch`): its
content depends only on its step, so the result is the same with or without it.

Imports torch and the project only.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from predictors._io import atomic_write
from predictors.precision import activation_dtype, to_precision
from search_spaces.hybrid_vit import build
from search_spaces.spec import ArchSpec
from search_spaces.supernet import Supernet, SupernetFrame

CKPT_NAME = "supernet.pt"
CKPT_FORMAT = 1
SAMPLINGS = ("uniform", "fair", "single_path")

__all__ = [
    "CKPT_NAME",
    "SupernetError",
    "TrainConfig",
    "accuracy",
    "evaluate_subnet",
    "fair_paths",
    "finetune",
    "load_checkpoint",
    "recalibrate_bn",
    "sandwich",
    "train_standalone",
    "train_supernet",
]


class SupernetError(ValueError):
    """A checkpoint or configuration problem the user can fix (one line)."""


class MemoryData(Protocol):
    """Images in memory: ``x`` (N, C, H, W) and ``y`` (N,)."""

    x: Tensor
    y: Tensor


class StreamData(Protocol):
    """Images decoded on demand (``nas.stream.StreamDataset``, ``workers.evaluate.StreamSplit``)."""

    in_chans: int
    img_size: int

    def __len__(self) -> int: ...

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


Data = MemoryData | StreamData
PREFETCH = True  # streaming data: fetch the next batch in a background thread while a step runs


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe, shared by the supernet and by standalone training.

    AdamW with linear warm-up then cosine decay, label smoothing, random-crop (zero padding of
    ``img/8``) and horizontal-flip augmentation, gradient clipping."""

    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    augment: bool = True
    flip: bool = True
    n_random: int = 2  # sandwich: random subnets per step besides the largest and the smallest
    distill: bool = True  # in-place distillation from the largest subnet
    distill_temperature: float = 1.0
    distill_weight: float = 0.5  # student loss = w * KD + (1 - w) * CE on the labels
    seed: int = 0
    # how the subnets besides the largest and the smallest are drawn: "uniform" (``n_random`` random
    # ones) or "fair" (FairNAS strict fairness of the mixers, ``n_random`` unused; see fair_paths);
    # "single_path": ``n_random`` random ones and no largest or smallest (SPOS, Guo et al. 2020)
    sampling: str = "uniform"
    # few-shot NAS (Zhao et al. 2021): a sub-supernet that trains only the subnets with this token
    # mixer in stage 0's first block (every subnet drawn is moved there: SupernetFrame.split_subnet);
    # None trains the whole space
    split_token_mixer: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.lr <= 0 or self.n_random < 0 or self.warmup_epochs < 0:
            raise SupernetError("batch_size and lr must be positive, n_random and warmup_epochs >= 0")
        if self.sampling not in SAMPLINGS:
            raise SupernetError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.sampling == "single_path" and (self.distill or self.n_random < 1):
            raise SupernetError("single_path sampling has no largest subnet to distill from and needs subnets: "
                                "set distill=False and n_random >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# pieces of the recipe
# --------------------------------------------------------------------------------------------


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def augment(x: Tensor, gen: torch.Generator, flip: bool = True) -> Tensor:
    """Random crop after zero padding by ``max(1, H // 8)`` pixels, and a random horizontal flip,
    per image (the standard CIFAR recipe of He et al. 2016)."""
    b, _, h, _ = x.shape
    return _apply_augment(x, *_augment_draws(b, h, gen, flip))


def _augment_draws(b: int, h: int, gen: torch.Generator,
                   flip: bool) -> tuple[int, Tensor, Tensor, Tensor | None]:
    """The random part of :func:`augment` for a batch of ``b`` images of height ``h``: (padding,
    row offsets, column offsets, flip mask or None), drawn in that order from ``gen``. Split out so
    that a rank can apply the global batch's draws to its shard alone."""
    pad = max(1, h // 8)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    mask = torch.rand(b, generator=gen) < 0.5 if flip else None
    return pad, dy, dx, mask


def _apply_augment(x: Tensor, pad: int, dy: Tensor, dx: Tensor, mask: Tensor | None) -> Tensor:
    """Crop (and flip) each image of ``x`` as drawn: pure indexing, so per-row exact."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if mask is not None:
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def _lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int, warm: int | None = None) -> float:
    warm = int(cfg.warmup_epochs * steps_per_epoch) if warm is None else warm
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=_generator(seed, epoch, 0xDA7A))


def _batch(data: Data, cfg: TrainConfig, step: int, steps_per_epoch: int, batch_size: int,
           device: torch.device | str) -> tuple[Tensor, Tensor]:
    """The (augmented) batch of ``step`` on ``device``: order from (seed, epoch), augmentation from (seed, step)."""
    epoch, k = divmod(step, steps_per_epoch)
    idx = _order(len(data.x), cfg.seed, epoch)[k * batch_size:(k + 1) * batch_size]
    x, y = data.x[idx], data.y[idx]
    if cfg.augment:
        x = augment(x, _generator(cfg.seed, step, 0xA06), cfg.flip)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# --------------------------------------------------------------------------------------------
# either kind of data: in memory (x, y) or streaming (len, labels, take)
# --------------------------------------------------------------------------------------------


def _in_memory(data: Any) -> bool:
    return isinstance(getattr(data, "x", None), Tensor)


def _size(data: Data) -> int:
    return len(data.x) if _in_memory(data) else len(data)  # type: ignore[union-attr,arg-type]


def _labels(data: Data) -> Tensor:
    """Every label, without decoding an image."""
    if _in_memory(data):
        return data.y  # type: ignore[union-attr]
    labels = getattr(data, "labels", None)
    return labels if isinstance(labels, Tensor) else data.y  # type: ignore[union-attr]


def _shape(data: Data) -> tuple[int, int, int]:
    """(C, H, W) of the images."""
    if _in_memory(data):
        _, c, h, w = data.x.shape  # type: ignore[union-attr]
        return int(c), int(h), int(w)
    size = data.img_size
    h, w = (size, size) if isinstance(size, int) else size
    return int(data.in_chans), int(h), int(w)


def _take(data: Data, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Images ``idx`` and their labels as one batch (evaluation transform for streaming data)."""
    if _in_memory(data):
        return data.x[idx], data.y[idx]  # type: ignore[union-attr]
    return data.take(idx)  # type: ignore[union-attr]


class _Prefetch:
    """``get(key, next_key)``: ``fetch(key)``, while ``fetch(next_key)`` starts in one background
    thread, so that decoding the next batch overlaps this one's work. ``fetch`` depends on its key
    alone, so results are the same with or without the thread (``enabled=False``); an error of a
    fetch surfaces when its key is asked for, and a fetch never asked for is dropped."""

    def __init__(self, fetch: Callable[[int], Any], enabled: bool = True) -> None:
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="supernet-prefetch") if enabled else None
        self._ahead: tuple[int, Future[Any]] | None = None

    def get(self, key: int, next_key: int | None = None) -> Any:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            value = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            value = self._fetch(key)
        if self._pool is not None and next_key is not None:
            self._ahead = (next_key, self._pool.submit(self._fetch, next_key))
        return value

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead = None

    def __enter__(self) -> _Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(data: Data, chunks: Sequence[Tensor | slice]) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` of each chunk (an index tensor or a slice) of ``data``, in order; streaming data
    is fetched a chunk ahead in a background thread."""
    if _in_memory(data):
        for c in chunks:
            yield data.x[c], data.y[c]  # type: ignore[union-attr]
        return

    def fetch(i: int) -> tuple[Tensor, Tensor]:
        c = chunks[i]
        return data.take(torch.arange(c.start, c.stop) if isinstance(c, slice) else c)  # type: ignore[union-attr]

    with _Prefetch(fetch, PREFETCH) as pf:
        for i in range(len(chunks)):
            yield pf.get(i, i + 1 if i + 1 < len(chunks) else None)


class _StepBatches:
    """The batch of each training step, either kind of data: :func:`_batch` in memory; for streaming
    data the same images fetched with ``take``, a step ahead in a background thread, and augmented
    with the global batch's draws of ``(seed, step)``. Under ``torch.distributed`` (``world`` > 1)
    either kind yields only this rank's shard of the global batch, ``share`` its fraction.
    ``last``: the last step asked for (no prefetch past it)."""

    def __init__(self, data: Data, cfg: TrainConfig, spe: int, bs: int, device: torch.device | str, last: int,
                 rank: int = 0, world: int = 1) -> None:
        self.data, self.cfg, self.spe, self.bs, self.device, self.last = data, cfg, spe, bs, device, last
        self.n = _size(data)
        self.part = _shard(bs, rank, world) if world > 1 else None
        self.share = 1.0 if self.part is None else (self.part.stop - self.part.start) / bs
        self.stream = not _in_memory(data)
        self._pf = _Prefetch(self._fetch, PREFETCH) if self.stream else None

    def _indices(self, step: int) -> Tensor:
        epoch, k = divmod(step, self.spe)
        idx = _order(self.n, self.cfg.seed, epoch)[k * self.bs:(k + 1) * self.bs]
        return idx if self.part is None else idx[self.part]

    def _fetch(self, step: int) -> tuple[Tensor, Tensor]:
        return self.data.take(self._indices(step))  # type: ignore[union-attr]

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        if self._pf is None:
            if self.part is None:
                return _batch(self.data, self.cfg, step, self.spe, self.bs, self.device)  # type: ignore[arg-type]
            # in memory under torch.distributed: the global batch (order and augmentation as in one
            # process), then this rank's rows
            x, y = _batch(self.data, self.cfg, step, self.spe, self.bs, "cpu")  # type: ignore[arg-type]
            return x[self.part].to(self.device, non_blocking=True), y[self.part].to(self.device, non_blocking=True)
        x, y = self._pf.get(step, step + 1 if step + 1 <= self.last else None)
        if self.cfg.augment:  # the global batch's draws (as _batch makes them), then this rank's rows
            pad, dy, dx, mask = _augment_draws(self.bs, _shape(self.data)[1], _generator(self.cfg.seed, step, 0xA06),
                                               self.cfg.flip)
            if self.part is not None:
                dy, dx, mask = dy[self.part], dx[self.part], None if mask is None else mask[self.part]
            x = _apply_augment(x, pad, dy, dx, mask)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        if self._pf is not None:
            self._pf.close()


_DATA_HELP = ("have x (N, C, H, W) and y (N,) tensors, or stream (len, labels, take(indices), in_chans, img_size), "
              "with N >= 1")


def _check_data(data: Data, what: str) -> None:
    if _in_memory(data) or not callable(getattr(data, "take", None)):
        x, y = getattr(data, "x", None), getattr(data, "y", None)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.ndim != 4 or len(x) != len(y) or len(x) == 0:
            raise SupernetError(f"{what} data must have x (N, C, H, W) and y (N,) tensors with N >= 1")
        return
    try:
        n, labels, shape = len(data), _labels(data), _shape(data)  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):
        raise SupernetError(f"{what} data must {_DATA_HELP}") from None
    if not isinstance(labels, Tensor) or labels.ndim != 1 or len(labels) != n or n == 0 or min(shape) < 1:
        raise SupernetError(f"{what} data must {_DATA_HELP}")


def _check_frame_data(frame: SupernetFrame, data: Data) -> None:
    _check_data(data, "training")
    c, h, w = _shape(data)
    if c != frame.in_chans or h != frame.img_size or w != frame.img_size:
        raise SupernetError(f"the frame takes {frame.in_chans}x{frame.img_size}x{frame.img_size} images but the data "
                            f"has {c}x{h}x{w}; resize the data (--img-size) or use a frame that matches")
    top = int(_labels(data).max())
    if top >= frame.num_classes:
        raise SupernetError(f"the data has class index {top} but the frame has {frame.num_classes} classes")


# --------------------------------------------------------------------------------------------
# the supernet
# --------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a supernet run is: counted in optimizer steps."""

    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] | None = None
    stopped: bool = False  # this run stopped at its allowance before ``total_steps``
    losses: list[float] | None = None  # each step's loss (global batch): the first subnet's, or the standalone model's


def sandwich(frame: SupernetFrame, cfg: TrainConfig, step: int) -> list[ArchSpec]:
    """The subnets of ``step``: largest, smallest and ``cfg.n_random`` random ones (mixers random);
    with ``cfg.sampling == "fair"`` the random ones are the FairNAS paths of :func:`fair_paths`
    (``n_random`` unused); with ``"single_path"`` only the ``n_random`` random ones. The two ends
    keep their random mixers, so fairness is strict among the paths and holds in expectation over
    the whole step. Everything derives from ``(cfg.seed, step)``, so every rank of a distributed run
    draws the same."""
    rng = random.Random(f"{cfg.seed}:{step}")
    specs = [] if cfg.sampling == "single_path" else [frame.largest(rng), frame.smallest(rng)]
    if cfg.sampling == "fair":
        specs += fair_paths(frame, rng)
    else:
        specs += [frame.random(rng.randrange(2**31)) for _ in range(cfg.n_random)]
    if cfg.split_token_mixer is not None:  # a few-shot sub-supernet: its part of the space only
        specs = [frame.split_subnet(s, cfg.split_token_mixer) for s in specs]
    return [s.with_precision(frame.precisions[0]) for s in specs]


_MIXER_PARAM = re.compile(r"s(\d+)\.(?:b(\d+)\.)?(token|channel)_mixer")


class _FairTrial:
    """A seeded trial for ``SupernetFrame.sample`` that answers the mixer names with fixed choices
    (``mixers[i][j]`` = (token, channel) of stage ``i``, block ``j``; the stage-wide name takes
    block 0's) and always mixes per block; depth, width, heads, MLP ratio stay uniformly random."""

    def __init__(self, seed: int, mixers: list[list[tuple[str, str]]]) -> None:
        self._rng = random.Random(seed)
        self._mixers = mixers
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name not in self.params:
            m = _MIXER_PARAM.fullmatch(name)
            if m is not None:
                value = self._mixers[int(m[1])][int(m[2] or 0)][0 if m[3] == "token" else 1]
            elif name.endswith(".per_block"):
                value = True
            else:
                value = choices[self._rng.randrange(len(choices))]
            self.params[name] = value
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int:
        if name not in self.params:
            self.params[name] = low + step * self._rng.randrange((high - low) // step + 1)
        return self.params[name]


def fair_paths(frame: SupernetFrame, rng: random.Random) -> list[ArchSpec]:
    """FairNAS strict fairness (Chu, Zhang, Xu 2021, "FairNAS: Rethinking Evaluation Fairness of
    Weight Sharing Neural Architecture Search") over the mixers of ``frame``: ``m`` paths, ``m`` the
    most token mixers any stage has.

    Every block position (stage i, block j < max depth) draws one random permutation of its stage's
    token mixers and one of its channel mixers; path k takes element ``k mod len`` of each. So at
    every position each token mixer is in exactly one path (a stage with fewer than ``m`` cycles its
    permutation: each then ``floor(m/T)`` or ``ceil(m/T)`` times), as is each channel mixer
    ``floor(m/C)`` or ``ceil(m/C)`` times. Depth, width, heads and MLP ratio of each path are
    uniformly random, as in ``frame.random``. A path of depth d uses only its first d positions,
    so the counts are exact at block 0 of every stage and only approximate (in expectation) deeper.
    With ``frame.per_block`` false a stage takes its block-0 choice in every block (exact then).
    Draws from ``rng`` only."""
    stages = frame.stages
    m = max(len(sf.token_mixers) for sf in stages)
    tperm = [[rng.sample(sf.token_mixers, len(sf.token_mixers)) for _ in range(sf.max_depth)] for sf in stages]
    cperm = [[rng.sample(sf.channel_mixers, len(sf.channel_mixers)) for _ in range(sf.max_depth)] for sf in stages]
    seeds = [rng.randrange(2**31) for _ in range(m)]
    paths = []
    for k in range(m):
        mixers = [[(t[k % len(t)], c[k % len(c)]) for t, c in zip(tperm[i], cperm[i])] for i in range(len(stages))]
        paths.append(frame.sample(_FairTrial(seeds[k], mixers)))
    return paths


def _kd(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t


# --------------------------------------------------------------------------------------------
# data parallel: ranks, gradient sync, BatchNorm over the global batch
# --------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    """(rank, world size) of the initialised default ``torch.distributed`` group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items: sizes differ by at most one."""
    return slice(rank * n // world, (rank + 1) * n // world)


def _digest(specs: Sequence[ArchSpec]) -> int:
    """A 60-bit fingerprint of a step's subnets (exact in an int64 collective)."""
    return int(hashlib.sha256(" ".join(s.hash for s in specs).encode()).hexdigest()[:15], 16)


def _check_same_subnets(specs: Sequence[ArchSpec], step: int, device: torch.device) -> None:
    """SupernetError on every rank unless every rank drew the same subnets for ``step``: a 60-bit
    digest and its negation, MAX-reduced, agree only if the digests do. Runs before the step's
    forward passes, whose BatchNorm collectives would otherwise meet tensors of other shapes."""
    import torch.distributed as dist

    digest = _digest(specs)
    t = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise SupernetError(f"the ranks drew different subnets at step {step}; every rank must run the same "
                            "frame, recipe and seed (the same code version)")


def _sync_gradients(net: nn.Module, loss: float) -> float:
    """Sum every rank's gradients (each rank's losses were weighted by its share of the global
    batch, so the sum is the global batch's gradient) and the weighted teacher losses; returns the
    global loss. DDP's gradient all-reduce done once per step, after all the sandwich passes
    (as ``DistributedDataParallel.no_sync`` then one synchronised backward would), but explicit.

    Why not DDP itself: its reducer hooks parameters that one forward reaches, while here 3-5
    subnets touch different parameter subsets through ``functional_call`` slices, and it would
    broadcast BatchNorm buffers from rank 0 every forward. First a small int64 MAX all-reduce
    finds which parameters have a gradient on any rank: a parameter no subnet of the step reached keeps
    ``grad=None`` everywhere, as in the single-process run (AdamW skips it: no decay, no moment
    update); one that has a gradient on some rank only (impossible while the subnets agree) gets
    zeros on the others, so every rank takes the same update."""
    import torch.distributed as dist

    params = [p for p in net.parameters() if p.requires_grad]
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    anywhere = has.cpu() > 0
    grads: list[Tensor] = []
    for p, used in zip(params, anywhere.tolist()):
        if used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    total = torch.tensor([loss], dtype=torch.float64, device=dev)
    if not by_dtype:
        dist.all_reduce(total)
    for i, group in enumerate(by_dtype.values()):
        parts = [g.reshape(-1) for g in group]
        if i == 0:  # the loss travels with the first bucket: one collective for both
            parts.append(total.to(group[0].dtype))
        flat = torch.cat(parts)
        dist.all_reduce(flat)  # SUM
        off = 0
        for g in group:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        if i == 0:
            total = flat[off:off + 1].double()
    return float(total)


def _all_agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (an int MAX all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(int(t.item()))


def _global_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                       bias: Tensor | None, momentum: float | None, eps: float) -> Tensor:
    """Training-mode batch normalisation (Ioffe & Szegedy 2015) with the statistics of the global
    batch: per-channel sums over every rank's shard, through a differentiable all-reduce whose
    backward sums the ranks' gradients, as ``torch.nn.SyncBatchNorm`` does on GPUs. Two-pass
    (mean, then the squared deviations) like the single-process kernel; running statistics take
    the unbiased global variance, as ``F.batch_norm`` does."""
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    dims = [0, *range(2, x.ndim)]
    count = torch.full((1,), float(x.numel() // c), dtype=x.dtype, device=x.device)
    s = all_reduce(torch.cat([x.sum(dims), count]))
    n = s[-1].detach()
    mean = s[:-1] / n
    shape = [1, c] + [1] * (x.ndim - 2)
    xc = x - mean.view(shape)
    var = all_reduce((xc * xc).sum(dims)) / n
    out = xc * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    if running_mean is not None and running_var is not None:
        m = 0.0 if momentum is None else float(momentum)
        with torch.no_grad():
            running_mean.mul_(1 - m).add_(mean.detach().to(running_mean.dtype), alpha=m)
            unbiased = var.detach() * (n / (n - 1).clamp(min=1))
            running_var.mul_(1 - m).add_(unbiased.to(running_var.dtype), alpha=m)
    return out


@contextmanager
def _batch_norm_over_ranks(active: bool) -> Iterator[None]:
    """While active, every training-mode ``F.batch_norm`` (any BatchNorm module, in the frame's stem,
    a downsampling conv or a ``batchnorm`` stage) uses the global batch's statistics.

    The choice: SyncBatchNorm semantics, so a W-rank step computes what the single-process step on
    the whole batch computes (per-shard statistics would change the loss with W). Not
    ``nn.SyncBatchNorm`` itself: it refuses CPU tensors, and the BatchNorms to convert sit inside
    the supernet's cached meta-device templates (``search_spaces``). ``_BatchNorm.forward`` looks
    ``F.batch_norm`` up at call time, so it is swapped here for the step (a process holds one
    training loop; evaluation mode and other processes are untouched)."""
    if not active:
        yield
        return
    original = F.batch_norm

    def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float | None = 0.1, eps: float = 1e-5) -> Tensor:
        if not training:
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return _global_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps)

    F.batch_norm = batch_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        F.batch_norm = original  # type: ignore[assignment]


def supernet_step(net: Supernet, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, specs: list[ArchSpec],
                  cfg: TrainConfig, *, share: float = 1.0, step: int = 0) -> float:
    """One sandwich update: the first spec learns from the labels, the others from the labels or
    (with ``cfg.distill``) from the first one's soft predictions. Returns the first spec's loss.

    Under ``torch.distributed`` (world size > 1) ``x, y`` are this rank's shard, ``share`` its
    fraction of the global batch: each loss is weighted by it, so the ranks' gradients sum to the
    global batch's (exact with shards of unequal size too); they are summed once, after every
    subnet's backward (:func:`_sync_gradients`), then clipped and applied identically everywhere.
    The returned loss is then the global batch's."""
    world = _dist()[1]
    if world > 1:
        _check_same_subnets(specs, step, x.device)
    opt.zero_grad(set_to_none=True)
    teacher_loss = 0.0
    teacher: Tensor | None = None
    with _batch_norm_over_ranks(world > 1):
        for k, spec in enumerate(specs):
            logits = net(x, spec)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if k > 0 and cfg.distill:
                w = cfg.distill_weight
                loss = w * _kd(logits, teacher, cfg.distill_temperature) + (1 - w) * loss  # type: ignore[arg-type]
            if k == 0:
                teacher = logits.detach()
                teacher_loss = float(loss.detach())
            (loss * share if share != 1.0 else loss).backward()
    if world > 1:
        teacher_loss = _sync_gradients(net, teacher_loss * share)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], cfg.grad_clip)
    opt.step()
    return teacher_loss


def _ckpt_payload(net: Supernet, opt: torch.optim.Optimizer, cfg: TrainConfig, st: TrainState, epochs: int,
                  meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CKPT_FORMAT, "frame": net.frame.to_dict(), "config": asdict(cfg), "epochs": epochs,
        "step": st.step, "total_steps": st.total_steps, "steps_per_epoch": st.steps_per_epoch,
        "seconds": st.seconds, "history": st.history or [], "meta": meta,
        "model": net.state_dict(), "optimizer": opt.state_dict(),
    }


def _stored_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recipe with the fields added since it was written at their defaults."""
    return {**{f.name: f.default for f in fields(TrainConfig)}, **stored}


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[Supernet, dict[str, Any]]:
    """The supernet saved under ``path`` (a directory or the file) and the checkpoint's metadata."""
    p = Path(path)
    if p.is_dir():
        p = p / CKPT_NAME
    if not p.is_file():
        raise SupernetError(f"no supernet checkpoint at {path}; train one with `nas supernet train --out DIR`")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # any unreadable file is the same user error
        raise SupernetError(f"{p} is not a readable supernet checkpoint ({type(e).__name__}); retrain or restore it") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise SupernetError(f"{p} is not a supernet checkpoint of format {CKPT_FORMAT}")
    try:
        frame = SupernetFrame.from_dict(ckpt["frame"])
        net = Supernet(frame, seed=int(ckpt["config"].get("seed", 0)))
        net.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as e:
        raise SupernetError(f"{p} is a damaged supernet checkpoint ({type(e).__name__}); retrain or restore it") \
            from None
    return net, ckpt


def train_supernet(
    frame: SupernetFrame,
    data: Data,
    epochs: int,
    *,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    ckpt_every: int = 200,
    max_steps: int | None = None,
    meta: dict[str, Any] | None = None,
    progress: Callable[[TrainState, float], None] | None = None,
    device: str | torch.device = "cpu",
    total_steps: int | None = None,
    max_seconds: float | None = None,
    init: Supernet | None = None,
) -> Supernet:
    """Train a supernet of ``frame`` on ``data`` for ``epochs`` with the sandwich rule (the subnets
    of each step by :func:`sandwich`: uniform or, with ``cfg.sampling="fair"``, FairNAS paths).

    With ``out`` the run is checkpointed there (atomically, every ``ckpt_every`` steps, at each
    epoch end and at the end) and an existing checkpoint is resumed exactly; a checkpoint made
    with another frame, recipe or epoch count is refused. ``max_steps`` stops early (after a
    checkpoint), e.g. to split a run. ``progress(state, loss)`` is called after every step.
    ``total_steps`` caps the schedule below ``epochs`` whole epochs (the learning-rate schedule,
    warm-up included, fits in it). ``max_seconds`` is this call's allowance: before each step the
    loop stops if the step (timed as the slowest of the last ones) would end past it, checkpoints
    there and sets ``train_state.stopped``; calling again with the same settings continues.
    ``init``: start from a copy of these weights instead of a fresh initialisation (few-shot NAS
    starts each sub-supernet from the trained one-shot supernet; a checkpoint in ``out`` still comes
    first); a fresh optimizer and schedule either way.

    Under ``torch.distributed`` (world size W > 1; ``device`` is this rank's) each rank trains on
    its slice of every global batch of ``cfg.batch_size`` images, the ranks' gradients are summed
    after each step's sandwich passes, BatchNorm uses the global batch's statistics, rank 0 alone
    writes ``out`` and every rank resumes from rank 0's checkpoint: the result equals the
    single-process run's up to float rounding. ``progress`` runs on every rank; ``max_seconds``
    stops all ranks at the same step."""
    cfg = config or TrainConfig()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SupernetError(f"epochs must be a positive integer, got {epochs!r}")
    _check_frame_data(frame, data)
    if cfg.split_token_mixer is not None and cfg.split_token_mixer not in frame.stages[0].token_mixers:
        raise SupernetError(f"split_token_mixer {cfg.split_token_mixer!r} is not one of stage 0's token mixers "
                            f"{list(frame.stages[0].token_mixers)}")
    if init is not None and init.frame.to_dict() != frame.to_dict():
        raise SupernetError("init is a supernet of another frame; pass one trained on this frame")
    rank, world = _dist()
    n = _size(data)
    bs = min(cfg.batch_size, n)
    if bs < world:
        raise SupernetError(f"a global batch of {bs} images cannot be split over {world} ranks; "
                            "use a larger --batch-size or fewer workers")
    spe = n // bs
    total = spe * epochs if total_steps is None else max(1, min(spe * epochs, int(total_steps)))
    warm = None if total == spe * epochs else min(int(cfg.warmup_epochs * spe), total // 4)
    st = TrainState(step=0, total_steps=total, steps_per_epoch=spe, history=[], losses=[])
    ckpt_path = Path(out) / CKPT_NAME if out is not None else None
    dev = torch.device(device)
    loaded, ckpt = _resume_from(ckpt_path, frame, cfg, epochs, spe, total, rank, world)
    if loaded is None and init is not None:
        loaded = Supernet(frame, seed=cfg.seed)
        loaded.load_state_dict(init.state_dict())
    net = (loaded if loaded is not None else Supernet(frame, seed=cfg.seed)).to(dev)  # ranks > 0: rank 0's next
    if world > 1:  # DDP's start: every rank holds rank 0's tensors (the same init, or the same checkpoint)
        import torch.distributed as dist

        with torch.no_grad():
            for t in net.state_dict().values():
                dist.broadcast(t, 0)
    opt = _optimizer(net, cfg)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        st = TrainState(step=ckpt["step"], total_steps=ckpt["total_steps"], steps_per_epoch=spe,
                        seconds=ckpt["seconds"], history=list(ckpt["history"]), losses=[])
        del ckpt
    meta = dict(meta or {}, n_train=n)

    def save() -> None:
        if ckpt_path is not None and rank == 0:  # one writer; the others hold the same state
            payload = _ckpt_payload(net, opt, cfg, st, epochs, meta)
            atomic_write(ckpt_path, lambda f: torch.save(payload, f))
            (ckpt_path.parent / "frame.json").write_text(frame.to_json(indent=2) + "\n")

    net.train()
    stop = st.total_steps if max_steps is None else min(st.total_steps, max_steps)
    epoch_loss, epoch_n = 0.0, 0
    began = time.perf_counter()
    recent: list[float] = []  # the last steps' seconds, batch included
    # each rank takes its shard of each global batch (streaming data: fetched a step ahead, in a thread)
    batches = _StepBatches(data, cfg, spe, bs, dev, stop - 1, rank, world)
    try:
        while st.step < stop:
            if max_seconds is not None:
                late = time.perf_counter() - began + max(recent, default=0.0) > max_seconds
                # ranks must stop at the same step (the next one's collectives would wait forever): any rank's
                # clock running out stops all
                if late if world == 1 else _all_agree(late):
                    st.stopped = True
                    break
            t_step = time.perf_counter()
            x, y = batches(st.step)  # this rank's images only
            share = batches.share
            _set_lr(opt, _lr_at(cfg, st.step, st.total_steps, spe, warm))
            t0 = time.perf_counter()
            loss = supernet_step(net, opt, x, y, sandwich(frame, cfg, st.step), cfg, share=share, step=st.step)
            st.seconds += time.perf_counter() - t0
            st.step += 1
            st.losses.append(loss)  # type: ignore[union-attr]
            recent = [*recent[-4:], time.perf_counter() - t_step]
            epoch_loss, epoch_n = epoch_loss + loss, epoch_n + 1
            if progress is not None:
                progress(st, loss)
            if st.step % spe == 0:
                st.history = [*(st.history or []), {"epoch": st.step // spe, "loss": epoch_loss / max(1, epoch_n),
                                                     "seconds": st.seconds}]
                epoch_loss, epoch_n = 0.0, 0
                save()
            elif ckpt_every and st.step % ckpt_every == 0:
                save()
    finally:
        batches.close()
    if st.step % spe or st.stopped:
        save()
    net.train_state = st  # type: ignore[attr-defined]
    return net


def _resume_from(ckpt_path: Path | None, frame: SupernetFrame, cfg: TrainConfig, epochs: int, spe: int, total: int,
                 rank: int = 0, world: int = 1) -> tuple[Supernet | None, dict[str, Any] | None]:
    """The checkpoint to continue from, checked against this run's settings: (its supernet, its dict)
    on the rank that read it, (None, its dict without the model) on the others, (None, None) to
    start afresh.

    Under ``torch.distributed`` rank 0 alone reads it and broadcasts the rest of it (or its error)
    to the others, so every rank resumes from the same step and optimizer state and fails with the
    same message, shared disk or not; the weights follow in ``train_supernet``'s broadcast."""
    net: Supernet | None = None
    found: dict[str, Any] | None = None
    error: str | None = None
    if rank == 0 and ckpt_path is not None and ckpt_path.exists():
        try:
            net, found = load_checkpoint(ckpt_path)
            out = ckpt_path.parent
            if found["frame"] != frame.to_dict():
                raise SupernetError(f"{out} holds a supernet of another frame; pass the same frame or a new --out")
            if _stored_config(found["config"]) != asdict(cfg) or found["epochs"] != epochs or \
                    found["steps_per_epoch"] != spe or found["total_steps"] != total:
                raise SupernetError(f"{out} was trained with another recipe ({found['epochs']} epochs, "
                                    f"{found['steps_per_epoch']} steps an epoch); pass the same settings or "
                                    "a new --out")
        except SupernetError as e:
            net, found, error = None, None, str(e)
    if world > 1:
        import torch.distributed as dist

        box: list[Any] = [None if found is None else {k: v for k, v in found.items() if k != "model"}, error]
        dist.broadcast_object_list(box, src=0)
        if rank:
            found, error = box
    if error is not None:
        raise SupernetError(error)
    return net, found


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Data, batches: int = 16, batch_size: int = 128, seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` as the plain average over
    ``batches`` batches of ``data`` (no augmentation); returns the images used. Other norms
    keep no statistics and need none."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    was_training = model.training
    model.train()
    order = _order(_size(data), seed, 0xBA7C)
    used = 0
    dev = next(model.parameters()).device
    chunks = [c for c in (order[b * batch_size:(b + 1) * batch_size] for b in range(batches)) if len(c)]
    for x, _ in _chunks(data, chunks):
        model(x.to(dev))
        used += len(x)
    for m, mom in saved:
        m.momentum = mom
    model.train(was_training)
    return used


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch_size: int = 512, dtype: torch.dtype | None = None) -> float:
    """Top-1 accuracy of ``model`` (as it is: eval mode is the caller's business) on ``data``."""
    _check_data(data, "evaluation")
    dev = next(model.parameters()).device
    correct = 0
    n = _size(data)
    for x, y in _chunks(data, [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]):
        x = x.to(dev)
        if dtype is not None:
            x = x.to(dtype)
        correct += int((model(x).argmax(-1).cpu() == y).sum())
    return correct / n


def finetune(model: nn.Module, data: Data, steps: int, *, lr: float = 1e-4, batch_size: int = 128,
             seed: int = 0) -> nn.Module:
    """Train ``model`` in place for ``steps`` steps on ``data``: AdamW at the constant ``lr`` (the
    recipe's weight decay and parameter groups, gradient clipping and label smoothing, no
    augmentation), batches in an order drawn from ``seed`` alone. Extracted subnets are briefly
    fine-tuned before evaluation as in Once-for-All (Cai et al. 2020), here only a few steps to
    undo the interference of weight sharing. Returns ``model`` in its previous train/eval mode."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SupernetError(f"finetune_steps must be a non-negative integer, got {steps!r}")
    _check_data(data, "fine-tuning")
    cfg = TrainConfig(batch_size=batch_size, lr=lr, seed=seed, augment=False)
    n = _size(data)
    bs = min(cfg.batch_size, n)
    spe = n // bs
    dev = next(model.parameters()).device
    opt = _optimizer(model, cfg)
    was_training = model.training
    model.train()
    batches = _StepBatches(data, cfg, spe, bs, dev, steps - 1)
    try:
        with torch.enable_grad():
            for step in range(steps):
                x, y = batches(step)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing).backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
    finally:
        batches.close()
    return model.train(was_training)


def evaluate_subnet(
    supernet: Supernet,
    spec: ArchSpec,
    data: Data,
    *,
    calib: Data | None = None,
    calib_batches: int = 16,
    batch_size: int = 512,
    precision: str | None = None,
    device: str | torch.device = "cpu",
    finetune_steps: int = 0,
    finetune_data: Data | None = None,
    finetune_lr: float = 1e-4,
    finetune_batch: int = 128,
    seed: int = 0,
) -> float:
    """Top-1 accuracy on ``data`` of the subnet ``spec`` with inherited weights.

    With ``finetune_steps`` > 0 the extracted subnet (a copy: the supernet does not change) first
    trains that many steps on ``finetune_data`` (training images, required then) by :func:`finetune`
    (``finetune_lr``, ``finetune_batch``, batches from ``seed``). BatchNorm statistics are then
    recalibrated on ``calib`` (training images; ``data`` itself when None, which is transductive:
    pass training data where you have it). The model then runs at ``precision`` (the spec's own by
    default) on ``device``: bf16/fp16 cast, int8/fp8 Linear layers (``predictors.precision``), so
    the accuracy includes the cost of that precision."""
    _check_data(data, "evaluation")
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise SupernetError(f"finetune_steps must be a non-negative integer, got {finetune_steps!r}")
    if finetune_steps and finetune_data is None:
        raise SupernetError("finetune_steps > 0 needs finetune_data (training images); pass it or set 0 steps")
    model = supernet.extract(spec).to(device)
    if finetune_steps and finetune_data is not None:
        finetune(model, finetune_data, finetune_steps, lr=finetune_lr, batch_size=finetune_batch, seed=seed)
    if has_batchnorm(model):
        recalibrate_bn(model, calib if calib is not None else data, batches=calib_batches)
    precision = precision or spec.precision
    model = to_precision(model, precision, device, inplace=True)
    return accuracy(model, data, batch_size=batch_size, dtype=activation_dtype(precision))


def standalone_model(spec: ArchSpec, data: Data, num_classes: int | None, seed: int) -> nn.Module:
    """``build(spec)`` for ``data``'s images (channels, size) and ``num_classes`` (None: the largest
    label + 1), initialised from ``seed``: the model :func:`train_standalone` trains."""
    c, h, _ = _shape(data)
    return build(spec, num_classes=num_classes or int(_labels(data).max()) + 1, img_size=h, in_chans=c, seed=seed)


def train_standalone(spec: ArchSpec, data: Data, epochs: int, *, config: TrainConfig | None = None,
                     num_classes: int | None = None, seed: int | None = None,
                     device: str | torch.device = "cpu",
                     on_epoch: Callable[[int, nn.Module], bool | None] | None = None,
                     before_step: Callable[[int, float], bool] | None = None) -> nn.Module:
    """Train ``build(spec)`` from scratch with the supernet's recipe (no sandwich, labels only).

    ``on_epoch(epoch, model)`` runs after each epoch (1-based) with the model in eval mode; returning
    True stops training there (early stopping, e.g. ASHA). ``before_step(step, step_seconds)`` runs
    before every optimisation step with the slowest of the last steps' seconds; returning True stops
    there (an allowance in seconds). The model's ``train_state`` (:class:`TrainState`) says how many
    steps ran, whether ``before_step`` stopped it, and each step's loss (``losses``).

    Under ``torch.distributed`` (world size W > 1; ``device`` is this rank's) it trains data
    parallel with DDP semantics (Li et al., VLDB 2020, "PyTorch Distributed"), as :func:`train_supernet`
    does: every rank starts from rank 0's weights, takes its shard of each global batch of
    ``cfg.batch_size`` images, the shards' gradients are summed (:func:`_sync_gradients`) and
    BatchNorm uses the global batch's statistics, so the run equals the single-process one up to
    float rounding. Pass the same callbacks (or None) on every rank: they run on rank 0 only and
    its answer is broadcast, so every rank stops at the same step (``on_epoch`` gets rank 0's model,
    which every rank holds too)."""
    cfg = config or TrainConfig()
    _check_data(data, "training")
    rank, world = _dist()
    model = standalone_model(spec, data, num_classes, cfg.seed if seed is None else seed).to(device)
    n = _size(data)
    bs = min(cfg.batch_size, n)
    if bs < world:
        raise SupernetError(f"a global batch of {bs} images cannot be split over {world} ranks; "
                            "use a larger --train-batch or fewer workers")
    if world > 1:  # DDP's start: every rank holds rank 0's parameters and buffers
        import torch.distributed as dist

        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, 0)
    opt = _optimizer(model, cfg)
    spe = n // bs
    total = spe * epochs
    st = TrainState(step=0, total_steps=total, steps_per_epoch=spe, losses=[])
    model.train_state = st  # type: ignore[assignment]
    model.train()
    recent: list[float] = []
    batches = _StepBatches(data, cfg, spe, bs, device, total - 1, rank, world)
    try:
        for step in range(total):
            if before_step is not None:
                late = before_step(step, max(recent, default=0.0)) if rank == 0 else False
                if late if world == 1 else _all_agree(late):  # rank 0's decision: the others pass False
                    st.stopped = True
                    break
            t_step = time.perf_counter()
            x, y = batches(step)
            _set_lr(opt, _lr_at(cfg, step, total, spe))
            opt.zero_grad(set_to_none=True)
            if world == 1:
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                loss.backward()
                value = float(loss.detach())
            else:  # this rank's shard, weighted by its share: the ranks' gradients sum to the global batch's
                with _batch_norm_over_ranks(True):
                    loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing) * batches.share
                    loss.backward()
                value = _sync_gradients(model, float(loss.detach()))
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            st.step = step + 1
            st.losses.append(value)  # type: ignore[union-attr]
            recent = [*recent[-4:], time.perf_counter() - t_step]
            st.seconds += recent[-1]
            if on_epoch is not None and (step + 1) % spe == 0:
                stop = False
                if rank == 0:  # the others wait at the broadcast
                    model.eval()
                    stop = bool(on_epoch((step + 1) // spe, model))
                    model.train()
                if stop if world == 1 else _all_agree(stop):
                    break
    finally:
        batches.close()
    return model.eval()


def study_recipe(n_train: int, in_chans: int, seed: int = 0) -> TrainConfig:
    """The supernet recipe a study trains with: single-path one-shot sampling (Guo et al. 2020,
    "SPOS"), 4 uniformly random subnets a step and no in-place distillation; batch 64 and lr 3e-3
    below 5,000 training images, else 128 and 2e-3; augmentation (crop and flip) for RGB images only.

    Measured on HybridBench (200 hybrid_vit architectures trained standalone on CIFAR-10; README,
    "HybridBench"), Kendall tau of inherited against standalone accuracy, two seeds each:
    the sandwich rule with distillation 0.330 and 0.340; without it 0.366 and 0.375; single path
    without it 0.391 and 0.390 (paired against the first on the same rows +0.061 and +0.060,
    bootstrap se 0.031 and 0.025), at about 10% less training time (no largest subnet a step)."""
    rgb = in_chans == 3
    small = n_train < 5000
    return TrainConfig(batch_size=64 if small else 128, lr=3e-3 if small else 2e-3, augment=rgb, flip=rgb, seed=seed,
                       sampling="single_path", n_random=4, distill=False)


def legacy_study_recipe(cfg: TrainConfig) -> TrainConfig:
    """The study recipe of a supernet whose ``plan.json`` predates the recipe record (before the
    ninth session): the sandwich rule, 2 random subnets, in-place distillation."""
    return replace(cfg, sampling="uniform", n_random=2, distill=True)


def train_within(job: Any, data: Any, *, device: str = "cpu", allowance: float | None = None,
                 trainer: Callable[..., Supernet] | None = None) -> dict[str, Any]:
    """Train (or continue training) a study's supernet under a time allowance; an evaluation dict.

    ``job`` has ``frame`` (frame JSON), ``out`` (checkpoint folder), ``epochs`` (None: as many as
    ``plan_seconds`` allows, at most ``max_epochs``), ``counted`` (checkpointed training seconds
    earlier trials already recorded) and ``seed``; ``data`` has ``train`` and ``in_chans``.

    The schedule (epochs, and steps when less than an epoch fits) is fixed once, timed on a few
    steps of the recipe, and kept in ``plan.json``. ``allowance`` (device-seconds) is a hard limit:
    training stops at the step where it runs out and checkpoints there (``complete`` = 0), and the
    next call continues from that checkpoint. Seconds a crash lost since the last recorded part
    are counted once (``counted``), and a continuation's are not counted twice.

    ``trainer`` replaces :func:`train_supernet` for the training itself (same arguments and result;
    ``workers.ray_train`` passes its Ray Train one); the few timing steps of the schedule stay in
    this process, so a distributed run plans on one worker's (slower) step: fewer epochs, not more."""
    import json

    from search_spaces.supernet import frame_from_json

    t0 = time.perf_counter()
    frame = frame_from_json(job.frame)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    n = _size(data.train)
    cfg = study_recipe(n, data.in_chans, int(job.seed))
    plan = out / "plan.json"
    steps: int | None = None
    saved = json.loads(plan.read_text()) if plan.is_file() else None
    if saved is not None:
        # a continued training keeps the recipe it started with, as its plan records it; a plan from
        # before the record was taken under the recipe of its time (sandwich, distillation)
        cfg = TrainConfig.from_dict(saved["config"]) if "config" in saved else legacy_study_recipe(cfg)
    spe = max(1, n // min(cfg.batch_size, n))
    if saved is not None:
        epochs, steps = int(saved["epochs"]), saved.get("steps")
    elif job.epochs:
        epochs = int(job.epochs)
    else:  # time a few steps of the recipe, then take as many epochs (or steps) as the plan's time holds
        marks: list[float] = []
        train_supernet(frame, data.train, 1, config=cfg, max_steps=4, device=device,
                       progress=lambda st, _loss: marks.append(st.seconds),
                       max_seconds=None if allowance is None else 0.25 * float(allowance))
        per_step = max((marks[-1] - marks[0]) / max(1, len(marks) - 1) if len(marks) > 1 else
                       (marks or [1.0])[0], 1e-9)
        plan_s = float(job.plan_seconds if job.plan_seconds is not None else allowance or 0.0)
        left = plan_s - (time.perf_counter() - t0)
        epochs = int(max(1, min(int(job.max_epochs), left * 0.85 // (per_step * spe))))
        if left * 0.85 < per_step * spe:  # less than an epoch fits: a schedule of the steps that do
            steps = max(1, int(left * 0.85 / per_step))
    plan.write_text(json.dumps({"epochs": epochs, "steps": steps, "config": asdict(cfg)}))
    prior = 0.0  # training time checkpointed by an earlier, interrupted run: used, and not counted yet
    if (out / "supernet.pt").is_file():
        ckpt_s = float(torch.load(out / "supernet.pt", map_location="cpu", weights_only=False).get("seconds", 0.0))
        prior = max(0.0, ckpt_s - float(job.counted or 0.0))
    budget_left = None if allowance is None else float(allowance) - (time.perf_counter() - t0) - prior - 0.05
    net = (trainer or train_supernet)(frame, data.train, epochs, config=cfg, out=out, device=device, total_steps=steps,
                                      max_seconds=None if budget_left is None else max(0.0, budget_left))
    st = net.train_state  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0 + prior
    metrics = {"epochs": float(epochs), "steps": float(st.step), "total_steps": float(st.total_steps),
               "complete": float(st.step >= st.total_steps), "train_seconds": float(st.seconds)}
    if allowance is not None:
        metrics["allowance"] = float(allowance)
    if st.history:
        metrics["loss"] = float(st.history[-1]["loss"])
    return {"spec_hash": None, "stage": "supernet_train", "seconds": seconds, "params": None, "flops": None,
            "metrics": metrics, "device": {}}
