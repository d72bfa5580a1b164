"""Streaming image sources: images decoded lazily, batch by batch, in DataLoader workers.

:func:`nas.data.open_dataset` picks, by size, between the in-memory :class:`nas.data.ImageDataset`
and the :class:`StreamDataset` here; both present the same interface, in plain torch terms, so a
consumer that must stay torch-only (the supernet) can take either without importing ``nas``:

- ``len(ds)``, ``ds.labels`` (int64 tensor of every label, known without decoding), ``ds.num_classes``,
  ``ds.in_chans``, ``ds.img_size``, ``ds.mean`` / ``ds.std``;
- ``ds.take(indices) -> (x, y)``: those images with the evaluation transform, as one batch (a proxy
  batch, BatchNorm calibration);
- ``ds.loader(indices, batch_size, train=..., shuffle=..., seed=..., epoch=...)``: an iterable of
  ``(x, y)`` batches over ``indices`` (all images when None), ``x`` float32 N,C,S,S normalised.

Transforms. Evaluation: the whole image resized to ``img_size`` x ``img_size`` (bilinear,
antialiased, as :func:`nas.data.load` does, so both paths give the same tensors), or with
``crop_pct`` the shorter side resized to ``img_size / crop_pct`` and the centre cropped (the
ImageNet convention, ``crop_pct=0.875``). Training: random-resized crop (Szegedy et al. 2015,
"Going deeper with convolutions": a box of 8-100 % of the area and aspect ratio 3/4-4/3, resized
to ``img_size``) and a horizontal flip; then normalisation by the source's channel mean/std.

Determinism: the order of an epoch is a permutation drawn from ``(seed, epoch)`` and the
augmentation of an image from ``(seed, epoch, index)`` alone (a generator per sample, never a
global RNG), so batches are the same for any number of DataLoader workers and across runs.

Storage. A directory is read file by file. A tar archive is read member by member at the byte
offsets of its header scan (:func:`nas.data._scan_tar`); gzip/bz2/xz allow no random access, so a
compressed archive is decompressed once into an uncompressed ``.tar`` under
:func:`nas.data.cache_dir` (as large as the archive's content) and read from there. WebDataset
shards (``wds:``) are tars too: a sample is the members sharing a key (``000123.jpg`` +
``000123.cls``), read the same way.
"""

from __future__ import annotations

import io
import lzma
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nas import data as _d

__all__ = [
    "STREAM_ABOVE_BYTES",
    "Augment",
    "StreamDataset",
    "crop_box",
    "default_workers",
    "epoch_order",
    "sample_rng",
]

# Above this many bytes of float32 images (N x C x S x S x 4, at the study's resolution) a source
# streams; below it is decoded into memory. 512 MiB: CIFAR-10's 50,000 training images at 32 px
# (590 MiB) stream, a --limit 10000 subset (118 MiB) or any set of a few thousand images does not.
STREAM_ABOVE_BYTES = 512 << 20
STREAM_ENV = "HYBRID_NAS_STREAM"  # auto | on | off: the override when the caller passes stream=None
WORKERS_ENV = "HYBRID_NAS_DATA_WORKERS"  # DataLoader workers when the caller passes none
_ORDER_TAG, _AUG_TAG = 0xDA7A, 0xA06


def stream_choice(stream: bool | str | None) -> bool | None:
    """``True``/``"on"`` force streaming, ``False``/``"off"`` force memory, ``None``/``"auto"``:
    ``$HYBRID_NAS_STREAM`` or, unset, by size (None)."""
    if stream is None:
        stream = os.environ.get(STREAM_ENV, "").strip().lower() or "auto"
    if isinstance(stream, bool):
        return stream
    value = str(stream).strip().lower()
    if value in ("on", "1", "true", "yes", "stream"):
        return True
    if value in ("off", "0", "false", "no", "memory"):
        return False
    if value == "auto":
        return None
    raise ValueError(f"stream must be auto, on or off, got {stream!r}; set {STREAM_ENV}=auto|on|off")


def default_workers() -> int:
    """DataLoader workers: ``$HYBRID_NAS_DATA_WORKERS``, else half the CPUs, 1 to 4."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={env!r} is not a number; set it to 0 or more workers") from None
        if n < 0:
            raise ValueError(f"{WORKERS_ENV}={n} is negative; set it to 0 or more workers")
        return n
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# ---------------------------------------------------------------------------------------------
# randomness: per epoch and per sample, never global


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's augmentation: a function of (seed, epoch, index) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), _AUG_TAG])


def epoch_order(indices: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """``indices`` as given, or permuted by a generator of (seed, epoch)."""
    if not shuffle:
        return indices
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), _ORDER_TAG]).permutation(len(indices))
    return indices[perm]


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random-resized crop (Szegedy et al. 2015, "Going deeper with
    convolutions"; area fraction ``scale``, aspect ratio ``ratio``) and a horizontal flip."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment ratio must satisfy 0 < low <= high, got {self.ratio}")


def crop_box(h: int, w: int, rng: np.random.Generator, aug: Augment) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of an h x w image (torchvision's
    algorithm: 10 tries at a random area and log-uniform aspect ratio, else the centre at the
    nearest allowed ratio)."""
    area = h * w
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(aug.scale[0], aug.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < aug.ratio[0]:
        cw, ch = w, min(h, round(w / aug.ratio[0]))
    elif ratio > aug.ratio[1]:
        ch, cw = h, min(w, round(h * aug.ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, max(1, ch), max(1, cw)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """1,C,H,W float -> 1,C,h,w (bilinear, antialiased: the same call as nas.data's in-memory resize)."""
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def eval_transform(x: torch.Tensor, size: int | None, crop_pct: float | None) -> torch.Tensor:
    """1,C,H,W in [0, 1] -> 1,C,S,S: the whole image resized, or shorter side to S/crop_pct and centre-cropped."""
    if size is None:
        return x
    if crop_pct is None:
        return _resize(x, size, size)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    short = max(size, math.floor(size / crop_pct))
    nh, nw = (short, max(size, round(w * short / h))) if h <= w else (max(size, round(h * short / w)), short)
    x = _resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def train_transform(x: torch.Tensor, size: int | tuple[int, int], rng: np.random.Generator,
                    aug: Augment) -> torch.Tensor:
    """1,C,H,W -> 1,C,S,S (or h,w): a random-resized crop, then a flip with probability 1/2."""
    top, left, ch, cw = crop_box(int(x.shape[-2]), int(x.shape[-1]), rng, aug)
    h, w = (size, size) if isinstance(size, int) else size
    out = _resize(x[..., top : top + ch, left : left + cw], h, w)
    if aug.flip and rng.random() < 0.5:
        out = out.flip(-1)
    return out


# ---------------------------------------------------------------------------------------------
# where the bytes are (picklable: a DataLoader worker reopens files in its own process)


class _Names:
    """Many strings in two numpy arrays (no Python objects: forked workers share them untouched)."""

    def __init__(self, names: Sequence[str]) -> None:
        blobs = [n.encode("utf-8", "surrogateescape") for n in names]
        self.ends = np.cumsum([len(b) for b in blobs], dtype=np.int64) if blobs else np.zeros(0, np.int64)
        self.buf = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.buf[start : int(self.ends[i])].tobytes().decode("utf-8", "surrogateescape")


class _Blobs:
    """Raw bytes of entry i."""

    where: str

    def read(self, i: int, name: str) -> bytes:
        raise NotImplementedError


class _FileBlobs(_Blobs):
    """Files of a directory, by their names relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = self.where = str(root)

    def read(self, i: int, name: str) -> bytes:
        try:
            with open(os.path.join(self.root, name), "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{self.root}: cannot read {name} ({_d._msg(e)}); fix or remove it") from None


class _TarBlobs(_Blobs):
    """Members of uncompressed tar files read with ``os.pread`` at their data offsets; the files
    are opened lazily in each process (a forked worker must not share a parent's descriptors'
    lifetimes, a spawned one gets none)."""

    def __init__(self, tars: Sequence[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 where: str) -> None:
        self.tars, self.shard, self.offset, self.size, self.where = list(tars), shard, offset, size, where
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():  # first use in this process (or after a fork)
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= 64:  # many shards: keep few descriptors open
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[k] = os.open(self.tars[k], os.O_RDONLY)
        return fd

    def read(self, i: int, name: str) -> bytes:
        k, offset, size = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        try:
            blob = os.pread(self._fd(k), size, offset)
        except OSError as e:
            raise ValueError(f"{self.where}: cannot read {name} ({_d._msg(e)}); re-create the archive") from None
        if len(blob) != size:
            raise ValueError(f"{self.where}: {name} is cut short; the archive is truncated, re-download it")
        return blob


class _SourceError(Exception):
    """Reading (decompressing) the archive failed, as opposed to writing the cache."""


def plain_tar(path: Path) -> Path:
    """``path`` itself for an uncompressed tar, else its decompressed copy in the data cache
    (written once, atomically; keyed by the archive's path, size and mtime)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] != b"\x1f\x8b" and magic[:3] != b"BZh" and magic != b"\xfd7zXZ\x00":
        return path
    key = ("tar-plain", _d._file_fp(path))
    dest = _d._cache_path(key, f"{_d._stem(path)}-plain", ".tar")
    if dest.is_file():
        return dest

    def write(f: Any) -> None:
        with _d._open_stream(path) as src:
            while True:
                try:
                    chunk = src.read(1 << 20)
                except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # the archive, not the cache
                    raise _SourceError(e) from None
                if not chunk:
                    break
                f.write(chunk)

    try:
        _d.atomic_write(dest, write, durable=False)
    except _SourceError as e:
        raise _d._corrupt(path, e.args[0]) from None
    except OSError as e:
        raise ValueError(
            f"{path}: cannot write its uncompressed copy to {dest.parent} ({_d._msg(e)}); set HYBRID_NAS_CACHE to "
            "a writable folder with room for it, or extract the archive and pass imagefolder:DIR"
        ) from None
    return dest


# ---------------------------------------------------------------------------------------------
# the dataset


class StreamDataset(Dataset):
    """Images decoded on demand: ``ds[i]`` is image i with the evaluation transform and its label;
    :meth:`loader` batches them through DataLoader workers. See the module docstring."""

    def __init__(self, *, blobs: _Blobs, names: _Names, labels: np.ndarray, classes: list[str], mode: str,
                 mean: Sequence[float], std: Sequence[float], img_size: int, name: str, split: str, source: str,
                 crop_pct: float | None = None, augment: Augment | None = None) -> None:
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.blobs, self.names = blobs, names
        self.y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.classes, self.mode, self.name, self.split, self.source = list(classes), mode, name, split, source
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.size, self.crop_pct, self.augment = int(img_size), crop_pct, augment or Augment()
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    # -- the shared interface (nas.data.ImageDataset has the same) --

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def img_size(self) -> int:
        return self.size

    @property
    def streaming(self) -> bool:
        return True

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(int(i))

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def item(self, i: int, train: bool = False, seed: int = 0, epoch: int = 0) -> tuple[torch.Tensor, int]:
        """Image i (C,S,S float32, normalised) and its label; ``train``: augmented from (seed, epoch, i)."""
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        name = self.names[i]
        a = decode(self.blobs.read(i, name), self.mode, self.blobs.where, name)
        a = np.ascontiguousarray(a)
        x = torch.from_numpy(a if a.flags.writeable else a.copy()).unsqueeze(0).float().mul_(1.0 / 255.0)
        if train:
            x = train_transform(x, self.size, sample_rng(seed, epoch, i), self.augment)
        else:
            x = eval_transform(x, self.size, self.crop_pct)
        x = x.sub_(self._mean).div_(self._std) if x.is_contiguous() else (x - self._mean) / self._std
        return x[0].contiguous(), int(self.y[i])

    def take(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at ``indices`` (evaluation transform) as one batch, decoded in this process."""
        idx = _as_indices(indices, len(self))
        if len(idx) == 0:
            return torch.zeros(0, self.in_chans, self.size, self.size), torch.zeros(0, dtype=torch.int64)
        xs = [self.item(int(i))[0] for i in idx]
        return torch.stack(xs), self.y[torch.from_numpy(idx)]

    def loader(self, indices: Sequence[int] | torch.Tensor | np.ndarray | None = None, batch_size: int = 128, *,
               train: bool = False, shuffle: bool | None = None, seed: int = 0, epoch: int = 0,
               drop_last: bool = False, num_workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``(x, y)`` over ``indices`` (all when None) through DataLoader workers.

        ``train``: augmented and (unless ``shuffle=False``) shuffled; the order comes from
        ``(seed, epoch)`` and each image's augmentation from ``(seed, epoch, index)``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = epoch_order(_as_indices(indices, len(self)), seed, epoch, train if shuffle is None else shuffle)
        workers = default_workers() if num_workers is None else int(num_workers)
        task = _Task(self, train, seed, epoch)
        dl = DataLoader(task, batch_size=batch_size, sampler=order.tolist(), drop_last=drop_last,
                        num_workers=workers, persistent_workers=False,
                        worker_init_fn=_worker_init if workers else None)
        try:
            yield from dl
        except ValueError as e:  # raised in a worker: DataLoader prefixes a traceback; keep the message
            raise ValueError(_last_line(e)) from None

    def __repr__(self) -> str:
        return (f"StreamDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
                f"in_chans={self.in_chans}, img_size={self.size})")


class _Task(Dataset):
    """One pass's view of a StreamDataset: index -> item with that pass's (train, seed, epoch)."""

    def __init__(self, ds: StreamDataset, train: bool, seed: int, epoch: int) -> None:
        self.ds, self.train, self.seed, self.epoch = ds, train, seed, epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.ds.item(int(i), self.train, self.seed, self.epoch)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # DataLoader does this too; explicit, as decoding is per sample


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return text.removeprefix("ValueError: ")


def _as_indices(indices: Sequence[int] | torch.Tensor | np.ndarray | None, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"indices must lie in 0..{n - 1}")
    return idx


def decode(blob: bytes, mode: str, where: Any, name: str) -> np.ndarray:
    """Encoded image -> uint8 C,H,W (one place, so tests can count decodes)."""
    return _d._decode(blob, mode, Path(str(where)), name)


# ---------------------------------------------------------------------------------------------
# building one from a source


def _native_size(blob: bytes, where: str, name: str) -> tuple[int, int]:
    image = _d._pil()
    try:
        with image.open(io.BytesIO(blob)) as im:
            w, h = im.size
    except Exception as e:
        raise ValueError(f"{where}: cannot decode {name} ({_d._msg(e)}); remove or replace that file") from None
    return int(h), int(w)


def _stats(entries: Sequence[tuple[str, bytes]], where: Path) -> dict[str, Any]:
    """Mode ('L'/'RGB') and per-channel mean/std of the statistics sample, decoding one image at a
    time (the same sums as nas.data._channel_stats: exact integer sums in float64)."""
    mode = _d._common_mode([b for _, b in entries])
    s1 = s2 = None
    count = 0
    for name, blob in entries:
        a = _d._decode(blob, mode, where, name).astype(np.float64)
        t1, t2 = a.sum(axis=(1, 2)), np.square(a).sum(axis=(1, 2))
        s1, s2 = (t1, t2) if s1 is None else (s1 + t1, s2 + t2)
        count += a.shape[1] * a.shape[2]
    if s1 is None or count == 0:
        raise ValueError(f"{where}: no images to compute the normalisation statistics on; add images")
    scale = 1.0 / 255.0
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    std = np.where(std * scale < 1e-6, 1.0 / scale, std)
    return {"mean": [float(v) * scale for v in mean], "std": [float(v) * scale for v in std], "mode": mode}


def _sample_stats(key: Any, names: Sequence[str], read: Any, where: Path, label: str) -> dict[str, Any]:
    """Statistics cached under ``key`` (the key nas.data uses for the same sample), else computed
    reading the sample in chunks (an ImageNet sample of 2,000 images is never all in memory)."""
    cached = _d._cache_get_json(key)
    if cached is not None:
        return cached
    entries: list[tuple[str, bytes]] = []
    for start in range(0, len(names), 256):
        chunk = list(names[start : start + 256])
        entries.extend(zip(chunk, read(start, chunk)))
    # decoding needs the common mode of the whole sample first; blobs are compressed, so holding
    # them is ~1/10 of holding the decoded images
    stats = _stats(entries, where)
    _d._cache_put_json(key, stats, label)
    return stats


def _pick_size(img_size: int | None, first: tuple[int, int], where: str) -> int:
    if img_size is not None:
        return img_size
    h, w = first
    if h != w:
        raise ValueError(f"{where}: images are {h}x{w}, not square; pass img_size to resize them")
    return h


def estimate_bytes(n: int, in_chans: int, size: int) -> int:
    """Bytes of n decoded float32 images at size x size: what the in-memory path would hold."""
    return int(n) * int(in_chans) * int(size) * int(size) * 4


def imagefolder(path: Path, split: str, limit: int | None, img_size: int | None, seed: int, source: str,
                crop_pct: float | None = None, augment: Augment | None = None,
                folder: Any = None) -> StreamDataset:
    """A StreamDataset over one split of an image folder (directory or tar archive); the selection
    (``limit``, ``seed``), the order, the labels and the statistics are those of nas.data.load.
    ``folder``: its already listed ``nas.data._Folder``."""
    folder = folder or _d._Folder(path)
    k = len(folder.classes)
    train, pool = folder.splits["train"], folder.splits[split]
    chosen = _d._select(pool.labels, k, limit, seed)
    if len(chosen) == 0:
        raise ValueError(f"{path}: the {split} split has no images; add some or pick the other split")
    sample = train.entries(_d._select(train.labels, k, _d.STATS_SAMPLE, _d._STATS_SEED))
    names = [pool.names[i] for i in chosen]
    if folder.archive:
        tar = plain_tar(path)
        where = np.asarray(pool.where)[chosen]
        blobs: _Blobs = _TarBlobs([str(tar)], np.zeros(len(chosen), np.int32), where[:, 0].copy(),
                                  where[:, 1].copy(), str(path))
        sample_blobs: _Blobs = _TarBlobs([str(tar)], np.zeros(len(sample), np.int32),
                                         np.array([e.where[0] for e in sample], np.int64),
                                         np.array([e.where[1] for e in sample], np.int64), str(path))
        root = path
    else:
        root = path
        blobs = sample_blobs = _FileBlobs(path)

    def read(start: int, chunk: Sequence[str]) -> list[bytes]:
        return [sample_blobs.read(start + j, n) for j, n in enumerate(chunk)]

    stats = _sample_stats(("stats", folder.fingerprint(sample), _d.STATS_SAMPLE), [e.name for e in sample], read,
                          root, f"{_d._stem(path)}-stats")
    size = _pick_size(img_size, _native_size(blobs.read(0, names[0]), str(path), names[0]), str(path))
    return StreamDataset(blobs=blobs, names=_Names(names), labels=pool.labels[chosen], classes=folder.classes,
                         mode=str(stats["mode"]), mean=stats["mean"], std=stats["std"], img_size=size,
                         name=_d._stem(path), split=split, source=source, crop_pct=crop_pct, augment=augment)


def folder_size_hint(folder: Any, split: str, limit: int | None, img_size: int | None) -> int:
    """Estimated bytes of the in-memory path for an image folder (a ``nas.data._Folder``), from its
    listing and, without ``img_size``, one image's header (3 channels assumed)."""
    path = folder.path
    pool = folder.splits[split]
    n = len(pool.labels) if limit is None else min(limit, len(pool.labels))
    if n == 0:
        return 0
    if img_size is not None:
        return estimate_bytes(n, 3, img_size)
    e = pool.entries(np.array([0]))[0]
    blob = folder.read([e])[0] if not folder.archive else _first_blob(path, e)
    h, w = _native_size(blob, str(path), e.name)
    return estimate_bytes(n, 3, max(h, w))


def _first_blob(path: Path, e: Any) -> bytes:
    offset, size = e.where
    with _d._open_stream(path) as f:  # one member: a compressed archive is read up to it only
        f.seek(offset)
        return f.read(size)


# ---------------------------------------------------------------------------------------------
# WebDataset shards


WDS_LABEL_EXTS = ("cls", "cls2", "label", "target", "index")
WDS_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class _Shards:
    """The samples of WebDataset shards: image member and label of each, split like an image folder
    (shards named or foldered ``train``/``test``/``val``, else 80/20 per class), cached per shard set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        shards = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(WDS_SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not shards:
            raise ValueError(f"{path}: no WebDataset shards (*.tar) found; pass wds:DIR holding train-*.tar "
                             "(and test-*.tar) shards of key.jpg + key.cls samples, or wds:SHARD.tar")
        self.shards = shards
        fp = [_d._file_fp(p) for p in shards]
        key = ("wds-layout", fp)
        cached = _d._cache_get_npz(key)
        if cached is None:
            cached = self._scan()
            _d._cache_put_npz(key, cached, f"{_d._stem(path)}-wds")
        self.tars = [str(plain_tar(p)) for p in shards]
        self.names = _d._unjoin(cached["names"])
        self.shard, self.offset, self.size = cached["shard"], cached["offset"], cached["size"]
        self.labels, self.split = cached["labels"], cached["split"]  # split: 0 train, 1 test, -1 undecided
        top = int(self.labels.max()) + 1
        present = np.bincount(self.labels, minlength=top)
        if top < 2:
            raise ValueError(f"{path}: the labels name 1 class; a dataset needs at least 2 classes")
        missing = np.flatnonzero(present == 0)
        if len(missing):
            raise ValueError(f"{path}: class {int(missing[0])} has no samples (labels run 0..{top - 1}); "
                             "relabel the classes 0..K-1 without gaps")
        self.classes = [str(c) for c in range(top)]

    def _scan(self) -> dict[str, np.ndarray]:
        names: list[str] = []
        shard, offset, size, labels, split = [], [], [], [], []
        for k, p in enumerate(self.shards):
            rel = p.relative_to(self.path).as_posix().lower() if self.path.is_dir() else p.name.lower()
            which = 0 if rel.startswith("train") else 1 if rel.startswith(("test", "val")) else -1
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            for name, off, sz in _d._scan_tar(p):
                base = name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                dot = name.find(".", len(name) - len(base))  # the key ends at the basename's first dot
                samples.setdefault(name[:dot], {})[name[dot + 1:].lower()] = (off, sz)
            pending = []
            for key_, members in samples.items():
                img = next((e for e in members if "." + e.rsplit(".", 1)[-1] in _d.IMAGE_EXTS), None)
                lab = next((e for e in WDS_LABEL_EXTS if e in members), None)
                if img is None:
                    continue
                if lab is None:
                    raise ValueError(f"{p}: sample {key_!r} has an image but no label member "
                                     f"(.{', .'.join(WDS_LABEL_EXTS[:3])}); write key.cls with the class index")
                pending.append((key_, img, members[img], members[lab]))
            if not pending:
                continue
            with _d._open_stream(p) as f:  # the small label members, in archive order
                for key_, img, (ioff, isz), (loff, lsz) in sorted(pending, key=lambda t: t[3][0]):
                    f.seek(loff)
                    text = f.read(lsz).decode("utf-8", "replace").strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise ValueError(f"{p}: label of sample {key_!r} is {text[:20]!r}, not a class index; "
                                         "write the class index 0..K-1 as text") from None
                    if label < 0:
                        raise ValueError(f"{p}: sample {key_!r} has negative label {label}; use 0..K-1")
                    names.append(f"{key_}.{img}")
                    shard.append(k)
                    offset.append(ioff)
                    size.append(isz)
                    labels.append(label)
                    split.append(which)
        if not names:
            raise ValueError(f"{self.path}: no image samples in the shards; {_WDS_WHAT}")
        order = sorted(range(len(names)), key=lambda i: (labels[i], names[i]))  # as folders: by class, then name
        return {
            "names": _d._join([names[i] for i in order]),
            "shard": np.array([shard[i] for i in order], np.int32),
            "offset": np.array([offset[i] for i in order], np.int64),
            "size": np.array([size[i] for i in order], np.int64),
            "labels": np.array([labels[i] for i in order], np.int64),
            "split": np.array([split[i] for i in order], np.int8),
        }

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the split's samples: by shard name, or the folder rule's 80/20 when no shard says."""
        has = set(np.unique(self.split).tolist())
        if 0 in has and 1 in has:
            return np.flatnonzero(self.split == (0 if split == "train" else 1))
        test = _d._split_test(self.labels, len(self.classes))
        return np.flatnonzero(test if split == "test" else ~test)


_WDS_WHAT = "each sample is key.jpg (or .png, ...) plus key.cls holding its class index"


def wds(path: Path, split: str, limit: int | None, img_size: int | None, seed: int, source: str,
        crop_pct: float | None = None, augment: Augment | None = None) -> StreamDataset:
    """A StreamDataset over one split of WebDataset shards (``wds:DIR`` or ``wds:SHARD.tar``)."""
    sh = _Shards(path)
    k = len(sh.classes)
    pool = sh.split_indices(split)
    if len(pool) == 0:
        raise ValueError(f"{path}: the {split} split has no samples; add {split}-*.tar shards or pick the other split")
    chosen = pool[_d._select(sh.labels[pool], k, limit, seed)]
    train = sh.split_indices("train")
    sample = train[_d._select(sh.labels[train], k, _d.STATS_SAMPLE, _d._STATS_SEED)]
    all_blobs = _TarBlobs(sh.tars, sh.shard, sh.offset, sh.size, str(path))

    def read(start: int, chunk: Sequence[str]) -> list[bytes]:
        return [all_blobs.read(int(sample[start + j]), n) for j, n in enumerate(chunk)]

    key = ("stats", [_d._file_fp(p) for p in sh.shards], "wds", _d._digest([sh.names[i] for i in sample]))
    stats = _sample_stats(key, [sh.names[i] for i in sample], read, path, f"{_d._stem(path)}-stats")
    blobs = _TarBlobs(sh.tars, sh.shard[chosen], sh.offset[chosen], sh.size[chosen], str(path))
    names = [sh.names[i] for i in chosen]
    size = _pick_size(img_size, _native_size(blobs.read(0, names[0]), str(path), names[0]), str(path))
    return StreamDataset(blobs=blobs, names=_Names(names), labels=sh.labels[chosen], classes=sh.classes,
                         mode=str(stats["mode"]), mean=stats["mean"], std=stats["std"], img_size=size,
                         name=_d._stem(path), split=split, source=source, crop_pct=crop_pct, augment=augment)
