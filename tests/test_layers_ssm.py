"""Exactness tests for the linear-time mixers: the parallel scan, the bidirectional Mamba mixer
("ssm") and ViG's bidirectional gated linear attention ("gated_linear"), each against a plain
Python loop over time. Shape/gradient/bf16/grid tests for every mixer live in the shared suite."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from search_spaces import count_ops
from search_spaces.layers._scan import linear_recurrence
from search_spaces.layers.gated_linear import BidirectionalGLA, gla_chunked
from search_spaces.layers.ssm import BidirectionalMamba
from search_spaces.registry import get_token_mixer

# ---------------------------------------------------------------------------------------------
# linear_recurrence


def loop_recurrence(a: torch.Tensor, b: torch.Tensor, dim: int, h0: torch.Tensor | None = None) -> torch.Tensor:
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    h = torch.zeros_like(b[0]) if h0 is None else h0
    out = []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out).movedim(0, dim)


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("n", [1, 7, 16, 17, 300])
def test_scan_matches_loop(n: int, with_h0: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n)
    a = (0.5 + 0.5 * torch.rand(3, n, 5, generator=g, dtype=dtype)).requires_grad_()
    b = torch.randn(3, n, 5, generator=g, dtype=dtype).requires_grad_()
    h0 = torch.randn(3, 5, generator=g, dtype=dtype).requires_grad_() if with_h0 else None
    got, want = linear_recurrence(a, b, 1, h0), loop_recurrence(a, b, 1, h0)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    w = torch.randn(got.shape, generator=g, dtype=dtype)
    inputs = [a, b] + ([h0] if with_h0 else [])
    # a_0 does not reach the output without h0: its gradient is zero (materialised).
    grads = torch.autograd.grad((got * w).sum(), inputs, materialize_grads=True)
    ref = torch.autograd.grad((want * w).sum(), inputs)
    for x, y in zip(grads, ref):  # reverse-time sums: looser by the length for fp32
        torch.testing.assert_close(x, y, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


class _Recurrence(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_recurrence(a, b, 1)


@pytest.mark.parametrize("n", [7, 16, 17, 300])
def test_scan_onnx_matches_loop(n: int) -> None:
    """``torch.onnx.export`` (TorchScript tracer) records the out-of-place path; ONNX Runtime then
    equals the loop. The in-place path exported wrong states (0.13 off on an ssm branch)."""
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime")
    g = torch.Generator().manual_seed(n)
    a, b = 0.5 + 0.5 * torch.rand(2, n, 6, generator=g), torch.randn(2, n, 6, generator=g)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Recurrence(), (a, b), buf, dynamo=False, opset_version=17, input_names=["a", "b"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    a2, b2 = 0.5 + 0.5 * torch.rand(2, n, 6, generator=g), torch.randn(2, n, 6, generator=g)
    got = torch.from_numpy(sess.run(None, {"a": a2.numpy(), "b": b2.numpy()})[0])
    torch.testing.assert_close(got, loop_recurrence(a2, b2, 1), atol=1e-5, rtol=1e-5)


def test_scan_other_dim_and_broadcast() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 40, generator=g, dtype=torch.float64)  # broadcasts over dim 1
    b = torch.randn(4, 6, 40, generator=g, dtype=torch.float64)
    h0 = torch.randn(6, 1, generator=g, dtype=torch.float64)  # broadcasts to (4, 6)
    got = linear_recurrence(a, b, dim=-1, h0=h0.T.expand(4, 6))
    want = loop_recurrence(a.expand_as(b), b, -1, h0.T.expand(4, 6))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(linear_recurrence(a, b, dim=0), loop_recurrence(a.expand_as(b), b, 0))


def scan_ops(n: int, backward: bool) -> int:
    a = torch.rand(2, n, 3, requires_grad=backward)
    b = torch.randn(2, n, 3, requires_grad=backward)

    def run() -> None:
        h = linear_recurrence(a, b, dim=1)
        if backward:
            h.sum().backward()

    return count_ops(run)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("n", [256, 1000])
def test_scan_work_is_linear(n: int, backward: bool) -> None:
    """Elements of every op + matmul FLOPs (search_spaces.count_ops): 4x the length, ~4x the work."""
    ratio = scan_ops(4 * n, backward) / scan_ops(n, backward)
    assert abs(ratio - 4) < 0.4, ratio


# ---------------------------------------------------------------------------------------------
# ssm: bidirectional Mamba


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def naive_mamba_branch(br: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One direction, (B, N, d_inner) -> (B, N, d_inner), everything as a loop over time."""
    bsz, n, d = x.shape
    w, bias = br.conv1d.weight[:, 0], br.conv1d.bias  # (d, K)
    k = w.shape[1]
    a = -torch.exp(br.A_log)  # (d, S)
    h = torch.zeros(bsz, d, a.shape[1])
    ys = []
    for t in range(n):
        u = bias.expand(bsz, d).clone()
        for j in range(k):  # causal: taps on x_{t-K+1..t}
            if t - (k - 1) + j >= 0:
                u = u + w[:, j] * x[:, t - (k - 1) + j]
        u = F.silu(u)
        dt, bm, cm = br.x_proj(u).split([br.dt_rank, br.d_state, br.d_state], dim=-1)
        delta = F.softplus(br.dt_proj(dt))  # (B, d)
        h = torch.exp(delta[..., None] * a) * h + (delta * u)[..., None] * bm[:, None, :]
        ys.append((h * cm[:, None, :]).sum(-1) + br.D * u)
    return torch.stack(ys, 1)


def naive_mamba(m: BidirectionalMamba, x: torch.Tensor) -> torch.Tensor:
    xi, z = m.in_proj(x).chunk(2, dim=-1)
    y = naive_mamba_branch(m.fwd, xi) + naive_mamba_branch(m.bwd, xi.flip(1)).flip(1)
    return m.out_proj(y * F.silu(z))


@pytest.mark.parametrize("n", [1, 23])
def test_ssm_matches_loop(n: int) -> None:
    torch.manual_seed(0)
    m = BidirectionalMamba(20)  # dt_rank 2, d_inner 40
    perturb(m, 1)
    x = torch.randn(2, n, 20)
    with torch.no_grad():
        torch.testing.assert_close(m(x, (1, n)), naive_mamba(m, x), atol=1e-5, rtol=1e-5)


def test_ssm_flip_with_swapped_branches() -> None:
    torch.manual_seed(0)
    m, swapped = BidirectionalMamba(16), BidirectionalMamba(16)
    perturb(m, 2)
    sd = m.state_dict()
    swap = {"fwd.": "bwd.", "bwd.": "fwd."}
    swapped.load_state_dict({(swap[k[:4]] + k[4:] if k[:4] in swap else k): v for k, v in sd.items()})
    x = torch.randn(2, 1 + 20, 16)  # a class token and a 4x5 grid
    with torch.no_grad():
        torch.testing.assert_close(swapped(x.flip(1), (4, 5)), m(x, (4, 5)).flip(1), atol=1e-5, rtol=1e-5)


def test_ssm_init() -> None:
    m = BidirectionalMamba(40)
    assert m.dt_rank == 3 and m.d_inner == 80
    for br in (m.fwd, m.bwd):
        dt = F.softplus(br.dt_proj.bias)
        assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
        assert br.dt_proj.bias._no_reinit and br.A_log._no_reinit and br.D._no_reinit
        torch.testing.assert_close(-torch.exp(br.A_log[0]), -torch.arange(1.0, 17.0))
        assert torch.equal(br.D, torch.ones(80))
    assert get_token_mixer("ssm") is BidirectionalMamba


# ---------------------------------------------------------------------------------------------
# gated_linear: ViG bidirectional GLA


def naive_gla(m: BidirectionalGLA, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    bsz, n, c = x.shape
    nh, hd = m.heads, m.head_dim
    xl = F.silu(m.local(x.transpose(1, 2).reshape(bsz, c, *hw))).flatten(2).transpose(1, 2)
    q, k, v = (t.reshape(bsz, n, nh, hd) for t in m.qkv(xl).chunk(3, dim=-1))
    q = q * hd**-0.5
    alpha_f = torch.sigmoid(m.gate_fwd(xl)).pow(1 / 16).reshape(bsz, n, nh, hd)
    alpha_b = torch.sigmoid(m.gate_bwd(xl)).pow(1 / 16).reshape(bsz, n, nh, hd)
    o = torch.zeros(bsz, n, nh, hd)
    for alpha, order in ((alpha_f, range(n)), (alpha_b, range(n - 1, -1, -1))):
        s = torch.zeros(bsz, nh, hd, hd)
        for t in order:
            s = alpha[:, t, :, :, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
            o[:, t] += (q[:, t, :, :, None] * s).sum(-2)

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    o = rms(o, m.o_norm.weight).reshape(bsz, n, c)
    local = rms(xl.reshape(bsz, n, nh, hd), m.l_norm.weight).reshape(bsz, n, c)
    gate = torch.sigmoid(m.g_proj(xl))
    return m.o_proj(gate * o + (1 - gate) * local)


@pytest.mark.parametrize("hw", [(1, 1), (3, 7)])
def test_gated_linear_matches_loop(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    m = BidirectionalGLA(12, heads=3)
    perturb(m, 3, scale=0.3)
    x = torch.randn(2, hw[0] * hw[1], 12)
    with torch.no_grad():
        torch.testing.assert_close(m(x, hw), naive_gla(m, x, hw), atol=1e-5, rtol=1e-5)


def test_gla_chunked_strong_gates_float64() -> None:
    """Gates near 0 (log alpha = -60 on one step) must not overflow the chunked form."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 40, 8, generator=g, dtype=torch.float64).unbind(0)
    log_alpha = F.logsigmoid(3 * torch.randn(2, 40, 8, generator=g, dtype=torch.float64)) / 16
    log_alpha[:, 20] = -60.0
    s = torch.zeros(2, 8, 8, dtype=torch.float64)
    want = []
    for t in range(40):
        s = log_alpha[:, t, :, None].exp() * s + k[:, t, :, None] * v[:, t, None, :]
        want.append((q[:, t, :, None] * s).sum(-2))
    torch.testing.assert_close(gla_chunked(q, k, v, log_alpha), torch.stack(want, 1), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spans", [{}, {torch.float32: math.inf, torch.float64: math.inf}])
@pytest.mark.parametrize("n", [5, 40])
def test_gla_chunked_both_intra_chunk_forms_equal_the_loop(spans: dict, n: int,  # type: ignore[type-arg]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The elementwise form ({}: always) and the matmul form (inf: always) equal the recurrence."""
    import search_spaces.layers.gated_linear as gl

    monkeypatch.setattr(gl, "_MATMUL_SPAN", spans)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, n, 8, generator=g).unbind(0)
    log_alpha = F.logsigmoid(2 * torch.randn(2, n, 8, generator=g)) / 4  # up to ~10 over a chunk
    s = torch.zeros(2, 8, 8, dtype=torch.float64)
    want = []
    for t in range(n):
        s = log_alpha[:, t, :, None].double().exp() * s + k[:, t, :, None].double() * v[:, t, None, :].double()
        want.append((q[:, t, :, None].double() * s).sum(-2))
    got = gla_chunked(q, k, v, log_alpha)
    torch.testing.assert_close(got.double(), torch.stack(want, 1), atol=1e-5, rtol=1e-5)


def _gla_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """GLA as written in the paper, one step at a time (differentiable)."""
    s = torch.zeros(*q.shape[:-2], q.shape[-1], v.shape[-1], dtype=q.dtype)
    out = []
    for t in range(q.shape[-2]):
        s = log_alpha[..., t, :, None].exp() * s + k[..., t, :, None] * v[..., t, None, :]
        out.append((q[..., t, :, None] * s).sum(-2))
    return torch.stack(out, -2)


@pytest.mark.parametrize("spans", [{}, {torch.float32: math.inf, torch.float64: math.inf}])
@pytest.mark.parametrize("n", [16, 37])
def test_gla_chunked_gradients_equal_the_loop(spans: dict, n: int,  # type: ignore[type-arg]
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Both intra-chunk forms, several chunks (37: three, the last padded), two batch dims: the
    gradients of every input equal the step-by-step recurrence's in float64."""
    import search_spaces.layers.gated_linear as gl

    monkeypatch.setattr(gl, "_MATMUL_SPAN", spans)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, n, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    log_alpha = (F.logsigmoid(2 * torch.randn(2, 3, n, 6, generator=g, dtype=torch.float64)) / 4).requires_grad_()
    ins = [q, k, v, log_alpha]
    got, want = gla_chunked(*ins), _gla_loop(*ins)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, ins, w), torch.autograd.grad(want, ins, w)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_gla_chunked_second_derivative() -> None:
    """Double backward (GraSP's Hessian-vector product) through the chunked form is exact too."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 20, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    log_alpha = (F.logsigmoid(torch.randn(1, 20, 4, generator=g, dtype=torch.float64)) / 4).requires_grad_()
    ins = [q, k, v, log_alpha]
    hvp = []
    for fn in (gla_chunked, _gla_loop):
        grads = torch.autograd.grad(fn(*ins).pow(2).sum(), ins, create_graph=True)
        hvp.append(torch.autograd.grad(sum((gi * gi).sum() for gi in grads), ins))
    for a, b in zip(*hvp):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_gated_linear_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        BidirectionalGLA(10, heads=3)
    with pytest.raises(ValueError, match="class tokens"):
        BidirectionalGLA(12, heads=2)(torch.randn(1, 10, 12), (3, 3))


# ---------------------------------------------------------------------------------------------
# bf16 autocast stays close to fp32

BF16_REL_TOL = 3e-2  # ||y_bf16 - y_fp32|| / ||y_fp32||; bf16 keeps 8 mantissa bits (~4e-3 per op)


@pytest.mark.parametrize("name", ["ssm", "gated_linear"])
def test_bf16_autocast_close_to_fp32(name: str) -> None:
    torch.manual_seed(0)
    m = get_token_mixer(name)(32, heads=2)
    x, hw = torch.randn(2, 49, 32), (7, 7)
    with torch.no_grad():
        ref = m(x, hw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, hw)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < BF16_REL_TOL, float(rel)
    assert math.isfinite(float(rel))


# ---- the fused, cache-blocked selective scan (search_spaces/layers/_selective_scan.py) ------------
# (float32 on a CPU goes to the native kernel by default: these tests ask for the fused form; the
# native kernel's tests are in test_native_scan.py)


def _scan_inputs(bsz: int, n: int, d: int, s: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, n, d, generator=g)
    delta = F.softplus(torch.randn(bsz, n, d, generator=g) - 2)
    a = -torch.exp(torch.randn(d, s, generator=g).clamp(-2, 2))
    b, c = torch.randn(bsz, n, s, generator=g), torch.randn(bsz, n, s, generator=g)
    return [t.to(dtype).requires_grad_() for t in (u, delta, a, b, c)]


def _scan_loop(u, delta, a, b, c):  # type: ignore[no-untyped-def]
    """The recurrence as written in the paper, one step at a time."""
    h = torch.zeros(u.shape[0], u.shape[2], a.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * u[:, t])[..., None] * b[:, t, None, :]
        ys.append((h * c[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def _saved_for_backward(fn: Callable[[], object], key: Callable[[torch.Tensor], int]) -> list[int]:
    """``key`` of every tensor autograd saves for the backward pass while ``fn()`` runs."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(key(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _small_blocks(monkeypatch: pytest.MonkeyPatch, samples: int, steps: int, state: int) -> None:
    """Blocks of ``samples`` samples by ``steps`` time steps for a state of ``state`` = S * D elements."""
    import search_spaces.layers._selective_scan as ss

    monkeypatch.setattr(ss, "STEP_ELEMENTS", samples * state)
    monkeypatch.setattr(ss, "BLOCK_ELEMENTS", samples * steps * state)


# (batch, tokens): batches of 1, 3 (slices of 2 and 1), 64; lengths shorter than a block, a multiple
# of it, and not a multiple (the last block is short)
@pytest.mark.parametrize("bsz,n", [(1, 1), (3, 1), (1, 23), (3, 17), (5, 10), (9, 64), (64, 13)])
def test_fused_selective_scan_equals_the_float64_loop(bsz: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import search_spaces.layers._selective_scan as ss

    _small_blocks(monkeypatch, 2, 5, 8 * 4)  # slices of 2 samples by 5 steps (a lone sample: 10)
    assert ss._plan(bsz, n, 8 * 4) == (min(bsz, 2), min(n, 10 // min(bsz, 2)))
    ins = _scan_inputs(bsz, n, 8, 4, torch.float32)
    ref = [t.detach().double().requires_grad_() for t in ins]
    y, y_ref = ss.selective_scan(*ins, native=False), _scan_loop(*ref)
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, ins, gy)
    grads_ref = torch.autograd.grad(y_ref, ref, gy.double())
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), gr, atol=1e-5 * float(gr.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("bsz,n", [(3, 17), (1, 64)])
def test_fused_selective_scan_float64_is_exact(bsz: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In float64 the blocked scan and its hand-written backward equal the loop to 1e-10."""
    import search_spaces.layers._selective_scan as ss

    _small_blocks(monkeypatch, 2, 6, 8 * 4)
    ins = _scan_inputs(bsz, n, 8, 4, torch.float64, seed=2)
    ref = [t.detach().clone().requires_grad_() for t in ins]
    y, y_ref = ss.selective_scan(*ins), _scan_loop(*ref)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for g, gr in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(y_ref, ref, gy)):
        torch.testing.assert_close(g, gr, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (3,), (4,), (0, 4), (2, 3)])
def test_fused_selective_scan_some_inputs_need_no_gradient(which: tuple[int, ...],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward pass skips what no input asks for; what is asked for stays exact."""
    import search_spaces.layers._selective_scan as ss

    _small_blocks(monkeypatch, 2, 4, 8 * 4)
    ins = [t.detach().requires_grad_(i in which) for i, t in enumerate(_scan_inputs(3, 11, 8, 4, torch.float64))]
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in ins]
    gy = torch.randn(3, 11, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = torch.autograd.grad(ss.selective_scan(*ins), [ins[i] for i in which], gy)
    want = torch.autograd.grad(_scan_loop(*ref), [ref[i] for i in which], gy)
    for g, gr in zip(got, want):
        torch.testing.assert_close(g, gr, atol=1e-10, rtol=1e-10)


def test_fused_selective_scan_equals_the_plain_form_at_default_blocks() -> None:
    """Default block sizes, a state of S x D = 16 x 256 (Mamba's at width 128): several slices and
    blocks; within 1e-5 of the plain formulation in float32, forward and backward."""
    from search_spaces.layers._selective_scan import _plan, selective_scan, selective_scan_reference

    per, steps = _plan(12, 100, 16 * 256)
    assert per < 12 and steps < 100 and 100 % steps  # several slices, several blocks, a short tail
    ins = _scan_inputs(12, 100, 256, 16, torch.float32, seed=5)
    ref = [t.detach().clone().requires_grad_() for t in ins]
    y, y_ref = selective_scan(*ins, native=False), selective_scan_reference(*ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    for g, gr in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(y_ref, ref, gy)):
        torch.testing.assert_close(g, gr, atol=1e-5 * float(gr.abs().max()), rtol=1e-5)


def test_fused_selective_scan_keeps_only_block_entry_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the passes autograd holds the inputs and one state per block and sample, never a
    (batch, N, S, D) tensor (and the forward pass under no_grad keeps nothing)."""
    import search_spaces.layers._selective_scan as ss

    _small_blocks(monkeypatch, 2, 8, 8 * 4)
    ins = _scan_inputs(4, 40, 8, 4, torch.float32)
    saved = _saved_for_backward(lambda: ss.selective_scan(*ins, native=False), torch.Tensor.numel)
    assert max(saved) == 4 * 40 * 8  # u, delta; the states: 4 samples x 5 blocks x (4 x 8)
    assert sorted(saved)[-3] == 4 * 5 * 4 * 8
    keeps: list[bool] = []
    real = ss._forward

    def spy(*args, keep: bool):  # type: ignore[no-untyped-def]
        keeps.append(keep)
        return real(*args, keep=keep)

    monkeypatch.setattr(ss, "_forward", spy)
    with torch.no_grad():  # A is a leaf that requires grad: still nothing to keep
        ss.selective_scan(*ins, native=False)
    ss.selective_scan(*ins, native=False)
    assert keeps == [False, True]


def test_fused_selective_scan_second_derivative_equals_the_plain_one() -> None:
    from search_spaces.layers._selective_scan import selective_scan, selective_scan_reference

    ins = _scan_inputs(2, 6, 4, 3, torch.float64)
    ref = [t.detach().clone().requires_grad_() for t in ins]
    hvp = []
    for fn, xs in ((selective_scan, ins), (selective_scan_reference, ref)):
        g = torch.autograd.grad(fn(*xs).pow(2).sum(), xs, create_graph=True)
        hvp.append(torch.autograd.grad(sum((gi * gi).sum() for gi in g), xs))
    for a, b in zip(*hvp):
        torch.testing.assert_close(a, b)
