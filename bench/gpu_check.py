"""GPU machine check: the first thing to run on a fresh GPU node; one table, one JSON file.

    python bench/gpu_check.py                                   # CUDA when visible: H100/H200 in <= 8 minutes
    .venv/bin/python bench/gpu_check.py --device cpu --quick    # the same code path on CPU, tiny sizes, < 1 minute

Sections, in the order they run (each guarded: a failure is recorded as one line and the next
section runs):

- ``fingerprint``: ``predictors.latency.device_fingerprint`` (NVML: GPU name, driver, clocks,
  power limit, memory, compute capability).
- ``numerics``: bf16, fp16 and fp8 against fp32 with the same weights (``predictors.precision``:
  the whole model cast for bf16/fp16, E4M3 ``torch._scaled_mm`` linears for fp8) on presets and
  random hybrid_vit specs: max abs and relative error of the logits, top-1 agreement. The weights
  are the initial ones (no trained weights ship), whose logits are small and close together, so
  top-1 agreement is a harsh test here, not a trained model's figure.
- ``export``: ``nas.export.generate`` writes the standalone file of a preset to a temp folder; a
  fresh interpreter that cannot import the project loads it, runs it on the device and compares
  with ``build(spec)`` (fp32; bf16 and fp8 too where the device runs them).
- ``latency_repeatability``: CV of 5 repeated ``measure`` medians of one model, eager and replaying
  a CUDA graph.
- ``mixer_step_time``: forward+backward of one ``ssm`` / ``gated_linear`` / ``ssd`` / ``hydra`` block against one
  ``attention`` block, interleaved in one run, at the token grids of a 224px image after a stride-4
  and a stride-16 stem; fp32 (as training runs) and bf16 autocast.
- ``supernet``: ``train_supernet`` steps per second on the ``small`` frame with random data.
- ``latency_predictor``: per-piece table + calibration (``build_lut``, ``fit``) on calibration
  archs, then predicted against measured on unseen archs (bf16, batch 64, 224px on a GPU): MAPE,
  share within +-5%. It runs last and stops adding archs at ``--time-limit``;
  ``--predictor-exclude`` leaves token mixers out of its archs (none by default).

Figures a CPU cannot give are the string ``"unmeasured (...)"``, never a number. Exit 0 when every
measured section succeeded, 1 otherwise, 2 on bad arguments. Imports only torch, numpy and the
project's ``search_spaces``, ``predictors`` and ``nas.export`` (none of Ray, Optuna, SQLAlchemy,
alembic), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictors.latency import (  # noqa: E402
    LatencyError,
    _run_timed,
    build_lut,
    device_fingerprint,
    measure,
    parse_device,
)
from predictors.precision import PrecisionError, activation_dtype, relative_error, to_precision  # noqa: E402
from predictors.supernet import TrainConfig, train_supernet  # noqa: E402
from search_spaces import get_space  # noqa: E402
from search_spaces.hybrid_vit import PRESETS, Block, build, init_weights  # noqa: E402
from search_spaces.registry import token_mixer_names  # noqa: E402
from search_spaces.spec import ArchSpec  # noqa: E402
from search_spaces.supernet import get_frame  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "gpu_check.json"
SECTIONS = ("fingerprint", "numerics", "export", "latency_repeatability", "mixer_step_time", "supernet",
            "latency_predictor")
HEAVY = ("ray", "optuna", "sqlalchemy", "alembic")  # must never be imported here (absent on the GPU image)
NUMERIC_PRECISIONS = ("bf16", "fp16", "fp8")

UNMEASURED_CUDA = "unmeasured (needs CUDA)"
UNMEASURED_FP8 = "unmeasured (needs sm_89+)"
UNMEASURED_NVML = "unmeasured (needs an NVIDIA GPU with NVML)"


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: ``FULL`` on a GPU, ``QUICK`` for ``--quick`` (any device)."""

    img: int
    num_classes: int
    numerics_batch: int
    numerics_random: int  # random hybrid_vit specs besides the presets
    export_batch: int
    rep_batch: int
    rep_warmup: int
    rep_repeats: int
    mix_batch: int
    mix_rounds: int
    mix_budget_s: float  # the section's allowance: fewer rounds when a step is slow
    sn_batch: int
    sn_steps: int
    lut_batch: int
    lut_calib: int
    lut_test: int
    piece_warmup: int
    piece_repeats: int
    piece_min_time_s: float
    whole_warmup: int
    whole_repeats: int
    time_limit_s: float


# batch 16 for the mixer blocks: on a GPU the ssm takes the plain parallel scan, whose (B, N, 2 dim, 16)
# states at 56x56 tokens are ~0.4 GB per tensor at batch 16, several times that over the backward
FULL = Sizes(img=224, num_classes=1000, numerics_batch=16, numerics_random=3, export_batch=4, rep_batch=64,
             rep_warmup=10, rep_repeats=50, mix_batch=16, mix_rounds=10, mix_budget_s=60.0, sn_batch=128,
             sn_steps=20, lut_batch=64, lut_calib=20, lut_test=100, piece_warmup=5, piece_repeats=20,
             piece_min_time_s=0.1, whole_warmup=10, whole_repeats=30, time_limit_s=450.0)
QUICK = Sizes(img=32, num_classes=1000, numerics_batch=4, numerics_random=2, export_batch=2, rep_batch=2,
              rep_warmup=3, rep_repeats=10, mix_batch=4, mix_rounds=5, mix_budget_s=10.0, sn_batch=8, sn_steps=3,
              lut_batch=2, lut_calib=6, lut_test=10, piece_warmup=2, piece_repeats=5, piece_min_time_s=0.0,
              whole_warmup=3, whole_repeats=5, time_limit_s=50.0)


@dataclass
class Ctx:
    """What every section gets: the device, the sizes and the run's deadline."""

    dev: torch.device
    sizes: Sizes
    threads: int | None  # CPU torch threads (None on a GPU)
    deadline: float  # time.perf_counter() value after which the predictor adds no more archs
    predictor_exclude: tuple[str, ...]
    seed: int

    @property
    def gpu(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def latency_precision(self) -> str:
        return "bf16" if self.gpu else "fp32"  # as bench/latency_predictor.py

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.dev)


class CheckError(RuntimeError):
    """A section measured something that is wrong (the message is the one line recorded)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions while a float32 reference is computed: cuDNN uses TF32
    for convolutions by default, which would make "fp32" carry a 1e-3 error of its own."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:300]


def _finite(v: float) -> float | str:
    """A JSON-safe number: non-finite values become strings (JSON has no NaN)."""
    return float(v) if math.isfinite(v) else f"non-finite ({v})"


def _cv(values: list[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(a.std() / a.mean()) if a.mean() > 0 else 0.0


def _kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b in numpy (predictors.metrics.kendall_tau needs scipy, absent on the GPU image)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denom = math.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    return float((dx * dy).sum() / denom) if denom else 0.0


def _convert(model: nn.Module, precision: str, ctx: Ctx) -> tuple[nn.Module | None, str]:
    """(``model`` at ``precision`` on the device, how); (None, "unmeasured (...)") where it cannot run.

    On a CPU without native bf16/fp16 kernels ``to_precision`` refuses (a latency there would be
    an emulation's); for numerics the cast is still meaningful, so it is done as to_precision
    does it and marked ``"cpu, not native"``."""
    try:
        return to_precision(model, precision, ctx.dev), "to_precision"
    except PrecisionError as e:
        if precision == "fp8":
            return None, UNMEASURED_FP8
        if not ctx.gpu and precision in ("bf16", "fp16"):
            return copy.deepcopy(model).eval().to(ctx.dev, activation_dtype(precision)), "cpu, not native"
        return None, f"unmeasured ({str(e).split(';')[0]})"


def _fp8_ok(ctx: Ctx) -> bool:
    try:
        to_precision(nn.Linear(16, 16), "fp8", ctx.dev)
        return True
    except PrecisionError:
        return False


# --------------------------------------------------------------------------------------------
# sections: each fills ``out`` (figures: numbers or strings; "details": anything) or raises
# --------------------------------------------------------------------------------------------


def check_fingerprint(ctx: Ctx, out: dict[str, Any]) -> None:
    """The device as NVML (or, on a CPU, /proc/cpuinfo) describes it."""
    fp = device_fingerprint(ctx.dev, threads=ctx.threads)
    out["details"] = fp
    out["name"], out["kind"], out["key"] = fp.get("name"), fp.get("kind"), fp.get("key")
    gpu_fields = ("driver", "memory_mb", "compute_capability", "sm_clock_mhz", "sm_clock_max_mhz",
                  "mem_clock_max_mhz", "power_limit_w")
    if not ctx.gpu:
        out.update({f: UNMEASURED_NVML for f in gpu_fields})
        out["cores"], out["isa"], out["torch_threads"] = fp.get("cores"), fp.get("isa"), fp.get("torch_threads")
        return
    missing = [f for f in gpu_fields if fp.get(f) is None]
    out.update({f: fp.get(f, "missing") for f in gpu_fields})
    out["cuda"] = fp.get("cuda")
    if missing:  # torch alone gives name, memory and compute capability; the rest is NVML's
        raise CheckError(f"NVML gave no {', '.join(missing)}: install nvidia-ml-py and check the driver library")


def _numeric_specs(ctx: Ctx) -> list[tuple[str, ArchSpec]]:
    space = get_space("hybrid_vit")
    specs = [(name, PRESETS[name]) for name in ("deit_tiny", "poolformer_s12", "hybrid_tiny")]
    specs += [(f"random_{ctx.seed + i}", space.random(ctx.seed + i)) for i in range(ctx.sizes.numerics_random)]
    return specs


def check_numerics(ctx: Ctx, out: dict[str, Any]) -> None:
    """Low-precision logits against the fp32 model with the same weights, on the same batch."""
    s = ctx.sizes
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    per: dict[str, list[dict[str, float]]] = {p: [] for p in NUMERIC_PRECISIONS}
    how: dict[str, str] = {}
    for name, spec in _numeric_specs(ctx):
        model = build(spec, s.num_classes, s.img).eval().to(ctx.dev)
        x = torch.randn(s.numerics_batch, 3, s.img, s.img, generator=torch.Generator().manual_seed(ctx.seed))
        with _exact_fp32(), torch.no_grad():
            ref = model(x.to(ctx.dev)).float()
        row: dict[str, Any] = {"arch": name, "hash": spec.hash[:12], "short": spec.short(),
                               "ref_logit_std": float(ref.std())}
        for p in NUMERIC_PRECISIONS:
            try:
                low, how[p] = _convert(model, p, ctx)
                if low is None:
                    row[p] = how[p]
                    continue
                with torch.no_grad():
                    y = low(x.to(ctx.dev, activation_dtype(p))).float()
                if not torch.isfinite(y).all():  # e.g. an fp16 overflow: a finding, not a figure
                    raise CheckError(f"non-finite logits at {p}")
                m = {"max_abs": float((y - ref).abs().max()), "rel": relative_error(y, ref),
                     "top1": float((y.argmax(-1) == ref.argmax(-1)).float().mean())}
                row[p] = {k: _finite(v) for k, v in m.items()}
                per[p].append(m)
                del low
            except Exception as e:  # one arch at one precision: recorded, the others still run
                row[p] = f"error: {_one_line(e)}"
                errors.append(f"{name} {p}: {_one_line(e)}")
        rows.append(row)
        del model
    out["archs"] = len(rows)
    for p in NUMERIC_PRECISIONS:
        ms = per[p]
        if not ms:
            for k in ("max_abs_err", "rel_err_max", "top1_agreement_min", "top1_agreement_mean"):
                out[f"{p}_{k}"] = how[p] if how.get(p, "").startswith("unmeasured") else "error (see details)"
            continue
        out[f"{p}_max_abs_err"] = _finite(max(m["max_abs"] for m in ms))
        out[f"{p}_rel_err_max"] = _finite(max(m["rel"] for m in ms))
        out[f"{p}_top1_agreement_min"] = min(m["top1"] for m in ms)
        out[f"{p}_top1_agreement_mean"] = float(np.mean([m["top1"] for m in ms]))
        out[f"{p}_how"] = how[p]
    out["details"] = {"batch": s.numerics_batch, "img_size": s.img, "num_classes": s.num_classes, "archs": rows}
    if errors:
        raise CheckError(f"{len(errors)} arch/precision case(s) failed; first: {errors[0]}")


# the fresh interpreter of the export check: the project is not importable there (sys.path holds the
# exported files' folder and the installed packages; a finder refuses the project's packages even if
# an editable install maps them), and timm is a stand-in, so the file shows it needs torch and math only
_EXPORT_CHILD = r"""
import importlib, importlib.abc, json, os, sys, types
tmp, device, root = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
sys.path = [tmp] + [p for p in sys.path if p and os.path.abspath(p) not in (root, tmp)]
PROJECT = ("search_spaces", "predictors", "nas", "workers")
class _NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError("the exported file must not import the project: " + name)
sys.meta_path.insert(0, _NoProject())
timm = types.ModuleType("timm"); timm.models = types.ModuleType("timm.models")
timm.models.register_model = lambda fn: fn
sys.modules["timm"], sys.modules["timm.models"] = timm, timm.models
import torch
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
ref = torch.load(os.path.join(tmp, "ref.pt"), weights_only=True)
x, out = ref["x"].to(device), {}
def run(module, precision, quantize=False):
    mod = importlib.import_module(module)
    model = mod.build_model(precision="fp32" if quantize else precision)
    model.load_state_dict(ref["state"], strict=True)
    model = model.eval().to(device)
    if quantize:
        model = mod.to_precision(model)
    dtype = {"bf16": torch.bfloat16, "fp8": torch.bfloat16}.get(precision, torch.float32)
    with torch.no_grad():
        y = model(x.to(dtype)).float().cpu()
    want = ref[precision]
    return {"max_abs": (y - want).abs().max().item(),
            "rel": ((y - want).norm() / want.norm().clamp_min(1e-12)).item()}
out["fp32"] = run("gpu_check_fp32", "fp32")
if "bf16" in ref:
    out["bf16"] = run("gpu_check_fp32", "bf16")
if "fp8" in ref:
    out["fp8"] = run("gpu_check_fp8", "fp8", quantize=True)
out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT)
out["device"] = str(x.device)
print(json.dumps(out))
"""


def check_export(ctx: Ctx, out: dict[str, Any]) -> None:
    """The standalone file of ``hybrid_tiny`` (attention, ssm, gated_linear, spectral, sepconv)
    run on the device in a fresh interpreter, against ``build(spec)`` with the same weights."""
    from nas.export import generate  # here, not at the top: a broken import fails this section only

    s = ctx.sizes
    spec = PRESETS["hybrid_tiny"]
    fp8 = _fp8_ok(ctx)
    model = build(spec, s.num_classes, s.img).eval()
    x = torch.randn(s.export_batch, 3, s.img, s.img, generator=torch.Generator().manual_seed(ctx.seed))
    ref: dict[str, Any] = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "x": x}
    with _exact_fp32(), torch.no_grad():
        ref["fp32"] = model.to(ctx.dev)(x.to(ctx.dev)).float().cpu()
        low, how = _convert(model, "bf16", ctx)
        if low is not None:
            ref["bf16"] = low(x.to(ctx.dev, torch.bfloat16)).float().cpu()
        if fp8:
            ref["fp8"] = to_precision(model, "fp8", ctx.dev)(x.to(ctx.dev, torch.bfloat16)).float().cpu()
    with tempfile.TemporaryDirectory(prefix="gpu_check_export_") as tmp:
        code = generate(spec, num_classes=s.num_classes, img_size=s.img, in_chans=3)
        (Path(tmp) / "gpu_check_fp32.py").write_text(code)
        if fp8:
            code8 = generate(spec.with_precision("fp8"), num_classes=s.num_classes, img_size=s.img, in_chans=3)
            (Path(tmp) / "gpu_check_fp8.py").write_text(code8)
        torch.save(ref, Path(tmp) / "ref.pt")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", _EXPORT_CHILD, tmp, str(ctx.dev), str(ROOT)], cwd=tmp,
                             capture_output=True, text=True, timeout=300)
        out["subprocess_s"] = time.perf_counter() - t0
    out["file_lines"] = len(code.splitlines())
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckError(f"the exported file failed in a fresh interpreter: {tail}")
    res = json.loads(run.stdout.strip().splitlines()[-1])
    out["details"] = {"spec": spec.short(), "hash": spec.hash[:12], "child": res, "bf16_how": how}
    out["ran_on"] = res["device"]
    out["fp32_max_abs_diff"] = _finite(res["fp32"]["max_abs"])
    out["bf16_max_abs_diff"] = _finite(res["bf16"]["max_abs"]) if "bf16" in res else how
    out["fp8_max_abs_diff"] = _finite(res["fp8"]["max_abs"]) if "fp8" in res else UNMEASURED_FP8
    if res["project_modules"]:
        raise CheckError(f"the exported file imported the project: {', '.join(res['project_modules'])}")
    # fp32 is the same arithmetic on both sides (build_model = build, TF32 off): 1e-5 as tests/test_export
    if not res["fp32"]["max_abs"] <= 1e-5:
        raise CheckError(f"exported file differs from build(spec) by {res['fp32']['max_abs']:.3g} in fp32 (> 1e-5)")
    for p in ("bf16", "fp8"):  # the same casts / fp8 layers on both sides: only kernel-level differences
        if p in res and not res[p]["rel"] <= 1e-2:
            raise CheckError(f"exported file differs from the project's {p} model by {res[p]['rel']:.3g} relative")


def check_repeatability(ctx: Ctx, out: dict[str, Any]) -> None:
    """CV of 5 repeated ``measure`` medians of ``deit_tiny``, eager and with a CUDA graph."""
    s = ctx.sizes
    model = build(PRESETS["deit_tiny"], s.num_classes, s.img)
    out["model"] = f"deit_tiny {ctx.latency_precision} batch {s.rep_batch} {s.img}px"
    details: dict[str, Any] = {}
    for label, graph in (("eager", False), ("cuda_graph", True)):
        if graph and not ctx.gpu:
            out[f"{label}_cv"] = out[f"{label}_median_ms"] = UNMEASURED_CUDA
            continue
        runs = [measure(model, (3, s.img, s.img), ctx.dev, ctx.latency_precision, batch_size=s.rep_batch,
                        warmup=s.rep_warmup, repeats=s.rep_repeats, threads=ctx.threads, cuda_graph=graph)
                for _ in range(5)]
        medians = [r.median_ms for r in runs]
        out[f"{label}_cv"] = _cv(medians)
        out[f"{label}_median_ms"] = float(np.median(medians))
        out[f"{label}_in_run_cv_median"] = float(np.median([r.cv for r in runs]))
        details[label] = {"medians_ms": medians, "in_run_cv": [r.cv for r in runs], "warmup": [r.warmup for r in runs]}
    if ctx.gpu:
        out["cuda_graph_speedup"] = out["eager_median_ms"] / out["cuda_graph_median_ms"]
    out["details"] = details


def _block(mixer: str, width: int, heads: int, grid: tuple[int, int], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blk = Block(width, mixer, "mlp", heads=heads, mlp_ratio=4.0, norm="layernorm", layer_scale=None, grid=grid)
        init_weights(blk)
    return blk


def _time_blocks(ctx: Ctx, blocks: dict[str, nn.Module], x: torch.Tensor, grid: tuple[int, int], bf16: bool,
                 budget_s: float) -> dict[str, Any]:
    """Median ms of one forward+backward of each block, timed round-robin so that the machine's
    drift hits all alike; as many rounds (up to ``mix_rounds``) as fit in ``budget_s``."""

    def step(blk: nn.Module) -> None:
        blk.zero_grad(set_to_none=True)
        with torch.autocast(ctx.dev.type, dtype=torch.bfloat16, enabled=bf16):
            y = blk(x, grid)
        y.float().square().mean().backward()

    t0 = time.perf_counter()
    first = {}
    for m, blk in blocks.items():  # warm-up (cuDNN plans, allocator), and what one step costs
        t = time.perf_counter()
        step(blk)
        ctx.sync()
        first[m] = time.perf_counter() - t
    left = budget_s - (time.perf_counter() - t0)
    rounds = max(1, min(ctx.sizes.mix_rounds, int(left / max(sum(first.values()), 1e-9))))
    times: dict[str, list[float]] = {m: [] for m in blocks}
    for _ in range(rounds):
        for m, blk in blocks.items():
            times[m] += _run_timed(lambda blk=blk: step(blk), ctx.dev, 1)
    return {"median_ms": {m: float(np.median(v)) for m, v in times.items()}, "rounds": rounds,
            "first_step_s": first}


def check_mixer_step_time(ctx: Ctx, out: dict[str, Any]) -> None:
    """Forward+backward of one ssm / gated_linear / ssd / hydra block against one attention block (MLP channel
    mixer, LayerNorm), side by side in one run: ratios of the medians. fp32 is how training runs."""
    s = ctx.sizes
    mixers = ("attention", "ssm", "gated_linear", "ssd", "hydra")
    # (label, stem stride, width, heads): the token grid of a 224px image after a stride-4 stem (the
    # first stage of a hierarchical net) and after a stride-16 stem (with DeiT-Tiny's width and heads)
    configs = (("stride4", 4, 64, 2), ("stride16", 16, 192, 3))
    dtypes = ("fp32", "bf16") if ctx.gpu else ("fp32",)
    budget = s.mix_budget_s / (len(configs) * len(dtypes))
    details: dict[str, Any] = {}
    for label, stride, width, heads in configs:
        grid = (max(1, s.img // stride), max(1, s.img // stride))
        gen = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(s.mix_batch, grid[0] * grid[1], width, generator=gen).to(ctx.dev)
        blocks = {m: _block(m, width, heads, grid, ctx.seed).to(ctx.dev).train() for m in mixers}
        for dt in ("fp32", "bf16"):
            key = f"{label}_{dt}"
            if dt not in dtypes:
                out.update({f"{key}_{m}_over_attention": UNMEASURED_CUDA for m in mixers[1:]})
                continue
            res = _time_blocks(ctx, blocks, x, grid, dt == "bf16", budget)
            med = res["median_ms"]
            for m in mixers[1:]:
                out[f"{key}_{m}_over_attention"] = med[m] / med["attention"]
            out[f"{key}_attention_ms"] = med["attention"]
            details[key] = {"grid": list(grid), "width": width, "heads": heads, "batch": s.mix_batch, **res}
    out["details"] = details


def check_supernet(ctx: Ctx, out: dict[str, Any]) -> None:
    """``train_supernet`` on the ``small`` frame (32px) with random data: optimiser steps per second
    (each step trains the sandwich: largest, smallest and 2 random subnets)."""
    s = ctx.sizes
    frame = get_frame("small")
    n = s.sn_batch * s.sn_steps
    gen = torch.Generator().manual_seed(ctx.seed)
    data = SimpleNamespace(x=torch.randn(n, frame.in_chans, frame.img_size, frame.img_size, generator=gen),
                           y=torch.randint(0, frame.num_classes, (n,), generator=gen))
    stamps: list[float] = []
    losses: list[float] = []

    def progress(_state: Any, loss: float) -> None:
        ctx.sync()
        stamps.append(time.perf_counter())
        losses.append(loss)

    cfg = TrainConfig(batch_size=s.sn_batch, seed=ctx.seed)
    t0 = time.perf_counter()
    train_supernet(frame, data, 1, config=cfg, max_steps=s.sn_steps, device=ctx.dev, progress=progress)
    if len(stamps) < 2:
        raise CheckError(f"only {len(stamps)} supernet step(s) ran; need 2 to time one")
    # the first step pays for lazy initialisation (CUDA context, cuDNN plans): left out of the rate
    out["steps_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    out["setup_and_first_step_s"] = stamps[0] - t0  # building the supernet included
    out["subnets_per_step"] = 2 + cfg.n_random
    out["batch"] = s.sn_batch
    out["last_loss"] = _finite(losses[-1])
    out["details"] = {"frame": "small", "img_size": frame.img_size, "steps": len(stamps),
                      "step_s": np.diff(stamps).tolist(), "losses": losses}
    if not all(math.isfinite(v) for v in losses):
        raise CheckError("supernet loss is not finite")


def check_predictor(ctx: Ctx, out: dict[str, Any]) -> None:
    """Per-piece table + calibration on ``lut_calib`` archs, then ``lut_test`` unseen archs predicted
    (their new pieces measured into the table, as in a search) and measured once each."""
    s = ctx.sizes
    precision = ctx.latency_precision
    if time.perf_counter() > ctx.deadline:
        raise CheckError("skipped: the earlier sections used up --time-limit")
    tms = tuple(t for t in token_mixer_names() if t not in ctx.predictor_exclude)
    space = get_space("hybrid_vit").with_choices(precisions=(precision,), token_mixers=tms)
    calib = [space.random(ctx.seed + i) for i in range(s.lut_calib)]  # the seeds bench/latency_predictor.py uses
    test = [space.random(ctx.seed + 100_000 + i) for i in range(s.lut_test)]
    out["setup"] = f"{precision} batch {s.lut_batch} {s.img}px"
    out["excluded_token_mixers"] = ",".join(ctx.predictor_exclude) or "none"

    def whole(spec: ArchSpec) -> float:
        return measure(build(spec, s.num_classes, s.img), (3, s.img, s.img), ctx.dev, precision,
                       batch_size=s.lut_batch, warmup=s.whole_warmup, repeats=s.whole_repeats,
                       threads=ctx.threads).median_ms

    t0 = time.perf_counter()
    pred = build_lut(space, str(ctx.dev), precision, s.img, s.lut_batch, specs=calib, threads=ctx.threads,
                     num_classes=s.num_classes, warmup=s.piece_warmup, repeats=s.piece_repeats,
                     min_time_s=s.piece_min_time_s)
    out["calib_pieces"] = len(pred.table)
    fit = pred.fit(calib, [whole(spec) for spec in calib])
    out["calib_s"] = time.perf_counter() - t0
    out["fit_a"], out["fit_b"], out["fit_c"], out["fit_mape_pct"] = fit["a"], fit["b"], fit["c"], fit["mape"]
    predicted, measured, spent = [], [], []
    for spec in test:
        # stop before an arch that would end past the deadline (timed as the slowest of the last ones)
        if time.perf_counter() + max(spent[-5:], default=0.0) > ctx.deadline:
            break
        t = time.perf_counter()
        predicted.append(pred.predict(spec))
        measured.append(whole(spec))
        spent.append(time.perf_counter() - t)
    out["n_test"], out["n_test_requested"] = len(measured), len(test)
    out["table_pieces"] = len(pred.table)
    out["details"] = {"archs": [{"hash": sp.hash[:12], "short": sp.short(), "predicted_ms": p, "measured_ms": m}
                                for sp, p, m in zip(test, predicted, measured)]}
    if len(measured) < 2:
        raise CheckError(f"only {len(measured)} unseen arch(s) measured before --time-limit; raise it")
    p, m = np.asarray(predicted), np.asarray(measured)
    err = np.abs(p - m) / m
    out["mape_pct"] = float(100 * err.mean())
    out["median_ape_pct"] = float(100 * np.median(err))
    out["within_5pct"] = float(np.mean(err <= 0.05))
    out["within_10pct"] = float(np.mean(err <= 0.10))
    out["kendall_tau"] = _kendall_tau(predicted, measured)
    out["measured_ms_range"] = f"{m.min():.3f}..{m.max():.3f}"
    out["test_s"] = float(sum(spent))
    if len(measured) < len(test):
        out["note"] = f"stopped at --time-limit after {len(measured)} of {len(test)} unseen archs"


CHECKS: dict[str, Callable[[Ctx, dict[str, Any]], None]] = {
    "fingerprint": check_fingerprint,
    "numerics": check_numerics,
    "export": check_export,
    "latency_repeatability": check_repeatability,
    "mixer_step_time": check_mixer_step_time,
    "supernet": check_supernet,
    "latency_predictor": check_predictor,
}
assert tuple(CHECKS) == SECTIONS


def run_section(name: str, ctx: Ctx) -> dict[str, Any]:
    """One guarded section: ``{"status": "ok" | "error", "seconds", "figures", "error"?}``."""
    figures: dict[str, Any] = {}
    t0 = time.perf_counter()
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"status": "ok"}
    try:
        CHECKS[name](ctx, figures)
    except Exception as e:  # any failure of a section is recorded and the next one runs
        result = {"status": "error", "error": _one_line(e),
                  "where": "".join(traceback.format_exception(type(e), e, e.__traceback__)[-2:]).strip()[-600:]}
        print(f"[{name}] error: {result['error']}", file=sys.stderr, flush=True)
    finally:
        gc.collect()
        if ctx.gpu:
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t0
    result["figures"] = figures
    return result


# --------------------------------------------------------------------------------------------
# table, arguments, main
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:90]


def table(report: dict[str, Any]) -> str:
    """Rows (section, figure, value): status and seconds first, then every scalar figure."""
    rows = []
    for name, sec in report["sections"].items():
        rows.append((name, "status", f"{sec['status']} ({sec['seconds']:.1f} s)"))
        if sec["status"] == "error":
            rows.append((name, "error", sec["error"][:90]))
        rows += [(name, k, _fmt(v)) for k, v in sec["figures"].items() if not isinstance(v, (dict, list))]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'section':<{w0}}  {'figure':<{w1}}  value", f"{'-' * w0}  {'-' * w1}  {'-' * 30}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints the usage too)
        _bad(message)


def _bad(message: str) -> NoReturn:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(2)


def _args(argv: list[str] | None) -> tuple[argparse.Namespace, Ctx, Path]:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu or cuda[:i]")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (32px, small batches, few archs)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"report file (default {DEFAULT_JSON.relative_to(ROOT)})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole run; the predictor adds no archs past it (default 450, quick 50)")
    ap.add_argument("--predictor-exclude", default=None,
                    help="token mixers left out of the predictor's archs, comma-separated (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads < 1:
        _bad(f"--threads must be >= 1, got {args.threads}")
    if args.time_limit is not None and not args.time_limit > 0:
        _bad(f"--time-limit must be positive seconds, got {args.time_limit}")
    try:
        dev = parse_device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    except LatencyError as e:
        _bad(str(e).replace("--target", "--device"))
    gpu = dev.type == "cuda"
    exclude = tuple(m for m in (args.predictor_exclude or "").split(",") if m)
    unknown = [m for m in exclude if m not in token_mixer_names()]
    if unknown:
        _bad(f"--predictor-exclude: unknown token mixer(s) {', '.join(unknown)}; "
             f"choose from {', '.join(token_mixer_names())}")
    if len(exclude) >= len(token_mixer_names()):
        _bad("--predictor-exclude leaves no token mixer")
    path = Path(args.json)
    if path.is_dir():
        _bad(f"--json {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _bad(f"--json: cannot create {path.parent} ({e.strerror})")
    sizes = QUICK if args.quick else FULL
    limit = args.time_limit if args.time_limit is not None else sizes.time_limit_s
    ctx = Ctx(dev=dev, sizes=sizes, threads=None if gpu else args.threads, deadline=time.perf_counter() + limit,
              predictor_exclude=exclude, seed=args.seed)
    return args, ctx, path


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args, ctx, path = _args(argv)
    if not ctx.gpu:
        torch.set_num_threads(args.threads)
        if not args.quick:
            print("gpu_check: note: --device cpu without --quick runs the GPU sizes (224px, batch 64); "
                  "expect it to take long", file=sys.stderr)
    report: dict[str, Any] = {
        "format": 1, "device": str(ctx.dev), "quick": args.quick, "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "sizes": vars(ctx.sizes),
        "unmeasured_means": "a figure this device cannot give (a string, never a made-up number)",
        "sections": {},
    }
    for name in SECTIONS:
        report["sections"][name] = run_section(name, ctx)
    failed = [n for n, sec in report["sections"].items() if sec["status"] != "ok"]
    report["heavy_modules_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    report["failed_sections"] = failed
    report["ok"] = not failed
    report["wall_s"] = time.perf_counter() - t0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # never a half-written report
    print(table(report))
    print(f"\n{'all measured sections ok' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"{report['wall_s']:.0f} s on {report['sections']['fingerprint']['figures'].get('name', ctx.dev)}; "
          f"wrote {path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
