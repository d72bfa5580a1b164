"""HybridBench (bench/hybridbench.py): its code path on a tiny version (3 architectures of the
``tiny`` frame, 1 epoch, digits), and the committed table's schema and stratification."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import hybridbench as hb  # noqa: E402

from predictors.precision import activation_dtype, to_precision  # noqa: E402
from predictors.supernet import accuracy, evaluate_subnet, load_checkpoint  # noqa: E402
from predictors.zero_cost import ALL_PROXIES, compute  # noqa: E402
from search_spaces.counting import count_params  # noqa: E402
from search_spaces.hybrid_vit import build  # noqa: E402
from search_spaces.spec import ArchSpec  # noqa: E402
from workers.evaluate import Split  # noqa: E402

TABLE = ROOT / "bench" / "data" / "hybridbench_c10_v1.csv"
ARCHS = ROOT / "bench" / "data" / "hybridbench_archs.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[str]]:
    """Runs every phase once on the tiny version; the tests below check what it left."""
    d = tmp_path_factory.mktemp("hybridbench")
    archs, cache, table = d / "archs.json", d / "cache", d / "table.csv"
    common = ["--archs", str(archs), "--cache", str(cache), "--data", "digits", "--train-limit", "300",
              "--test-limit", "200", "--curve-limit", "100", "--epochs", "1", "--batch", "32", "--workers", "1",
              "--seeds", "0,1", "--second-seed-n", "1"]
    hb.main(["sample", "--frame", "tiny", "--n", "3", "--archs", str(archs)])
    hb.main(["train", *common])
    hb.main(["proxies", *common])
    hb.main(["latency", *common, "--repeats", "3"])
    hb.main(["supernet", *common, "--supernet-epochs", "1", "--threads", "1"])
    hb.main(["fewshot", *common, "--supernet-epochs", "1", "--variant", "fewshot1", "--few-shot-epochs", "1"])
    hb.main(["table", *common, "--out", str(table)])
    return {"archs": archs, "cache": cache, "table": table, "common": common}


def _args(tiny: dict) -> object:  # type: ignore[type-arg]
    import argparse

    ns = argparse.Namespace(data="digits", train_limit=300, test_limit=200, curve_limit=100, epochs=1, batch=32,
                            lr=2e-3)
    return ns


def test_tiny_benchmark_trains_every_architecture_and_scores_it_on_the_test_split(tiny: dict) -> None:
    frame, specs, _ = hb.load_archs(tiny["archs"])
    assert len(specs) == 3 and len({s.hash for s in specs}) == 3
    r = hb.recipe_of(_args(tiny), frame)
    d = torch.load(hb.data_file(tiny["cache"], r), weights_only=False)
    assert len(d["train_x"]) == 300 and len(d["test_x"]) == 200
    files = sorted((tiny["cache"] / f"train_{r.digest()}").glob("*.json"))
    # three architectures with seed 0, the first also with seed 1
    assert len(files) == 4
    for s, seed in ((specs[0], 0), (specs[0], 1), (specs[1], 0), (specs[2], 0)):
        res = json.loads(hb.result_file(tiny["cache"], r, s.hash, seed).read_text())
        assert len(res["curve"]) == 1 and res["steps"] == 300 // 32
        # the stored accuracy is the saved weights' accuracy on the whole test split at the spec's precision
        model = build(s, num_classes=10, img_size=frame.img_size, in_chans=1)
        model.load_state_dict(torch.load(hb.weights_dir(tiny["cache"], r, seed) / f"{s.hash}.pt", weights_only=True))
        test = Split(d["test_x"], d["test_y"])
        assert res["test_acc_fp32"] == accuracy(model.eval(), test, batch_size=256)
        q = to_precision(model, s.precision, "cpu")
        assert res["test_acc"] == accuracy(q, test, batch_size=256, dtype=activation_dtype(s.precision))
    a = json.loads(hb.result_file(tiny["cache"], r, specs[0].hash, 0).read_text())
    b = json.loads(hb.result_file(tiny["cache"], r, specs[0].hash, 1).read_text())
    assert a["curve"] != b["curve"] or a["test_acc"] != b["test_acc"]  # another seed, another run


def test_tiny_benchmark_resumes_without_training_again(tiny: dict, capsys: pytest.CaptureFixture[str]) -> None:
    frame, _, _ = hb.load_archs(tiny["archs"])
    r = hb.recipe_of(_args(tiny), frame)
    files = sorted((tiny["cache"] / f"train_{r.digest()}").glob("*.json"))
    before = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    hb.main(["train", *tiny["common"]])
    assert "4/4 trainings cached; 0 to run" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_tiny_benchmark_continues_from_the_committed_runs_in_a_fresh_cache(
        tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [json.loads(line) for line in (tiny["table"].parent / "table_runs.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["seed"]) for r in runs) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    sup = json.loads((tiny["table"].parent / "table_supernet.json").read_text())
    assert list(sup) == ["base/ft0", "fewshot1/ft0"] and len(sup["base/ft0"]) == len(sup["fewshot1/ft0"]) == 3
    common = list(tiny["common"])
    common[common.index("--cache") + 1] = str(tmp_path / "fresh")
    capsys.readouterr()
    hb.main(["train", *common, "--out", str(tiny["table"])])
    out = capsys.readouterr().out
    assert "4 finished trainings taken from" in out and "4/4 trainings cached; 0 to run" in out
    frame, specs, _ = hb.load_archs(tiny["archs"])
    r = hb.recipe_of(_args(tiny), frame)
    assert json.loads(hb.result_file(tmp_path / "fresh", r, specs[1].hash, 0).read_text()) == \
        json.loads(hb.result_file(tiny["cache"], r, specs[1].hash, 0).read_text())


def test_tiny_benchmark_proxies_equal_a_direct_computation(tiny: dict) -> None:
    frame, specs, _ = hb.load_archs(tiny["archs"])
    r = hb.recipe_of(_args(tiny), frame)
    d = torch.load(hb.data_file(tiny["cache"], r), weights_only=False)
    idx = hb._balanced(d["train_y"], 64, seed=0)
    s = specs[1]
    model = build(s, num_classes=10, img_size=frame.img_size, in_chans=1, seed=0)
    names = [p for p in ALL_PROXIES if p not in ("params", "flops")]
    want = compute(model, d["train_x"][idx], d["train_y"][idx], names=names)
    got = json.loads(hb.proxy_file(tiny["cache"], r, s.hash).read_text())
    for p in names:
        assert got[f"zc_{p}"] == pytest.approx(want[p], rel=1e-6, nan_ok=True), p
    assert len(got["parzc_nodes"]) > 0 and len(got["parzc_nodes"][0]) == 9


def test_tiny_benchmark_supernet_accuracy_is_the_inherited_one(tiny: dict) -> None:
    frame, specs, _ = hb.load_archs(tiny["archs"])
    r = hb.recipe_of(_args(tiny), frame)
    d = torch.load(hb.data_file(tiny["cache"], r), weights_only=False)
    out = hb.supernet_dir(tiny["cache"], r, "base")
    net, _ = load_checkpoint(out)
    got = json.loads((out / "inherited_ft0.json").read_text())
    s = specs[2]
    want = evaluate_subnet(net.eval(), s, Split(d["test_x"], d["test_y"]), calib=Split(d["train_x"], d["train_y"]),
                           batch_size=256)
    assert got[s.hash] == want


def test_tiny_benchmark_few_shot_reads_each_architecture_from_its_own_sub_supernet(tiny: dict) -> None:
    """fewshot: one sub-supernet per first token mixer the architectures take, each started from the
    base supernet and trained on its part only; each architecture's value is its own sub-supernet's
    inherited accuracy, and the table keeps the variant."""
    frame, specs, _ = hb.load_archs(tiny["archs"])
    r = hb.recipe_of(_args(tiny), frame)
    d = torch.load(hb.data_file(tiny["cache"], r), weights_only=False)
    out = hb.supernet_dir(tiny["cache"], r, "fewshot1")
    got = json.loads((out / "inherited_ft0.json").read_text())
    assert set(got) == {s.hash for s in specs}
    firsts = {hb.first_token_mixer(s) for s in specs}
    assert {p.name for p in out.glob("split_*")} == {f"split_{t}" for t in firsts}
    base, _ = load_checkpoint(hb.supernet_dir(tiny["cache"], r, "base"))
    for s in specs:
        net, ckpt = load_checkpoint(out / f"split_{hb.first_token_mixer(s)}")
        assert ckpt["config"]["split_token_mixer"] == hb.first_token_mixer(s) and ckpt["epochs"] == 1
        assert ckpt["meta"]["few_shot_from"] == str(hb.supernet_dir(tiny["cache"], r, "base"))
        assert not all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), base.state_dict().values()))
        want = evaluate_subnet(net.eval(), s, Split(d["test_x"], d["test_y"]),
                               calib=Split(d["train_x"], d["train_y"]), batch_size=256)
        assert got[s.hash] == want
    sup = json.loads((tiny["table"].parent / "table_supernet.json").read_text())
    assert sup["fewshot1/ft0"] == got


def test_tiny_benchmark_table_has_one_complete_row_per_architecture(tiny: dict) -> None:
    with open(tiny["table"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == [0, 1, 2]
    for r in rows:
        for col in ("params", "flops", "lat_cpu_b1_ms", "lat_cpu_b64_ms", "zc_nwot", "zc_synflow", "test_acc_s0",
                    "test_acc_mean", "supernet_acc", "spec"):
            assert r[col] != "", (r["id"], col)
        assert 0.0 <= float(r["test_acc_s0"]) <= 1.0 and float(r["lat_cpu_b1_ms"]) > 0
    assert rows[0]["test_acc_s1"] != "" and rows[1]["test_acc_s1"] == "" == rows[2]["test_acc_s1"]
    s0, s1 = float(rows[0]["test_acc_s0"]), float(rows[0]["test_acc_s1"])
    assert float(rows[0]["test_acc_mean"]) == pytest.approx((s0 + s1) / 2, abs=1e-6)


# ---- the committed benchmark ------------------------------------------------------------------


def test_committed_architecture_list_is_stratified() -> None:
    frame, specs, doc = hb.load_archs(ARCHS)
    assert len(specs) >= 200 and len({s.hash for s in specs}) == len(specs)
    assert specs == hb.sample_archs(frame, doc["n"], doc["seed"])  # fixed by its seed
    used: Counter[str] = Counter()
    for s in specs:
        frame.check(s)
        used.update(set(hb.mixer_counts(s)))
    for m in (*frame.stages[0].token_mixers, *frame.stages[0].channel_mixers):
        assert used[m] >= 15, m
    for i, sf in enumerate(frame.stages):
        assert {s.stages[i].width for s in specs} == set(sf.widths)
        assert {s.stages[i].depth for s in specs} == set(range(1, sf.max_depth + 1))
    assert {s.precision for s in specs} == set(frame.precisions)


def test_committed_table_schema_and_values() -> None:
    frame, specs, _ = hb.load_archs(ARCHS)
    with TABLE.open() as f:
        rows = list(csv.DictReader(f))
    n = len(rows)
    assert n == 200  # complete since the fourth session
    # rows are the list's architectures in order (a prefix while the benchmark is being completed)
    assert [r["hash"] for r in rows] == [s.hash for s in specs[:n]]
    required = ["params", "flops", "lat_cpu_b1_ms", "lat_cpu_b64_ms", "test_acc_s0", "test_acc_mean",
                "test_acc_fp32_s0", "train_seconds_s0", "supernet_acc", "spec",
                *(f"zc_{p}" for p in ALL_PROXIES if p not in ("params", "flops"))]
    for r in rows:
        for col in required:
            assert r.get(col, "") != "", (r["id"], col)
        assert 0.1 <= float(r["test_acc_s0"]) <= 1.0
        assert 0 < float(r["lat_cpu_b1_ms"]) < float(r["lat_cpu_b64_ms"])  # a batch of 64 costs more than 1
        s = ArchSpec.from_dict(json.loads(r["spec"]))
        assert s.hash == r["hash"] and int(r["blocks"]) == sum(st.depth for st in s.stages)
        assert int(r["params"]) == count_params(build(s, num_classes=10, img_size=32, in_chans=3))
    # the first 40 architectures carry the second seed, and the mean is over the seeds
    for r in rows[:40]:
        s0, s1 = float(r["test_acc_s0"]), float(r["test_acc_s1"])
        assert float(r["test_acc_mean"]) == pytest.approx((s0 + s1) / 2, abs=1e-5)
    # stratified: each token mixer is used by at least 15 of every 200 rows (pro rata for a prefix)
    used: Counter[str] = Counter()
    for r in rows:
        used.update(m for m in (*frame.stages[0].token_mixers, *frame.stages[0].channel_mixers) if int(r[f"n_{m}"]))
    for m in (*frame.stages[0].token_mixers, *frame.stages[0].channel_mixers):
        assert used[m] >= 15 * n // 200, (m, used[m], n)
