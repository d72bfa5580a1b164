"""Zero-cost proxy cost: all gradient proxies in one `compute` call vs each on its own vs one fwd+bwd.

    .venv/bin/python bench/proxy_speed.py [--batch 64] [--repeats 3] [--models 4]

Measured side by side in one run on one thread; prints ratios (absolute times on a shared machine
mean little). Models: NB201 cells and hybrid_vit nets at 32x32 with a random CIFAR-shaped batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import search_spaces as ss
from predictors.zero_cost import PROXIES, compute
from search_spaces.hybrid_vit import build

GRADIENT_PROXIES = ("grad_norm", "snip", "grasp", "fisher", "jacob_cov", "synflow")  # Abdelfattah et al. 2021


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _models(n: int) -> list[tuple[str, torch.nn.Module]]:
    nb = ss.get_space("nb201")
    hv = ss.get_space("hybrid_vit")
    out: list[tuple[str, torch.nn.Module]] = []
    for seed in range(n):
        spec = nb.random(seed)
        out.append((f"nb201 {spec.to_string()[:40]}...", nb.build(spec)))
    seed = 0
    while len(out) < 2 * n:
        spec = hv.random(seed)
        seed += 1
        model = build(spec, num_classes=10, img_size=32)
        if ss.count_params(model) > 3_000_000:  # keep the bench quick on 2 cores
            continue
        out.append((f"hybrid_vit {spec.short()[:60]}", model))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", type=int, default=3, help="models per space")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.arange(args.batch) % 10

    header = (f"{'model':<72} {'all/fb':>7} {'1by1/fb':>8} {'speedup':>8} "
              + " ".join(f"{p[:8]:>8}" for p in PROXIES))
    print(f"batch {args.batch}, 32x32, 1 thread, median of {args.repeats}; ratios to one forward+backward (fb)")
    print(header)
    speedups, all_ratios, no_grasp_ratios = [], [], []
    for name, model in _models(args.models):
        model.train()

        def fwd_bwd(model: torch.nn.Module = model) -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        fb = _time(fwd_bwd, args.repeats)
        one_call = _time(lambda model=model: compute(model, x, y, names=list(GRADIENT_PROXIES)), args.repeats)
        each = {p: _time(lambda p=p, model=model: compute(model, x, y, names=[p]), args.repeats) for p in PROXIES}
        one_by_one = sum(each[p] for p in GRADIENT_PROXIES)
        no_grasp = _time(lambda model=model: compute(model, x, y, names=[p for p in PROXIES if p != "grasp"]),
                         args.repeats)
        speedups.append(one_by_one / one_call)
        all_ratios.append(one_call / fb)
        no_grasp_ratios.append(no_grasp / fb)
        print(f"{name:<72} {one_call / fb:7.2f} {one_by_one / fb:8.2f} {one_by_one / one_call:7.2f}x "
              + " ".join(f"{each[p] / fb:8.2f}" for p in PROXIES))
    print()
    print(f"six gradient proxies (Abdelfattah et al.) one by one / in one call: median speed-up "
          f"{statistics.median(speedups):.2f}x (min {min(speedups):.2f}x)")
    print(f"one call with all six, in forward+backward units: median {statistics.median(all_ratios):.2f}")
    print(f"one call with all ten proxies except grasp, in forward+backward units: median "
          f"{statistics.median(no_grasp_ratios):.2f} (max {max(no_grasp_ratios):.2f})")


if __name__ == "__main__":
    main()
