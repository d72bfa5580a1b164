"""Training and evaluation on streaming data equal the same runs in memory.

``predictors.supernet`` takes a streaming dataset (``len``, ``labels``, ``take``): each step fetches
the images the in-memory step indexes and augments them with the same draws, so a supernet run,
its stop and resume, a standalone training and a subnet evaluation on a streamed image folder
equal the runs on the same folder decoded into memory (losses and weights to 1e-5); a staged
search on a forced-streaming folder runs the same evaluations as with streaming off. Small
synthetic PNG folders (lossless: both paths see the same pixels). No timing assertions.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nas.stream as ns
from nas.data import open_dataset
from predictors import supernet as sn
from predictors.supernet import (
    SupernetError,
    TrainConfig,
    accuracy,
    evaluate_subnet,
    recalibrate_bn,
    train_standalone,
    train_supernet,
)
from search_spaces.spec import StemSpec
from search_spaces.supernet import StageFrame, SupernetFrame
from workers.evaluate import StreamSplit, head, split_dataset

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write image folders")

# BatchNorm in the conv stem and as the stage's pre-norm, so BatchNorm recalibration matters; no
# pooling mixer (its pre-norm bias gets a gradient of pure rounding noise, see test_supernet_ddp.py)
FRAME = SupernetFrame(
    stem=StemSpec(kind="conv", stride=4, norm="layernorm"),
    stages=(StageFrame(max_depth=2, widths=(8, 16), heads=(1, 2), mlp_ratios=(2.0,),
                       token_mixers=("attention", "sepconv"), channel_mixers=("mlp", "glu"), norm="batchnorm",
                       downsample="none"),),
    img_size=16, in_chans=3, num_classes=3,
)
# a batch of 10 from 45 images: 4 steps an epoch, crop-and-flip augmentation on (RGB)
CFG = TrainConfig(batch_size=10, lr=3e-3, warmup_epochs=0.5, augment=True, flip=True, seed=5)
EPOCHS = 2
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of its own per test; no streaming / worker settings from outside."""
    monkeypatch.setenv("HYBRID_NAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ns.STREAM_ENV, raising=False)
    monkeypatch.setenv(ns.WORKERS_ENV, "0")


def _folder(root: Path, per_class: int = 15, size: int = 16, classes: int = 3, seed: int = 0) -> Path:
    """root/train/<class>/NNNN.png (and a small test split): structured images, so training learns."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for split, n in (("train", per_class), ("test", 2)):
            for i in range(n):
                img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img[:, :, c] += 120  # the class is the dominant channel
                p = root / split / f"c{c}" / f"{i:04d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                p.write_bytes(buf.getvalue())
    return root


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Any, Any]:
    """The same 45 training images in memory and streaming."""
    src = f"imagefolder:{_folder(tmp_path / 'imgs')}"
    mem, sds = open_dataset(src, stream=False), open_dataset(src, stream=True)
    assert not mem.streaming and sds.streaming and len(mem) == len(sds) == 45
    assert torch.equal(mem.labels, sds.labels)
    return mem, sds


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((v - w).abs().max()) for v, w in zip(a.state_dict().values(), b.state_dict().values())
               if v.is_floating_point())


def _count_takes(monkeypatch: pytest.MonkeyPatch, sds: Any) -> list[int]:
    """Images fetched per ``take`` call on ``sds``."""
    seen: list[int] = []
    take = sds.take

    def counting(indices: Any) -> Any:
        seen.append(len(indices))
        return take(indices)

    monkeypatch.setattr(sds, "take", counting)
    return seen


def test_take_matches_memory(pair: tuple[Any, Any]) -> None:
    mem, sds = pair
    idx = torch.tensor([3, 0, 44, 17])
    x, y = sds.take(idx)
    assert torch.allclose(x, mem.x[idx], atol=ATOL) and torch.equal(y, mem.y[idx])


def test_supernet_on_streaming_data_equals_memory_and_resumes_exactly(pair: tuple[Any, Any], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mem, sds = pair
    ref = train_supernet(FRAME, mem, EPOCHS, config=CFG)
    takes = _count_takes(monkeypatch, sds)
    got = train_supernet(FRAME, sds, EPOCHS, config=CFG)
    st_ref, st = ref.train_state, got.train_state  # type: ignore[attr-defined]
    assert st.step == st_ref.step == EPOCHS * (45 // 10)
    assert np.allclose(st.losses, st_ref.losses, atol=ATOL, rtol=0)
    assert _max_diff(ref, got) < ATOL
    # one take per step, of one batch (the prefetch fetches each step once, never past the last)
    assert takes == [10] * st.step
    # stopped mid-epoch, then resumed from the checkpoint: the uninterrupted in-memory run's result
    out = tmp_path / "sn"
    first = train_supernet(FRAME, sds, EPOCHS, config=CFG, out=out, max_steps=3)
    assert first.train_state.step == 3  # type: ignore[attr-defined]
    rest = train_supernet(FRAME, sds, EPOCHS, config=CFG, out=out)
    losses = first.train_state.losses + rest.train_state.losses  # type: ignore[attr-defined]
    assert np.allclose(losses, st_ref.losses, atol=ATOL, rtol=0)
    assert _max_diff(ref, rest) < ATOL


def test_prefetch_does_not_change_the_run(pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _, sds = pair
    with_thread = train_supernet(FRAME, sds, 1, config=CFG)
    monkeypatch.setattr(sn, "PREFETCH", False)
    without = train_supernet(FRAME, sds, 1, config=CFG)
    assert with_thread.train_state.losses == without.train_state.losses  # type: ignore[attr-defined]
    assert _max_diff(with_thread, without) == 0.0


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_fetches_only_its_shard_of_the_global_batch(pair: tuple[Any, Any], world: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The distributed path's data part, without a process group: rank r's streamed batch is the
    in-memory global batch's slice r (same images, same augmentation), fetched alone."""
    mem, sds = pair
    takes = _count_takes(monkeypatch, sds)
    for rank in range(world):
        batches = sn._StepBatches(sds, CFG, 4, 10, "cpu", 5, rank, world)
        try:
            for step in range(6):
                x, y = batches(step)
                gx, gy = sn._batch(mem, CFG, step, 4, 10, "cpu")
                part = sn._shard(10, rank, world)
                assert torch.allclose(x, gx[part], atol=ATOL) and torch.equal(y, gy[part])
                assert batches.share == pytest.approx((part.stop - part.start) / 10)
        finally:
            batches.close()
    assert sum(takes) == 6 * 10 and max(takes) <= -(-10 // world)


def test_train_standalone_and_accuracy_on_streaming_data_equal_memory(pair: tuple[Any, Any]) -> None:
    mem, sds = pair
    spec = FRAME.random(1)
    epochs_mem: list[float] = []
    epochs_str: list[float] = []
    a = train_standalone(spec, mem, 2, config=CFG, on_epoch=lambda e, m: epochs_mem.append(accuracy(m, mem, 7)))
    b = train_standalone(spec, sds, 2, config=CFG, on_epoch=lambda e, m: epochs_str.append(accuracy(m, sds, 7)))
    assert a.train_state.step == b.train_state.step == 8  # type: ignore[attr-defined]
    assert _max_diff(a, b) < ATOL and epochs_mem == epochs_str
    # stopped by before_step, as in memory
    c = train_standalone(spec, sds, 2, config=CFG, before_step=lambda i, _s: i == 3)
    assert c.train_state.stopped and c.train_state.step == 3  # type: ignore[attr-defined]


def test_evaluate_subnet_on_streaming_data_equals_memory(pair: tuple[Any, Any], tmp_path: Path) -> None:
    mem, sds = pair
    net = train_supernet(FRAME, mem, 1, config=CFG)
    spec = FRAME.largest()
    kw: dict[str, Any] = {"calib_batches": 3, "batch_size": 8, "finetune_steps": 3, "finetune_batch": 8}
    m = evaluate_subnet(net, spec, mem, calib=mem, finetune_data=mem, **kw)
    s = evaluate_subnet(net, spec, sds, calib=sds, finetune_data=sds, **kw)
    assert s == m
    # the recalibrated statistics themselves
    a, b = net.extract(spec), net.extract(spec)
    assert recalibrate_bn(a, mem, batches=2, batch_size=16) == recalibrate_bn(b, sds, batches=2, batch_size=16) == 32
    assert _max_diff(a, b) < ATOL


def test_split_views_and_bad_streaming_data(pair: tuple[Any, Any]) -> None:
    mem, sds = pair
    data, ref = split_dataset(sds, 0.2, 1), split_dataset(mem, 0.2, 1)
    assert isinstance(data.train, StreamSplit) and len(data.train) == len(ref.train)
    x, y = head(data.train, 5)
    rx, ry = head(ref.train, 5)
    assert torch.allclose(x, rx, atol=ATOL) and torch.equal(y, ry)
    assert head(ref.train, 10_000)[0].shape[0] == len(ref.train)
    # a supernet trains on a split as on the dataset (the search's path)
    net = train_supernet(FRAME, data.train, 1, config=CFG, max_steps=2)
    assert net.train_state.step == 2  # type: ignore[attr-defined]

    class Broken:
        in_chans, img_size, labels = 3, 16, torch.zeros(0, dtype=torch.int64)

        def __len__(self) -> int:
            return 0

        def take(self, idx: Any) -> Any:
            raise AssertionError

    with pytest.raises(SupernetError, match="stream") as e:
        train_supernet(FRAME, Broken(), 1, config=CFG)
    assert "\n" not in str(e.value)
    with pytest.raises(SupernetError, match="the frame takes 3x8x8"):
        train_supernet(replace(FRAME, img_size=8), sds, 1, config=CFG)


def test_staged_search_streaming_runs_the_same_evaluations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny staged study (in-process executor, a trial budget) on a folder forced to stream runs
    every stage, the supernet's included, and the same evaluations as with streaming off."""
    from nas.budget import parse_budget
    from nas.search import SearchConfig, create_study, load_data, run_study
    from nas.store import Store

    root = _folder(tmp_path / "imgs", per_class=20)
    counts = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ns.STREAM_ENV, mode)
        cfg = SearchConfig(data=f"imagefolder:{root}", train_epochs=1, frame="tiny", seed=0,
                           workdir=str(tmp_path / f"work-{mode}"))
        assert load_data(cfg).streaming == (mode == "on")
        store = Store(f"sqlite:///{tmp_path / f'{mode}.db'}")
        create_study(store, "s", cfg, parse_budget("24trials"))
        run_study(store, "s", executor="local")
        info = store.study("s")
        evs = store.evaluations("s")
        assert info.status == "completed" and not [e.error for e in evs if e.error], [e.error for e in evs]
        counts[mode] = Counter(e.stage for e in evs)
    assert counts["on"] == counts["off"]
    assert {"screen", "supernet_train", "supernet", "train"} <= set(counts["on"]), counts["on"]


def _rank_main(rank: int, world: int, port: int, sds: Any, out: str) -> None:
    """One rank of a 2-process gloo group (spawned): the supernet on streaming data; rank 0 saves."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        taken: list[int] = []
        take = sds.take
        sds.take = lambda idx: (taken.append(len(idx)), take(idx))[1]
        net = train_supernet(FRAME, sds, EPOCHS, config=CFG)
        if rank == 0:
            torch.save({"model": net.state_dict(), "losses": net.train_state.losses, "taken": taken}, out)
    finally:
        dist.destroy_process_group()


def test_distributed_supernet_on_streaming_data_equals_memory(pair: tuple[Any, Any], tmp_path: Path) -> None:
    """Two gloo ranks on the streamed folder, each fetching its shard only: the single-process
    in-memory run (to the tolerances of test_supernet_ddp.py)."""
    import socket

    import torch.multiprocessing as mp

    mem, sds = pair
    ref = train_supernet(FRAME, mem, EPOCHS, config=CFG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.start_processes(_rank_main, args=(2, port, sds, str(out)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out, weights_only=False)
    assert got["taken"] == [5] * (EPOCHS * 4)  # rank 0's half of each global batch of 10
    assert np.allclose(got["losses"], ref.train_state.losses, atol=2e-5, rtol=0)  # type: ignore[attr-defined]
    diff = max(float((v - ref.state_dict()[k]).abs().max()) for k, v in got["model"].items() if v.is_floating_point())
    assert diff < ATOL
