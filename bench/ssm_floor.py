"""What the `ssm` block costs without its selective scans, and what the scans cost alone.

    .venv/bin/python bench/ssm_floor.py [--grid 14] [--rounds 9] [--seed 0]

Issue 21 asks for `ssm` (Mamba's selective scan, Gu & Dao 2023; bidirectional as in Vision Mamba,
Zhu et al. 2024) at <= 3x an attention block's forward+backward at 14x14 tokens. Side by side in
one process (batch 64, width 128, one thread, CPU time, median over rounds that visit each in turn),
this prints, as ratios to `attention`:

- ``ssm``: the block as registered;
- ``ssm, scans stood in``: the same block with both selective scans swapped for an elementwise
  stand-in that keeps every scan input in the graph (``u * delta`` plus B's and C's sums): the
  projections, convs, softplus and gate, the part no scan can remove;
- ``two scans alone``: both directions' ``selective_scan`` forward+backward on inputs of the
  block's shapes (d_inner = 256, d_state = 16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import search_spaces.layers.ssm as ssm_module  # noqa: E402
from bench.mixer_speed import make_mixer  # noqa: E402
from search_spaces._runtime import retain_freed_memory  # noqa: E402


def stand_in(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, reverse: bool = False) -> Tensor:
    """Shapes and graph of ``selective_scan`` without the scan: every input reaches the output
    (``reverse``, the scan's direction, changes nothing here)."""
    return u * delta + (B.sum(-1, keepdim=True) + C.sum(-1, keepdim=True)) + A.sum() * 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    retain_freed_memory()
    g, width, batch = args.grid, 128, 64
    att = make_mixer("attention", width, 4, (g, g), args.seed)
    block = make_mixer("ssm", width, 4, (g, g), args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, g * g, width, generator=gen, requires_grad=True)
    d_inner, d_state = 2 * width, block.d_state
    u = torch.randn(batch, g * g, d_inner, generator=gen, requires_grad=True)
    delta = (0.1 * torch.rand(batch, g * g, d_inner, generator=gen)).requires_grad_()
    A = (-torch.exp(block.fwd.A_log.detach())).requires_grad_()  # Mamba's S4D-real A = -[1..16]
    B, C = (torch.randn(batch, g * g, d_state, generator=gen, requires_grad=True) for _ in range(2))
    real = ssm_module.selective_scan

    def run(name: str) -> None:
        if name == "attention":
            att(x, (g, g)).sum().backward()
        elif name == "two scans alone":
            for reverse in (False, True):  # the block's two directions
                real(u, delta, A, B, C, reverse=reverse).sum().backward()
        else:
            ssm_module.selective_scan = real if name == "ssm" else stand_in
            try:
                block(x, (g, g)).sum().backward()
            finally:
                ssm_module.selective_scan = real

    names = ["attention", "ssm", "ssm, scans stood in", "two scans alone"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 1):  # round 0 warms up
        for n in names:
            t0 = time.process_time()
            run(n)
            if r:
                times[n].append(time.process_time() - t0)
    ref = statistics.median(times["attention"])
    print(f"cpu fp32, 1 thread, batch {batch}, width {width}, {g}x{g} tokens, median of {args.rounds} rounds")
    for n in names:
        t = statistics.median(times[n])
        print(f"{n:22s} {t * 1e3:8.1f} ms  {t / ref:5.2f}x attention")


if __name__ == "__main__":
    main()
