"""The native scans against the PyTorch ones they replace on a CPU, side by side in one process.

    .venv/bin/python bench/native_scan.py [--grids 14,28] [--rounds 7] [--json out.json]

Forward+backward of one scan, batch 64, one thread, CPU time, median over rounds that visit each
form in turn, at the shapes of a width-128 block:

- Mamba's selective scan (Gu & Dao 2023), ``ssm``: u, delta (64, N, 256), A (256, 16), B, C
  (64, N, 16); native (``_native_scan``, C) against the fused, blocked PyTorch scan;
- Mamba-2's scan (Dao & Gu 2024), ``ssd``/``hydra``: 16 heads of 16 channels, a state of 16,
  Mamba-2's D as skip; native step by step against the chunked matmul form (``ssd_chunked``).

Each pair is also checked equal (to 1e-4 relative, on y and every gradient) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_spaces._runtime import retain_freed_memory  # noqa: E402
from search_spaces.layers import _native_scan  # noqa: E402
from search_spaces.layers._selective_scan import selective_scan  # noqa: E402
from search_spaces.layers._ssd import ssd_chunked, ssd_scan  # noqa: E402


def _inputs(tokens: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """(Mamba's u, delta, A, B, C; Mamba-2's x, dt, A, B, C, D) at batch 64, width 128 (inner 256)."""
    g = torch.Generator().manual_seed(seed)
    b, d, s, h, p = 64, 256, 16, 16, 16
    mamba = [torch.randn(b, tokens, d, generator=g), 0.1 * torch.rand(b, tokens, d, generator=g),
             -torch.arange(1.0, s + 1).repeat(d, 1),  # Mamba's S4D-real A
             torch.randn(b, tokens, s, generator=g), torch.randn(b, tokens, s, generator=g)]
    mamba2 = [torch.randn(b, tokens, h, p, generator=g), F.softplus(torch.randn(b, tokens, h, generator=g) - 3),
              -torch.rand(h, generator=g) * 15 - 1,  # Mamba-2's A in [-16, -1]
              torch.randn(b, tokens, s, generator=g), torch.randn(b, tokens, s, generator=g), torch.ones(h)]
    return [t.requires_grad_() for t in mamba], [t.requires_grad_() for t in mamba2]


def _step(fn: Callable[[], Tensor], ins: list[Tensor]) -> list[Tensor]:
    """y and the gradients of every input, for a fixed output gradient (y's own values)."""
    y = fn()
    return [y.detach(), *torch.autograd.grad(y, ins, y.detach())]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default="14,28", help="token grid sides, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not _native_scan.available():
        sys.exit("no native scan here (no C compiler, or HYBRID_NAS_NATIVE_SCAN=0): nothing to compare")
    torch.set_num_threads(1)
    retain_freed_memory()
    out: dict = {"config": vars(args), "results": {}}
    print(f"cpu fp32, 1 thread, batch 64, fwd+bwd of one scan, median of {args.rounds} rounds")
    print(f"{'scan':28s} {'grid':>5s} {'PyTorch ms':>11s} {'native ms':>10s} {'speed-up':>9s}")
    for g in (int(v) for v in args.grids.split(",")):
        mamba, mamba2 = _inputs(g * g, args.seed)
        forms = {  # (inputs, the PyTorch form, the native form); m and m2 bound now, not at call time
            "selective scan (ssm)": (mamba, lambda m=mamba: selective_scan(*m, native=False),
                                     lambda m=mamba: selective_scan(*m)),
            "SSD, Mamba-2 (ssd, hydra)": (mamba2, lambda m2=mamba2: ssd_chunked(*m2[:5], skip=m2[5]),
                                          lambda m2=mamba2: ssd_scan(*m2[:5], skip=m2[5])),
        }
        for name, (ins, torch_form, native_form) in forms.items():
            for a, b in zip(_step(torch_form, ins), _step(native_form, ins)):  # equal before timed
                torch.testing.assert_close(b, a, atol=1e-4 * float(a.abs().max()), rtol=1e-4)
            times: dict[str, list[float]] = {"torch": [], "native": []}
            for _ in range(args.rounds):
                for key, fn in (("torch", torch_form), ("native", native_form)):
                    t0 = time.process_time()
                    _step(fn, ins)
                    times[key].append(time.process_time() - t0)
            t_torch, t_native = statistics.median(times["torch"]), statistics.median(times["native"])
            out["results"].setdefault(str(g), {})[name] = {
                "torch_ms": t_torch * 1e3, "native_ms": t_native * 1e3, "speedup": t_torch / t_native}
            print(f"{name:28s} {g:>3d}^2 {t_torch * 1e3:11.1f} {t_native * 1e3:10.1f} {t_torch / t_native:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
