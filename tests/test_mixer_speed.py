"""bench/mixer_speed.py: its memory figure is exact on known graphs, and a tiny run covers every
registered token mixer with attention as the unit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from search_spaces.registry import token_mixer_names

ROOT = Path(__file__).resolve().parents[1]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mixer_speed", ROOT / "bench" / "mixer_speed.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["mixer_speed"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_saved_bytes_counts_what_autograd_keeps() -> None:
    ms = _bench()
    a = torch.randn(100, 10, requires_grad=True)
    b = torch.randn(100, 10, requires_grad=True)
    assert ms.saved_bytes(lambda: (a * b).sum()) == 2 * 100 * 10 * 4  # mul saves both operands
    assert ms.saved_bytes(lambda: (a + b).sum()) == 0  # add saves nothing
    w = torch.randn(10, 7, requires_grad=True)
    # matmul saves a and w (one storage each, counted once even if saved twice)
    assert ms.saved_bytes(lambda: (a @ w).sum() + (a * 2).sum()) == (100 * 10 + 10 * 7) * 4


def test_tiny_run_covers_every_mixer(tmp_path: Path) -> None:
    ms = _bench()
    out = tmp_path / "m.json"
    assert ms.main(["--batch", "2", "--grids", "3", "--rounds", "1", "--width", "32", "--heads", "2",
                    "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["3"]
    assert set(res) == set(token_mixer_names())
    assert res["attention"]["fwd_bwd_ratio"] == 1.0 and res["attention"]["saved_ratio"] == 1.0
    assert all(r["fwd_bwd_ms"] > 0 and r["saved_mb"] >= 0 for r in res.values())


def test_ssm_floor_stand_in_keeps_the_scans_inputs_and_a_tiny_run_prints_every_figure(capsys) -> None:  # type: ignore[no-untyped-def]
    """bench/ssm_floor.py: the stand-in has the scan's output shape and passes a gradient to every
    input (so the block's graph is otherwise unchanged); a tiny run prints the four rows."""
    spec = importlib.util.spec_from_file_location("ssm_floor", ROOT / "bench" / "ssm_floor.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    u, delta = torch.randn(2, 5, 8, requires_grad=True), torch.rand(2, 5, 8, requires_grad=True)
    A = torch.randn(8, 4, requires_grad=True)
    B, C = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 5, 4, requires_grad=True)
    from search_spaces.layers._selective_scan import selective_scan

    out = mod.stand_in(u, delta, A, B, C)
    assert out.shape == selective_scan(u, delta, A, B, C).shape
    grads = torch.autograd.grad(out.sum(), [u, delta, A, B, C])
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, [u, delta, A, B, C]))
    threads = torch.get_num_threads()
    try:
        mod.main(["--grid", "3", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread; the test worker goes on
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:22].strip(): line for line in lines[1:]}
    assert list(rows) == ["attention", "ssm", "ssm, scans stood in", "two scans alone"]
    assert rows["attention"].endswith("1.00x attention")


def test_native_scan_bench_checks_each_pair_equal_and_prints_both_scans(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bench/native_scan.py: a tiny run (2x2 tokens, one round) prints a row per scan and writes
    its JSON; each pair was checked equal before it was timed (the run would raise otherwise)."""
    spec = importlib.util.spec_from_file_location("native_scan_bench", ROOT / "bench" / "native_scan.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    from search_spaces.layers import _native_scan

    if not _native_scan.available():
        import pytest

        pytest.skip("no native scan here")
    threads = torch.get_num_threads()
    try:
        out = mod.main(["--grids", "2", "--rounds", "1", "--json", str(tmp_path / "n.json")])
    finally:
        torch.set_num_threads(threads)
    assert list(out["results"]["2"]) == ["selective scan (ssm)", "SSD, Mamba-2 (ssd, hydra)"]
    assert all(r["torch_ms"] > 0 and r["native_ms"] > 0 for r in out["results"]["2"].values())
    assert json.loads((tmp_path / "n.json").read_text())["results"] == out["results"]
    printed = capsys.readouterr().out
    assert "selective scan (ssm)" in printed and "SSD, Mamba-2" in printed
