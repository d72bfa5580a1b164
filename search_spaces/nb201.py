"""The NAS-Bench-201 cell search space (15,625 architectures).

Dong & Yang, "NAS-Bench-201: Extending the Scope of Reproducible Neural Architecture Search",
ICLR 2020. The macro skeleton is fixed: a 3x3 conv stem, three stages of N=5 identical cells
at C=16, 32, 64 channels separated by ResNet basic-block reductions, then BN-ReLU, global
average pooling and a linear classifier. A cell is a DAG of 4 nodes: node j is the sum over
i < j of op_{j,i}(node i), node 3 is the output, and each of the 6 edges picks one of 5 ops.

An architecture is written as in the benchmark,
``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` (node 1, node 2, node 3; ``op~i`` = edge from node i).

The network here reproduces the benchmark's ``TinyNetwork`` (AutoDL-Projects,
``xautodl/models/cell_infers/tiny_network.py``): same ops, same parameter counts, same module
names (so the benchmark's state dicts load), and, built under the same seed, the same initial
weights. One difference: ``forward`` returns the logits only (the reference returns
``(pooled_features, logits)``).
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search_spaces._space import SearchSpace, Trial, register_space
from search_spaces.counting import count_flops, count_params
from search_spaces.spec import canonical_json, spec_hash

__all__ = [
    "EDGES",
    "OPS",
    "NB201Frame",
    "NB201Network",
    "NB201Space",
    "NB201Spec",
    "enumerate_specs",
    "load_labels",
    "nb201_flops",
    "nb201_mean_flops",
    "nb201_params",
]

SPACE = "nb201"
VERSION = 1

# The benchmark's op list, in its order (cell_operations.NAS_BENCH_201); the enumeration
# order of the benchmark index depends on it.
OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NUM_NODES = 4
# (to, from) for each edge, in the order the arch string lists them.
EDGES: tuple[tuple[int, int], ...] = tuple((j, i) for j in range(1, NUM_NODES) for i in range(j))

C_STEM = 16  # channels of stage 1 (then 32, 64)
CELLS_PER_STAGE = 5
NUM_STAGES = 3
_BENCHMARK_SHUFFLE_SEED = 88  # exps/NAS-Bench-201/main.py: generate_meta_info


# --------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class NB201Spec:
    """One NAS-Bench-201 cell: the op on each of the 6 edges, in arch-string order (``EDGES``)."""

    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        ops = self.ops
        if isinstance(ops, str) or not isinstance(ops, (tuple, list)):
            raise ValueError(f"NB201Spec.ops must be a tuple of {len(EDGES)} op names, got {type(ops).__name__}")
        if len(ops) != len(EDGES):
            raise ValueError(f"NB201Spec needs {len(EDGES)} ops (one per edge), got {len(ops)}")
        for (to, frm), op in zip(EDGES, ops):
            if not isinstance(op, str) or op not in OPS:
                raise ValueError(f"unknown NB201 op {op!r} on edge {frm}->{to}; choose one of: {', '.join(OPS)}")
        if isinstance(ops, list):
            object.__setattr__(self, "ops", tuple(ops))

    # -- strings

    @classmethod
    def from_string(cls, s: str) -> NB201Spec:
        """Parse the benchmark's arch string, e.g. ``|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...|``."""
        if not isinstance(s, str):
            raise ValueError(f"an NB201 arch must be a string, got {type(s).__name__}")
        hint = "expected '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'"
        nodes = s.split("+")
        if len(nodes) != NUM_NODES - 1:
            raise ValueError(f"malformed NB201 arch {s!r}: {len(nodes)} nodes, {hint}")
        ops: list[str] = []
        for j, node in enumerate(nodes, start=1):
            if len(node) < 2 or node[0] != "|" or node[-1] != "|":
                raise ValueError(f"malformed NB201 arch {s!r}: node {j} is {node!r}, {hint}")
            tokens = node[1:-1].split("|")
            if len(tokens) != j:
                raise ValueError(f"malformed NB201 arch {s!r}: node {j} needs {j} inputs, {hint}")
            for i, token in enumerate(tokens):
                op, sep, src = token.partition("~")
                if not sep or src != str(i):
                    raise ValueError(f"malformed NB201 arch {s!r}: node {j} input {token!r}, {hint}")
                if op not in OPS:
                    raise ValueError(f"unknown NB201 op {op!r} in arch {s!r}; choose one of: {', '.join(OPS)}")
                ops.append(op)
        return cls(tuple(ops))

    def to_string(self) -> str:
        """The benchmark's arch string (exact inverse of ``from_string``)."""
        nodes = []
        for j in range(1, NUM_NODES):
            tokens = [f"{self.op(j, i)}~{i}" for i in range(j)]
            nodes.append("|" + "|".join(tokens) + "|")
        return "+".join(nodes)

    def op(self, to: int, frm: int) -> str:
        """The op on the edge ``frm -> to``."""
        return self.ops[EDGES.index((to, frm))]

    def short(self) -> str:
        return self.to_string()

    def __str__(self) -> str:
        return self.to_string()

    # -- JSON

    def to_dict(self) -> dict[str, Any]:
        return {"space": SPACE, "version": VERSION, "arch": self.to_string()}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NB201Spec:
        """Strict: exactly the keys space, version, arch; space must be "nb201"."""
        if not isinstance(data, dict):
            raise ValueError(f"an NB201 spec must be a JSON object, got {type(data).__name__}")
        keys = {"space", "version", "arch"}
        unknown = sorted(set(data) - keys)
        if unknown:
            raise ValueError(
                f"unknown keys in NB201 spec: {', '.join(map(str, unknown))} (allowed: arch, space, version)"
            )
        missing = sorted(keys - set(data))
        if missing:
            raise ValueError(f"NB201 spec is missing: {', '.join(missing)}")
        if data["space"] != SPACE:
            raise ValueError(f"spec is for space {data['space']!r}, not {SPACE!r}")
        version = data["version"]
        if isinstance(version, bool) or version != VERSION:
            raise ValueError(f"unsupported NB201 spec version {version!r} (this code reads version {VERSION})")
        return cls.from_string(data["arch"])

    @classmethod
    def from_json(cls, text: str) -> NB201Spec:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"NB201 spec is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("NB201 spec JSON is nested too deeply") from None
        return cls.from_dict(data)

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON: the architecture's identity everywhere."""
        return spec_hash(self.to_json())


def _benchmark_shuffle(items: list[Any], seed: int) -> None:
    """Fisher-Yates exactly as CPython's ``random.Random(seed).shuffle`` (with getrandbits).

    Spelled out so the benchmark order does not depend on ``random.shuffle`` staying the same
    across Python versions (only ``random()`` is guaranteed to)."""
    rng = random.Random(seed)
    for i in reversed(range(1, len(items))):
        n = i + 1
        k = n.bit_length()
        j = rng.getrandbits(k)
        while j >= n:
            j = rng.getrandbits(k)
        items[i], items[j] = items[j], items[i]


@lru_cache(maxsize=1)
def _enumerated() -> tuple[NB201Spec, ...]:
    # The benchmark builds all cells with CellStructure.gen_all (a product over the edges in
    # string order, last edge fastest, ops in OPS order), then random.seed(88); shuffle.
    specs = [NB201Spec(ops) for ops in itertools.product(OPS, repeat=len(EDGES))]
    _benchmark_shuffle(specs, _BENCHMARK_SHUFFLE_SEED)
    return tuple(specs)


def enumerate_specs() -> list[NB201Spec]:
    """All 15,625 cells, in the benchmark's index order (list index == benchmark arch index)."""
    return list(_enumerated())


# -------------------------------------------------------------------------------------- model


class _ReLUConvBN(nn.Module):
    """ReLU - Conv (no bias) - BN(affine, running stats); the benchmark's ReLUConvBN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        # nested as ``.op`` so parameter names match the reference (``layers.k.op.1.weight``)
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out, affine=True, track_running_stats=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _Zero(nn.Module):
    """The "none" op: multiplies by 0 (as the reference does), so it still returns a tensor of
    the input's shape, propagates NaN/inf like the reference, and has no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def _make_op(name: str, channels: int) -> nn.Module:
    if name == "none":
        return _Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return _ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return _ReLUConvBN(channels, channels, 3)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"unknown NB201 op {name!r}; choose one of: {', '.join(OPS)}")


class NB201Cell(nn.Module):
    """A 4-node cell: node j = sum_{i<j} op_{j,i}(node i); returns node 3.

    Every edge is computed, "none" included (its output is an exact zero tensor), so a node
    whose inputs are all "none" is a zero tensor, as in the reference; nothing is pruned."""

    def __init__(self, spec: NB201Spec, channels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_make_op(op, channels) for op in spec.ops)
        self.arch = spec.to_string()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        acc = x
        for k, (to, frm) in enumerate(EDGES):  # grouped by target node, sources ascending
            out = self.layers[k](nodes[frm])
            acc = out if frm == 0 else acc + out
            if frm == to - 1:  # last input of node ``to``: the node is complete
                nodes.append(acc)
        return nodes[-1]

    def extra_repr(self) -> str:
        return f"arch={self.arch}"


class NB201Reduction(nn.Module):
    """ResNet basic block with stride 2 between stages (the benchmark's ResNetBasicblock):
    ReLU-Conv3x3/2-BN, ReLU-Conv3x3-BN, shortcut AvgPool2d(2, 2) + Conv1x1 (no bias, no BN)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = _ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = _ReLUConvBN(c_out, c_out, 3, stride=1)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """The NAS-Bench-201 network for one cell (the benchmark's TinyNetwork with C=16, N=5).

    Module names follow the reference (``stem``, ``cells``, ``lastact``, ``classifier``); modules
    are created in the reference's order, so under the same seed the initial weights match."""

    def __init__(
        self,
        spec: NB201Spec,
        *,
        num_classes: int = 10,
        channels: int = C_STEM,
        cells_per_stage: int = CELLS_PER_STAGE,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.cells = nn.ModuleList()
        c_prev = channels
        for stage in range(NUM_STAGES):
            c = channels * 2**stage
            if stage > 0:
                self.cells.append(NB201Reduction(c_prev, c))
            for _ in range(cells_per_stage):
                self.cells.append(NB201Cell(spec, c))
            c_prev = c
        self.num_features = c_prev
        self.lastact = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 64, H/4, W/4), after the final BN-ReLU."""
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.lastact(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pooling(x).flatten(1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -------------------------------------------------------------------------------------- space


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_space(SPACE)
class NB201Space(SearchSpace):
    """NAS-Bench-201: one cell (6 edges x 5 ops) repeated in a fixed ResNet-like skeleton."""

    default_img_size = 32
    default_num_classes = 10

    def sample(self, trial: Trial) -> NB201Spec:
        """Define-by-run: one categorical per edge, named ``cell.e{to}_{from}`` (``cell.e1_0``...)."""
        ops = [trial.suggest_categorical(f"cell.e{to}_{frm}", OPS) for to, frm in EDGES]
        return NB201Spec(tuple(ops))

    def build(self, spec: NB201Spec, num_classes: int | None = None, img_size: int | None = None) -> nn.Module:
        """A freshly initialised NB201Network (same weights every call); ``img_size`` is ignored
        (the network is fully convolutional up to global pooling)."""
        if not isinstance(spec, NB201Spec):
            raise TypeError(f"NB201Space.build takes an NB201Spec, got {type(spec).__name__}")
        n = _check_positive("num_classes", self.default_num_classes if num_classes is None else num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return NB201Network(spec, num_classes=n)

    def spec_from_json(self, text: str) -> NB201Spec:
        return NB201Spec.from_json(text)

    def spec_from_dict(self, data: dict[str, Any]) -> NB201Spec:
        return NB201Spec.from_dict(data)

    def describe(self, spec: NB201Spec, img_size: int | None = None, num_classes: int | None = None) -> dict[str, Any]:
        """Parameters, FLOPs (torch's counter: 2 per multiply-add) at 1x3xHxW, per-stage table."""
        size = _check_positive("img_size", self.default_img_size if img_size is None else img_size)
        if size % 4:
            raise ValueError(f"img_size must be a multiple of 4 for NB201 (two stride-2 reductions), got {size}")
        model = self.build(spec, num_classes=num_classes)
        flops = count_flops(model, (1, 3, size, size))
        stages = [
            {
                "name": f"stage{s + 1}",
                "channels": C_STEM * 2**s,
                "resolution": size // 2**s,
                "cells": CELLS_PER_STAGE,
            }
            for s in range(NUM_STAGES)
        ]
        return {
            "space": SPACE,
            "hash": spec.hash,
            "arch": spec.to_string(),
            "short": spec.short(),
            "img_size": size,
            "num_classes": model.num_classes,
            "params": count_params(model),
            "flops": flops,
            "macs": flops // 2,
            "stages": stages,
        }


# ------------------------------------------------------------------------------------- labels


class LabelsNotFoundError(FileNotFoundError, ValueError):
    """The labels file does not exist (also a ValueError: bad input to the user)."""


def load_labels(path: str | Path, column: str = "cifar10_test_acc") -> dict[str, float]:
    """Read a CSV with columns ``arch`` and ``column`` (e.g. index,arch,cifar10_test_acc).

    Returns arch string -> accuracy; every arch is validated; duplicates are an error."""
    p = Path(path)
    if not p.is_file():
        raise LabelsNotFoundError(f"NB201 labels file not found: {p} (expected a CSV with columns arch,{column})")
    labels: dict[str, float] = {}
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if "arch" not in header or column not in header:
            raise ValueError(f"{p}: header {','.join(header) or '(empty)'} lacks the columns arch and {column}")
        for row in reader:
            line = reader.line_num
            try:
                arch = NB201Spec.from_string(row["arch"] or "").to_string()
                value = float(row[column] or "")
            except ValueError as exc:
                raise ValueError(f"{p}:{line}: {exc}") from None
            if arch in labels:
                raise ValueError(f"{p}:{line}: duplicate arch {arch}")
            labels[arch] = value
    return labels


# ------------------------------------------------------------------------- FLOPs, frame


@lru_cache(maxsize=8)
def _terms(num_classes: int, img_size: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """FLOPs and parameters as (all-``none`` cell network, extra per 1x1 conv edge, extra per 3x3
    conv edge). Torch's FLOP counter counts convolutions and matmuls only, pooling and skip edges
    have no parameters, and every edge of a cell works at the same channels and resolution, so
    both are exactly linear in a cell's number of conv edges (``test_nb201_flops_formula_equals_the_counter``)."""
    shape = (1, 3, img_size, img_size)

    def count(ops: tuple[str, ...]) -> tuple[int, int]:
        with torch.device("meta"):
            model = NB201Network(NB201Spec(ops), num_classes=num_classes)
        return count_flops(model, shape), count_params(model)

    none = ("none",) * (len(EDGES) - 1)
    base, one, three = count(("none", *none)), count(("nor_conv_1x1", *none)), count(("nor_conv_3x3", *none))
    return ((base[0], one[0] - base[0], three[0] - base[0]), (base[1], one[1] - base[1], three[1] - base[1]))


def nb201_flops(spec: NB201Spec, num_classes: int = 10, img_size: int = 32) -> int:
    """Forward FLOPs of ``spec``'s network at 1x3xHxW (torch's counter: 2 per multiply-add),
    from the linear formula of :func:`_terms` (no model is built)."""
    base, one, three = _terms(num_classes, img_size)[0]
    return base + one * spec.ops.count("nor_conv_1x1") + three * spec.ops.count("nor_conv_3x3")


def nb201_params(spec: NB201Spec, num_classes: int = 10) -> int:
    """Parameters of ``spec``'s network, from the linear formula of :func:`_terms`."""
    base, one, three = _terms(num_classes, 32)[1]
    return base + one * spec.ops.count("nor_conv_1x1") + three * spec.ops.count("nor_conv_3x3")


def nb201_mean_flops(num_classes: int = 10, img_size: int = 32) -> float:
    """The mean of :func:`nb201_flops` over all 15,625 cells (each edge takes each op equally often)."""
    base, one, three = _terms(num_classes, img_size)[0]
    return base + len(EDGES) * (one + three) / len(OPS)


@dataclass(frozen=True)
class NB201Frame:
    """The search's view of the NB201 space (what ``nas search`` samples from): the same
    interface as a hybrid_vit supernet frame where a search needs one (``sample``, ``largest``,
    ``to_dict``), for the fixed CIFAR-sized skeleton."""

    num_classes: int = 10
    img_size: int = 32
    in_chans: int = 3
    space: str = SPACE

    def sample(self, trial: Trial) -> NB201Spec:
        return NB201Space().sample(trial)

    def largest(self, rng: random.Random | None = None) -> NB201Spec:
        return NB201Spec(("nor_conv_3x3",) * len(EDGES))

    def smallest(self, rng: random.Random | None = None) -> NB201Spec:
        return NB201Spec(("none",) * len(EDGES))

    def to_dict(self) -> dict[str, Any]:
        return {"space": SPACE, "num_classes": self.num_classes, "img_size": self.img_size, "in_chans": self.in_chans}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NB201Frame:
        if data.get("space") != SPACE:
            raise ValueError(f"not an NB201 frame: {data.get('space')!r}")
        return cls(num_classes=int(data["num_classes"]), img_size=int(data["img_size"]),
                   in_chans=int(data.get("in_chans", 3)))
