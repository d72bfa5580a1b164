"""nas.data: source strings, the four kinds of dataset, class-balanced subsets, the cache."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data import DataSpec, ImageDataset, batches, cache_dir, load, one_batch, parse_data

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write and decode image folders")

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty cache directory of its own (never ~/.cache)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("HYBRID_NAS_CACHE", str(d))
    return d


def _one_line_error(excinfo: pytest.ExceptionInfo[ValueError]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- source strings


def test_parse_data_good(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    f.write_bytes(b"")
    (tmp_path / "a.tar.gz").write_bytes(b"")
    assert parse_data("digits") == DataSpec("digits", None)
    assert parse_data("  Digits ") == DataSpec("digits", None)
    assert parse_data(f"cifar10:{tmp_path}") == DataSpec("cifar10", str(tmp_path))
    assert parse_data(f"imagefolder:{tmp_path}") == DataSpec("imagefolder", str(tmp_path))
    assert parse_data(f"imagefolder:{tmp_path / 'a.tar.gz'}").path == str(tmp_path / "a.tar.gz")
    spec = parse_data(f"npz:{f}")
    assert spec == DataSpec("npz", str(f)) and str(spec) == f"npz:{f}" and parse_data(str(spec)) == spec
    assert str(parse_data("digits")) == "digits"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("", "pass digits"),
        ("   ", "pass digits"),
        ("mnist:/data", "unknown dataset kind 'mnist'"),
        ("cifar10", "cifar10 needs a path"),
        ("cifar10:", "cifar10 needs a path"),
        ("npz:", "npz:PATH"),
        ("digits:/data/x", "takes no path"),
        ("cifar10:/no/such/dir", "does not exist"),
        ("imagefolder:/no/such/file.tar.gz", "does not exist"),
        ("npz:{tmp}", "is not a file"),
        ("imagefolder:{tmp}/notes.txt", "neither a directory nor"),
        ("{tmp}", "has no kind; pass imagefolder:"),
    ],
)
def test_parse_data_bad(source: str, needle: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        parse_data(source.format(tmp=tmp_path))
    msg = _one_line_error(e)
    assert needle in msg
    assert "pass" in msg


def test_load_rejects_bad_arguments() -> None:
    for kwargs, needle in [
        ({"split": "val"}, "unknown split"),
        ({"limit": 0}, "limit"),
        ({"limit": 2.5}, "limit"),
        ({"img_size": 0}, "img_size"),
    ]:
        with pytest.raises(ValueError, match=needle) as e:
            load("digits", **kwargs)  # type: ignore[arg-type]
        _one_line_error(e)


# ----------------------------------------------------------------------------- digits


def test_digits() -> None:
    tr, te = load("digits"), load("digits", "test")
    assert len(tr) + len(te) == 1797
    assert abs(len(te) - 0.2 * 1797) < 10
    for ds in (tr, te):
        assert isinstance(ds, ImageDataset)
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8)
        assert ds.num_classes == 10 and ds.in_chans == 1 and ds.img_size == 8
        assert ds.classes == [str(i) for i in range(10)]
        assert ds.name == "digits" and ds.source == "digits"
    assert te.mean == tr.mean and te.std == tr.std  # the test split uses the train statistics
    m, s = tr.x.mean(dim=(0, 2, 3)), tr.x.std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(1), atol=1e-4) and torch.allclose(s, torch.ones(1), atol=1e-2)
    assert 0.2 < tr.mean[0] < 0.4 and 0.3 < tr.std[0] < 0.5  # on the 0..1 scale
    # stratified: every class in both splits, in proportion
    assert min(tr.class_counts()) > 130 and min(te.class_counts()) > 30
    # deterministic
    again = load("digits")
    assert torch.equal(again.x, tr.x) and torch.equal(again.y, tr.y)


def test_digits_limit_and_resize() -> None:
    a = load("digits", limit=100, seed=1)
    assert len(a) == 100 and a.class_counts() == [10] * 10
    b = load("digits", limit=100, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = load("digits", limit=100, seed=2)
    assert not torch.equal(a.x, c.x)
    d = load("digits", limit=55)  # 5 a class plus 5 classes with one more
    assert len(d) == 55 and sorted(d.class_counts()) == [5] * 5 + [6] * 5
    # nested subsets: a smaller limit picks a subset of a larger one (same seed)
    small, big = load("digits", limit=50, seed=3), load("digits", limit=200, seed=3)
    rows_big = {tuple(r.tolist()) for r in big.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows_big for r in small.x.flatten(1))
    r = load("digits", limit=20, img_size=16)
    assert r.x.shape == (20, 1, 16, 16) and r.img_size == 16
    assert load("digits", limit=100_000).x.shape[0] == len(load("digits"))


# ----------------------------------------------------------------------------- npz


def test_npz_both_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (40, 9, 7, 3), dtype=np.uint8)  # N,H,W,C (non-square on purpose)
    x_test = rng.integers(0, 256, (12, 9, 7, 3), dtype=np.uint8)
    y_train, y_test = np.arange(40) % 4, np.arange(12) % 4
    nhwc, nchw = tmp_path / "nhwc.npz", tmp_path / "nchw.npz"
    np.savez(nhwc, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(list("abcd")))
    np.savez(
        nchw,
        x_train=x_train.transpose(0, 3, 1, 2),
        y_train=y_train,
        x_test=x_test.transpose(0, 3, 1, 2),
        y_test=y_test,
    )
    a, b = load(f"npz:{nhwc}"), load(f"npz:{nchw}")
    assert a.x.shape == b.x.shape == (40, 3, 9, 7)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.classes == ["a", "b", "c", "d"] and b.classes == ["0", "1", "2", "3"]
    assert a.name == "nhwc" and a.img_size == (9, 7)
    # round trip: the normalisation is affine, undo it and get the uint8 pixels back
    raw = a.x * torch.tensor(a.std).view(1, 3, 1, 1) + torch.tensor(a.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw * 255, torch.from_numpy(x_train.transpose(0, 3, 1, 2)).float(), atol=1e-3)
    te = load(f"npz:{nhwc}", "test", img_size=14)
    assert te.x.shape == (12, 3, 14, 14) and te.mean == a.mean
    # float images are used as they are
    f32 = tmp_path / "float.npz"
    np.savez(f32, x_train=x_train / 255.0, y_train=y_train, x_test=x_test / 255.0, y_test=y_test)
    assert torch.allclose(load(f"npz:{f32}").x, a.x, atol=1e-4)


def test_npz_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="missing arrays x_test, y_test") as e:
        load(f"npz:{p}")
    _one_line_error(e)
    q = tmp_path / "garbage.npz"
    q.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"cannot read as \.npz") as e:
        load(f"npz:{q}")
    _one_line_error(e)


# ----------------------------------------------------------------------------- image folders


def _write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (12, 12), gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if gray else (*size, 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)


def _make_folder(root: Path, classes: dict[str, tuple[int, int]], seed: int = 0, **kw: object) -> Path:
    """root/train/<class>/*.{jpg,png} and root/test/<class>/*; classes: name -> (n_train, n_test)."""
    rng = np.random.default_rng(seed)
    for c, (n_tr, n_te) in classes.items():
        for split, n in (("train", n_tr), ("test", n_te)):
            for i in range(n):
                _write_image(root / split / c / f"{i:04d}.{'jpg' if i % 2 else 'png'}", rng, **kw)  # type: ignore[arg-type]
    return root


def _tar(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return dest


def test_imagefolder_dir_and_targz_identical(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "toy", {"cat": (6, 3), "ant": (6, 3), "bee": (6, 3)})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    (root / "train" / ".hidden.jpg").write_bytes(b"junk")  # ignored
    archive = _tar(root, tmp_path / "toy.tar.gz", arcname="wrapped")  # a wrapping top folder is fine
    for split, n in (("train", 18), ("test", 9)):
        d = load(f"imagefolder:{root}", split)
        t = load(f"imagefolder:{archive}", split)
        assert d.x.shape == (n, 3, 12, 12)
        assert d.classes == t.classes == ["ant", "bee", "cat"]
        assert d.mean == t.mean and d.std == t.std
        assert torch.equal(d.x, t.x) and torch.equal(d.y, t.y)
        assert d.class_counts() == [n // 3] * 3
    assert load(f"imagefolder:{archive}").name == "toy"
    lim = load(f"imagefolder:{archive}", limit=6, seed=5)
    assert lim.class_counts() == [2, 2, 2]
    assert torch.equal(lim.x, load(f"imagefolder:{root}", limit=6, seed=5).x)


def test_imagefolder_flat_layout_is_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for c in ("x", "y"):
        for i in range(10):
            _write_image(tmp_path / "flat" / c / f"{i}.png", rng)
    tr, te = load(f"imagefolder:{tmp_path / 'flat'}"), load(f"imagefolder:{tmp_path / 'flat'}", "test")
    assert tr.class_counts() == [8, 8] and te.class_counts() == [2, 2]
    seen = {tuple(r.tolist()) for r in tr.x.flatten(1)}
    assert not any(tuple(r.tolist()) in seen for r in te.x.flatten(1))  # disjoint


def test_imagefolder_grayscale_and_sizes(tmp_path: Path) -> None:
    gray = _make_folder(tmp_path / "gray", {"a": (2, 1), "b": (2, 1)}, gray=True)
    g = load(f"imagefolder:{gray}")
    assert g.in_chans == 1 and g.x.shape == (4, 1, 12, 12)
    mixed = _make_folder(tmp_path / "mixed", {"a": (2, 1), "b": (2, 1)})
    _write_image(mixed / "train" / "a" / "big.png", np.random.default_rng(2), size=(20, 16))
    with pytest.raises(ValueError, match=r"different sizes.*pass img_size") as e:
        load(f"imagefolder:{mixed}")
    _one_line_error(e)
    m = load(f"imagefolder:{mixed}", img_size=10)
    assert m.x.shape == (5, 3, 10, 10)


def test_imagefolder_errors(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "inc", {"a": (2, 1), "b": (2, 0)})
    with pytest.raises(ValueError, match="inconsistent classes between train/ and test/") as e:
        load(f"imagefolder:{root}")
    assert str(root) in _one_line_error(e)

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found") as e:
        load(f"imagefolder:{empty}")
    assert str(empty) in _one_line_error(e)

    good = _tar(_make_folder(tmp_path / "ok", {"a": (3, 1), "b": (3, 1)}), tmp_path / "ok.tar.gz", "ok")
    data = good.read_bytes()
    for name, blob in (("truncated", data[: len(data) // 2]), ("garbage", b"\x1f\x8b" + b"\x00" * 200)):
        bad = tmp_path / f"{name}.tgz"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="corrupted or unreadable archive") as e:
            load(f"imagefolder:{bad}")
        assert str(bad) in _one_line_error(e)

    broken = _make_folder(tmp_path / "broken", {"a": (2, 1), "b": (2, 1)})
    (broken / "train" / "a" / "0000.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot decode") as e:
        load(f"imagefolder:{broken}")
    assert "0000.png" in _one_line_error(e)


def test_imagefolder_cache(tmp_path: Path, _cache: Path) -> None:
    archive = _tar(_make_folder(tmp_path / "c", {"a": (4, 2), "b": (4, 2)}), tmp_path / "c.tar.gz", "c")
    first = load(f"imagefolder:{archive}", limit=4)
    files = sorted(p.name for p in _cache.iterdir())
    assert any(n.endswith(".npz") and "-train-4-" in n for n in files)
    assert not any(n.endswith(".tmp") for n in files)  # writes are atomic
    assert cache_dir() == _cache
    second = load(f"imagefolder:{archive}", limit=4)
    assert torch.equal(first.x, second.x) and first.mean == second.mean
    # a changed archive (size/mtime) is not served from the stale cache
    _tar(_make_folder(tmp_path / "c2", {"a": (4, 2), "b": (4, 2)}, seed=9), archive, "c")
    os.utime(archive, ns=(1, 1))
    assert not torch.equal(load(f"imagefolder:{archive}", limit=4).x, first.x)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
def test_tar_scanner_matches_tarfile(tmp_path: Path, fmt: int, mode: str) -> None:
    """The header-only scanner finds the same members at the same offsets as the tarfile module."""
    from nas.data import _scan_tar_fast

    path = tmp_path / "t.tar"
    names = ["a/b.jpg", "x" * 120 + "/long.jpg", "d/" + "y" * 90 + "/" + "z" * 60 + ".png", "ünï/cödé.jpg", "big.bin"]
    with tarfile.open(path, mode, format=fmt) as tf:
        for n in names:
            data = bytes(range(256)) * (4000 if n == "big.bin" else 3)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "a/b.jpg"
        tf.addfile(link)
    with tarfile.open(path) as tf:
        expected = [[m.name, m.offset_data, m.size] for m in tf if m.isreg()]
    assert _scan_tar_fast(path) == expected and len(expected) == len(names)


# ----------------------------------------------------------------------------- CIFAR-10 python batches


def _write_cifar(root: Path, per_batch: int = 4, protocol: int = 2) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=protocol)
        xs.append(data)
        ys.append(labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}, f, protocol=protocol)
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_batches(tmp_path: Path, protocol: int) -> None:
    root = tmp_path / "cifar-10-batches-py"
    xs, ys = _write_cifar(root, protocol=protocol)
    tr = load(f"cifar10:{root}")
    assert tr.x.shape == (20, 3, 32, 32) and tr.classes == CIFAR_CLASSES and tr.name == "cifar10"
    assert torch.equal(tr.y, torch.from_numpy(ys[:20]))
    raw = tr.x * torch.tensor(tr.std).view(1, 3, 1, 1) + torch.tensor(tr.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw * 255, torch.from_numpy(xs[:20].reshape(-1, 3, 32, 32)).float(), atol=1e-3)
    te = load(f"cifar10:{tmp_path}", "test")  # the parent of cifar-10-batches-py works too
    assert te.x.shape == (4, 3, 32, 32) and te.mean == tr.mean
    archive = _tar(root, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    assert torch.equal(load(f"cifar10:{archive}", "test").x, te.x)


def test_cifar10_python2_pickle() -> None:
    """The official batches were pickled by Python 2 (str as SHORT_BINSTRING, numpy.core paths)."""
    from nas.data import _unpickle

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    dtype = (
        b"cnumpy\ndtype\n"
        + s(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        b"(K\x01K\x02K\x03\x86" + dtype + b"\x89" + s(bytes(range(6))) + b"tb"
    )
    blob = b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"](K\x01K\x02eu."
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation warning either
        d = _unpickle(blob, "batch")
    assert d["labels"] == [1, 2] and d["data"].dtype == np.uint8 and d["data"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    root = tmp_path / "evil"
    _write_cifar(root)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"echo pwned > {tmp_path / 'pwned'}",))

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch") as e:
        load(f"cifar10:{root}")
    _one_line_error(e)
    assert not (tmp_path / "pwned").exists()
    (root / "test_batch").unlink()
    with pytest.raises(ValueError, match="test_batch missing") as e:
        load(f"cifar10:{root}")
    _one_line_error(e)


# ----------------------------------------------------------------------------- batches


def test_one_batch_and_batches() -> None:
    ds = load("digits")
    x, y = one_batch(ds, 50, seed=0)
    assert x.shape == (50, 1, 8, 8) and torch.bincount(y, minlength=10).tolist() == [5] * 10
    x2, y2 = one_batch(ds, 50, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(one_batch(ds, 50, seed=1)[0], x)
    assert sorted(torch.bincount(one_batch(ds, 64)[1], minlength=10).tolist()) == [6] * 6 + [7] * 4
    assert len(set(y[:10].tolist())) > 1  # shuffled, not sorted by class
    with pytest.raises(ValueError, match="exceeds"):
        one_batch(ds, len(ds) + 1)
    seen = torch.cat([yb for _, yb in batches(ds, 100, shuffle=True, seed=3)])
    assert torch.equal(torch.sort(seen).values, torch.sort(ds.y).values)
    sizes = [len(xb) for xb, _ in batches(ds, 100, shuffle=False, seed=0, drop_last=True)]
    assert sizes == [100] * (len(ds) // 100)
    first = next(batches(ds, 8, shuffle=False, seed=0))
    assert torch.equal(first[0], ds.x[:8])


# ----------------------------------------------------------------------------- the real CIFAR-10 JPEG archive


def test_cifar10_jpeg_archive(shared_data: Path, _cache: Path) -> None:
    archive = shared_data / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    source = f"imagefolder:{archive}"
    tr = load(source, "train", limit=200)
    te = load(source, "test", limit=100)
    assert tr.x.shape == (200, 3, 32, 32) and te.x.shape == (100, 3, 32, 32)
    assert tr.classes == te.classes == CIFAR_CLASSES == sorted(CIFAR_CLASSES)
    assert tr.class_counts() == [20] * 10 and te.class_counts() == [10] * 10
    assert te.mean == tr.mean and te.std == tr.std
    assert all(0.4 < m < 0.55 for m in tr.mean) and all(0.2 < s < 0.3 for s in tr.std)  # CIFAR-10's known values
    assert abs(float(tr.x.mean())) < 0.2
    cached = [p.name for p in _cache.iterdir()]
    assert any("-train-200-" in n and n.endswith(".npz") for n in cached)
    assert any("-test-100-" in n and n.endswith(".npz") for n in cached)
    again = load(source, "train", limit=200)
    assert torch.equal(again.x, tr.x) and torch.equal(again.y, tr.y)
    _, y = one_batch(tr, 40, seed=0)
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10


def test_nas_package_is_thin() -> None:
    code = "import sys, nas; assert nas.__doc__; assert 'torch' not in sys.modules, 'nas/__init__ imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
