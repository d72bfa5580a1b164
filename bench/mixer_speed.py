"""Token-mixer speed and memory, each against softmax attention, side by side in one run.

    .venv/bin/python bench/mixer_speed.py [--device cpu|cuda] [--batch 64] [--width 128] [--grids 8,14,28]
                                          [--rounds 7] [--mixers all] [--json out.json]

For every registered token mixer (``search_spaces.registry``), on a (batch, H*W, width) input in the
mixer's own layout, at each token grid H = W:

- ``fwd+bwd``: one forward and backward of the mixer module alone (its input projection to its
  output projection; no norm, no channel mixer, so the ratio is the mixer's own), median over
  ``--rounds`` rounds that visit the mixers in turn (the machine's drift hits all alike); on CPU
  timed in process CPU time, so that time spent descheduled on a loaded machine does not count;
- ``fwd b1``: one forward at batch 1 under ``torch.no_grad`` (latency is an objective);
- ``saved MB``: bytes the autograd graph keeps for the backward pass (``saved_tensors_hooks``),
  the memory a training step holds per block, deterministic on any device; on CUDA also the peak
  allocated bytes of the forward+backward (``max_memory_allocated``).

Each figure is also given as a ratio to attention's. fp32 on CPU (one thread by default); bf16
autocast on CUDA. Issue 21's targets read off this table: ssd/hydra <= 2x attention at 14x14 and
faster at 28x28; ssm and gated_linear <= 3x attention at 14x14.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_spaces._runtime import retain_freed_memory  # noqa: E402
from search_spaces.layers.common import to_layout  # noqa: E402
from search_spaces.registry import get_token_mixer, token_mixer_names  # noqa: E402

REFERENCE = "attention"


def make_mixer(name: str, width: int, heads: int, grid: tuple[int, int], seed: int) -> nn.Module:
    """The registered token mixer ``name`` at ``width``, seeded (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_token_mixer(name)(width, heads=heads, grid=grid)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn``: on CPU the process's CPU time (one torch thread; time spent descheduled on a
    shared, loaded machine does not count), on CUDA the wall clock between synchronisations."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``fn`` runs (each storage
    counted once): what one training step keeps alive between its forward and backward."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a wrapper)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def measure_grid(names: list[str], grid: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """fwd+bwd and batch-1 forward medians, saved bytes (and CUDA peak) of every mixer at one grid."""
    hw = (grid, grid)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randn(args.batch, grid * grid, args.width, generator=gen).to(device)
    one = tokens[:1].clone()
    bf16 = device.type == "cuda"
    mixers = {n: make_mixer(n, args.width, args.heads, hw, args.seed).to(device).train() for n in names}
    inputs = {n: to_layout(tokens, m.layout, hw).contiguous() for n, m in mixers.items()}
    singles = {n: to_layout(one, m.layout, hw).contiguous() for n, m in mixers.items()}

    def forward(n: str, x: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return mixers[n](x, hw)

    def train_step(n: str) -> None:
        mixers[n].zero_grad(set_to_none=True)
        x = inputs[n].requires_grad_(True)
        forward(n, x).float().square().mean().backward()

    def infer(n: str) -> None:
        with torch.no_grad():
            forward(n, singles[n])

    out: dict[str, Any] = {n: {} for n in names}
    for n in names:  # warm-up, and the memory figures (deterministic: one pass each)
        train_step(n)
        infer(n)
        out[n]["saved_mb"] = saved_bytes(lambda n=n: forward(n, inputs[n].requires_grad_(True))) / 2**20
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            train_step(n)
            out[n]["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    fb: dict[str, list[float]] = {n: [] for n in names}
    f1: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # round-robin: each round visits every mixer once
        for n in names:
            fb[n].append(_timed(lambda n=n: train_step(n), device))
            f1[n].append(_timed(lambda n=n: infer(n), device))
    for n in names:
        out[n]["fwd_bwd_ms"] = 1e3 * statistics.median(fb[n])
        out[n]["fwd_b1_ms"] = 1e3 * statistics.median(f1[n])
    ref = out.get(REFERENCE)
    if ref is not None:
        for n in names:
            for k in ("fwd_bwd_ms", "fwd_b1_ms", "saved_mb", "peak_mb"):
                if k in out[n] and ref.get(k):
                    out[n][k.replace("_ms", "").replace("_mb", "") + "_ratio"] = out[n][k] / ref[k]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--grids", default="8,14,28", help="token grid sides, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mixers", default="all", help="token mixers, comma-separated (attention is always added)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc", default="retain", choices=("retain", "glibc"),
                    help="CPU: keep freed memory in the process as the search's workers do (retain), or "
                         "glibc's defaults, which hand large blocks back to the kernel after each step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    known = token_mixer_names()
    names = known if args.mixers == "all" else [m for m in args.mixers.split(",") if m]
    unknown = [m for m in names if m not in known]
    if unknown:
        ap.error(f"unknown token mixer(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    names = [REFERENCE] + [m for m in names if m != REFERENCE]
    try:
        grids = [int(g) for g in args.grids.split(",") if g]
    except ValueError:
        ap.error(f"--grids takes integers such as 8,14,28, got {args.grids!r}")
    if not grids or min(grids) < 1 or args.batch < 1 or args.rounds < 1 or args.width < 1:
        ap.error("--grids, --batch, --rounds and --width must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if args.malloc == "retain" and not retain_freed_memory():
            print("--malloc retain: this C library has no glibc mallopt; measuring with its defaults", flush=True)

    results: dict[str, Any] = {}
    for g in grids:
        t0 = time.perf_counter()
        results[str(g)] = measure_grid(names, g, args, device)
        print(f"grid {g}x{g} measured in {time.perf_counter() - t0:.0f} s", flush=True)
    cuda = device.type == "cuda"
    setting = " bf16 autocast" if cuda else f" fp32, {args.threads} thread(s), malloc {args.malloc}"
    print(f"\n{args.device}{setting}, "
          f"batch {args.batch}, width {args.width}, heads {args.heads}; ratios to {REFERENCE}")
    head = f"{'mixer':<16} {'grid':>5} {'fwd+bwd ms':>11} {'x attn':>7} {'fwd b1 ms':>10} {'x attn':>7} " \
           f"{'saved MB':>9} {'x attn':>7}" + (f" {'peak MB':>8}" if cuda else "")
    print(head)
    for n in names:
        for g in grids:
            r = results[str(g)][n]
            line = (f"{n:<16} {g:>3}^2 {r['fwd_bwd_ms']:11.2f} {r.get('fwd_bwd_ratio', float('nan')):7.2f} "
                    f"{r['fwd_b1_ms']:10.3f} {r.get('fwd_b1_ratio', float('nan')):7.2f} {r['saved_mb']:9.1f} "
                    f"{r.get('saved_ratio', float('nan')):7.2f}")
            print(line + (f" {r['peak_mb']:8.1f}" if cuda else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
