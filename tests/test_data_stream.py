"""nas.stream: the streaming path agrees with the in-memory one, decodes only what it is asked
for, is deterministic for any number of DataLoader workers, and rejects bad input in one line."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import nas.data as nd
import nas.stream as ns
from nas.data import ImageDataset, load, open_dataset
from nas.stream import Augment, StreamDataset, crop_box

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write and decode image folders")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of its own per test; no $HYBRID_NAS_STREAM / worker settings from outside."""
    d = tmp_path / "cache"
    monkeypatch.setenv("HYBRID_NAS_CACHE", str(d))
    monkeypatch.delenv(ns.STREAM_ENV, raising=False)
    monkeypatch.delenv(ns.WORKERS_ENV, raising=False)
    return d


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def _image_bytes(rng: np.random.Generator, size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root: Path, classes: dict[str, tuple[int, int]], size: tuple[int, int] = (12, 12), seed: int = 0) -> Path:
    """root/{train,test}/<class>/NNNN.{png,jpg}; classes: name -> (n_train, n_test)."""
    rng = np.random.default_rng(seed)
    for c, counts in classes.items():
        for split, n in zip(("train", "test"), counts):
            for i in range(n):
                fmt = "PNG" if i % 2 else "JPEG"
                p = root / split / c / f"{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(_image_bytes(rng, size, fmt))
    return root


def _targz(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname="wrapped")
    return dest


@pytest.fixture()
def toy(tmp_path: Path) -> tuple[Path, Path]:
    root = _folder(tmp_path / "toy", {"ant": (8, 3), "bee": (8, 3), "cat": (8, 3)})
    return root, _targz(root, tmp_path / "toy.tar.gz")


# ----------------------------------------------------------------------------- same images as in memory


@pytest.mark.parametrize("kind", ["dir", "targz"])
@pytest.mark.parametrize("img_size", [None, 9])
def test_stream_matches_memory(toy: tuple[Path, Path], kind: str, img_size: int | None) -> None:
    path = toy[0] if kind == "dir" else toy[1]
    for split in ("train", "test"):
        mem = load(f"imagefolder:{path}", split, img_size=img_size)
        sds = open_dataset(f"imagefolder:{path}", split, img_size=img_size, stream=True)
        assert isinstance(sds, StreamDataset) and sds.streaming and len(sds) == len(mem)
        assert sds.classes == mem.classes and sds.mean == mem.mean and sds.std == mem.std
        assert torch.equal(sds.labels, mem.y)
        x, y = sds.take(range(len(sds)))
        assert torch.allclose(x, mem.x, atol=1e-5) and torch.equal(y, mem.y)
        got = list(sds.loader(batch_size=5, num_workers=0))
        assert [len(b[0]) for b in got] == [5] * (len(sds) // 5) + ([len(sds) % 5] if len(sds) % 5 else [])
        assert torch.allclose(torch.cat([b[0] for b in got]), mem.x, atol=1e-5)
        # the same interface in memory
        m = open_dataset(f"imagefolder:{path}", split, img_size=img_size, stream=False)
        assert isinstance(m, ImageDataset) and not m.streaming
        mx = torch.cat([b[0] for b in m.loader(batch_size=5)])
        assert torch.equal(mx, mem.x) and torch.equal(m.take([2, 0])[1], mem.y[[2, 0]])


def test_archive_is_decompressed_once_into_the_cache(toy: tuple[Path, Path], _cache: Path, tmp_path: Path) -> None:
    open_dataset(f"imagefolder:{toy[1]}", stream=True)
    plain = [p for p in _cache.iterdir() if "-plain-" in p.name and p.name.endswith(".tar")]
    assert len(plain) == 1
    mtime = plain[0].stat().st_mtime_ns
    open_dataset(f"imagefolder:{toy[1]}", "test", stream=True)
    assert plain[0].stat().st_mtime_ns == mtime
    # an uncompressed tar is read in place: no copy
    with tarfile.open(tmp_path / "toy.tar", "w") as tf:
        tf.add(toy[0], arcname="toy")
    sds = open_dataset(f"imagefolder:{tmp_path / 'toy.tar'}", stream=True)
    assert len([p for p in _cache.iterdir() if "-plain-" in p.name and p.name.endswith(".tar")]) == 1
    assert torch.allclose(sds.take([0, 5])[0], load(f"imagefolder:{toy[0]}").x[[0, 5]], atol=1e-5)


def test_crop_pct_centre_crop(tmp_path: Path) -> None:
    root = _folder(tmp_path / "wide", {"a": (2, 1), "b": (2, 1)}, size=(10, 20))
    sds = open_dataset(f"imagefolder:{root}", img_size=8, crop_pct=0.8, stream=True)
    x, _ = sds.take([0])
    assert x.shape == (1, 3, 8, 8)
    # by hand: shorter side 8/0.8 = 10 (no resize of the 10x20 image), then its centre 8x8
    raw = load(f"imagefolder:{root}", limit=None)  # native 10x20, normalised the same way
    assert torch.allclose(x[0], raw.x[0, :, 1:9, 6:14], atol=1e-5)
    mem = open_dataset(f"imagefolder:{root}", img_size=8, crop_pct=0.8, stream=False)
    assert isinstance(mem, ImageDataset) and torch.allclose(mem.x[0], x[0], atol=1e-6)


# ----------------------------------------------------------------------------- the class-balanced limit


@pytest.mark.parametrize("kind", ["dir", "targz"])
def test_limit_decodes_only_the_chosen(toy: tuple[Path, Path], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toy[0] if kind == "dir" else toy[1]
    open_dataset(f"imagefolder:{path}", limit=6, seed=4, stream=True)  # statistics computed and cached
    decoded: list[str] = []
    real = nd._decode

    def counting(blob: bytes, mode: str, where: Path, name: str) -> np.ndarray:
        decoded.append(name)
        return real(blob, mode, where, name)

    monkeypatch.setattr(nd, "_decode", counting)
    sds = open_dataset(f"imagefolder:{path}", limit=6, seed=4, stream=True)
    assert sds.class_counts() == [2, 2, 2]
    assert decoded == []  # opening decodes nothing (the statistics are cached)
    x = torch.cat([b[0] for b in sds.loader(batch_size=4, num_workers=0)])
    assert len(decoded) == 6 and len(set(decoded)) == 6  # one decode per chosen image, no other member
    monkeypatch.setattr(nd, "_decode", real)
    mem = load(f"imagefolder:{path}", limit=6, seed=4)
    assert torch.allclose(x, mem.x, atol=1e-5) and torch.equal(sds.labels, mem.y)  # the same selection


# ----------------------------------------------------------------------------- determinism and augmentation


def _epoch(ds: object, workers: int, seed: int = 3, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    got = list(ds.loader(batch_size=4, train=True, seed=seed, epoch=epoch, num_workers=workers))  # type: ignore[attr-defined]
    return torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])


def test_deterministic_across_runs_and_workers(toy: tuple[Path, Path]) -> None:
    sds = open_dataset(f"imagefolder:{toy[1]}", stream=True)
    x0, y0 = _epoch(sds, 0)
    x0b, y0b = _epoch(sds, 0)
    x2, y2 = _epoch(sds, 2)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x_other, y_other = _epoch(sds, 0, epoch=2)
    assert not torch.equal(y0, y_other) or not torch.equal(x0, x_other)  # a new epoch: new order/augmentation
    assert sorted(y0.tolist()) == sorted(sds.labels.tolist())  # a permutation of the whole split
    # in memory at the native size, the same crops and flips give the same tensors
    mem = open_dataset(f"imagefolder:{toy[1]}", stream=False)
    xm, ym = _epoch(mem, 0)
    assert torch.equal(ym, y0) and torch.allclose(xm, x0, atol=1e-4)


def test_augmentation_shapes_and_ranges(toy: tuple[Path, Path]) -> None:
    sds = open_dataset(f"imagefolder:{toy[0]}", img_size=8, stream=True)
    x, y = _epoch(sds, 0)
    assert x.shape == (24, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all()
    mean, std = torch.tensor(sds.mean).view(1, 3, 1, 1), torch.tensor(sds.std).view(1, 3, 1, 1)
    raw = x * std + mean  # back to [0, 1] pixel units
    assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4
    ev, _ = sds.take(range(len(sds)))
    unshuffled = torch.cat([b[0] for b in sds.loader(batch_size=8, train=True, shuffle=False, num_workers=0)])
    assert unshuffled.shape == ev.shape and not torch.allclose(unshuffled, ev)  # augmentation changed them
    aug = Augment()
    flips = 0
    for i in range(200):
        rng = ns.sample_rng(0, 0, i)
        top, left, h, w = crop_box(30, 40, rng, aug)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h >= 1 and w >= 1
        assert h * w <= 30 * 40
        flips += rng.random() < 0.5
    assert 50 < flips < 150
    narrow = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert crop_box(12, 12, ns.sample_rng(0, 0, 0), narrow) == (0, 0, 12, 12)
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=(0.5, 0.2))


# ----------------------------------------------------------------------------- choosing the path


def test_threshold_and_override(toy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src = f"imagefolder:{toy[0]}"
    assert isinstance(open_dataset(src), ImageDataset)  # 24 tiny images: far below the threshold
    monkeypatch.setattr(ns, "STREAM_ABOVE_BYTES", 100)
    assert isinstance(open_dataset(src), StreamDataset)
    assert isinstance(open_dataset(src, stream="off"), ImageDataset)
    monkeypatch.setattr(ns, "STREAM_ABOVE_BYTES", 1 << 40)
    monkeypatch.setenv(ns.STREAM_ENV, "on")
    assert isinstance(open_dataset(src), StreamDataset)
    assert isinstance(open_dataset(src, stream=False), ImageDataset)  # the argument beats the environment
    d = open_dataset("digits", stream="off")
    assert isinstance(d, ImageDataset) and len(list(d.loader(batch_size=500))) == 3
    monkeypatch.setenv(ns.STREAM_ENV, "auto")
    assert isinstance(open_dataset("digits"), ImageDataset)


# ----------------------------------------------------------------------------- WebDataset shards


def _shard(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, img, label in samples:
            for name, data in ((f"{key}.png", img), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_wds_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "test": []}
    for split, n in (("train", 12), ("test", 6)):
        imgs[split] = [(f"s{split}{i:03d}", _image_bytes(rng, (10, 10), "PNG"), i % 3) for i in range(n)]
        _shard(tmp_path / "shards" / f"{split}-000.tar", imgs[split][: n // 2])
        _shard(tmp_path / "shards" / f"{split}-001.tar", imgs[split][n // 2 :])
    src = f"wds:{tmp_path / 'shards'}"
    sds = open_dataset(src, stream=True)
    assert isinstance(sds, StreamDataset) and len(sds) == 12 and sds.num_classes == 3
    assert sds.class_counts() == [4, 4, 4] and sds.img_size == 10
    x, y = sds.take(range(len(sds)))
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # by class, then key: sample s-train-000 (label 0) comes first
    first = torch.from_numpy(np.asarray(Image.open(io.BytesIO(imgs["train"][0][1]))).copy()).permute(2, 0, 1)
    mean, std = torch.tensor(sds.mean).view(3, 1, 1), torch.tensor(sds.std).view(3, 1, 1)
    assert torch.allclose(x[0], (first.float() / 255 - mean) / std, atol=1e-5)
    assert open_dataset(src, "test", stream=True).class_counts() == [2, 2, 2]
    assert open_dataset(src, limit=6, stream=True).class_counts() == [2, 2, 2]
    mem = load(src)
    assert torch.allclose(mem.x, x, atol=1e-6)
    assert torch.equal(_epoch(sds, 0)[0], _epoch(sds, 2)[0])

    bad = tmp_path / "nolabel"
    bad.mkdir()
    with tarfile.open(bad / "train-0.tar", "w") as tf:
        info = tarfile.TarInfo("k1.png")
        info.size = len(imgs["train"][0][1])
        tf.addfile(info, io.BytesIO(imgs["train"][0][1]))
    with pytest.raises(ValueError, match="no label member") as e:
        open_dataset(f"wds:{bad}", stream=True)
    _one_line(e)
    (tmp_path / "noshards").mkdir()
    with pytest.raises(ValueError, match="no WebDataset shards") as e:
        open_dataset(f"wds:{tmp_path / 'noshards'}")
    _one_line(e)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_one_line(tmp_path: Path, toy: tuple[Path, Path]) -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        (f"imagefolder:{tmp_path / 'missing'}", {}, "does not exist"),
        ("ftp:/x", {}, "unknown dataset kind 'ftp'"),
        ("digits", {"stream": True}, "cannot stream"),
        (f"imagefolder:{toy[0]}", {"stream": "sometimes"}, "stream must be auto, on or off"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((f"imagefolder:{empty}", {"stream": True}, "no images found"))
    hollow = _folder(tmp_path / "hollow", {"a": (2, 1), "b": (2, 1)})
    (hollow / "train" / "c").mkdir()
    (hollow / "test" / "c").mkdir()
    cases.append((f"imagefolder:{hollow}", {"stream": True}, "class folder 'train/c' has no images"))
    data = toy[1].read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    cases.append((f"imagefolder:{cut}", {"stream": True}, "corrupted or unreadable archive"))
    for source, kw, needle in cases:
        with pytest.raises(ValueError) as e:
            open_dataset(source, **kw)  # type: ignore[arg-type]
        assert needle in _one_line(e), (source, str(e.value))
    # the in-memory path reports an empty class folder the same way
    with pytest.raises(ValueError, match="class folder 'train/c' has no images"):
        load(f"imagefolder:{hollow}")


def test_broken_image_in_a_worker_is_one_line(tmp_path: Path) -> None:
    root = _folder(tmp_path / "broken", {"a": (4, 1), "b": (4, 1)})
    sds = open_dataset(f"imagefolder:{root}", stream=True)  # statistics decode the sample: all good now
    (root / "train" / "b" / "0002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="cannot decode") as e:
        list(sds.loader(batch_size=2, num_workers=2))
    assert "0002.jpg" in _one_line(e)


# ----------------------------------------------------------------------------- the train stage on streaming data


def test_evaluate_stages_on_streaming_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nas.search import SearchConfig, make_frame
    from workers.evaluate import EvalConfig, EvaluationError, StreamSplit, evaluate, split_dataset

    monkeypatch.setenv(ns.WORKERS_ENV, "0")
    root = _folder(tmp_path / "f", {"a": (10, 2), "b": (10, 2), "c": (10, 2)}, size=(16, 16))
    mem = split_dataset(open_dataset(f"imagefolder:{root}", stream=False), seed=1)
    data = split_dataset(open_dataset(f"imagefolder:{root}", stream=True), seed=1)
    assert data.streaming and not mem.streaming and isinstance(data.train, StreamSplit)
    assert (data.in_chans, data.img_size, data.num_classes) == (mem.in_chans, mem.img_size, 3) == (3, 16, 3)
    assert torch.equal(data.train.y, mem.train.y) and torch.equal(data.val.y, mem.val.y)
    spec = make_frame(SearchConfig(), 3, 3, 16).random(0)
    cfg = EvalConfig(proxy_batch=6, screen_repeats=1, train_epochs=1, train_batch=8)
    s_mem, s_str = evaluate(spec, "screen", mem, config=cfg), evaluate(spec, "screen", data, config=cfg)
    for k in ("zc.nwot", "zc.synflow", "zc.snip"):
        assert s_str.metrics[k] == pytest.approx(s_mem.metrics[k], rel=1e-3, abs=1e-6)
    seen: list[int] = []
    ev = evaluate(spec, "train", data, config=cfg, report=lambda e, m: seen.append(e) and False)
    assert ev.metrics["steps"] == len(data.train) // 8 and ev.metrics["epochs"] == 1.0 and seen == [1]
    assert 0.0 <= ev.metrics["accuracy"] <= 1.0
    stopped = evaluate(spec, "train", data, config=cfg, allowance=0.0)
    assert stopped.metrics["budget_stop"] == 1.0 and stopped.metrics["steps"] == 0
    # the supernet stage takes streaming data too: only the missing checkpoint stops it here
    with pytest.raises(EvaluationError, match="no supernet checkpoint") as e:
        evaluate(spec, "supernet", data, config=EvalConfig(supernet=str(tmp_path)))
    _one_line(e)
