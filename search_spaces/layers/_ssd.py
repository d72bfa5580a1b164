"""State space duality (SSD): Mamba-2's selective scan as chunked, batched matrix products.

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (ICML 2024). With the state matrix restricted to a scalar per
head, ``A_t = exp(dt_t a)``, the scan

    h_t = exp(dt_t a) h_{t-1} + dt_t B_t x_t^T,      y_t = h_t^T C_t        (h_t: d_state x headdim)

is multiplication by a semiseparable matrix, ``y = (L o C B^T) (dt x)`` with
``L[t, j] = exp(a (dt_{j+1} + ... + dt_t))`` for ``j <= t``. The chunked algorithm (paper, Sec. 6)
splits the sequence into chunks of ``q`` tokens:

1. inside each chunk, the quadratic ("attention") form: a (q, q) matrix per head, applied by a
   batched matmul;
2. each chunk's contribution to the state it hands on: one (d_state, q) x (q, headdim) matmul;
3. the states carried from chunk to chunk (a recurrence over n / q steps, a short loop);
4. what the carried state adds to each chunk's outputs: one (q, d_state) x (d_state, headdim) matmul.

Work is O(n q) for the chunk-local part and O(n d_state headdim) for the rest, memory O(n q) per
head; no (n, d_state, headdim) state is ever materialised for all tokens. Plain PyTorch: the
factorised path (the common one) has a hand-written backward over its large tensors
(:class:`_FactorisedScan`), the per-head path is left to autograd and is the one ``torch.onnx``
traces.

On a CPU in float32 the mixers call :func:`ssd_scan`, which runs the recurrence itself in native
code (``_native_scan``; the state of a head's 16 channels stays in the L1 cache, one exp per head
and step): 3.2x faster than the chunked form for one scan's forward+backward at batch 64, 16 heads
of 16 channels, one thread, at 14x14 tokens, 2.9x at 28x28 (``bench/native_scan.py``). The chunked
form serves everything else.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.layers import _native_scan
from search_spaces.layers.common import plain_grads

#: tokens per chunk; the chunk-local work grows with it, the number of carried states shrinks. Of
#: 16, 24, 32, 48 and 64, 48 measured best for fwd+bwd of ssd and hydra at 14x14 and 28x28 (batch 64,
#: width 128, one CPU thread): at 28x28, 16 cost 2.5x as much
CHUNK = 48
# Largest decay over one chunk (-dt a summed over it) for which the factorised form is used: its
# factors reach exp(span / 2), far from float32's largest value, and the exponents' rounding (about
# 6e-8 of 60 + 30) stays within 1e-5 of the float64 recurrence.
_FACTOR_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def ssd_recurrence(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, shift: bool = False,
                   reverse: bool = False) -> Tensor:
    """The definition, step by step (for tests): x (b, n, h, p), dt (b, n, h), A broadcastable to
    (b, h) or (h,), B and C (b, n, s) -> y (b, n, h, p), zero initial state. ``reverse``: the steps
    run from the last token to the first. ``shift``: each step's output is the one of the step
    before it (zero for the first), Hydra's ``shift(SS(x))``."""
    b, n, h, p = x.shape
    state = x.new_zeros(b, h, B.shape[-1], p)
    out: list[Tensor] = [x.new_zeros(0)] * n
    prev = torch.zeros_like(x[:, 0])
    for t in (range(n - 1, -1, -1) if reverse else range(n)):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        inp = B[:, t, None, :, None] * (dt[:, t, :, None] * x[:, t])[:, :, None, :]  # (b, h, s, p)
        state = decay[..., None, None] * state + inp
        y = (C[:, t, None, :, None] * state).sum(2)
        out[t], prev = (prev, y) if shift else (y, y)
    return torch.stack(out, dim=1) if n else x.clone()


def _span_ok(total: Tensor) -> Tensor | None:
    """Per head, whether the factorised form is exact for every chunk: each chunk's whole log decay
    ``total`` (b, c, 1, h) is within ``_FACTOR_SPAN``. None while a graph is traced (ONNX) or a CUDA
    graph captured, where a data-dependent branch cannot be taken: the per-head form is used there."""
    if torch.jit.is_tracing() or (total.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    return total.abs().amax((0, 1, 2)) <= _FACTOR_SPAN.get(total.dtype, 0.0)


def _mask(q: int, shift: bool, reverse: bool, device: torch.device) -> Tensor:
    """(q, q) bool, [t, j]: whether input j reaches output t: j <= t (j < t with the shift); transposed
    for a reverse scan."""
    ones = torch.ones(q, q, dtype=torch.bool, device=device)
    return ones.triu(int(shift)) if reverse else ones.tril(-int(shift))


def _running(log_a: Tensor, reverse: bool, exclusive: bool = False) -> Tensor:
    """Running sums of (b, c, q, h) log decays along q in the scan's direction, up to and including
    each step (or up to the step before it). Summed directly, never as a difference of running sums,
    which loses digits when the decay inside a chunk is strong."""
    if exclusive:  # step t carries the log decay of the step before it (zero for the first)
        log_a = F.pad(log_a[:, :, 1:], (0, 0, 0, 1)) if reverse else F.pad(log_a[:, :, :-1], (0, 0, 1, 0))
    return log_a.flip(2).cumsum(2).flip(2) if reverse else log_a.cumsum(2)


def _intra_per_head(log_a: Tensor, xd: Tensor, scores: Tensor, shift: bool, reverse: bool) -> Tensor:
    """Inside the chunks, head by head (any decay): ``L[t, j] = exp(log_a_{j+1} + ... + log_a_t) <= 1``
    for the pairs of ``_mask`` (up to ``log_a_{t-1}`` with the shift; mirrored for a reverse scan) as
    a (q, q) matrix per head, times ``C B^T``, times x. The sums are cumulated along t over the
    masked steps (Mamba-2's stable "segsum"). log_a (b, c, q, h); xd (b, c, q, h, p); scores
    (b, c, q, q), masked."""
    q = log_a.shape[2]
    if reverse:  # the forward construction on the mirrored steps, mirrored back
        log_a = log_a.flip(2)
    if shift:  # step m carries log_a_{m-1}: the sums stop one step earlier
        log_a = F.pad(log_a[:, :, :-1], (0, 0, 1, 0))
    la = log_a.transpose(2, 3)[..., :, None].expand(*log_a.shape[:2], log_a.shape[3], q, q)  # [.., k, j] = la_k
    keep = torch.ones(q, q, dtype=torch.bool, device=la.device).tril(-1 - int(shift))  # [k, j]: k > j (+1)
    seg = la.masked_fill(~keep, 0.0).cumsum(-2)  # [.., t, j]: the sum over the steps between j and t
    decay = seg.masked_fill(~_mask(q, shift, False, la.device), -math.inf).exp()  # (b, c, h, q, q)
    if reverse:
        decay = decay.flip(-1, -2)
    return ((decay * scores[:, :, None]) @ xd.transpose(2, 3)).transpose(2, 3)


def _per_column(t: Tensor, p: int) -> Tensor:
    """(..., h) per-head values repeated for each of the head's p columns: (..., h * p). (An expand,
    not ``repeat_interleave``, which the ONNX exporter turns into a wrongly shaped graph.)"""
    return t[..., None].expand(*t.shape, p).flatten(-2)


def _carry(local: Tensor, total: Tensor, p: int, reverse: bool) -> Tensor:
    """The state entering each chunk, (b, c, s, h * p), from the states the chunks leave by their own
    inputs ``local`` (b, c, s, h * p) and their whole-chunk log decays ``total`` (b, c, 1, h): a short
    recurrence over the chunks in the scan's direction (step 3)."""
    carry = _per_column(total.exp(), p)  # (b, c, 1, h * p): per column of the state
    order = range(local.shape[1] - 1, -1, -1) if reverse else range(local.shape[1])
    state = torch.zeros_like(local[:, 0])
    entering = []
    for i in order:
        entering.append(state)
        state = carry[:, i] * state + local[:, i]
    return torch.stack(entering[::-1] if reverse else entering, 1)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, shift: bool = False,
                reverse: bool = False, chunk: int = CHUNK, skip: Tensor | None = None,
                acc: Tensor | None = None) -> Tensor:
    """The same ``y`` as :func:`ssd_recurrence` by the chunked algorithm (see the module docstring),
    plus ``x * skip`` (a skip per head: ``skip`` broadcastable to (b, n, h), Mamba-2's D or Hydra's
    diagonal) and ``acc`` (b, n, h, p) when given. On the factorised path both are added while the
    output is written, with their gradients in the same backward: two passes over (b, n, h, p)
    tensors fewer than adding them afterwards.

    x (b, n, h, p); dt (b, n, h), >= 0; A (h,) or (b, 1, h), <= 0 (a scalar per head); B, C
    (b, n, s) shared by the heads (one group). ``reverse``: the scan runs from the last token to the
    first, computed in place (no (b, n, h, p) tensor is flipped). ``shift``: y_t is the output of the
    step before, ``C_{t-1} . h_{t-1}``: a strictly causal scan read through ``C`` shifted by one token.
    ``skip``'s last dimension is the heads'. Computes in the promoted dtype of the inputs.
    """
    b, n, h, p = x.shape
    if n == 0:
        return x.clone()
    given = (x, dt, A, B, C)  # as they came: the strongly decaying heads start again from these
    chunks = math.ceil(n / chunk)
    size = math.ceil(n / chunks)  # <= chunk; pads fewer than `chunks` tokens in total
    pad = chunks * size - n
    log_a = dt * A  # (b, n, h): log of each step's decay
    if shift:  # the step before's C at every step
        C = F.pad(C[:, 1:], (0, 0, 0, 1)) if reverse else F.pad(C[:, :-1], (0, 0, 1, 0))
    if pad:  # padded tokens go last (first in a reverse scan): log decay 0 and zero inputs change nothing
        dt, log_a = F.pad(dt, (0, 0, 0, pad)), F.pad(log_a, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    dtc, log_a = dt.view(b, chunks, size, h), log_a.view(b, chunks, size, h)
    cs = _running(log_a, reverse)  # (b, c, q, h): the input side's running log decay in the chunk
    cs_out = _running(log_a, reverse, exclusive=True) if shift else cs  # the output side's
    Bc, Cc = B.view(b, chunks, size, -1), C.view(b, chunks, size, -1)  # (b, c, q, s)
    # 1. inside the chunks: C_t . B_j, shared by the heads, for the pairs (t, j) the scan connects
    scores = (Cc @ Bc.transpose(-1, -2)).masked_fill(~_mask(size, shift, reverse, x.device), 0.0)
    total = cs[:, :, :1] if reverse else cs[:, :, -1:]  # (b, c, 1, h): each chunk's whole log decay
    ok = _span_ok(total)
    shorten = ok is not None and size > 1 and total.dtype in _FACTOR_SPAN  # (others: never factorised)
    if shorten and not bool(ok.any()):  # no head fits: all by shorter chunks
        return ssd_chunked(*given, shift, reverse, _shorter(total, size), skip, acc)
    if ok is None or not bool(ok.any()):  # traced, or a single step decays too much: head by head
        xc = (F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).view(b, chunks, size, h, p)
        y = _general(xc, dtc, log_a, cs_out, total, Bc, Cc, scores, shift, reverse).reshape(b, chunks * size, h, p)
        return _extras(y[:, :n] if pad else y, x, skip, acc)
    y = _fast(x, dtc, cs, cs_out, total, Bc, Cc, scores, reverse, skip, acc)
    if not bool(ok.all()):  # the heads with a strong decay inside some chunk: computed again
        slow = (~ok).nonzero()[:, 0]

        def heads(t: Tensor | None, dim: int = -1) -> Tensor | None:  # the slow heads of a tensor
            return None if t is None else t.index_select(dim, slow)  # (10x faster than t[..., slow])
        skip_s, acc_s = heads(skip), heads(acc, 2)
        if shorten:  # by shorter chunks, where their decay over a chunk fits the factorised form
            gx, gdt, gA, gB, gC = given
            ys = ssd_chunked(heads(gx, 2), heads(gdt), heads(gA), gB, gC, shift, reverse, _shorter(heads(total), size),
                             skip_s, acc_s)
        else:  # a single step decays that much: the per-head form
            xs = heads(x, 2)
            xc = F.pad(xs, (0, 0, 0, 0, 0, pad)) if pad else xs
            ys = _general(xc.view(b, chunks, size, -1, p), heads(dtc), heads(log_a), heads(cs_out), heads(total),
                          Bc, Cc, scores, shift, reverse).reshape(b, chunks * size, -1, p)
            ys = _extras(ys[:, :n] if pad else ys, xs, skip_s, acc_s)
        _put_heads(y, slow.tolist(), ys)  # (in place: _FactorisedScan saves y before f_out, not this)
    return y


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, shift: bool = False, reverse: bool = False,
             skip: Tensor | None = None, acc: Tensor | None = None) -> Tensor:
    """:func:`ssd_chunked`'s ``y`` (same arguments), by the native step-by-step scan where it runs
    (float32 on a CPU, outside tracing: ``_native_scan``) and by the chunked matmuls elsewhere (a
    GPU, float64, ``torch.onnx``, no C compiler). See the module docstring for its speed."""
    if (x.shape[1] == 0 or torch.jit.is_tracing() or not _native_scan.supports(x, A, B.shape[-1])
            or any(t is not None and t.dtype != torch.float32 for t in (dt, A, B, C, skip, acc))):
        return ssd_chunked(x, dt, A, B, C, shift, reverse, skip=skip, acc=acc)
    return _NativeSSD.apply(x, dt, A, B, C, skip, acc, shift, reverse)


class _NativeSSD(torch.autograd.Function):
    """:func:`ssd_scan`'s native path: keeps the inputs only; the backward recomputes the states."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,  # type: ignore[override]
                skip: Tensor | None, acc: Tensor | None, shift: bool, reverse: bool) -> Tensor:
        b, n, h, _ = x.shape
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        a = A.detach().expand(b, 1, h).reshape(b, h).contiguous()  # (h,) or (b, 1, h): one a per sample and head
        sk = None if skip is None else skip.detach().expand(b, n, h).contiguous()
        y = _native_scan.ssd_forward(x, dt, a, B, C, sk, None if acc is None else acc.contiguous(), shift, reverse)
        ctx.save_for_backward(x, dt, A, B, C, skip)
        ctx.flags = (shift, reverse, acc is not None)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, dt, A, B, C, skip = ctx.saved_tensors
        shift, reverse, has_acc = ctx.flags
        if torch.is_grad_enabled():  # create_graph: differentiate the chunked form instead
            acc = g.new_zeros(g.shape).requires_grad_() if has_acc else None
            grads = plain_grads(lambda *t: ssd_chunked(*t[:5], shift, reverse, skip=t[5], acc=t[6]),
                                (x, dt, A, B, C, skip, acc), g)
            return (*grads[:6], g if has_acc else None, None, None)
        b, n, h, _ = x.shape
        a = A.expand(b, 1, h).reshape(b, h).contiguous()
        sk = None if skip is None else skip.expand(b, n, h).contiguous()
        gx, gdt, ga, gB, gC, gsk = _native_scan.ssd_backward(x, dt, a, B, C, sk, g, shift, reverse)
        want = ctx.needs_input_grad
        return (gx if want[0] else None, gdt if want[1] else None,
                ga.view(b, 1, h).sum_to_size(A.shape) if want[2] else None, gB if want[3] else None,
                gC if want[4] else None, gsk.sum_to_size(skip.shape) if want[5] and gsk is not None else None,
                g if want[6] else None, None, None)


def _put_heads(y: Tensor, heads: list[int], ys: Tensor) -> None:
    """``y[..., heads, :] = ys`` (heads along dim 2) in place, a slice assignment per run of
    consecutive heads: for the one or two strong heads usual at Mamba-2's initialisation, 0.3x
    the cost of the indexed assignment forward and backward ((64, 784, 16, 16), two heads)."""
    start = 0
    while start < len(heads):
        end = start + 1
        while end < len(heads) and heads[end] == heads[end - 1] + 1:
            end += 1
        y[:, :, heads[start]:heads[end - 1] + 1] = ys[:, :, start:end]
        start = end


def _shorter(total: Tensor, size: int) -> int:
    """The chunk length to scan heads again with, whose decay over some chunk of ``size`` tokens
    (``total``: the chunks' whole log decays, (b, c, 1, h)) is beyond ``_FACTOR_SPAN``: at most half
    of ``size``, and short enough that the strongest decay, spread evenly, would fit. A chunk's decay
    shrinks with its length, so a few halvings at most reach chunks that fit (or single steps, which
    take the per-head form when even one step decays that much). What the strong heads add to an
    ssd block's fwd+bwd (batch 64, width 128, one CPU thread; inputs with one such head at 14x14
    tokens, two at 28x28), this way against the per-head form at the first chunk length: 4.5 against
    18.6 ms at 14x14, 92 against 162 ms at 28x28."""
    worst = float(total.detach().abs().amax())
    return max(1, min(size // 2, math.floor(size * _FACTOR_SPAN[total.dtype] / worst)))


def _extras(y: Tensor, x: Tensor, skip: Tensor | None, acc: Tensor | None) -> Tensor:
    """``y + x * skip + acc`` (what is given), out of place (the general and traced paths)."""
    if skip is not None:
        y = torch.addcmul(y, x, skip[..., None])
    return y if acc is None else y + acc


def _fast(x: Tensor, dtc: Tensor, cs: Tensor, cs_out: Tensor, total: Tensor, Bc: Tensor, Cc: Tensor,
          scores: Tensor, reverse: bool, skip: Tensor | None, acc: Tensor | None) -> Tensor:
    """Steps 1-4 with all heads in each matmul and one pass over x on either side, exact for the
    heads whose decay over every chunk is within ``_FACTOR_SPAN`` (``_span_ok``). With r half the
    chunk's whole log decay, ``exp(cs_t - cs_j) = exp(cs_t - r) exp(r - cs_j)`` (the split GLA also
    uses: Yang et al. 2024, Sec. 4.2): v = dt x exp(r - cs) is what the head-shared C B^T multiplies
    and what B^T collects into the chunk's state (times exp(cs_end - r)), and exp(cs_out - r) scales
    the sum of both outputs. Every running sum lies between the chunk's whole decay and 0, so each
    factor is at most exp(span / 2). For the other heads the exponents are capped there, so their
    columns stay finite (no inf or NaN reaches the shared C B^T's gradient) but wrong: the caller
    computes those heads again. x (b, n, h, p) unpadded, the others chunked as in :func:`ssd_chunked`;
    returns y (b, n, h, p), with ``skip`` and ``acc`` added as :func:`ssd_chunked` says. The per-head
    factors are small (b, c, q, h) tensors left to autograd; the passes over (b, n, h, p) tensors are
    :class:`_FactorisedScan`'s, with a hand-written backward."""
    cap = _FACTOR_SPAN.get(cs.dtype, 0.0) / 2
    ref = total / 2  # (exp of it, and of total - ref, may underflow to 0 for a capped head: harmless)
    f_in = dtc * (ref - cs).clamp(max=cap).exp()  # (b, c, q, h): v = x f_in
    f_out = (cs_out - ref).clamp(max=cap).exp()
    if Bc.shape[1] == 1:  # one chunk: no state is carried
        return _FactorisedScan.apply(x, f_in, f_out, None, None, None, Bc, Cc, scores, skip, acc, reverse)
    return _FactorisedScan.apply(x, f_in, f_out, (total - ref).exp(), ref.exp(), total.exp(), Bc, Cc, scores,
                                 skip, acc, reverse)


def _heads(t: Tensor | None) -> Tensor | None:
    """A (b, c, 1, h) per-chunk, per-head factor as (b, c, 1, h, 1), to scale (b, c, s, h, p) states."""
    return None if t is None else t[..., None]


class _FactorisedScan(torch.autograd.Function):
    """``_fast``'s work on the (b, n, h, p)-sized tensors, in as few passes as eager PyTorch allows:
    x is padded while it is scaled into v (no padded copy of x), the carried state is added by an
    in-place ``baddbmm``, the output is written unpadded; the backward recomputes v (one pass) rather
    than saving it, and takes the carry's recurrence backwards by hand.

    Inputs: x (b, n, h, p); f_in, f_out (b, c, q, h); f_local, f_ref, decay (b, c, 1, h): exp(total -
    r), exp(r), exp(total), or None for one chunk; Bc, Cc (b, c, q, s); scores (b, c, q, q), masked;
    skip broadcastable to (b, n, h) and acc (b, n, h, p), or None.
    ``out = f_out (scores @ v + Cc @ (E f_ref)) + x skip + acc``, v = x f_in padded, E the states
    entering the chunks: ``E_next = decay E + (Bc^T @ v) f_local`` in the scan's direction. Added here,
    the skip costs one pass forward (in place, no new tensor) and one backward (its part of x's
    gradient joins the scan's in one ``addcmul_``, where autograd would make it and then sum it in);
    ``acc`` is read while the output is written and passes the gradient on untouched."""

    @staticmethod
    def _v(x: Tensor, f_in: Tensor) -> Tensor:
        """v = x f_in, padded with zero tokens to the chunks: (b, c, q, h * p)."""
        b, n, h, p = x.shape
        c, q = f_in.shape[1:3]
        v = x.new_empty(b, c * q, h, p)
        torch.mul(x, f_in.reshape(b, c * q, h)[:, :n, :, None], out=v[:, :n])
        v[:, n:].zero_()
        return v.view(b, c, q, h * p)

    @staticmethod
    def forward(ctx, x: Tensor, f_in: Tensor, f_out: Tensor, f_local: Tensor | None, f_ref: Tensor | None,
                decay: Tensor | None, Bc: Tensor, Cc: Tensor, scores: Tensor, skip: Tensor | None,
                acc: Tensor | None, reverse: bool) -> Tensor:
        b, n, h, p = x.shape
        c, q, s = Bc.shape[1:]
        v = _FactorisedScan._v(x, f_in)
        y = scores @ v  # (b, c, q, h * p)
        raw = entering = None
        if c > 1:
            raw = (Bc.transpose(-1, -2) @ v).view(b, c, s, h, p)  # each chunk's own state, before f_local
            entering = _carry_states(raw * _heads(f_local), _heads(decay), reverse)
            state = entering * _heads(f_ref)
            y.view(b * c, q, h * p).baddbmm_(Cc.reshape(b * c, q, s), state.view(b * c, s, h * p))
        yv, fo = y.view(b, c * q, h, p)[:, :n], f_out.reshape(b, c * q, h)[:, :n, :, None]
        out = torch.mul(yv, fo) if acc is None else torch.addcmul(acc, yv, fo)
        if skip is not None:
            out.addcmul_(x, skip[..., None])
        ctx.reverse, ctx.has_acc = reverse, acc is not None
        ctx.save_for_backward(x, f_in, f_out, f_local, f_ref, decay, Bc, Cc, scores, skip, y, raw, entering)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, f_in, f_out, f_local, f_ref, decay, Bc, Cc, scores, skip, y, raw, entering = ctx.saved_tensors
        g_acc = g if ctx.has_acc else None  # acc is added as it is
        if torch.is_grad_enabled():  # create_graph (GraSP's Hessian-gradient product): differentiate
            # the plain formulation on the saved inputs, so the gradients stay connected to their history
            return (*plain_grads(_factorised_plain, (x, f_in, f_out, f_local, f_ref, decay, Bc, Cc, scores, skip),
                                  g, ctx.reverse), g_acc, None)
        b, n, h, p = x.shape
        c, q, s = Bc.shape[1:]
        g_out = torch.zeros_like(f_out).view(b, c * q, h)
        g_out[:, :n] = _dot(g, y.view(b, c * q, h, p)[:, :n])
        gy = x.new_empty(b, c * q, h, p)  # the gradient of y before f_out, padded
        torch.mul(g, f_out.reshape(b, c * q, h)[:, :n, :, None], out=gy[:, :n])
        gy[:, n:].zero_()
        gy = gy.view(b, c, q, h * p)
        v = _FactorisedScan._v(x, f_in)
        g_scores = gy @ v.transpose(-1, -2)
        gv = scores.transpose(-1, -2) @ gy  # (b, c, q, h * p)
        g_local = g_ref = g_decay = g_B = g_C = None
        if c > 1:
            state = entering * _heads(f_ref)
            g_C = gy @ state.view(b, c, s, h * p).transpose(-1, -2)
            g_state = (Cc.transpose(-1, -2) @ gy).view(b, c, s, h, p)
            g_ref = (g_state * entering).sum((2, 4))[:, :, None]
            g_own, g_decay = _carry_states_backward(g_state * _heads(f_ref), entering, _heads(decay), ctx.reverse)
            g_local = (g_own * raw).sum((2, 4))[:, :, None]
            g_raw = (g_own * _heads(f_local)).view(b * c, s, h * p)
            g_B = v @ g_raw.view(b, c, s, h * p).transpose(-1, -2)
            gv.view(b * c, q, h * p).baddbmm_(Bc.reshape(b * c, q, s), g_raw)
        gv = gv.view(b, c * q, h, p)[:, :n]
        g_x = gv * f_in.reshape(b, c * q, h)[:, :n, :, None]
        g_skip = None
        if skip is not None:
            g_x.addcmul_(g, skip[..., None])
            g_skip = _dot(g, x).sum_to_size(skip.shape) if ctx.needs_input_grad[9] else None
        g_in = torch.zeros_like(f_in).view(b, c * q, h)
        g_in[:, :n] = _dot(gv, x)
        return (g_x, g_in.view_as(f_in), g_out.view_as(f_out), g_local, g_ref, g_decay, g_B, g_C, g_scores, g_skip,
                g_acc, None)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for (b, n, h, p) tensors. For contiguous ones as a batched product, without
    the (b, n, h, p) product in memory: 0.8x the product and sum (one CPU thread, p = 16). A slice of
    a padded tensor would be copied first, which costs more than it saves: product and sum there."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.einsum("bnhp,bnhp->bnh", a, b)
    return (a * b).sum(-1)


def _factorised_plain(x: Tensor, f_in: Tensor, f_out: Tensor, f_local: Tensor | None, f_ref: Tensor | None,
                      decay: Tensor | None, Bc: Tensor, Cc: Tensor, scores: Tensor, skip: Tensor | None,
                      reverse: bool) -> Tensor:
    """:class:`_FactorisedScan`'s output by plain autograd ops (its double backward)."""
    b, n, h, p = x.shape
    c, q, s = Bc.shape[1:]
    v = (F.pad(x, (0, 0, 0, 0, 0, c * q - n)) * f_in.reshape(b, c * q, h)[..., None]).view(b, c, q, h * p)
    y = scores @ v
    if f_local is not None and f_ref is not None and decay is not None:
        own = (Bc.transpose(-1, -2) @ v).view(b, c, s, h, p) * _heads(f_local)
        state, entering = torch.zeros_like(own[:, 0]), []
        for i in (range(c - 1, -1, -1) if reverse else range(c)):
            entering.append(state)
            state = _heads(decay)[:, i] * state + own[:, i]
        ent = torch.stack(entering[::-1] if reverse else entering, 1) * _heads(f_ref)
        y = y + Cc @ ent.reshape(b, c, s, h * p)
    return _extras(y.view(b, c * q, h, p)[:, :n] * f_out.reshape(b, c * q, h)[:, :n, :, None], x, skip, None)


def _carry_states(own: Tensor, decay: Tensor, reverse: bool) -> Tensor:
    """The states entering each chunk, (b, c, s, h, p), from each chunk's own state ``own`` (b, c, s,
    h, p) and whole-chunk decay (b, c, 1, h, 1): ``E_next = decay E + own`` over the chunks in the
    scan's direction, zero entering the first (step 3)."""
    entering = torch.empty_like(own)
    state = torch.zeros_like(own[:, 0])
    order = range(own.shape[1] - 1, -1, -1) if reverse else range(own.shape[1])
    for i in order:
        entering[:, i] = state
        state = torch.addcmul(own[:, i], decay[:, i], state)
    return entering


def _carry_states_backward(g_entering: Tensor, entering: Tensor, decay: Tensor,
                           reverse: bool) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`_carry_states` with respect to ``own`` (b, c, s, h, p) and ``decay``
    (b, c, 1, h), from those of its output: its recurrence taken backwards."""
    g_own = torch.empty_like(g_entering)
    g_decay = entering.new_empty(entering.shape[0], entering.shape[1], 1, entering.shape[3])
    g_state = torch.zeros_like(g_entering[:, 0])  # of the state leaving the current chunk
    order = range(entering.shape[1]) if reverse else range(entering.shape[1] - 1, -1, -1)
    for i in order:
        g_own[:, i] = g_state
        g_decay[:, i] = (g_state * entering[:, i]).sum((1, 3))[:, None]
        g_state = torch.addcmul(g_entering[:, i], decay[:, i], g_state)
    return g_own, g_decay


def _general(xc: Tensor, dtc: Tensor, log_a: Tensor, cs_out: Tensor, total: Tensor, Bc: Tensor, Cc: Tensor,
             scores: Tensor, shift: bool, reverse: bool) -> Tensor:
    """Steps 1-4 for any decay, head by head inside the chunks (:func:`_intra_per_head`); the weights
    that carry inputs to the end of a chunk are running sums taken from that end. For the heads
    ``_fast`` cannot take, and while tracing (ONNX)."""
    c, h, p = xc.shape[1], xc.shape[3], xc.shape[4]
    xd = xc * dtc[..., None]
    y = _intra_per_head(log_a, xd, scores, shift, reverse)
    if c > 1:
        to_end = _running(log_a, not reverse, exclusive=True)  # log decay from each step to the chunk's end
        local = Bc.transpose(-1, -2) @ (xd * to_end.exp()[..., None]).flatten(-2)  # (b, c, s, h * p)
        y = y + (Cc @ _carry(local, total, p, reverse)).unflatten(-1, (h, p)) * cs_out.exp()[..., None]
    return y


class GatedRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) with a SiLU gate ``z``, as Mamba-2 ends its mixer (Dao & Gu
    2024): ``norm(y * silu(z)) * w``, or ``norm(y) * w * silu(z)`` when ``norm_before_gate`` (Hydra,
    Hwang et al. 2024). Computed in float32 at least, returned in ``z``'s dtype; with a hand-written
    backward (:class:`_GatedRMSNormFn`) while a gradient is taken, outside tracing."""

    def __init__(self, dim: int, norm_before_gate: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_before_gate, self.eps = norm_before_gate, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return self._apply_norm(y, z, self.weight)

    def normed(self, y: Tensor, z: Tensor) -> Tensor:
        """The gated norm without its weight: ``forward`` is ``normed(y, z) * weight``."""
        return self._apply_norm(y, z, None)

    def project(self, y: Tensor, z: Tensor, out: nn.Linear) -> Tensor:
        """``out(self(y, z))`` with the weight folded into ``out``'s columns, ``out.weight * weight``
        (a per-channel scale before a linear map): the same map, two passes over the (b, n, d)
        tensors fewer forward and three backward (no scaling by the weight, and its gradient is a
        (dim, d) product instead of a reduction over every token). Measured (norm and out_proj of
        ssd and hydra, forward+backward, interleaved in one process): 0.92-0.93x the unfolded at 14x14
        tokens and 0.87-0.91x at 28x28. A Linear swapped for a low-precision one (fp8, int8: no float
        weight to scale) is applied to ``self(y, z)``."""
        if type(out) is not nn.Linear:
            return out(self(y, z))
        return F.linear(self.normed(y, z), out.weight * self.weight.to(out.weight.dtype), out.bias)

    def _apply_norm(self, y: Tensor, z: Tensor, weight: Tensor | None) -> Tensor:
        dtype = torch.promote_types(y.dtype, torch.float32)
        with torch.autocast(y.device.type, enabled=False):
            y, z32 = y.to(dtype), z.to(dtype)
            w = None if weight is None else weight.to(dtype)
            if torch.is_grad_enabled() and not torch.jit.is_tracing():
                return _GatedRMSNormFn.apply(y, z32, w, self.eps, self.norm_before_gate).to(z.dtype)
            return _gated_rms_plain(y, z32, w, self.eps, self.norm_before_gate).to(z.dtype)


def _gated_rms_plain(y: Tensor, z: Tensor, w: Tensor | None, eps: float, before: bool) -> Tensor:
    """:class:`GatedRMSNorm` by plain autograd ops (the inference path, and its Function's double
    backward); ``w`` None: without the weight."""
    gate = F.silu(z)
    if not before:
        y = y * gate
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    return y * gate if before else y


class _GatedRMSNormFn(torch.autograd.Function):
    """:class:`GatedRMSNorm`'s forward and backward in fewer passes over the (b, n, d) tensors than
    autograd takes: the mean square is one reduction, the scalings are applied in place, and the
    backward recomputes the normalised input (one pass) where the output is not it. With ``a`` the normed
    input (``y silu(z)``, or ``y`` before the gate), r = rsqrt(mean(a^2) + eps) and ``yh = a r``:
    ``d a = r (d yh - yh mean(d yh . yh))``."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, w: Tensor | None, eps: float, before: bool) -> Tensor:
        gate = F.silu(z)
        a = y if before else y * gate
        r = torch.rsqrt(torch.linalg.vector_norm(a, dim=-1, keepdim=True).square_().div_(a.shape[-1]).add_(eps))
        out = a * r
        if w is not None:
            out.mul_(w)
        if before:
            out.mul_(gate)
        ctx.before, ctx.eps = before, eps
        # unweighted and gated first, the output is ``yh`` itself: kept (the output projection that
        # reads it keeps it too, so it costs no memory) instead of made again in the backward
        ctx.save_for_backward(y, z, w, r, out if w is None and not before else None)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        y, z, w, r, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the plain formulation's gradients, with a graph
            return (*plain_grads(_gated_rms_plain, (y, z, w), g, ctx.eps, ctx.before), None, None)  # w may be None
        gate = F.silu(z)
        if ctx.before:  # out = yh w gate, a = y
            yh = y * r
            g_gate = yh * g if w is None else (yh * w).mul_(g)
            g = g * gate  # the gradient of yh w
        else:  # out = yh w, a = y gate
            yh = out if out is not None else (y * gate).mul_(r)
        g_w = None if w is None else (g * yh).flatten(0, -2).sum(0)
        g_yh = g if w is None else g * w
        dot = (g_yh * yh).mean(-1, keepdim=True)
        g_a = torch.addcmul(g_yh * r, yh, dot * r, value=-1.0)
        if not ctx.before:
            g_gate = g_a * y
            g_a.mul_(gate)  # the gradient of y
        g_z = torch.ops.aten.silu_backward(g_gate, z)
        return g_a, g_z, g_w, None, None


class SSDMixer(nn.Module):
    """What the SSD token mixers (``ssd``: Mamba-2, ``hydra``: Hydra) share: sequence-only mixers on
    (B, N, C) tokens, class tokens included (``hw`` is not used), linear in N, with an inner width
    of ``expand * dim`` split into heads of ``headdim`` channels, each with its own scalar A and Δ,
    and B, C of ``d_state`` shared by the heads (one group)."""

    layout: ClassVar[str] = "nlc"
    uses_heads: ClassVar[bool] = False  # heads = d_inner / headdim follow the width
    supports_prefix: ClassVar[bool] = True
    complexity: ClassVar[str] = "linear"
    onnx_blocker: ClassVar[str | None] = None
    expand: ClassVar[int] = 2  # d_inner = expand * dim
    d_state: ClassVar[int] = 16
    headdim: ClassVar[int] = 16  # every width of the spaces is a multiple of 8: d_inner of 16
    width_multiple: ClassVar[int] = 8  # headdim / expand: the spec refuses other widths

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.d_inner = self.expand * dim
        if self.d_inner % self.headdim:
            raise ValueError(f"token mixer {getattr(self, 'registry_name', type(self).__name__)!r} needs a width "
                             f"that is a multiple of {self.width_multiple} (heads of {self.headdim} channels); "
                             f"got width {dim}")
        self.nheads = self.d_inner // self.headdim
