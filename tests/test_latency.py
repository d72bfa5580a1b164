"""predictors.latency: fingerprint without NVML, measure() on CPU, piece keys vs the network, and the
lookup-table predictor (round trip, refusal of foreign tables, ranking of CPU models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
from search_spaces import get_space
from search_spaces.hybrid_vit import build
from search_spaces.spec import ArchSpec, HeadSpec, StageSpec, StemSpec


def _vit(depth: int, width: int, heads: int = 2) -> ArchSpec:
    return ArchSpec(stem=StemSpec("patch", 4), stages=(StageSpec(depth=depth, width=width, heads=heads),),
                    head=HeadSpec(pool="avg"))


def test_cpu_fingerprint_is_stable_and_keyed_by_threads() -> None:
    a, b = device_fingerprint("cpu", threads=1), device_fingerprint("cpu", threads=1)
    assert a == b and a["kind"] == "cpu" and a["torch_threads"] == 1
    assert {"name", "cores", "isa", "torch"} <= set(a) and len(a["key"]) == 16
    assert device_fingerprint("cpu", threads=2)["key"] != a["key"]


def test_fingerprint_without_gpu_or_nvml_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fp = device_fingerprint("cuda")
    assert fp["kind"] == "cpu" and fp["requested"] == "cuda"
    assert device_fingerprint("not-a-device")["kind"] == "cpu"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    assert L._nvml_fields(torch.device("cuda", 0)) == {}


def test_measure_cpu_figures_are_sane_and_the_model_untouched() -> None:
    model = build(_vit(2, 64), 10, 32).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    r = measure(model, (3, 32, 32), "cpu", batch_size=4, warmup=2, repeats=7, threads=1)
    assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.cv >= 0 and r.mean_ms > 0
    assert r.repeats == 7 and r.warmup >= 2 and r.input_shape == (4, 3, 32, 32) and r.batch_size == 4
    assert r.threads == 1 and torch.get_num_threads() == threads
    assert r.peak_mem_mb is not None and r.peak_mem_mb >= 0
    assert r.fingerprint["key"] == device_fingerprint("cpu", threads=1)["key"]
    assert r.throughput == pytest.approx(4 / (r.median_ms / 1e3))
    assert json.loads(json.dumps(r.to_dict()))["precision"] == "fp32"
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_bigger_model_of_the_same_family_is_slower() -> None:
    small = measure(build(_vit(1, 32), 10, 32), (3, 32, 32), batch_size=8, warmup=3, repeats=10, threads=1)
    big = measure(build(_vit(6, 192), 10, 32), (3, 32, 32), batch_size=8, warmup=3, repeats=10, threads=1)
    assert big.median_ms > 2 * small.median_ms


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "cuda"}, "--device cpu"),
    ({"input_shape": (3, 32)}, "input_shape must be"),
    ({"precision": "fp8"}, "compute capability"),
    ({"input_shape": (2, 3, 32, 32), "batch_size": 4}, "has batch 2"),
    ({"cuda_graph": True}, "cuda_graph needs a cuda device"),
])
def test_measure_bad_input(kwargs: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = {"input_shape": (3, 32, 32), **kwargs}
    with pytest.raises(LatencyError, match=message):
        measure(build(_vit(1, 32), 10, 32), **args)


def test_piece_keys_match_the_pieces_of_the_network() -> None:
    space = get_space("hybrid_vit")
    x = torch.randn(2, 3, 32, 32)
    for seed in range(12):
        spec = space.random(seed).with_precision("fp32")
        keys = piece_keys(spec, 32, 2, "fp32", num_classes=10)
        with torch.no_grad():
            pieces = build(spec, 10, 32).eval().pieces(x)
        assert len(keys) == len(pieces), spec.short()
        assert [k["in"] for k in keys] == [list(args[0].shape) for _, _, args in pieces], spec.short()
        assert keys[0]["op"] == "stem" and keys[-1]["op"] == "head"


def test_pieces_in_place_add_up_to_the_whole_model() -> None:
    model = build(get_space("hybrid_vit").random(3), 10, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        pieces = model.pieces(x)
    parts = time_pieces([(fn, len(a)) for _, fn, a in pieces], x, "cpu", warmup=3, repeats=10, threads=1)
    whole, _ = time_callable(lambda: model(x), "cpu", warmup=3, repeats=10, threads=1)
    assert len(parts) == len(pieces) and all(p > 0 for p in parts)
    assert 0.5 < sum(parts) / float(np.median(whole)) < 1.5  # loose: a noisy shared CPU


@pytest.fixture(scope="module")
def table() -> tuple[LatencyPredictor, list[ArchSpec], list[float]]:
    specs = [_vit(d, w) for d, w in ((1, 32), (1, 64), (2, 96), (3, 128), (4, 192), (6, 256))]
    pred = build_lut("hybrid_vit", "cpu", "fp32", 32, 4, specs=specs, threads=1, warmup=2, repeats=5,
                     min_time_s=0.0, num_classes=10)
    measured = [measure(build(s, 10, 32), (3, 32, 32), batch_size=4, warmup=3, repeats=10, threads=1).median_ms
                for s in specs]
    return pred, specs, measured


def test_table_holds_every_piece_once(table: tuple[LatencyPredictor, list[ArchSpec], list[float]]) -> None:
    pred, specs, _ = table
    assert pred.missing(specs) == []
    n_pieces = sum(len(pred.keys(s)) for s in specs)
    assert len(pred.table) < n_pieces  # identical blocks (and the shared stems/heads) share one entry
    # stem, block 0 (NCHW input from the stem), blocks 1-5 (NLC input: attention leaves tokens), head
    assert len(set(pred.keys(specs[-1]))) == 4
    assert all(v > 0 for v in pred.table.values())


def test_predictor_ranks_cpu_models(table: tuple[LatencyPredictor, list[ArchSpec], list[float]]) -> None:
    pred, specs, measured = table
    fit = pred.fit(specs, measured)
    assert fit["a"] > 0 and fit["mape"] >= 0
    predicted = [pred.predict(s) for s in specs]
    assert all(p > 0 for p in predicted)
    assert kendall_tau(predicted, measured) >= 0.7  # floor: 6 models spanning ~50x in latency


def test_save_load_round_trip_and_foreign_tables(table: tuple[LatencyPredictor, list[ArchSpec], list[float]],
                                                 tmp_path: Path) -> None:
    pred, specs, measured = table
    pred.fit(specs, measured)
    path = pred.save(tmp_path / pred.filename())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    back = LatencyPredictor.load(path, device="cpu")
    assert back.table == pred.table and back.calibration == pytest.approx(pred.calibration)
    assert [back.predict(s, fill=False) for s in specs] == pytest.approx([pred.predict(s) for s in specs])
    data = json.loads(path.read_text())
    data["fingerprint"]["key"] = "0" * 16
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    with pytest.raises(LatencyError, match="build one here"):
        LatencyPredictor.load(foreign, device="cpu")
    other = LatencyPredictor.load(foreign)  # readable, but it cannot add pieces on this machine
    assert not other.can_measure()
    with pytest.raises(LatencyError, match="not in this latency table"):
        other.predict(_vit(1, 48))
    (tmp_path / "junk.json").write_text('{"a": 1}')
    with pytest.raises(LatencyError, match="not a latency table"):
        LatencyPredictor.load(tmp_path / "junk.json")


def test_build_lut_rejects_other_spaces_and_unsupported_precisions() -> None:
    with pytest.raises(LatencyError, match="hybrid_vit"):
        build_lut("nb201", "cpu")
    with pytest.raises(LatencyError, match="compute capability"):
        build_lut("hybrid_vit", "cpu", "fp8", 32, 1, specs=[])
