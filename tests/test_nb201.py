"""NAS-Bench-201 space: strings, hashes, enumeration order, reference parameter counts, models."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from search_spaces.counting import count_params
from search_spaces.nb201 import (
    EDGES,
    OPS,
    NB201Space,
    NB201Spec,
    enumerate_specs,
    load_labels,
)

LABELS_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nb201_cifar10.csv"
needs_csv = pytest.mark.skipif(
    not LABELS_CSV.is_file(), reason=f"NB201 labels CSV not present at {LABELS_CSV} (shared data folder absent)"
)

ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
ALL_CONV3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
# genotypes.ResNet_CODE in the reference: node1 = conv(0), node2 = conv(1), node3 = skip(0) + skip(2)
RESNET = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
# the best cell of nb201_cifar10.csv (index 6111, 94.3733 %)
BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
EXAMPLE = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"

# Parameter counts from running the benchmark's own code (AutoDL-Projects, xautodl/models/
# cell_infers/tiny_network.py: TinyNetwork(C=16, N=5, Structure.str2structure(arch), 10),
# sum of p.numel() over parameters), outside this project.
REFERENCE_PARAMS = {
    ALL_NONE: 73_306,
    ALL_CONV3: 1_531_546,
    RESNET: 559_386,
    BEST: 1_073_466,
    "|nor_conv_1x1~0|+|nor_conv_1x1~0|nor_conv_1x1~1|+|nor_conv_1x1~0|nor_conv_1x1~1|nor_conv_1x1~2|": 241_306,
    "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|": 73_306,
    "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|": 73_306,
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|": 129_306,
    EXAMPLE: 802_426,
    "|nor_conv_1x1~0|+|nor_conv_3x3~0|none~1|+|avg_pool_3x3~0|skip_connect~1|nor_conv_1x1~2|": 372_346,
}



@pytest.fixture(scope="module")
def space() -> NB201Space:
    return NB201Space()


@pytest.fixture(scope="module")
def all_specs() -> list[NB201Spec]:
    return enumerate_specs()


# ------------------------------------------------------------------------------ strings, JSON


def test_constants() -> None:
    assert OPS == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    assert EDGES == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))


def test_string_round_trip_all(all_specs: list[NB201Spec]) -> None:
    assert len(all_specs) == 15_625 == len(set(all_specs))
    strings = [s.to_string() for s in all_specs]
    assert len(set(strings)) == 15_625
    for s, text in zip(all_specs, strings):
        assert NB201Spec.from_string(text) == s
        assert s.short() == text


def test_edge_order_in_string() -> None:
    s = NB201Spec.from_string(EXAMPLE)
    assert s.ops == ("nor_conv_3x3", "nor_conv_3x3", "avg_pool_3x3", "skip_connect", "nor_conv_3x3", "skip_connect")
    assert s.op(2, 1) == "avg_pool_3x3" and s.op(3, 2) == "skip_connect"


def test_json_round_trip_and_hash(space: NB201Space) -> None:
    s = NB201Spec.from_string(EXAMPLE)
    assert s.to_dict() == {"space": "nb201", "version": 1, "arch": EXAMPLE}
    assert s.to_json() == '{"arch":"' + EXAMPLE + '","space":"nb201","version":1}'
    assert NB201Spec.from_json(s.to_json()) == s
    assert space.spec_from_json(s.to_json()) == s
    assert space.spec_from_dict(json.loads(s.to_json())) == s
    # computed once; must never change (it is the architecture's identity in every store)
    assert s.hash == "714aa711c4cdb07e9c9b8d0a19fb63ca28225fd30d2f1faee90f004bc638909b"
    assert NB201Spec(tuple(s.ops)).hash == s.hash
    assert NB201Spec.from_string(ALL_NONE).hash != s.hash


def test_list_ops_coerced_to_tuple() -> None:
    s = NB201Spec(["none"] * 6)  # type: ignore[arg-type]
    assert s.ops == ("none",) * 6 and hash(s) == hash(NB201Spec(("none",) * 6))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "|nor_conv_3x3~0|",
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|",
        EXAMPLE + "+|none~0|",
        EXAMPLE.replace("avg_pool_3x3~1", "avg_pool_3x3~2"),  # wrong source node
        EXAMPLE.replace("avg_pool_3x3", "max_pool_3x3"),  # op outside NB201
        EXAMPLE.replace("|skip_connect~2|", "|skip_connect2|"),  # missing "~"
        EXAMPLE.replace("|+|", "+"),  # missing bars
        EXAMPLE[:-1],  # trailing bar missing
        " " + EXAMPLE,
        EXAMPLE.replace("|nor_conv_3x3~0|+", "|nor_conv_3x3~0|none~1|+", 1),  # extra input on node 1
        "|nor_conv_3x3~0|+|avg_pool_3x3~1|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
    ],
)
def test_invalid_strings_rejected(text: str) -> None:
    with pytest.raises(ValueError) as info:
        NB201Spec.from_string(text)
    assert "\n" not in str(info.value)


def test_invalid_specs_rejected() -> None:
    for bad in [("none",) * 5, ("none",) * 7, ("none",) * 5 + ("conv",), "none" * 6, ("none",) * 5 + (3,)]:
        with pytest.raises(ValueError) as info:
            NB201Spec(bad)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="must be a string"):
        NB201Spec.from_string(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        {"space": "hybrid_vit", "version": 1, "arch": EXAMPLE},
        {"space": "nb201", "version": 2, "arch": EXAMPLE},
        {"space": "nb201", "version": True, "arch": EXAMPLE},
        {"space": "nb201", "version": 1, "arch": EXAMPLE, "extra": 0},
        {"space": "nb201", "arch": EXAMPLE},
        {"space": "nb201", "version": 1, "arch": "|none~0|"},
        [EXAMPLE],
    ],
)
def test_from_dict_strict(data: object, space: NB201Space) -> None:
    with pytest.raises(ValueError):
        NB201Spec.from_dict(data)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        space.spec_from_json(json.dumps(data))


def test_from_json_rejects_bad_json() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        NB201Spec.from_json("{arch: 1")


# ------------------------------------------------------------------------------- enumeration


def test_enumeration_is_shuffled_product(all_specs: list[NB201Spec]) -> None:
    # the benchmark: CellStructure.gen_all (product over edges, ops in OPS order), then
    # random.seed(88); random.shuffle(archs); generate_meta_info asserts archs 0, 9 and 123.
    assert set(all_specs) == {NB201Spec(ops) for ops in itertools.product(OPS, repeat=6)}
    product = [NB201Spec(ops) for ops in itertools.product(OPS, repeat=6)]
    random.Random(88).shuffle(product)
    assert product == all_specs
    assert all_specs[0].to_string() == (
        "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"
    )
    assert all_specs[9].to_string() == "|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    assert all_specs[123].to_string() == (
        "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|"
    )
    assert enumerate_specs() is not enumerate_specs()  # callers get their own list


@needs_csv
def test_enumeration_matches_benchmark_csv(all_specs: list[NB201Spec]) -> None:
    import csv

    with LABELS_CSV.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == list(range(15_625))
    assert [r["arch"] for r in rows] == [s.to_string() for s in all_specs]


@needs_csv
def test_load_labels_shared_csv() -> None:
    labels = load_labels(LABELS_CSV)
    assert len(labels) == 15_625
    assert set(labels) == {s.to_string() for s in enumerate_specs()}
    assert max(labels, key=labels.__getitem__) == BEST
    assert labels[EXAMPLE] == pytest.approx(93.66)


def test_load_labels_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found") as info:
        load_labels(tmp_path / "missing.csv")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("index,architecture,acc\n0,x,1\n")
    with pytest.raises(ValueError, match="lacks the columns") as info2:
        load_labels(bad)
    assert "\n" not in str(info2.value)
    bad.write_text(f"index,arch,cifar10_test_acc\n0,{EXAMPLE},93.5\n1,|none~0|,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        load_labels(bad)
    bad.write_text(f"index,arch,cifar10_test_acc\n0,{EXAMPLE},93.5\n1,{EXAMPLE},1\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_labels(bad)
    good = tmp_path / "good.csv"
    good.write_text(f"index,arch,cifar10_test_acc\n0,{EXAMPLE},93.5\n1,{ALL_NONE},10.0\n")
    assert load_labels(good) == {EXAMPLE: 93.5, ALL_NONE: 10.0}


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", list(REFERENCE_PARAMS))
def test_params_match_reference(arch: str, space: NB201Space) -> None:
    assert count_params(space.build(NB201Spec.from_string(arch))) == REFERENCE_PARAMS[arch]


def test_params_range_matches_paper() -> None:
    # NB201 paper (CIFAR-10): parameters range over 0.073M - 1.531M (truncated, not rounded)
    low, high = min(REFERENCE_PARAMS.values()), max(REFERENCE_PARAMS.values())
    assert (low, high) == (REFERENCE_PARAMS[ALL_NONE], REFERENCE_PARAMS[ALL_CONV3])
    assert (low // 1000, high // 1000) == (73, 1531)


def test_describe(space: NB201Space) -> None:
    d = space.describe(NB201Spec.from_string(ALL_CONV3))
    assert d["space"] == "nb201" and d["arch"] == ALL_CONV3
    assert d["hash"] == NB201Spec.from_string(ALL_CONV3).hash
    assert d["params"] == 1_531_546
    # NB201 paper: FLOPs (its counter: multiply-adds of conv + linear) range 7.78M - 220.11M
    assert d["macs"] == d["flops"] // 2 and int(d["macs"] / 1e4) / 100 == 220.11
    assert int(space.describe(NB201Spec.from_string(ALL_NONE))["macs"] / 1e4) / 100 == 7.78
    assert [(s["name"], s["channels"], s["resolution"], s["cells"]) for s in d["stages"]] == [
        ("stage1", 16, 32, 5),
        ("stage2", 32, 16, 5),
        ("stage3", 64, 8, 5),
    ]
    json.dumps(d)
    d64 = space.describe(NB201Spec.from_string(ALL_CONV3), img_size=64, num_classes=100)
    assert d64["macs"] > 4 * d["macs"] - 10**6 and d64["stages"][2]["resolution"] == 16
    with pytest.raises(ValueError, match="multiple of 4"):
        space.describe(NB201Spec.from_string(ALL_NONE), img_size=30)


def test_model_layout(space: NB201Space) -> None:
    model = space.build(NB201Spec.from_string(RESNET))
    names = set(model.state_dict())
    # module names as in the reference TinyNetwork (so its checkpoints load)
    for key in [
        "stem.0.weight",
        "stem.1.running_mean",
        "cells.0.layers.0.op.1.weight",  # edge 0->1, conv3x3
        "cells.0.layers.2.op.2.weight",  # edge 1->2, BN of the conv
        "cells.5.conv_a.op.1.weight",
        "cells.5.conv_b.op.2.bias",
        "cells.5.downsample.1.weight",
        "cells.11.downsample.1.weight",
        "lastact.0.weight",
        "classifier.bias",
    ]:
        assert key in names, key
    assert not any(k.startswith("cells.0.layers.1.") for k in names)  # "none" has no parameters
    assert len(model.cells) == 17
    assert model.stem[0].bias is None and model.cells[0].layers[0].op[1].bias is None


def test_build_is_deterministic(space: NB201Space) -> None:
    spec = NB201Spec.from_string(BEST)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = space.build(spec)
    after = torch.rand(1)
    b = space.build(spec, img_size=64)  # img_size is ignored
    assert torch.equal(before, after)  # global RNG untouched
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(TypeError):
        space.build(BEST)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        space.build(spec, num_classes=0)


def test_forward_random_cells(space: NB201Space) -> None:
    x = torch.randn(2, 3, 32, 32)
    seen = set()
    for seed in range(20):
        spec = space.random(seed)
        seen.add(spec)
        model = space.build(spec)
        with torch.no_grad():
            out = model(x)
            feats = model.forward_features(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert feats.shape == (2, 64, 8, 8)
        assert torch.equal(model.forward_head(feats), out)
    assert len(seen) > 15
    assert space.build(space.random(0), num_classes=100)(x).shape == (2, 100)


def test_all_none_ignores_input(space: NB201Space) -> None:
    model = space.build(NB201Spec.from_string(ALL_NONE))
    x1, x2 = torch.randn(3, 3, 32, 32), 5 * torch.randn(3, 3, 32, 32)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            y1, y2 = model(x1), model(x2)
        assert torch.equal(y1, y2)
        assert torch.equal(y1, model.classifier.bias.expand(3, 10))
    # a node whose inputs are all "none" is an exact zero tensor, not missing
    cell = model.cells[0]
    assert torch.equal(cell(torch.randn(1, 16, 8, 8)), torch.zeros(1, 16, 8, 8))


def test_sample_with_optuna(space: NB201Space) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    spec = space.sample(trial)
    assert isinstance(spec, NB201Spec)
    assert list(trial.params) == ["cell.e1_0", "cell.e2_0", "cell.e2_1", "cell.e3_0", "cell.e3_1", "cell.e3_2"]
    assert tuple(trial.params.values()) == spec.ops
    assert NB201Spec.from_string(spec.to_string()) == spec


def test_random_is_seeded(space: NB201Space) -> None:
    assert space.random(3) == space.random(3)
    assert isinstance(space.random(3), NB201Spec)
    assert NB201Space.name == "nb201"
    assert (NB201Space.default_img_size, NB201Space.default_num_classes) == (32, 10)
