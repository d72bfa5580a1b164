"""The native scans (search_spaces/layers/_native_scan.py, _selective_scan.c), Mamba's selective scan
and Mamba-2's SSD: equal to the papers' recurrences in float64, forward and backward, in both
directions (and shifted, with skip and acc, for SSD); what they keep; threads; the fallback to the
PyTorch scans when they cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_layers_ssm import _saved_for_backward, _scan_inputs, _scan_loop

import search_spaces.layers._native_scan as ns
import search_spaces.layers._selective_scan as ss
from search_spaces.layers._ssd import ssd_chunked, ssd_recurrence, ssd_scan
from search_spaces.registry import get_token_mixer

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the native scan cannot be built here")


def _grads(y: torch.Tensor, ins: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)  # the same values for both
    got = torch.autograd.grad(y, ins, gy, allow_unused=True)  # (a shifted scan of one token reads no B or C)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(got, ins))


def _flipped(ins: list[torch.Tensor]) -> list[torch.Tensor]:
    """u, delta, B, C read from the last token to the first (A has no time axis)."""
    return [t if i == 2 else t.flip(1) for i, t in enumerate(ins)]


def test_the_native_scan_builds_here() -> None:
    assert ns.available(), "a C compiler is on PATH, so the native scan must build"
    assert ns.library_path().exists()
    u, a = torch.zeros(1, 1, 1), torch.zeros(1, 16)
    assert ns.supports(u, a)
    assert not ns.supports(u.double(), a) and not ns.supports(u, torch.zeros(1, ns.MAX_STATE + 1))


# (batch, tokens, channels, state, reverse): a single token; channels a multiple of the 16-channel
# tile, not one (a 40 = 16 + 16 + 8 tail), fewer than a tile; Mamba's state of 16 and smaller ones;
# 197 tokens (a class token and 14x14)
@pytest.mark.parametrize("bsz,n,d,s,reverse", [
    (1, 1, 16, 16, False), (3, 17, 40, 16, False), (2, 23, 7, 3, True), (5, 64, 48, 16, True),
    (1, 197, 32, 16, False), (4, 9, 24, 5, True),
])
def test_native_scan_equals_the_float64_loop(bsz: int, n: int, d: int, s: int, reverse: bool) -> None:
    """Within 1e-5 of the recurrence written step by step in float64: y and the gradients of all
    five inputs (those relative to the largest gradient entry)."""
    ins = _scan_inputs(bsz, n, d, s, torch.float32, seed=n)
    ref = [t.detach().double().requires_grad_() for t in ins]
    y = ss.selective_scan(*ins, reverse=reverse)
    y_ref = _scan_loop(*_flipped(ref)).flip(1) if reverse else _scan_loop(*ref)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_NativeSelectiveScanBackward"
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=1e-5, rtol=1e-5)
    for g, gr in zip(_grads(y, ins, 1), _grads(y_ref, ref, 1)):
        torch.testing.assert_close(g.double(), gr, atol=1e-5 * max(float(gr.abs().max()), 1e-30), rtol=1e-5)


def test_native_scan_equals_the_fused_scan_at_mambas_size() -> None:
    """Mamba's state at width 128 (S = 16, D = 256) over 64 tokens: the native and the fused
    PyTorch scan agree to 1e-5, forward and backward."""
    ins = _scan_inputs(6, 64, 256, 16, torch.float32, seed=7)
    ref = [t.detach().clone().requires_grad_() for t in ins]
    y, y_ref = ss.selective_scan(*ins), ss.selective_scan(*ref, native=False)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(_grads(y, ins, 8), _grads(y_ref, ref, 8)):
        torch.testing.assert_close(g, gr, atol=1e-5 * float(gr.abs().max()), rtol=1e-5)


def test_native_scan_keeps_only_its_inputs() -> None:
    """Between the passes autograd holds u, delta, A, B, C and nothing else: no state of any kind."""
    ins = _scan_inputs(4, 40, 24, 16, torch.float32)
    saved = _saved_for_backward(lambda: ss.selective_scan(*ins), torch.Tensor.data_ptr)
    assert sorted(saved) == sorted(t.data_ptr() for t in ins)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (3,), (4,), (0, 4)])
def test_native_scan_some_inputs_need_no_gradient(which: tuple[int, ...]) -> None:
    ins = [t.detach().requires_grad_(i in which) for i, t in enumerate(_scan_inputs(3, 11, 20, 16, torch.float32))]
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in ins]
    gy = torch.randn(3, 11, 20, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(ss.selective_scan(*ins, reverse=True), [ins[i] for i in which], gy)
    want = torch.autograd.grad(_scan_loop(*_flipped(ref)).flip(1), [ref[i] for i in which], gy.double())
    for g, gr in zip(got, want):
        torch.testing.assert_close(g.double(), gr, atol=1e-5 * float(gr.abs().max()), rtol=1e-5)


def test_native_scan_second_derivative_equals_the_plain_one() -> None:
    """With create_graph (GraSP) the backward differentiates the plain formulation, reversed too."""
    ins = _scan_inputs(2, 6, 20, 16, torch.float32)
    ref = [t.detach().double().requires_grad_() for t in ins]
    hvp = []
    for xs, fn in ((ins, lambda *a: ss.selective_scan(*a, reverse=True)),
                   (ref, lambda *a: _scan_loop(*_flipped(list(a))).flip(1))):
        g = torch.autograd.grad(fn(*xs).pow(2).sum(), xs, create_graph=True)
        hvp.append(torch.autograd.grad(sum((gi * gi).sum() for gi in g), xs))
    for a, b in zip(*hvp):
        torch.testing.assert_close(a.double(), b, atol=1e-4 * float(b.abs().max()), rtol=1e-4)


def test_native_scan_threads_split_the_batch_to_the_same_result() -> None:
    """With several torch threads the samples are split over threads: each sample's outputs are
    the same bits; dL/dA, summed per thread and then added, to float rounding."""
    ins = _scan_inputs(5, 30, 40, 16, torch.float32, seed=3)
    threads = torch.get_num_threads()
    out = []
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            assert len(ns._parts(5)) == k
            y = ss.selective_scan(*ins)
            out.append((y, *_grads(y, ins, 2)))
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*out)):
        if i == 3:  # dL/dA
            torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=1e-6)
        else:
            assert torch.equal(a, b), i


@pytest.mark.parametrize("mixer", ["ssm", "ssd", "hydra"])
def test_blocks_are_the_same_with_and_without_the_native_scans(mixer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Vision Mamba's block (its backward branch scans in reverse, with no flips), Mamba-2's and
    Hydra's (shifted scans, the input-dependent diagonal as skip) give the same output and parameter
    gradients through the native scans as through the PyTorch ones (fused, chunked)."""
    torch.manual_seed(0)
    m = get_token_mixer(mixer)(32, heads=2, grid=(5, 5))
    x = torch.randn(3, 1 + 25, 32)
    got = []
    for native in (True, False):
        monkeypatch.setattr(ns, "available", lambda native=native: native)
        m.zero_grad()
        y = m(x, (5, 5))
        y.pow(2).sum().backward()
        got.append((y.detach(), *(p.grad.clone() for p in m.parameters())))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_working_compiler_the_pytorch_scan_runs(compiler: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No compiler, or one that fails (``false``), with an empty cache: one warning that says why,
    no file left in the cache, and the scan still runs (the fused form) and is right."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(ns.CACHE_ENV, str(cache))
    if compiler == "missing":
        monkeypatch.setattr(ns.shutil, "which", lambda name: None)
        why = "no C compiler found"
    else:
        monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
        why = "failed"
    monkeypatch.setattr(ns, "_tried", False)
    monkeypatch.setattr(ns, "_lib", None)
    with pytest.warns(UserWarning, match=f"native scans unavailable.*{why}"):
        assert not ns.available()
    assert not cache.exists() or not any(cache.iterdir())
    ins = _scan_inputs(2, 9, 20, 16, torch.float32)
    y = ss.selective_scan(*ins)
    assert type(y.grad_fn).__name__ == "_SelectiveScanBackward"
    torch.testing.assert_close(y.double(), _scan_loop(*[t.detach().double() for t in ins]), atol=1e-5, rtol=1e-5)


def test_native_scan_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ns.ENV, "0")
    monkeypatch.setattr(ns, "_tried", False)
    monkeypatch.setattr(ns, "_lib", None)
    assert not ns.available()
    ins = _scan_inputs(2, 5, 16, 16, torch.float32)
    assert type(ss.selective_scan(*ins).grad_fn).__name__ == "_SelectiveScanBackward"


def test_a_fresh_cache_gets_one_library_and_no_partial_files(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The library is compiled under a temporary name and renamed: after two builds the cache
    holds exactly the one library, and the second build reuses it."""
    monkeypatch.setenv(ns.CACHE_ENV, str(tmp_path))
    path = ns.build()
    assert path.parent == tmp_path and path.exists()
    mtime = path.stat().st_mtime_ns
    assert ns.build() == path and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---- Mamba-2's scan (SSD) -------------------------------------------------------------------------


def _ssd_inputs(b: int, n: int, h: int, p: int, s: int, skip: str | None, acc: bool, decay: float = 1.0,
                seed: int = 0) -> list[torch.Tensor | None]:
    """x, dt, A, B, C, skip ((h,) as Mamba-2's D or (b, n, h) as Hydra's diagonal), acc; ``decay``
    scales dt (50: a head's decay over one step reaches e^-100, past what the chunked form factorises)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, n, h, generator=g) - 1) * decay
    a = -torch.exp(torch.randn(h, generator=g))
    bm, cm = torch.randn(b, n, s, generator=g), torch.randn(b, n, s, generator=g)
    sk = None if skip is None else torch.randn(h if skip == "h" else (b, n, h), generator=g)
    ac = torch.randn(b, n, h, p, generator=g) if acc else None
    return [None if t is None else t.requires_grad_() for t in (x, dt, a, bm, cm, sk, ac)]


def _ssd_reference(x, dt, a, bm, cm, sk, ac, shift: bool, reverse: bool):  # type: ignore[no-untyped-def]
    """Mamba-2's recurrence step by step (``ssd_recurrence``), plus x * skip and acc."""
    y = ssd_recurrence(x, dt, a, bm, cm, shift=shift, reverse=reverse)
    if sk is not None:
        y = y + x * sk[..., None]
    return y if ac is None else y + ac


def _check_ssd_against_the_recurrence(ins: list[torch.Tensor | None], shift: bool, reverse: bool) -> None:
    """ssd_scan through the native path equals the float64 recurrence to 1e-5: y and the gradient
    of every given input, each relative to its largest entry."""
    ref = [None if t is None else t.detach().double().requires_grad_() for t in ins]
    y = ssd_scan(*ins[:5], shift=shift, reverse=reverse, skip=ins[5], acc=ins[6])
    assert type(y.grad_fn).__name__ == "_NativeSSDBackward"
    y_ref = _ssd_reference(*ref, shift=shift, reverse=reverse)
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=1e-5 * float(y_ref.detach().abs().max()), rtol=1e-5)
    given = [t for t in ins if t is not None]
    for g, gr in zip(_grads(y, given, 1), _grads(y_ref, [t for t in ref if t is not None], 1)):
        torch.testing.assert_close(g.double(), gr, atol=1e-5 * max(float(gr.abs().max()), 1e-30), rtol=1e-5)


# (batch, tokens, heads, headdim, state): ssd's and hydra's heads of 16 channels; a headdim of 20 (a
# tile and a 4-channel tail) and of 8 (a tail alone); a single token; states of 16 and 5
@pytest.mark.parametrize("shape,shift,reverse,skip,acc", [
    ((2, 23, 3, 16, 16), False, False, "h", False), ((2, 23, 3, 16, 16), False, True, "h", True),
    ((1, 50, 2, 20, 5), True, False, "bnh", False), ((1, 50, 2, 20, 5), True, True, None, True),
    ((3, 7, 4, 8, 16), True, True, "bnh", True), ((3, 7, 4, 8, 16), False, False, None, False),
    ((2, 1, 2, 16, 16), True, False, "h", True), ((2, 1, 2, 16, 16), False, True, "bnh", False),
])
def test_native_ssd_equals_the_float64_recurrence(shape: tuple[int, ...], shift: bool, reverse: bool,
                                                  skip: str | None, acc: bool) -> None:
    """Within 1e-5 of Mamba-2's recurrence in float64: y and the gradients of every input (x, dt,
    A, B, C, skip, acc), relative to the largest entry of each."""
    _check_ssd_against_the_recurrence(_ssd_inputs(*shape, skip, acc, seed=shape[1]), shift, reverse)


def test_native_ssd_needs_no_factorising_for_strong_decays() -> None:
    """Heads that decay by up to e^-100 in one step (the chunked form takes its per-head path for
    them) are exact step by step: within 1e-5 of the float64 recurrence, with their gradients."""
    ins = _ssd_inputs(2, 40, 4, 16, 16, "h", False, decay=50.0, seed=9)
    assert float((ins[1] * ins[2]).detach().min()) < -60  # past the factorised form's span in one step
    _check_ssd_against_the_recurrence(ins, shift=True, reverse=False)


def test_native_ssd_keeps_only_its_inputs_and_agrees_with_the_chunked_form() -> None:
    """Autograd holds x, dt, A, B, C and skip between the passes, no state and no (q, q) scores;
    the chunked form gives the same y and gradients (and takes the place of the native one on
    float64, where it still runs)."""
    ins = _ssd_inputs(3, 60, 4, 16, 16, "bnh", True, seed=4)
    saved = _saved_for_backward(lambda: ssd_scan(*ins[:5], shift=True, reverse=True, skip=ins[5], acc=ins[6]),
                                torch.Tensor.data_ptr)
    assert sorted(saved) == sorted(t.data_ptr() for t in ins[:6])
    y = ssd_scan(*ins[:5], shift=True, reverse=True, skip=ins[5], acc=ins[6])
    y_ref = ssd_chunked(*ins[:5], shift=True, reverse=True, skip=ins[5], acc=ins[6])
    torch.testing.assert_close(y, y_ref, atol=1e-5 * float(y_ref.detach().abs().max()), rtol=1e-5)
    for g, gr in zip(_grads(y, ins, 3), _grads(y_ref, ins, 3)):
        torch.testing.assert_close(g, gr, atol=1e-5 * float(gr.abs().max()), rtol=1e-5)
    assert ssd_scan(*(t.detach().double() for t in ins[:5])).grad_fn is None  # float64: the chunked form


def test_native_ssd_second_derivative_equals_the_chunked_one() -> None:
    """With create_graph (GraSP) the backward differentiates the chunked form."""
    ins = _ssd_inputs(2, 9, 2, 16, 16, "h", True, seed=5)
    hvp = []
    for fn in (ssd_scan, ssd_chunked):
        xs = [t.detach().clone().requires_grad_() for t in ins]
        g = torch.autograd.grad(fn(*xs[:5], shift=True, skip=xs[5], acc=xs[6]).pow(2).sum(), xs, create_graph=True)
        hvp.append(torch.autograd.grad(sum((gi * gi).sum() for gi in g), xs, allow_unused=True))
    for a, b in zip(*hvp):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-4)


def test_native_ssd_threads_split_the_batch_to_the_same_result() -> None:
    ins = _ssd_inputs(5, 30, 2, 16, 16, "bnh", False, seed=6)
    threads = torch.get_num_threads()
    out = []
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            y = ssd_scan(*ins[:5], shift=True, skip=ins[5])
            out.append((y, *_grads(y, ins[:6], 2)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("home_is", ["a file", "not writable"])
def test_a_home_that_cannot_be_written_gets_a_cache_in_the_temporary_directory(
        home_is: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No ``$HYBRID_NAS_CACHE``, and a home whose cache folder cannot be made (the home is a file)
    or written (``os.access`` says no: these tests run as root, which writes anywhere): the
    library goes to a per-user folder in the temporary directory. With a usable home, there."""
    home = tmp_path / "home"
    monkeypatch.delenv(ns.CACHE_ENV, raising=False)
    monkeypatch.setattr(ns.Path, "home", lambda: home)
    monkeypatch.setattr(ns.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    home.mkdir()
    assert ns.library_path().parent == home / ".cache" / "hybrid_nas"
    if home_is == "a file":
        shutil.rmtree(home)
        home.write_text("")
    else:
        monkeypatch.setattr(ns.os, "access", lambda path, mode: False)
    assert ns.library_path().parent == tmp_path / "tmp" / f"hybrid_nas-{ns.os.getuid()}"


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork here")
def test_a_forked_child_scans_with_threads_after_its_parent_did() -> None:
    """The parent scans on 2 threads (its pool starts), then forks: the child's scan on 2 threads
    must run (a pool inherited as it was would never run the work) and give the parent's result."""
    import os

    ins = [t.detach() for t in _scan_inputs(4, 12, 32, 16, torch.float32)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = ss.selective_scan(*ins)
        assert ns._pool is not None
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the scan ran and agreed
            import signal

            signal.alarm(120)  # a hung scan (the bug this guards against) ends the child, not the suite
            ok = False
            try:
                ok = torch.equal(ss.selective_scan(*ins), want)
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(threads)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
