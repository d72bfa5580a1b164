"""predictors.latency on this (GPU-less, 2-core) machine: the device fingerprint without a GPU or NVML,
measure() on CPU, piece keys vs the network's pieces, timing pieces in place, and the lookup-table
predictor (identical blocks shared, fit, save/load round trip, refusal of foreign tables, ranking).

Kept fast: 32px images, batches of 2-8, a few repeats. That predictors.latency imports no typer, ray,
optuna or sqlalchemy is checked by tests/test_imports.py (which imports it in a fresh interpreter)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from predictors import latency as L
from predictors.latency import (
    LatencyError,
    LatencyPredictor,
    build_lut,
    device_fingerprint,
    measure,
    piece_keys,
    time_callable,
    time_pieces,
)
from predictors.metrics import kendall_tau
from predictors.precision import supported_precisions
from search_spaces import get_space
from search_spaces.hybrid_vit import build
from search_spaces.spec import ArchSpec, HeadSpec, StageSpec, StemSpec

IMG = 32
CLASSES = 10


def _vit(depth: int, width: int, heads: int = 2) -> ArchSpec:
    """A one-stage attention + MLP net (DeiT-like, average pooled) on a 4x4 patch stem."""
    return ArchSpec(stem=StemSpec("patch", 4), stages=(StageSpec(depth=depth, width=width, heads=heads),),
                    head=HeadSpec(pool="avg"))


def _net(spec: ArchSpec) -> nn.Module:
    return build(spec, CLASSES, IMG)


def _median_ms(spec: ArchSpec, batch: int) -> float:
    return measure(_net(spec), (3, IMG, IMG), "cpu", batch_size=batch, warmup=3, repeats=10, threads=1).median_ms


# ------------------------------------------------------------------------------ fingerprint


def test_cpu_fingerprint_fields_are_stable_and_keyed_by_threads() -> None:
    a, b = device_fingerprint("cpu", threads=1), device_fingerprint("cpu", threads=1)
    assert a == b
    assert a["kind"] == "cpu" and a["torch_threads"] == 1
    assert isinstance(a["name"], str) and a["name"]
    assert isinstance(a["cores"], int) and a["cores"] >= 1
    assert isinstance(a["isa"], str) and a["isa"]
    assert re.fullmatch(r"[0-9a-f]{16}", a["key"])
    assert json.loads(json.dumps(a)) == a  # JSON-able
    assert device_fingerprint("cpu", threads=2)["key"] != a["key"]
    # no threads: torch's current count (1 in this suite, see conftest.py)
    assert device_fingerprint("cpu")["torch_threads"] == torch.get_num_threads()


def test_fingerprint_of_a_missing_gpu_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    for device in ("cuda", "cuda:1"):
        fp = device_fingerprint(device, threads=1)
        assert fp["kind"] == "cpu" and fp["requested"] == device
        assert fp["key"] == device_fingerprint("cpu", threads=1)["key"]
    assert device_fingerprint("not-a-device")["kind"] == "cpu"  # never raises


def test_nvml_fields_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert L._nvml_fields(torch.device("cuda", 0)) == {}
    fp = device_fingerprint("cuda")
    assert fp["kind"] == "cpu" and "nvml" not in fp


# ------------------------------------------------------------------------------ measure


def test_measure_cpu_figures_are_sane_and_the_model_untouched() -> None:
    model = _net(_vit(2, 64)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[int] = []  # torch threads during each forward (the hook travels with measure's copy)
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads_before = torch.get_num_threads()
    want = 2 if threads_before != 2 else 1
    r = measure(model, (3, IMG, IMG), "cpu", batch_size=4, warmup=2, repeats=7, threads=want)
    assert r.median_ms > 0 and r.mean_ms > 0
    assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.cv >= 0
    assert r.repeats == 7 and r.warmup >= 2
    assert r.input_shape == (4, 3, IMG, IMG) and r.batch_size == 4
    assert r.device == "cpu" and r.precision == "fp32" and not r.cuda_graph
    assert r.threads == want and set(seen) == {want}  # fixed while measuring
    assert torch.get_num_threads() == threads_before  # and restored afterwards
    assert isinstance(r.peak_mem_mb, float) and r.peak_mem_mb >= 0
    assert r.fingerprint["key"] == device_fingerprint("cpu", threads=want)["key"]
    assert r.throughput == pytest.approx(4 / (r.median_ms / 1e3))
    assert json.loads(json.dumps(r.to_dict()))["input_shape"] == [4, 3, IMG, IMG]
    # the model passed in: same weights, still training, no quantized layers
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(type(m).__name__ != "Int8Linear" for m in model.modules())


def test_measure_takes_a_full_shape_and_low_precisions() -> None:
    model = _net(_vit(1, 32))
    r = measure(model, (2, 3, IMG, IMG), warmup=1, repeats=3, threads=1)
    assert r.batch_size == 2 and r.input_shape == (2, 3, IMG, IMG) and r.threads == 1
    for precision in ("bf16", "int8"):
        if precision in supported_precisions("cpu"):
            r = measure(model, (3, IMG, IMG), "cpu", precision, batch_size=2, warmup=1, repeats=3, threads=1)
            assert r.precision == precision and r.median_ms > 0


def test_a_bigger_model_of_the_same_family_is_slower() -> None:
    small = _median_ms(_vit(1, 64), 8)
    big = _median_ms(_vit(6, 192), 8)  # ~33x slower measured here; assert only 2x
    assert big > 2 * small


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "cuda"}, "--target cpu"),
    ({"input_shape": (3, 32)}, "input_shape must be"),
    ({"input_shape": (3, 0, 32)}, "must be positive"),
    ({"precision": "fp8"}, "compute capability"),
    ({"precision": "fp4"}, "unknown precision"),
    ({"input_shape": (2, 3, 32, 32), "batch_size": 4}, "has batch 2"),
    ({"cuda_graph": True}, "cuda_graph needs a cuda device"),
    ({"device": "meta"}, "not supported"),
    ({"device": "tpu"}, "bad device"),
])
def test_measure_bad_input(kwargs: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args: dict[str, Any] = {"input_shape": (3, IMG, IMG), "warmup": 1, "repeats": 1, **kwargs}
    with pytest.raises(LatencyError, match=message):
        measure(_net(_vit(1, 32)), **args)


def test_time_callable_rejects_bad_counts() -> None:
    with pytest.raises(LatencyError, match="repeats must be"):
        time_callable(lambda: None, "cpu", repeats=0)
    times, warm = time_callable(lambda: None, "cpu", warmup=0, repeats=4)
    assert len(times) == 4 and warm >= 3 and all(t >= 0 for t in times)


# ------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("seed", range(10))
def test_piece_keys_match_the_pieces_of_the_network(seed: int) -> None:
    spec = get_space("hybrid_vit").random(seed).with_precision("fp32")
    keys = piece_keys(spec, IMG, 2, "fp32", num_classes=CLASSES)
    model = _net(spec).eval()
    with torch.no_grad():
        pieces = model.pieces(torch.randn(2, 3, IMG, IMG))
    assert len(keys) == len(pieces), spec.short()
    assert [k["in"] for k in keys] == [list(args[0].shape) for _, _, args in pieces], spec.short()
    assert keys[0]["op"] == "stem" and keys[-1]["op"] == "head"
    assert sum(k["op"] == "block" for k in keys) == sum(st.depth for st in spec.stages)
    assert all(k["precision"] == "fp32" and k["batch"] == 2 for k in keys)


def test_piece_keys_reject_other_specs() -> None:
    with pytest.raises(LatencyError, match="hybrid_vit specs"):
        piece_keys("not a spec", IMG, 1, "fp32")  # type: ignore[arg-type]


def test_pieces_in_place_add_up_to_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _net(get_space("hybrid_vit").random(3)).eval()
    x = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        pieces = model.pieces(x)
    chain = [(fn, len(a)) for _, fn, a in pieces]
    # timed on this thread's CPU clock (one torch thread: the work is on it), so a busy machine that
    # deschedules the test does not stretch one side: on the wall clock the ratio was 0.48 and 1.8
    monkeypatch.setattr(time, "perf_counter", time.thread_time)
    sums, wholes = [], []
    for _ in range(5):
        parts = time_pieces(chain, x, "cpu", warmup=1, repeats=4, threads=1)
        assert len(parts) == len(pieces) and all(p > 0 for p in parts)
        sums.append(sum(parts))
        wholes.append(float(np.median(time_callable(lambda: model(x), "cpu", warmup=1, repeats=4, threads=1)[0])))
    # the pieces partition each forward: their sum is the whole, up to the marks' own cost and noise
    assert 0.5 < float(np.median(sums)) / float(np.median(wholes)) < 1.5


def test_identical_blocks_share_one_table_entry() -> None:
    spec = _vit(3, 64)  # stem, block 0 (NCHW in, from the stem), blocks 1-2 (tokens in: identical), head
    pred = LatencyPredictor("cpu", "fp32", IMG, 2, num_classes=CLASSES, threads=1, warmup=1, repeats=3,
                            min_time_s=0.0)
    n_pieces = len(pred.keys(spec))
    assert n_pieces == 5
    assert pred.add([spec]) == 4 < n_pieces
    assert len(pred.table) == 4 and pred.missing([spec]) == []
    assert pred.add([spec]) == 0  # nothing new to measure


# ------------------------------------------------------------------------------ the predictor


@pytest.fixture(scope="module")
def small_lut() -> tuple[LatencyPredictor, list[ArchSpec], list[float]]:
    specs = [_vit(1, 32), _vit(3, 64), get_space("hybrid_vit").random(4).with_precision("fp32")]
    pred = build_lut(get_space("hybrid_vit"), "cpu", "fp32", IMG, 4, specs=specs, threads=1, warmup=2, repeats=3,
                     min_time_s=0.0, num_classes=CLASSES)
    return pred, specs, [_median_ms(s, 4) for s in specs]


def test_build_lut_holds_every_piece(small_lut: tuple[LatencyPredictor, list[ArchSpec], list[float]]) -> None:
    pred, specs, _ = small_lut
    assert pred.table and all(v > 0 for v in pred.table.values())
    assert all(k in pred.table for s in specs for k in pred.keys(s))
    assert pred.missing(specs) == []
    assert len(pred.table) < sum(len(pred.keys(s)) for s in specs)  # repeated pieces are stored once
    assert pred.can_measure()
    assert pred.fingerprint["key"] == device_fingerprint("cpu", threads=1)["key"]


def test_fit_and_predict(small_lut: tuple[LatencyPredictor, list[ArchSpec], list[float]]) -> None:
    pred, specs, measured = small_lut
    fit = pred.fit(specs, measured)
    assert set(fit) == {"a", "b", "c", "mape"}
    sums = np.array([pred.piece_sum(s)[0] for s in specs])
    # fewer than 4 measurements: the ratio alone (the median of measured / sum of pieces)
    assert fit["a"] == pytest.approx(float(np.median(np.asarray(measured) / sums)))
    assert fit["b"] == fit["c"] == 0.0 and fit["mape"] >= 0
    assert pred.calibration == (fit["a"], 0.0, 0.0)
    predicted = [pred.predict(s) for s in specs]
    assert all(p > 0 for p in predicted)
    assert predicted == pytest.approx(list(fit["a"] * sums))
    with pytest.raises(LatencyError, match="as many measurements"):
        pred.fit(specs, measured[:-1])
    with pytest.raises(LatencyError, match="positive and finite"):
        pred.fit(specs[:1], [0.0])


def test_save_load_round_trip(small_lut: tuple[LatencyPredictor, list[ArchSpec], list[float]],
                              tmp_path: Path) -> None:
    pred, specs, measured = small_lut
    pred.fit(specs, measured)
    path = pred.save(tmp_path / "sub" / pred.filename())
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no .tmp left behind
    for back in (LatencyPredictor.load(path), LatencyPredictor.load(path, device="cpu")):
        assert back.table == pred.table
        assert back.calibration == pytest.approx(pred.calibration)
        assert back.key == pred.key and back.filename() == pred.filename()
        assert [back.predict(s, fill=False) for s in specs] == pytest.approx([pred.predict(s) for s in specs])
        assert back.can_measure()  # the same machine and thread count: it may add pieces
    pred.save(path)  # overwriting is fine, still no temporary file
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_foreign_and_broken_tables_are_refused(small_lut: tuple[LatencyPredictor, list[ArchSpec], list[float]],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pred, specs, _ = small_lut
    data = json.loads(pred.save(tmp_path / "mine.json").read_text())
    data["fingerprint"]["key"] = "0" * 16
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    with pytest.raises(LatencyError, match="build one here with build_lut"):
        LatencyPredictor.load(foreign, device="cpu")
    other = LatencyPredictor.load(foreign)  # readable without a device ...
    assert not other.can_measure()  # ... but it cannot add pieces on this machine

    def no_timing(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("a foreign table must not measure pieces here")

    monkeypatch.setattr(L, "time_pieces", no_timing)
    assert other.predict(specs[0]) > 0  # everything it needs is in the table
    with pytest.raises(LatencyError, match="not in this latency table"):
        other.predict(_vit(1, 48))
    with pytest.raises(LatencyError, match="not in the latency table"):
        other.predict(_vit(1, 48), fill=False)
    for name, text in (("junk.json", '{"a": 1}'), ("list.json", "[1, 2]"), ("old.json", '{"format": 0}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(LatencyError, match="not a latency table"):
            LatencyPredictor.load(tmp_path / name)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LatencyError, match="cannot read latency table"):
        LatencyPredictor.load(tmp_path / "bad.json")
    with pytest.raises(LatencyError, match="cannot read latency table"):
        LatencyPredictor.load(tmp_path / "missing.json")


def test_build_lut_rejects_other_spaces_and_unsupported_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LatencyError, match="hybrid_vit"):
        build_lut("nb201", "cpu")
    with pytest.raises(LatencyError, match="compute capability"):
        build_lut("hybrid_vit", "cpu", "fp8", IMG, 1, specs=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LatencyError, match="--target cpu"):
        build_lut("hybrid_vit", "cuda", "fp32", IMG, 1, specs=[])
    with pytest.raises(LatencyError, match="must be >= 1"):
        LatencyPredictor("cpu", "fp32", IMG, 0)


def test_predictor_ranks_cpu_models(monkeypatch: pytest.MonkeyPatch) -> None:
    # six one-stage attention + MLP nets spanning ~50x in latency on this CPU, timed on the thread's
    # CPU clock so that a busy machine descheduling the test does not reorder them
    monkeypatch.setattr(time, "perf_counter", time.thread_time)
    specs = [_vit(d, w) for d, w in ((1, 32), (1, 64), (2, 96), (3, 128), (4, 192), (6, 256))]
    pred = build_lut("hybrid_vit", "cpu", "fp32", IMG, 4, specs=specs, threads=1, warmup=2, repeats=5,
                     min_time_s=0.0, num_classes=CLASSES)
    measured = [_median_ms(s, 4) for s in specs]
    fit = pred.fit(specs, measured)  # >= 4 measurements: a * sum + b * n_pieces + c
    assert fit["a"] > 0 and fit["mape"] >= 0
    predicted = [pred.predict(s, fill=False) for s in specs]
    assert all(p > 0 for p in predicted)
    assert kendall_tau(predicted, measured) >= 0.7  # floor: the right order up to ~1-2 swapped pairs of 15
