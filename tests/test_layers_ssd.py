"""SSD (Mamba-2) and Hydra token mixers: the chunked scan against the step-by-step recurrence in
float64, both mixers against their papers' formulations written plainly (flips, one conv over
(x, B, C), Hydra's roll-and-zero shift), the initialisations and the width check."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from search_spaces.layers import _ssd
from search_spaces.layers._ssd import ssd_chunked, ssd_recurrence
from search_spaces.layers.common import depthwise_conv_tokens, stacked_linears
from search_spaces.layers.hydra import Hydra
from search_spaces.layers.ssd import BidirectionalMamba2

LENGTHS = [1, 2, 7, 47, 48, 49, 96, 100, 196, 197]  # 48 is the chunk: below, at and across it


def _inputs(n: int, scale: float, seed: int, b: int = 2, h: int = 4, p: int = 8, s: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, h, p, generator=g, dtype=torch.float64)
    dt = scale * torch.rand(b, n, h, generator=g, dtype=torch.float64)
    A = -1.0 - 15.0 * torch.rand(h, generator=g, dtype=torch.float64)  # Mamba-2's A range [-16, -1]
    B = torch.randn(b, n, s, generator=g, dtype=torch.float64)
    C = torch.randn(b, n, s, generator=g, dtype=torch.float64)
    return x, dt, A, B, C


def _chunk_totals(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Each chunk's whole log decay, (b, chunks, 1, h) in float32, chunked as ssd_chunked chunks."""
    b, n, h = dt.shape
    chunks = math.ceil(n / _ssd.CHUNK)
    size = math.ceil(n / chunks)
    la = F.pad((dt * A).float(), (0, 0, 0, chunks * size - n))
    return la.view(b, chunks, size, h).sum(2, keepdim=True)


# dt scales for the three ways through the chunk: every head factorised, some heads, none
REGIMES = {"factorised": 0.02, "mixed": 0.4, "per_head": 5.0}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_the_regimes_take_the_paths_they_name(regime: str) -> None:
    dt, A = _inputs(196, REGIMES[regime], 0)[1:3]
    ok = _ssd._span_ok(_chunk_totals(dt, A))
    assert ok is not None
    assert {"factorised": bool(ok.all()), "mixed": bool(ok.any()) and not bool(ok.all()),
            "per_head": not bool(ok.any())}[regime]


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_scan_equals_the_float64_recurrence(regime: str, shift: bool, reverse: bool) -> None:
    for n in LENGTHS:
        x, dt, A, B, C = _inputs(n, REGIMES[regime], n)
        want = ssd_recurrence(x, dt, A, B, C, shift=shift, reverse=reverse)
        got = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), shift=shift, reverse=reverse)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"n={n}")


def test_reverse_is_the_forward_scan_of_the_flipped_sequence() -> None:
    x, dt, A, B, C = _inputs(37, 0.3, 1)
    for shift in (False, True):
        flipped = ssd_recurrence(x.flip(1), dt.flip(1), A, B.flip(1), C.flip(1), shift=shift).flip(1)
        torch.testing.assert_close(ssd_recurrence(x, dt, A, B, C, shift=shift, reverse=True), flipped)


def test_chunked_scan_gradients_equal_the_recurrence() -> None:
    x, dt, A, B, C = _inputs(45, 0.3, 2)
    ins = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C)]
    grads_want = torch.autograd.grad(ssd_recurrence(*ins, shift=True, reverse=True).square().sum(), ins)
    grads_got = torch.autograd.grad(ssd_chunked(*ins, shift=True, reverse=True).square().sum(), ins)
    for want, got in zip(grads_want, grads_got):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [97, 150])  # several chunks (the carried state's hand-written backward), padded
def test_factorised_scan_gradients_across_chunks(n: int, shift: bool, reverse: bool) -> None:
    """The factorised path's hand-written backward (``_FactorisedScan``, the carry recurrence taken
    backwards) against autograd through the float64 recurrence, every input, several chunks."""
    x, dt, A, B, C = _inputs(n, REGIMES["factorised"], 7)
    ok = _ssd._span_ok(_chunk_totals(dt, A))
    assert ok is not None and bool(ok.all())
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C)]
    want = torch.autograd.grad((ssd_recurrence(*ins, shift=shift, reverse=reverse) * w).sum(), ins)
    got = torch.autograd.grad((ssd_chunked(*ins, shift=shift, reverse=reverse) * w).sum(), ins)
    for g, g64 in zip(got, want):
        torch.testing.assert_close(g, g64, rtol=1e-8, atol=1e-8)


def test_factorised_scan_backward_passes_gradcheck() -> None:
    """``_FactorisedScan`` on its own (arbitrary factors, two chunks, padding) against finite differences."""
    g = torch.Generator().manual_seed(9)
    b, n, h, p, s, c, q = 1, 7, 2, 3, 2, 2, 4

    def r(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    ins = (r(b, n, h, p), r(b, c, q, h), r(b, c, q, h), r(b, c, 1, h), r(b, c, 1, h), r(b, c, 1, h),
           r(b, c, q, s), r(b, c, q, s), r(b, c, q, q))
    # extras (skip, acc): none; Hydra's diagonal per head and token, with the other direction's
    # output added in; Mamba-2's D per head
    for skip, acc in ((None, None), (r(b, n, h), r(b, n, h, p)), (r(h), None)):
        given = tuple(t for t in (skip, acc) if t is not None)
        has = (skip is not None, acc is not None)
        for reverse in (False, True):
            def f(*a: torch.Tensor, rev: bool = reverse, has: tuple[bool, bool] = has) -> torch.Tensor:
                rest = iter(a[9:])
                return _ssd._FactorisedScan.apply(*a[:9], *(next(rest) if on else None for on in has), rev)
            assert torch.autograd.gradcheck(f, (*ins, *given))
            # its double backward (GraSP's Hessian-gradient product) through the plain formulation
            assert torch.autograd.gradgradcheck(f, (*ins, *given))


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_skip_and_the_added_output_are_those_of_adding_them_afterwards(regime: str, per_token: bool,
                                                                          reverse: bool) -> None:
    """``ssd_chunked(..., skip=, acc=)`` is ``y + x * skip + acc``, on every path: in float32 against the
    float64 recurrence, and its gradients (every input, the skip and acc too) in float64."""
    x, dt, A, B, C = _inputs(100, REGIMES[regime], 11)
    g = torch.Generator().manual_seed(12)
    skip = torch.randn(*(x.shape[:3] if per_token else x.shape[2:3]), generator=g, dtype=torch.float64)
    acc = torch.randn(x.shape, generator=g, dtype=torch.float64)
    want = ssd_recurrence(x, dt, A, B, C, shift=True, reverse=reverse) + x * skip[..., None] + acc
    got = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), shift=True, reverse=reverse, skip=skip.float(),
                      acc=acc.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, skip, acc)]
    g_want = torch.autograd.grad(((ssd_recurrence(*ins[:5], shift=True, reverse=reverse)
                                   + ins[0] * ins[5][..., None] + ins[6]) * w).sum(), ins)
    g_got = torch.autograd.grad((ssd_chunked(*ins[:5], shift=True, reverse=reverse, skip=ins[5], acc=ins[6])
                                 * w).sum(), ins)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_strongly_decaying_heads_are_scanned_again_by_shorter_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heads whose decay over a chunk is too strong for the factorised form are computed again by
    the factorised form over shorter chunks (each no longer than half the first), not head by head;
    only a decay too strong for a single step takes the per-head form. Equal to the recurrence."""
    per_head, chunks = [], []
    general, chunked = _ssd._general, _ssd.ssd_chunked
    monkeypatch.setattr(_ssd, "_general", lambda *a: per_head.append(a[0].shape[2]) or general(*a))

    def spy(*a: torch.Tensor, **k: object) -> torch.Tensor:
        chunks.append((a[0].shape[2], a[7] if len(a) > 7 else _ssd.CHUNK))
        return chunked(*a, **k)
    monkeypatch.setattr(_ssd, "ssd_chunked", spy)
    x, dt, A, B, C = _inputs(196, REGIMES["mixed"], 0)
    ok = _ssd._span_ok(_chunk_totals(dt, A))
    assert ok is not None and 0 < int(ok.sum()) < 4
    got = spy(*(t.float() for t in (x, dt, A, B, C)))
    torch.testing.assert_close(got.double(), ssd_recurrence(x, dt, A, B, C), rtol=1e-5, atol=1e-5)
    assert per_head == [] and chunks[0] == (4, _ssd.CHUNK)
    assert [h for h, _ in chunks[1:2]] == [int((~ok).sum())]  # the strong heads alone, once or more
    assert all(c <= _ssd.CHUNK // 2 for _, c in chunks[1:]) and len(chunks) <= 7
    # a decay above the limit in one step (dt up to 5, A = -16): the per-head form, at chunk 1
    per_head.clear()
    x, dt, A, B, C = _inputs(60, REGIMES["per_head"], 1)
    A = torch.full_like(A, -16.0)
    assert float((dt * A).abs().max()) > _ssd._FACTOR_SPAN[torch.float32]
    got = spy(*(t.float() for t in (x, dt, A, B, C)))
    torch.testing.assert_close(got.double(), ssd_recurrence(x, dt, A, B, C), rtol=1e-5, atol=1e-5)
    assert per_head and chunks[-1][1] == 1


def test_stacked_linears_equal_the_separate_maps_and_fall_back_for_a_swapped_one() -> None:
    """One product over the stacked weights gives each map's output and gradients; a map that is not a
    plain bias-free Linear (a bias here, as a quantised swap would be another class) runs on its own."""
    torch.manual_seed(0)
    maps = [torch.nn.Linear(12, k, bias=False).double() for k in (5, 16, 3)]
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    got, want = stacked_linears(x, maps), [m(x) for m in maps]
    assert [t.shape[-1] for t in got] == [5, 16, 3]
    w = [torch.randn(t.shape, dtype=torch.float64) for t in want]
    params = [x, *(m.weight for m in maps)]
    g_got = torch.autograd.grad(sum((t * v).sum() for t, v in zip(got, w)), params)
    g_want = torch.autograd.grad(sum((t * v).sum() for t, v in zip(want, w)), params)
    for a, b in zip((*got, *g_got), (*want, *g_want)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with_bias = [*maps[:2], torch.nn.Linear(12, 3).double()]
    for a, m in zip(stacked_linears(x, with_bias), with_bias):
        assert a.is_contiguous()  # each map on its own: no column view of a stacked output
        torch.testing.assert_close(a, m(x), rtol=0, atol=0)


@pytest.mark.parametrize("before", [False, True])
def test_gated_rmsnorm_backward_equals_autograd(before: bool) -> None:
    """The hand-written backward of the gated RMSNorm against autograd through its plain form."""
    torch.manual_seed(0)
    norm = _ssd.GatedRMSNorm(24, norm_before_gate=before).double()
    with torch.no_grad():
        norm.weight.normal_()
    y, z = (torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gate = F.silu(z)
    a = y if before else y * gate
    want = _rms(a, norm.weight, norm.eps) * (gate if before else 1.0)
    got = norm(y, z)
    torch.testing.assert_close(got, want)
    w = torch.randn(got.shape, dtype=torch.float64)
    for g_got, g_want in zip(torch.autograd.grad((got * w).sum(), [y, z, norm.weight]),
                             torch.autograd.grad((want * w).sum(), [y, z, norm.weight])):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradgradcheck(lambda *t: _ssd._GatedRMSNormFn.apply(*t, norm.eps, before),
                                        (y[:1, :2], z[:1, :2], norm.weight))


@pytest.mark.parametrize("before", [False, True])
def test_gated_rmsnorm_project_folds_its_weight_into_the_linear(before: bool) -> None:
    """``project`` (the weight folded into the output projection's columns) computes
    ``out(norm(y, z))``, and gives every input and both weights the same gradients; also with a
    graph (the double-backward path) and without gradients (the inference path)."""
    torch.manual_seed(1)
    norm = _ssd.GatedRMSNorm(24, norm_before_gate=before).double()
    out = torch.nn.Linear(24, 10, bias=True).double()
    with torch.no_grad():
        norm.weight.normal_()
    y, z = (torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True) for _ in range(2))
    params = [y, z, norm.weight, out.weight, out.bias]
    got, want = norm.project(y, z, out), out(norm(y, z))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(got.shape, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), params, create_graph=True)
    g_want = torch.autograd.grad((want * w).sum(), params, create_graph=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # second order: the gradient of a gradient's norm, through both formulations
    gg_got = torch.autograd.grad(g_got[0].square().sum(), [z, norm.weight])
    gg_want = torch.autograd.grad(g_want[0].square().sum(), [z, norm.weight])
    for a, b in zip(gg_got, gg_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(norm.project(y, z, out), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_mixed_heads_gradients_in_float32(reverse: bool) -> None:
    """Some heads factorised, the others capped there and computed again per head: the gradients
    (through the shared C B^T too) equal the float64 recurrence's, nothing inf or NaN leaks."""
    x, dt, _, B, C = _inputs(100, REGIMES["mixed"], 5)
    A = -torch.tensor([1.0, 2.0, 14.0, 16.0], dtype=torch.float64)  # chunk decays of about 5 to 80
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ins64 = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C)]
    ins32 = [t.float().requires_grad_(True) for t in (x, dt, A, B, C)]
    ok = _ssd._span_ok(_chunk_totals(dt, A))
    assert ok is not None and bool(ok.any()) and not bool(ok.all())
    want = torch.autograd.grad((ssd_recurrence(*ins64, shift=True, reverse=reverse) * w).sum(), ins64)
    got = torch.autograd.grad((ssd_chunked(*ins32, shift=True, reverse=reverse) * w.float()).sum(), ins32)
    for g32, g64 in zip(got, want):
        assert torch.isfinite(g32).all()
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4)


def test_traced_scan_takes_the_per_head_form_and_agrees() -> None:
    x, dt, A, B, C = (t.float() for t in _inputs(50, 0.02, 3))
    traced = torch.jit.trace(lambda *a: ssd_chunked(*a, shift=True), (x, dt, A, B, C))
    torch.testing.assert_close(traced(x, dt, A, B, C), ssd_chunked(x, dt, A, B, C, shift=True),
                               rtol=1e-5, atol=1e-5)


def test_scan_memory_is_linear_in_tokens() -> None:
    """No (n, n) or (n, d_state, headdim)-per-token tensor: the largest tensor the scan makes grows
    linearly with the tokens (chunk-local (q, q) blocks and per-chunk states only)."""
    biggest = {}
    for n in (256, 1024):
        x, dt, A, B, C = (t.float() for t in _inputs(n, 0.3, 4, b=1))
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            ssd_chunked(x.requires_grad_(True), dt, A, B, C)
        biggest[n] = max(sizes)
    assert biggest[1024] <= 4.5 * biggest[256]  # 4x the tokens; chunks of 47 against 43 tokens (padding)
    assert biggest[256] <= 256 * 4 * _ssd.CHUNK * 2  # tokens x heads x chunk (x2: decay and scores)


@pytest.mark.parametrize("mode", ["causal", "anticausal", "same"])
def test_depthwise_conv_tokens_equals_conv1d(mode: str) -> None:
    torch.manual_seed(0)
    k = 7 if mode == "same" else 4
    conv = torch.nn.Conv1d(6, 6, k, groups=6, padding=k // 2 if mode == "same" else k - 1)
    x = torch.randn(2, 9, 6)
    if mode == "same":
        want = conv(x.transpose(1, 2)).transpose(1, 2)
    else:
        seq = x.flip(1) if mode == "anticausal" else x
        want = conv(seq.transpose(1, 2))[..., :9].transpose(1, 2)
        want = want.flip(1) if mode == "anticausal" else want
    torch.testing.assert_close(depthwise_conv_tokens(x, conv, mode), want)


# ------------------------------------------------------------------------------------------------
# the mixers against their papers' formulations, written plainly, in float64
# ------------------------------------------------------------------------------------------------


def _perturb(m: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _rms(y: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) * w


def _conv_xbc(xbc: torch.Tensor, convs: list[torch.nn.Conv1d], padding: int, n: int) -> torch.Tensor:
    """Mamba-2's / Hydra's one depthwise conv over the concatenated (x, B, C) channels."""
    w = torch.cat([c.weight for c in convs])
    b = torch.cat([c.bias for c in convs])
    return F.conv1d(xbc.transpose(1, 2), w, b, padding=padding, groups=w.shape[0])[..., :n].transpose(1, 2)


def plain_mamba2(m: BidirectionalMamba2, u: torch.Tensor) -> torch.Tensor:
    """Vision-Mamba-style bidirectional Mamba-2: the backward branch on the flipped sequence."""
    x, z = m.x_proj(u), m.z_proj(u)

    def branch(br: torch.nn.Module, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[1], m.d_state
        xbc = F.silu(_conv_xbc(torch.cat([x, br.bc_proj(u)], -1), [br.conv_x, br.conv_bc], m.d_conv - 1, n))
        x, b, c = xbc.split([m.d_inner, s, s], dim=-1)
        dt = F.softplus(br.delta_proj(u) + br.dt_bias)
        xh = x.unflatten(-1, (br.nheads, m.headdim))
        return (ssd_recurrence(xh, dt, -torch.exp(br.A_log), b, c) + br.D[:, None] * xh).flatten(-2)

    y = branch(m.fwd, u, x) + branch(m.bwd, u.flip(1), x.flip(1)).flip(1)
    return m.out_proj(_rms(y * F.silu(z), m.norm.weight, m.norm.eps))


def plain_hydra(m: Hydra, u: torch.Tensor) -> torch.Tensor:
    """Hydra as its paper's code writes it: both directions stacked on the batch (the backward one
    flipped), one forward scan, roll by one token and zero the first, flip back, add the diagonal."""
    bsz, n = u.shape[:2]
    s, h = m.d_state, m.nheads
    x, z = m.x_proj(u), m.z_proj(u)
    xbc = F.silu(_conv_xbc(torch.cat([x, m.bc_proj(u)], -1), [m.conv_x, m.conv_bc], m.d_conv // 2, n))
    x, bc = xbc.split([m.d_inner, 4 * s], dim=-1)
    dt = m.delta_proj(u)
    dt = F.softplus(torch.cat([dt[..., :h], dt[..., h:].flip(1)]) + m.dt_bias)
    xs = torch.cat([x, x.flip(1)]).unflatten(-1, (h, m.headdim))
    bc = torch.cat([bc[..., :2 * s], bc[..., 2 * s:].flip(1)])
    b, c = bc.split([s, s], dim=-1)
    y = ssd_recurrence(xs, dt, -torch.exp(m.A_log), b, c).flatten(-2)
    y = torch.roll(y, shifts=1, dims=1)
    y[:, 0] = 0.0
    diag = F.linear(x, m.fc_D.weight, m.D).repeat_interleave(m.headdim, dim=-1)
    y = y[:bsz] + y[bsz:].flip(1) + x * diag
    return m.out_proj(_rms(y, m.norm.weight, m.norm.eps) * F.silu(z))


MIXERS = {"ssd": (BidirectionalMamba2, plain_mamba2), "hydra": (Hydra, plain_hydra)}


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("n", [1, 17, 50, 197])
def test_mixer_equals_its_plain_formulation_in_float64(name: str, n: int) -> None:
    cls, plain = MIXERS[name]
    torch.manual_seed(0)
    m = cls(24)  # d_inner 48: 3 heads of 16
    _perturb(m, 1)
    u = torch.randn(2, n, 24)
    with torch.no_grad():
        want = plain(copy.deepcopy(m).double(), u.double())
        got = m(u, (1, n))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_gradients_equal_the_plain_formulation(name: str) -> None:
    cls, plain = MIXERS[name]
    torch.manual_seed(0)
    m = cls(16).double()
    _perturb(m, 2)
    u = torch.randn(2, 40, 16, dtype=torch.float64, requires_grad=True)
    ref = copy.deepcopy(m)
    g_got = torch.autograd.grad(m(u, (1, 40)).square().sum(), [u, *m.parameters()])
    g_want = torch.autograd.grad(plain(ref, u).square().sum(), [u, *ref.parameters()])
    for got, want in zip(g_got, g_want):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_ssd_branches_run_both_ways() -> None:
    """Swapping the two branches' weights and flipping the sequence flips the output."""
    torch.manual_seed(0)
    m, swapped = BidirectionalMamba2(16), BidirectionalMamba2(16)
    _perturb(m, 3)
    swap = {"fwd.": "bwd.", "bwd.": "fwd."}
    swapped.load_state_dict({(swap[k[:4]] + k[4:] if k[:4] in swap else k): v for k, v in m.state_dict().items()})
    u = torch.randn(2, 21, 16)
    with torch.no_grad():
        torch.testing.assert_close(swapped(u.flip(1), (1, 21)), m(u, (1, 21)).flip(1), rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_papers() -> None:
    torch.manual_seed(0)
    m = BidirectionalMamba2(64)  # d_inner 128: 8 heads
    for br in (m.fwd, m.bwd):
        a = torch.exp(br.A_log)
        assert br.nheads == 8 and a.min() >= 1.0 and a.max() <= 16.0  # Mamba-2: A ~ -U[1, 16]
        dt = F.softplus(br.dt_bias)
        assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6  # Δ starts in [1e-3, 0.1]
        assert torch.equal(br.D, torch.ones(8))
    hy = Hydra(64)
    assert torch.equal(hy.A_log, torch.zeros(8)) and torch.equal(hy.D, torch.ones(8))  # Hydra: A = -1
    assert F.softplus(hy.dt_bias).max() <= 0.1 + 1e-6
    assert hy.conv_x.kernel_size == (7,) and m.fwd.conv_x.kernel_size == (4,)


@pytest.mark.parametrize("cls", [BidirectionalMamba2, Hydra])
def test_a_width_the_heads_do_not_divide_is_refused(cls: type) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        cls(20)


@pytest.mark.parametrize("name", list(MIXERS))
def test_a_spec_with_such_a_width_is_refused_in_one_line(name: str) -> None:
    from search_spaces.spec import ArchSpec

    stage = {"depth": 1, "width": 20, "token_mixer": name, "channel_mixer": "mlp"}
    with pytest.raises(ValueError, match=f"width 20 is not a multiple of 8, which token mixer '{name}' needs"):
        ArchSpec.from_dict({"stem": {"kind": "conv", "stride": 4}, "stages": [stage]})
    ArchSpec.from_dict({"stem": {"kind": "conv", "stride": 4}, "stages": [{**stage, "width": 24}]})
