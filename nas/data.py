"""Datasets for hybrid-NAS: small image-classification sets as normalised tensors in memory.

A source is a string (the CLI's ``--data``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, one
  channel); the embedded default, nothing to download. Alpaydin & Kaynak, UCI 1998.
- ``cifar10:PATH``: CIFAR-10 "python version" batches (Krizhevsky 2009): a directory with
  ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta`` (or its parent
  holding ``cifar-10-batches-py/``), or the downloaded ``cifar-10-python.tar.gz`` itself.
- ``imagefolder:PATH``: ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` (``val/`` stands in for
  a missing ``test/``), or just ``<class>/*.jpg``, split 80/20 per class, deterministically. PATH
  is a directory or a ``.tar``/``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz`` of such a tree, read
  straight from the archive (a single wrapping top folder is fine). JPEG, PNG, BMP, GIF, WebP,
  TIFF, PPM, decoded with Pillow.
- ``npz:PATH``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally
  ``classes``); x is N,H,W,C or N,C,H,W (or N,H,W), uint8 (scaled by 1/255) or float (as is).
- ``wds:PATH``: WebDataset shards (a directory of ``*.tar``, or one shard): each sample is
  ``KEY.jpg`` (or another image type) plus ``KEY.cls`` holding the class index as text. Shards
  named (or in folders named) ``train*`` and ``test*``/``val*`` give the splits, else 80/20 per
  class. Read with the same tar reader as image folders; no ``webdataset`` package needed.

:func:`open_dataset` is the entry point for training and evaluation: it returns this in-memory
:class:`ImageDataset` for small sets and a :class:`nas.stream.StreamDataset` (decoded lazily in
DataLoader workers) for large image folders and shards, chosen by size
(:data:`nas.stream.STREAM_ABOVE_BYTES`, overridden by ``stream=`` or ``$HYBRID_NAS_STREAM``). Both
offer ``labels``, ``take(indices)`` and ``loader(indices, batch_size, train=...)``.

:func:`load` returns an :class:`ImageDataset`: ``x`` float32 N,C,H,W normalised per channel,
``y`` int64. The per-channel ``mean``/``std`` belong to the source, not to one call: they are
computed on a fixed class-balanced sample of at most :data:`STATS_SAMPLE` train images (all of
them for digits), at native resolution, so train and test loads - any ``limit``, ``seed`` or
``img_size`` - share them.

``limit`` picks a class-balanced subset: per class, a prefix of a permutation seeded by
``(seed, class)``, so a smaller limit is a subset of a larger one under the same seed. From an
image folder only the chosen files are read and decoded (a compressed archive is still streamed
once to reach them); the decoded uint8 arrays, the archive's member index and the statistics
are cached under :func:`cache_dir`, keyed by the path, size and mtime of what was read and the
selection, so a rerun skips decoding.

Errors the user can act on (unknown kind, missing path, corrupted archive, no images,
different classes in train and test) are one-line ``ValueError``s naming the path.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from predictors._io import atomic_write

__all__ = [
    "KINDS",
    "STATS_SAMPLE",
    "DataSpec",
    "ImageDataset",
    "batches",
    "cache_dir",
    "load",
    "one_batch",
    "open_dataset",
    "parse_data",
]

KINDS: tuple[str, ...] = ("digits", "cifar10", "imagefolder", "npz", "wds")
SPLITS: tuple[str, ...] = ("train", "test")
STATS_SAMPLE = 2000  # train images the per-channel mean/std are computed on (class-balanced, seed 0)
TEST_FRACTION = 0.2  # share of each class held out when a source has no test split of its own
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_USAGE = "pass digits, cifar10:PATH, imagefolder:PATH (directory or .tar.gz), npz:PATH or wds:PATH (shards)"
_SPLIT_SEED = 0  # the 80/20 split never depends on the load's seed: train and test never overlap
_STATS_SEED = 0
_CACHE_VERSION = 1
_CACHE_MAX_BYTES = 2 << 30  # decoded selections bigger than this are not written to the cache
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


# ---------------------------------------------------------------------------------------------
# source strings


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset source: ``kind`` is one of :data:`KINDS`; ``path`` is None for digits."""

    kind: str
    path: str | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data(source: str) -> DataSpec:
    """Parse ``digits`` / ``cifar10:PATH`` / ``imagefolder:PATH`` / ``npz:PATH`` / ``wds:PATH``; the path must exist."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"empty dataset source; {_USAGE}")
    text = source.strip()
    kind, sep, raw = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        if not sep and Path(text).expanduser().exists():
            raise ValueError(
                f"dataset source {text!r} has no kind; pass imagefolder:{text}, cifar10:{text} or npz:{text}"
            )
        raise ValueError(f"unknown dataset kind {kind!r} in {text!r}; {_USAGE}")
    raw = raw.strip()
    if kind == "digits":
        if raw:
            raise ValueError(f"digits is bundled with scikit-learn and takes no path; pass digits, not {text!r}")
        return DataSpec("digits", None)
    if not raw:
        raise ValueError(f"{kind} needs a path; pass {kind}:PATH ({_what(kind)})")
    path = Path(raw).expanduser()
    if not path.exists():
        raise ValueError(f"{kind} path {str(path)!r} does not exist; pass {kind}:PATH to {_what(kind)}")
    if kind == "npz" and not path.is_file():
        raise ValueError(f"npz path {str(path)!r} is not a file; pass npz:FILE.npz holding x_train, y_train, ...")
    if kind == "imagefolder" and path.is_file() and not _is_archive_name(path):
        raise ValueError(
            f"imagefolder path {str(path)!r} is neither a directory nor a .tar/.tar.gz/.tgz archive; "
            "pass imagefolder:DIR or imagefolder:ARCHIVE.tar.gz"
        )
    if kind == "wds" and path.is_file() and not path.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        raise ValueError(f"wds path {str(path)!r} is neither a directory of shards nor a .tar shard; "
                         "pass wds:DIR or wds:SHARD.tar")
    return DataSpec(kind, str(path))


def _what(kind: str) -> str:
    return {
        "cifar10": "the cifar-10-batches-py directory (or cifar-10-python.tar.gz)",
        "imagefolder": "a directory or .tar.gz with train/<class>/*.jpg and test/<class>/*.jpg, or <class>/*.jpg",
        "npz": "an .npz file with x_train, y_train, x_test, y_test",
        "wds": "a directory of WebDataset .tar shards (key.jpg + key.cls samples), or one shard",
    }[kind]


def _is_archive_name(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# the dataset


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images in memory: ``x`` float32 N,C,H,W normalised with ``mean``/``std`` (per channel, in the
    units of the raw data: [0, 1] for 8-bit images), ``y`` int64 class indices into ``classes``."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    augment: Any = None  # nas.stream.Augment for loader(train=True); None: its defaults

    @property
    def labels(self) -> torch.Tensor:
        """Every label (the interface a StreamDataset shares)."""
        return self.y

    @property
    def streaming(self) -> bool:
        return False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.x.shape[1])

    @property
    def img_size(self) -> int | tuple[int, int]:
        """Side of the (square) images; (H, W) when they are not square."""
        h, w = int(self.x.shape[2]), int(self.x.shape[3])
        return h if h == w else (h, w)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def take(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at ``indices`` and their labels, as one batch."""
        from nas.stream import _as_indices

        t = torch.from_numpy(_as_indices(indices, len(self)))
        return self.x[t], self.y[t]

    def loader(self, indices: Sequence[int] | torch.Tensor | np.ndarray | None = None, batch_size: int = 128, *,
               train: bool = False, shuffle: bool | None = None, seed: int = 0, epoch: int = 0,
               drop_last: bool = False, num_workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``(x, y)`` over ``indices`` (all when None), as ``StreamDataset.loader``: the same
        order for the same (seed, epoch) and, with ``train``, the same random-resized crop and flip
        per image (applied here to the stored, already resized image). ``num_workers`` is unused."""
        from nas.stream import Augment, _as_indices, epoch_order, sample_rng, train_transform

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = epoch_order(_as_indices(indices, len(self)), seed, epoch, train if shuffle is None else shuffle)
        aug = self.augment or Augment()
        hw = (int(self.x.shape[2]), int(self.x.shape[3]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            t = torch.from_numpy(idx)
            x = self.x[t]
            if train:  # crop and resize commute with the per-channel normalisation (both are affine)
                x = torch.cat([train_transform(x[j : j + 1], hw, sample_rng(seed, epoch, int(i)), aug)
                               for j, i in enumerate(idx.tolist())])
            yield x, self.y[t]

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
            f"in_chans={self.in_chans}, img_size={self.img_size})"
        )


def load(
    source: str | DataSpec,
    split: str = "train",
    limit: int | None = None,
    img_size: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load one split of a source as an :class:`ImageDataset`.

    ``limit``: a class-balanced subset of that many images (deterministic under ``seed``; all
    images when the split has fewer). ``img_size``: resize to img_size x img_size (bilinear,
    antialiased); native size otherwise.
    """
    spec = parse_data(str(source))  # a DataSpec is checked again: its path may have gone
    _check_args(split, limit, img_size)
    if spec.kind == "imagefolder":
        raw = _load_imagefolder(Path(str(spec.path)), split, limit, seed)
    elif spec.kind in ("digits", "cifar10", "npz"):
        raw = _load_arrays(spec, split, limit, seed)
    elif spec.kind == "wds":
        from nas import stream

        return _materialise(stream.wds(Path(str(spec.path)), split, limit, img_size, seed, str(spec)))
    else:
        raise ValueError(f"unknown dataset kind {spec.kind!r}; {_USAGE}")
    x = _to_float(raw.images, raw.scale, img_size, str(spec.path))
    mean = torch.tensor(raw.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(raw.std, dtype=torch.float32).view(1, -1, 1, 1)
    x.sub_(mean).div_(std)
    return ImageDataset(
        x=x,
        y=torch.from_numpy(np.ascontiguousarray(raw.labels, dtype=np.int64)),
        classes=list(raw.classes),
        name=raw.name,
        split=split,
        mean=tuple(float(v) for v in raw.mean),
        std=tuple(float(v) for v in raw.std),
        source=str(spec),
    )


def _check_args(split: str, limit: int | None, img_size: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; pass split='train' or split='test'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive integer or None, got {img_size!r}")


def open_dataset(
    source: str | DataSpec,
    split: str = "train",
    *,
    limit: int | None = None,
    img_size: int | None = None,
    seed: int = 0,
    stream: bool | str | None = None,
    crop_pct: float | None = None,
    augment: Any = None,
) -> Any:
    """One split of a source, in memory (:class:`ImageDataset`) or streaming
    (:class:`nas.stream.StreamDataset`); both have ``labels``, ``take`` and ``loader``.

    ``stream``: True/"on" or False/"off" forces the path; None/"auto" reads ``$HYBRID_NAS_STREAM``
    and, when that is unset or "auto", streams an image folder or shard set whose float32 images at
    ``img_size`` (native size when None) would exceed :data:`nas.stream.STREAM_ABOVE_BYTES`.
    digits, cifar10 and npz are arrays already and never stream. ``crop_pct``: evaluation resizes
    the shorter side to ``img_size / crop_pct`` and centre-crops (default: the whole image, as
    :func:`load`). ``augment``: a :class:`nas.stream.Augment` for ``loader(train=True)``."""
    from nas import stream as st

    spec = parse_data(str(source))
    _check_args(split, limit, img_size)
    choice = st.stream_choice(stream)
    if spec.kind not in ("imagefolder", "wds"):
        if choice is True:
            raise ValueError(f"{spec.kind} is held in memory and cannot stream; pass stream=auto or off, or convert "
                             "the data to imagefolder:DIR or wds:DIR")
        if crop_pct is not None:
            raise ValueError(f"crop_pct applies to imagefolder: and wds: sources, not {spec.kind}; leave it unset")
        ds = load(spec, split, limit=limit, img_size=img_size, seed=seed)
        return ImageDataset(ds.x, ds.y, ds.classes, ds.name, split, ds.mean, ds.std, ds.source, augment)
    path = Path(str(spec.path))
    if spec.kind == "wds":
        sds = st.wds(path, split, limit, img_size, seed, str(spec), crop_pct, augment)
        big = st.estimate_bytes(len(sds), sds.in_chans, sds.img_size) > st.STREAM_ABOVE_BYTES
        return sds if (choice if choice is not None else big) else _materialise(sds)
    folder = _Folder(path)
    if choice is None:
        choice = st.folder_size_hint(folder, split, limit, img_size) > st.STREAM_ABOVE_BYTES
    if choice or crop_pct is not None:
        sds = st.imagefolder(path, split, limit, img_size, seed, str(spec), crop_pct, augment, folder=folder)
        return sds if choice else _materialise(sds)
    ds = load(spec, split, limit=limit, img_size=img_size, seed=seed)
    return ImageDataset(ds.x, ds.y, ds.classes, ds.name, split, ds.mean, ds.std, ds.source, augment)


def _materialise(sds: Any) -> ImageDataset:
    """A StreamDataset decoded into memory (evaluation transform)."""
    x, y = sds.take(np.arange(len(sds)))
    return ImageDataset(x, y, list(sds.classes), sds.name, sds.split, sds.mean, sds.std, sds.source, sds.augment)


def batches(
    ds: ImageDataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches ``(x, y)`` over the dataset once; the order under ``shuffle`` depends only on ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if drop_last and stop - start < batch_size:
            return
        if order is None:
            yield ds.x[start:stop], ds.y[start:stop]
        else:
            idx = order[start:stop]
            yield ds.x[idx], ds.y[idx]


def one_batch(ds: ImageDataset, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One class-balanced batch (``batch_size // num_classes`` a class, the remainder spread), shuffled.

    Used by the zero-cost proxies, which score an architecture on a single batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > len(ds):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(ds)} images of {ds.name}; load more or ask fewer")
    idx = _select(ds.y.numpy(), ds.num_classes, batch_size, seed)
    idx = idx[np.random.default_rng([seed, 0xBA7C4]).permutation(len(idx))]
    t = torch.from_numpy(idx)
    return ds.x[t], ds.y[t]


# ---------------------------------------------------------------------------------------------
# selection


def _quotas(counts: Sequence[int], total: int, rng: np.random.Generator) -> list[int]:
    """Split ``total`` over classes as evenly as their sizes allow (water-filling); the classes
    that get one more than the others follow a seeded order."""
    quotas = [0] * len(counts)
    open_ = [int(c) for c in rng.permutation(len(counts)) if counts[c] > 0]
    remaining = min(int(total), int(sum(counts)))
    while remaining > 0 and open_:
        share, extra = divmod(remaining, len(open_))
        still = []
        for j, c in enumerate(open_):
            take = min(share + (j < extra), counts[c] - quotas[c])
            quotas[c] += take
            remaining -= take
            if quotas[c] < counts[c]:
                still.append(c)
        open_ = still
    return quotas


def _select(labels: np.ndarray, num_classes: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of a class-balanced subset: per class, a prefix of a seeded permutation."""
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    quotas = _quotas([len(m) for m in members], limit, np.random.default_rng([seed, 0xC1A55]))
    chosen = [
        m[np.random.default_rng([seed, c]).permutation(len(m))[:q]] for c, (m, q) in enumerate(zip(members, quotas))
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _split_test(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Boolean mask of the deterministic stratified test split (TEST_FRACTION of each class)."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        m = np.flatnonzero(labels == c)
        n_test = round(len(m) * TEST_FRACTION) if len(m) > 1 else 0
        mask[m[np.random.default_rng([_SPLIT_SEED, c, 0x7E57]).permutation(len(m))[:n_test]]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# raw arrays -> tensors


@dataclass
class _Raw:
    images: np.ndarray | list[np.ndarray]  # uint8 or float, N,C,H,W (a list of C,H,W when sizes differ)
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float  # 1/255 for uint8, 1 for float data
    name: str


def _scale_of(x: np.ndarray | list[np.ndarray]) -> float:
    dtype = x.dtype if isinstance(x, np.ndarray) else (x[0].dtype if x else np.dtype(np.uint8))
    return 1.0 if np.issubdtype(dtype, np.floating) else 1.0 / 255.0


def _channel_stats(images: np.ndarray | list[np.ndarray], scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of the images (N,C,H,W array or list of C,H,W)."""
    if isinstance(images, list) and images and len({a.shape for a in images}) == 1:
        images = np.stack(images)
    chunks = [images[i : i + 512] for i in range(0, len(images), 512)] if isinstance(images, np.ndarray) else images
    s1 = s2 = None
    count = 0
    for chunk in chunks:
        a = np.asarray(chunk, dtype=np.float64)
        axes = (0, 2, 3) if a.ndim == 4 else (1, 2)
        t1, t2 = a.sum(axis=axes), np.square(a).sum(axis=axes)
        s1, s2 = (t1, t2) if s1 is None else (s1 + t1, s2 + t2)
        count += a.size // a.shape[-3]
    if s1 is None or count == 0:
        raise ValueError("no images to compute the normalisation statistics on")
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    std = np.where(std * scale < 1e-6, 1.0 / scale, std)  # a constant channel: only shift it
    return tuple(float(v) * scale for v in mean), tuple(float(v) * scale for v in std)


def _to_float(images: np.ndarray | list[np.ndarray], scale: float, img_size: int | None, where: str) -> torch.Tensor:
    """uint8/float N,C,H,W (or list of C,H,W) -> float32 N,C,H,W scaled, resized when img_size is given."""
    if isinstance(images, list):
        if img_size is None:
            shapes = sorted({im.shape[-2:] for im in images})
            if len(shapes) > 1:
                sizes = ", ".join(f"{h}x{w}" for h, w in shapes[:3])
                raise ValueError(f"{where}: images have different sizes ({sizes}, ...); pass img_size to resize them")
            images = np.stack(images) if images else np.zeros((0, 3, 1, 1), np.uint8)
        else:
            out = torch.empty(len(images), images[0].shape[0] if images else 3, img_size, img_size)
            for i, im in enumerate(images):
                out[i] = _resize(torch.from_numpy(np.asarray(im)).unsqueeze(0).float().mul_(scale), img_size)[0]
            return out
    x = torch.from_numpy(np.ascontiguousarray(images))
    n = x.shape[0]
    if img_size is None or tuple(x.shape[-2:]) == (img_size, img_size):
        return x.to(torch.float32, copy=True).mul_(scale)
    out = torch.empty(n, x.shape[1], img_size, img_size)
    for i in range(0, n, 1024):
        out[i : i + 1024] = _resize(x[i : i + 1024].to(torch.float32) * scale, img_size)
    return out


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------------------------
# in-memory sources: digits, CIFAR-10 python batches, npz


def _load_arrays(spec: DataSpec, split: str, limit: int | None, seed: int) -> _Raw:
    if spec.kind == "digits":
        splits, classes, fp = _digits(), [str(c) for c in range(10)], None
        name = "digits"
    elif spec.kind == "cifar10":
        splits, classes, fp = _cifar10(Path(str(spec.path)))
        name = "cifar10"
    else:
        splits, classes, fp = _npz(Path(str(spec.path)))
        name = _stem(Path(str(spec.path)))

    def compute() -> dict[str, Any]:
        x_train, y_train = splits["train"]()
        idx = _select(y_train, len(classes), STATS_SAMPLE, _STATS_SEED)
        mean, std = _channel_stats(x_train[idx], _scale_of(x_train))
        return {"mean": mean, "std": std}

    stats = compute() if fp is None else _cached_json(("stats", spec.kind, fp, STATS_SAMPLE), compute, f"{name}-stats")
    x, y = splits[split]()
    if len(x) == 0:
        raise ValueError(f"{spec.path or name}: the {split} split has no images; add some or pick the other split")
    idx = _select(y, len(classes), limit, seed)
    if len(idx) != len(y):
        x, y = x[idx], y[idx]
    return _Raw(x, y, classes, tuple(stats["mean"]), tuple(stats["std"]), _scale_of(x), name)


# split -> () -> (images N,C,H,W, labels); read lazily: the test split needs train data only for statistics
_Splits = dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]


def _digits() -> _Splits:
    x, y = _digits_arrays()
    x = np.rint(x.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    test = _split_test(y, 10)
    return {"train": lambda: (x[~test], y[~test]), "test": lambda: (x[test], y[test])}


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits.csv.gz read directly (importing sklearn.datasets takes ~1.5 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        try:
            a = np.loadtxt(csv, delimiter=",", dtype=np.float64)
            if a.shape == (1797, 65):
                return a[:, :64], a[:, 64].astype(np.int64)
        except (OSError, ValueError):
            pass
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("digits needs scikit-learn; pip install scikit-learn, or pass another dataset") from None
    d = load_digits()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def _npz(path: Path) -> tuple[_Splits, list[str], Any]:
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
        ys = {s: _labels(z[f"y_{s}"], path, f"y_{s}") for s in SPLITS} if not missing else {}
        names = [str(c) for c in z["classes"].tolist()] if "classes" in keys and not missing else None
    except (OSError, ValueError, zlib.error, EOFError, AttributeError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read as .npz ({_msg(e)}); pass a file written by np.savez") from None
    if missing:
        raise ValueError(f"{path}: missing arrays {', '.join(missing)}; save x_train, y_train, x_test, y_test")
    num_classes = max((int(v.max()) + 1 for v in ys.values() if len(v)), default=0)
    if num_classes == 0:
        raise ValueError(f"{path}: y_train and y_test are empty; save some images")
    if num_classes < 2:
        raise ValueError(f"{path}: the labels name 1 class; a dataset needs at least 2 classes")
    classes = [str(c) for c in range(num_classes)]
    if names is not None:
        if len(names) < num_classes:
            raise ValueError(f"{path}: 'classes' names {len(names)} classes but labels go up to {num_classes - 1}")
        classes = names

    def split(s: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def get() -> tuple[np.ndarray, np.ndarray]:
            x = _nchw(z[f"x_{s}"], path, f"x_{s}")
            if len(x) != len(ys[s]):
                raise ValueError(f"{path}: x_{s} has {len(x)} images but y_{s} has {len(ys[s])} labels; save as many")
            return x, ys[s]

        return get

    return {s: split(s) for s in SPLITS}, classes, _file_fp(path)


def _labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{path}: {key} must be a 1-D array of class indices, got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or not np.array_equal(y, np.round(y))):
        raise ValueError(f"{path}: {key} must hold class indices 0..K-1")
    return y.astype(np.int64)


def _nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """N,H,W,C / N,C,H,W / N,H,W -> N,C,H,W, uint8 or float32."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{path}: {key} has shape {x.shape}; expected N,H,W,C or N,C,H,W")
    c_first, c_last = 1 <= x.shape[1] <= 4, 1 <= x.shape[3] <= 4
    if c_last and (not c_first or x.shape[3] <= x.shape[1]):
        x = x.transpose(0, 3, 1, 2)  # N,H,W,C (the guess when both could be channels: tiny images)
    elif not c_first:
        raise ValueError(f"{path}: {key} has shape {x.shape}: no axis of 1-4 channels; save N,H,W,C or N,C,H,W")
    if x.dtype == np.uint8 or x.dtype == np.float32:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return np.ascontiguousarray(x, dtype=np.float32)
    if np.issubdtype(x.dtype, np.integer) and (x.size == 0 or (x.min() >= 0 and x.max() <= 255)):
        return np.ascontiguousarray(x, dtype=np.uint8)
    raise ValueError(f"{path}: {key} has dtype {x.dtype}; save uint8 (0..255) or float images")


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow numpy arrays and plain containers, nothing that runs code."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if canonical.startswith("numpy.core") and importlib.util.find_spec("numpy._core") is not None:
            module = canonical.replace("numpy.core", "numpy._core", 1)  # numpy 2: no deprecation warning
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[Any, Any]:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any garbage in a pickle surfaces as one of many exception types
        raise ValueError(f"{where}: not a CIFAR-10 python batch ({_msg(e)}); re-download the dataset") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: not a CIFAR-10 python batch (a {type(obj).__name__}); re-download it")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar10(path: Path) -> tuple[_Splits, list[str], Any]:
    files = _cifar_files(path)
    meta = _unpickle(files["batches.meta"][0](), f"{path}: batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: batches.meta has no label_names; re-download cifar-10-python.tar.gz")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def read(batches: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fname in batches:
            d = _unpickle(files[fname][0](), f"{path}: {fname}")
            data, labels = d.get("data"), d.get("labels")
            if not isinstance(data, np.ndarray) or labels is None or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}: {fname} lacks data (N x 3072 uint8) and labels; re-download it")
            y = np.asarray(labels, dtype=np.int64)
            if len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() >= len(classes))):
                raise ValueError(f"{path}: {fname} has labels that do not match its data or batches.meta")
            xs.append(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    fp = [files[f][1] for f in _CIFAR_FILES]
    return {"train": lambda: read(_CIFAR_TRAIN), "test": lambda: read(("test_batch",))}, classes, fp


def _cifar_files(path: Path) -> dict[str, tuple[Callable[[], bytes], Any]]:
    """name -> (reader, fingerprint) for the CIFAR-10 python files in a directory or the .tar.gz."""
    if path.is_dir():
        root = path / "cifar-10-batches-py" if not (path / "batches.meta").exists() else path
        missing = [f for f in _CIFAR_FILES if not (root / f).is_file()]
        if missing:
            raise ValueError(
                f"{path}: no CIFAR-10 python batches ({', '.join(missing[:3])} missing); "
                "pass cifar10:DIR holding data_batch_1..5, test_batch and batches.meta"
            )
        return {f: ((lambda p=root / f: p.read_bytes()), _file_fp(root / f)) for f in _CIFAR_FILES}
    fp = _file_fp(path)
    try:
        with tarfile.open(path, "r:*") as tf:
            blobs = {}
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in _CIFAR_FILES:
                    f = tf.extractfile(m)
                    blobs[base] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ValueError(f"{path}: cannot read the archive ({_msg(e)}); re-download it or pass its directory") from None
    missing = [f for f in _CIFAR_FILES if f not in blobs]
    if missing:
        raise ValueError(f"{path}: archive lacks {', '.join(missing[:3])}; pass cifar-10-python.tar.gz or its folder")
    return {f: ((lambda b=blobs[f]: b), [fp, f]) for f in _CIFAR_FILES}


# ---------------------------------------------------------------------------------------------
# image folders: a directory or a tar archive


@dataclass
class _Entry:
    name: str  # path inside the folder / archive
    label: int
    where: Any  # Path (directory) or (offset, size) inside the decompressed tar stream


@dataclass
class _Split:
    names: list[str]  # sorted by class, then name
    labels: np.ndarray  # int64
    where: list[Path] | np.ndarray  # directory: paths; archive: int64 N,2 (data offset, size)

    def entries(self, idx: np.ndarray) -> list[_Entry]:
        if isinstance(self.where, np.ndarray):
            return [
                _Entry(self.names[i], int(self.labels[i]), (int(self.where[i, 0]), int(self.where[i, 1]))) for i in idx
            ]
        return [_Entry(self.names[i], int(self.labels[i]), self.where[i]) for i in idx]


class _Folder:
    """The images of an image folder (directory or tar archive), split and labelled, and how to read them.

    For an archive, the layout (names, labels, offsets) is cached: listing 60,000 members means
    decompressing the whole archive once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.archive = path.is_file()
        if not self.archive:
            self.fp: Any = [str(path.resolve())]
            dirs: list[str] = []
            files = _walk(path, dirs)
            names = list(files)
            self.classes, groups = _layout(names, path, dirs)
            self.splits = {
                s: _Split([names[i] for i in idx], labels, [files[names[i]] for i in idx])
                for s, (idx, labels) in groups.items()
            }
            return
        self.fp = _file_fp(path)
        key = ("tar-layout", self.fp)
        cached = _cache_get_npz(key)
        if cached is not None:
            try:
                self.classes = _unjoin(cached["classes"])
                self.splits = {
                    s: _Split(_unjoin(cached[f"{s}_names"]), cached[f"{s}_labels"], cached[f"{s}_where"])
                    for s in SPLITS
                }
                return
            except (KeyError, ValueError):
                pass
        listing = _scan_tar(path)
        names = [n for n, _, _ in listing]
        where = np.empty((len(listing), 2), dtype=np.int64)
        where[:, 0] = np.fromiter((o for _, o, _ in listing), dtype=np.int64, count=len(listing))
        where[:, 1] = np.fromiter((z for _, _, z in listing), dtype=np.int64, count=len(listing))
        self.classes, groups = _layout(names, path)
        self.splits = {s: _Split([names[i] for i in idx], labels, where[idx]) for s, (idx, labels) in groups.items()}
        arrays = {"classes": _join(self.classes)}
        for s, sp in self.splits.items():
            arrays.update({f"{s}_names": _join(sp.names), f"{s}_labels": sp.labels, f"{s}_where": sp.where})
        _cache_put_npz(key, arrays, f"{_stem(path)}-layout")

    def fingerprint(self, entries: Sequence[_Entry]) -> Any:
        """Identity of what ``entries`` read: the archive's path, size and mtime, or each file's."""
        if self.archive:
            return self.fp
        out = []
        for e in entries:
            try:
                st = os.stat(e.where)
            except OSError as err:
                raise ValueError(f"{self.path}: cannot read {e.name} ({_msg(err)}); fix or remove it") from None
            out.append([e.name, st.st_size, st.st_mtime_ns])
        return [*self.fp, out]

    def read(self, entries: Sequence[_Entry]) -> list[bytes]:
        """Raw bytes of the entries; an archive is streamed once, in offset order."""
        out: list[bytes] = [b""] * len(entries)
        if not self.archive:
            for i, e in enumerate(entries):
                try:
                    out[i] = Path(e.where).read_bytes()
                except OSError as err:
                    raise ValueError(f"{self.path}: cannot read {e.name} ({_msg(err)}); fix or remove it") from None
            return out
        if not entries:
            return out
        try:
            with _open_stream(self.path) as f:
                for i in sorted(range(len(entries)), key=lambda i: entries[i].where[0]):
                    offset, size = entries[i].where
                    f.seek(offset)
                    out[i] = f.read(size)
                    if len(out[i]) != size:
                        raise EOFError("archive ends inside a member")
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise _corrupt(self.path, e) from None
        return out


def _join(names: Sequence[str]) -> np.ndarray:
    return np.frombuffer("\0".join(names).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _unjoin(a: np.ndarray) -> list[str]:
    text = a.tobytes().decode("utf-8", "surrogateescape")
    return text.split("\0") if text else []


def _load_imagefolder(path: Path, split: str, limit: int | None, seed: int) -> _Raw:
    folder = _Folder(path)
    name = _stem(path)
    num_classes = len(folder.classes)
    train, pool = folder.splits["train"], folder.splits[split]
    sample = train.entries(_select(train.labels, num_classes, STATS_SAMPLE, _STATS_SEED))
    chosen = pool.entries(_select(pool.labels, num_classes, limit, seed))
    if not chosen:
        raise ValueError(f"{path}: the {split} split has no images; add some or pick the other split")

    stats_key = ("stats", folder.fingerprint(sample), STATS_SAMPLE)
    stats = _cache_get_json(stats_key)
    blobs: dict[str, bytes] = {}
    decoded: dict[str, np.ndarray] = {}
    if stats is None:  # read the statistics sample and this call's images in one pass over the archive
        sample_names = {e.name for e in sample}
        wanted = sample + [e for e in chosen if e.name not in sample_names]
        blobs = dict(zip((e.name for e in wanted), folder.read(wanted)))
        mode = _common_mode([blobs[e.name] for e in sample])
        for e in sample:
            decoded[e.name] = _decode(blobs[e.name], mode, path, e.name)
        mean, std = _channel_stats([decoded[e.name] for e in sample], 1.0 / 255.0)
        stats = {"mean": mean, "std": std, "mode": mode}
        _cache_put_json(stats_key, stats, f"{name}-stats")
    mode = str(stats["mode"])
    images_key = ("images", folder.fingerprint(chosen), split, mode, _digest([e.name for e in chosen]))
    images = _cache_get_images(images_key, len(chosen))
    if images is None:
        todo = [e for e in chosen if e.name not in decoded and e.name not in blobs]
        blobs.update(zip((e.name for e in todo), folder.read(todo)))
        arrays = [decoded[e.name] if e.name in decoded else _decode(blobs[e.name], mode, path, e.name) for e in chosen]
        images = np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays
        _cache_put_images(images_key, images, f"{name}-{split}-{len(chosen)}")
    labels = np.array([e.label for e in chosen], dtype=np.int64)
    return _Raw(images, labels, folder.classes, tuple(stats["mean"]), tuple(stats["std"]), 1.0 / 255.0, name)


def _walk(root: Path, dirs: list[str] | None = None) -> dict[str, Path]:
    """Files under ``root`` by relative name; ``dirs`` collects the relative folder names."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel = Path(dirpath).relative_to(root).as_posix()
        if dirs is not None and rel != ".":
            dirs.append(rel)
        for f in filenames:
            files[f if rel == "." else f"{rel}/{f}"] = Path(dirpath, f)
    return files


def _layout(names: Sequence[str], path: Path,
            dirs: Sequence[str] | None = None) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Classes, and per split the indices into ``names`` of its images (sorted by class, then name)
    with their labels. Hidden files and folders (``.x``, ``__MACOSX``) and non-images are skipped.
    ``dirs`` (the folders of a directory source): a class folder among them without images is an
    error (an archive lists no folders reliably, so there an empty class is only missing)."""
    kept: list[tuple[list[str], int]] = []
    for i, name in enumerate(names):
        n = name[2:] if name.startswith("./") else name
        dot = n.rfind(".")
        if dot < 0 or "/" not in n or n[dot:].lower() not in IMAGE_EXTS:
            continue
        if n.startswith(".") or "/." in n or "__MACOSX" in n:
            continue
        kept.append(([s for s in n.split("/") if s] if "//" in n else n.split("/"), i))
    if not kept:
        raise ValueError(f"{path}: no images found; {_what('imagefolder')}")
    depth = 0  # strip wrapping folders (archive.tar.gz -> cifar10/train/cat/1.jpg)
    while (
        all(len(p) > depth + 2 for p, _ in kept)
        and len({p[depth] for p, _ in kept}) == 1
        and kept[0][0][depth].lower() not in ("train", "test", "val")
    ):
        depth += 1
    tops = {p[depth].lower() for p, _ in kept}
    test_key = "test" if "test" in tops else "val"
    if "train" in tops and test_key in tops:
        groups = {
            s: [(p[depth + 1], i) for p, i in kept if len(p) > depth + 2 and p[depth].lower() == k]
            for s, k in (("train", "train"), ("test", test_key))
        }
        classes = sorted({c for c, _ in groups["train"]})
        test_classes = sorted({c for c, _ in groups["test"]})
        _at_least_two(classes, path)
        if classes != test_classes:
            only_tr = [c for c in classes if c not in test_classes]
            only_te = [c for c in test_classes if c not in classes]
            raise ValueError(
                f"{path}: inconsistent classes between train/ and {test_key}/ (only in train: {only_tr[:5]}, "
                f"only in {test_key}: {only_te[:5]}); give both splits the same class folders"
            )
        for s, k in (("train", "train"), ("test", test_key)):
            _no_empty_class(dirs, depth + 2, lambda parts, k=k: parts[depth].lower() == k,
                            {c for c, _ in groups[s]}, path)
        index = {c: k for k, c in enumerate(classes)}
        out = {}
        for s, g in groups.items():
            order = sorted((index[c], names[i], i) for c, i in g)
            out[s] = (np.array([i for _, _, i in order], dtype=np.int64), np.array([c for c, _, _ in order], np.int64))
        return classes, out
    if tops == {"train"}:  # only train/: split it like a flat folder
        depth += 1
    flat = [(p[depth], i) for p, i in kept if len(p) > depth + 1]
    classes = sorted({c for c, _ in flat})
    if not classes:
        raise ValueError(f"{path}: no class folders with images; {_what('imagefolder')}")
    _no_empty_class(dirs, depth + 1, lambda parts: all(parts[j] == kept[0][0][j] for j in range(depth)),
                    set(classes), path)
    _at_least_two(classes, path)
    index = {c: k for k, c in enumerate(classes)}
    order = sorted((index[c], names[i], i) for c, i in flat)
    idx = np.array([i for _, _, i in order], dtype=np.int64)
    labels = np.array([c for c, _, _ in order], dtype=np.int64)
    test = _split_test(labels, len(classes))
    return classes, {"train": (idx[~test], labels[~test]), "test": (idx[test], labels[test])}


def _no_empty_class(dirs: Sequence[str] | None, level: int, under: Callable[[list[str]], bool],
                    classes: set[str], path: Path) -> None:
    """A folder at the class level (``level`` path parts, in a split ``under`` accepts) with no images."""
    for d in dirs or ():
        parts = d.split("/")
        if len(parts) == level and under(parts) and parts[-1] not in classes:
            raise ValueError(f"{path}: class folder {d!r} has no images; add images to it or remove the folder")


def _at_least_two(classes: Sequence[str], path: Path) -> None:
    """A classification dataset needs two classes or more (one class gives nothing to learn or rank)."""
    if len(classes) < 2:
        only = f" (only {classes[0][:40]!r})" if classes else ""
        raise ValueError(f"{path}: found {len(classes)} class folder{only}; a dataset needs at least 2 classes, "
                         "one folder of images per class")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("imagefolder needs Pillow to decode images; pip install pillow") from None
    return Image


def _common_mode(blobs: Sequence[bytes]) -> str:
    """'L' when every sampled image is grayscale, else 'RGB' (reads headers only)."""
    image = _pil()
    for b in blobs:
        try:
            if image.open(io.BytesIO(b)).mode not in _GRAY_MODES:
                return "RGB"
        except Exception:
            return "RGB"  # _decode reports the broken file with its name
    return "L"


def _decode(blob: bytes, mode: str, path: Path, name: str) -> np.ndarray:
    """Encoded image -> uint8 C,H,W in ``mode`` ('L' or 'RGB')."""
    image = _pil()
    try:
        with image.open(io.BytesIO(blob)) as im:
            if im.mode != mode:
                im = im.convert(mode)
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot decode {name} ({_msg(e)}); remove or replace that file") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# -- tar archives, read as a stream -------------------------------------------------------------


class _Unsupported(Exception):
    """A tar feature the fast scanner leaves to the tarfile module."""


def _open_stream(path: Path) -> BinaryIO:
    """The decompressed byte stream of a (compressed) tar file, chosen by its magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _scan_tar(path: Path) -> list[list[Any]]:
    """[name, data offset, size] of the regular files of a tar archive, in archive order."""
    try:
        try:
            return _scan_tar_fast(path)
        except _Unsupported:
            with tarfile.open(path, "r:*") as tf:
                return [[m.name, m.offset_data, m.size] for m in tf if m.isreg()]
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise _corrupt(path, e) from None


def _scan_tar_fast(path: Path) -> list[list[Any]]:
    """Header-only pass over ustar/GNU/pax tar data (tarfile spends ~25 us a member on objects
    this does not need: 60,000 members in ~0.4 s instead of ~1.6 s)."""
    chunk = 1 << 20
    out: list[list[Any]] = []
    with _open_stream(path) as f:
        buf, pos, base = b"", 0, 0  # buf[pos] is stream offset base + pos

        def need(n: int) -> bool:
            nonlocal buf, pos, base
            if len(buf) - pos >= n:
                return True
            base += pos
            buf, pos = buf[pos:] + f.read(max(n, chunk)), 0
            while len(buf) < n:
                more = f.read(max(n - len(buf), chunk))
                if not more:
                    return False
                buf += more
            return True

        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            if not need(512):
                if len(buf) - pos == 0 and base + pos > 0:
                    break  # no end-of-archive blocks: tolerated, like tarfile
                raise EOFError("archive ends inside a header")
            hdr = buf[pos : pos + 512]
            if hdr == _ZERO_BLOCK:
                break
            if not _checksum_ok(hdr):
                raise tarfile.ReadError(f"bad tar header checksum at byte {base + pos}")
            try:  # the usual 11 octal digits and a terminator; else the general parser
                size = int(hdr[124:135], 8) if hdr[135] in (0, 32) else _octal(hdr[124:136])
            except ValueError:
                size = _octal(hdr[124:136])
            kind = hdr[156:157]
            padded = (size + 511) & ~511
            if kind in (b"L", b"x", b"g"):
                if not need(512 + size):
                    raise EOFError("archive ends inside a header")
                data = buf[pos + 512 : pos + 512 + size]
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif kind == b"x":
                    pax.update(_pax_records(data))
                elif _pax_records(data).keys() & {"path", "size"}:
                    raise _Unsupported("global pax path/size")
            elif kind in (b"0", b"\0", b"7"):
                name = long_name if long_name is not None else _header_name(hdr)
                name = pax.get("path", name)
                if "size" in pax:
                    size = int(pax["size"])
                    padded = (size + 511) & ~511
                out.append([name, base + pos + 512, size])
                long_name, pax = None, {}
            elif kind in (b"1", b"2", b"3", b"4", b"5", b"6", b"K"):
                long_name, pax = (long_name, pax) if kind == b"K" else (None, {})
            else:
                raise _Unsupported(f"tar member type {kind!r}")
            pos += 512 + padded
            if pos > len(buf):  # skip member data beyond the buffer
                skip = pos - len(buf)
                base += len(buf)
                buf, pos = b"", 0
                while skip > 0:
                    got = len(f.read(min(skip, chunk)))
                    if got == 0:
                        raise EOFError("archive ends inside a member")
                    skip -= got
                    base += got
    return out


_ZERO_BLOCK = bytes(512)


def _checksum_ok(hdr: bytes) -> bool:
    """The header checksum: the sum of its bytes with the checksum field read as 8 spaces."""
    field = hdr[148:156]
    stored = _octal(field)
    if stored == sum(hdr) - sum(field) + 256:
        return True
    signed = sum(b - 256 if b > 127 else b for b in hdr[:148] + hdr[156:]) + 256  # some old tars
    return stored == signed


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"bad numeric header field {field!r}") from None


def _header_name(hdr: bytes) -> str:
    end = hdr.find(0, 0, 100)
    name = hdr[: end if end >= 0 else 100]
    if hdr[257:263] == b"ustar\0":  # POSIX ustar: a prefix field (GNU "ustar  " uses it for times)
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data) and data[i : i + 1] != b"\0":
        sp = data.index(b" ", i)
        length = int(data[i:sp])
        key, _, value = data[sp + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        i += length
    return out


def _corrupt(path: Path, e: BaseException) -> ValueError:
    return ValueError(
        f"{path}: corrupted or unreadable archive ({_msg(e)}); re-download it, or extract it and pass imagefolder:DIR"
    )


# ---------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    """Where decoded images, archive indexes and statistics are cached: ``$HYBRID_NAS_CACHE`` or
    ``~/.cache/hybrid-nas/data``."""
    env = os.environ.get("HYBRID_NAS_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid-nas" / "data"


def _digest(obj: Any) -> str:
    text = json.dumps([_CACHE_VERSION, obj], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_fp(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _cache_path(key: Any, label: str, suffix: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
    return cache_dir() / f"{safe}-{_digest(key)[:20]}{suffix}"


def _cache_get_json(key: Any) -> dict[str, Any] | None:
    for p in cache_dir().glob(f"*-{_digest(key)[:20]}.json"):
        try:
            data = json.loads(p.read_text())
            if data.get("key") == _digest(key):
                return data["value"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    return None


def _cache_put_json(key: Any, value: dict[str, Any], label: str) -> None:
    payload = json.dumps({"key": _digest(key), "value": value}).encode()
    _atomic_write(_cache_path(key, label, ".json"), lambda f: f.write(payload))


def _cached_json(key: Any, compute: Callable[[], dict[str, Any]], label: str) -> dict[str, Any]:
    value = _cache_get_json(key)
    if value is None:
        value = compute()
        _cache_put_json(key, value, label)
    return value


def _cache_get_npz(key: Any) -> dict[str, np.ndarray] | None:
    digest = _digest(key)
    for p in cache_dir().glob(f"*-{digest[:20]}.npz"):
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["key"]) == digest:
                    return {k: z[k] for k in z.files if k != "key"}
        except (OSError, ValueError, KeyError, zlib.error, EOFError):
            pass  # unreadable cache file: recompute and overwrite it
    return None


def _cache_put_npz(key: Any, arrays: dict[str, np.ndarray], label: str) -> None:
    _atomic_write(_cache_path(key, label, ".npz"), lambda f: np.savez(f, key=np.array(_digest(key)), **arrays))


def _cache_get_images(key: Any, n: int) -> np.ndarray | list[np.ndarray] | None:
    z = _cache_get_npz(key)
    if z is None:
        return None
    if "x" in z:
        x = z["x"]
        return x if len(x) == n and x.dtype == np.uint8 and x.ndim == 4 else None
    flat, shapes = z.get("flat"), z.get("shapes")
    if flat is None or shapes is None or len(shapes) != n:
        return None
    ends = np.cumsum(np.prod(shapes, axis=1))
    if len(ends) and ends[-1] != len(flat):
        return None
    return [flat[e - int(np.prod(s)) : e].reshape(s) for e, s in zip(ends, shapes)]


def _cache_put_images(key: Any, images: np.ndarray | list[np.ndarray], label: str) -> None:
    nbytes = images.nbytes if isinstance(images, np.ndarray) else sum(a.nbytes for a in images)
    if nbytes > _CACHE_MAX_BYTES:
        return
    if isinstance(images, np.ndarray):
        arrays = {"x": images}
    else:
        arrays = {
            "flat": np.concatenate([a.reshape(-1) for a in images]),
            "shapes": np.array([a.shape for a in images], dtype=np.int64),
        }
    _cache_put_npz(key, arrays, label)


_warned = False


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write atomically (no fsync: it is a cache); a cache that cannot be written only costs speed,
    so failures warn once and go on."""
    global _warned
    try:
        atomic_write(path, write, durable=False)
    except OSError as e:
        if not _warned:
            warnings.warn(f"data cache {path.parent} is not writable ({_msg(e)}); set HYBRID_NAS_CACHE", stacklevel=3)
            _warned = True


# ---------------------------------------------------------------------------------------------
# small helpers


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*ARCHIVE_SUFFIXES, ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _msg(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
