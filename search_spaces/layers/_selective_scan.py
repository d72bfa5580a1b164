"""Mamba's selective scan, fused and blocked over batch and time, in pure PyTorch (no custom kernels).

(On a CPU in float32, ``selective_scan`` hands the scan to native code instead, ``_native_scan``:
3.3-3.4x faster than this form, ``bench/native_scan.py``. This form serves other CPU dtypes and
runs wherever that code cannot be built.)

``y_t = C_t . h_t`` with ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t`` (Gu & Dao 2023, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces", Algorithm 2), for u, delta of shape
(batch, N, D), A (D, S), B and C (batch, N, S).

Written plainly (``exp``, outer product, scan, contraction over S), every step creates or sweeps
a (batch, N, D, S) tensor: 67 MB for a batch of 128 at 64 tokens, D = 128, S = 16. On a CPU those
sweeps run at memory bandwidth; and a loop over tokens whose ops each touch a few thousand
elements runs at the interpreter's speed. This version does what Mamba's CUDA kernel does with
registers, with the CPU's caches instead:

- it works on blocks of a few samples by a few time steps (``_plan``): each block's
  (b, T, S, D) intermediates (2 MB each) stay in the caches while they are made, scanned and
  contracted, and each time step of the scan is still one op over b * S * D elements (32k), large
  enough that the cost per op call does not dominate. The state h (b, S, D) is carried from one
  block to the next, so no (batch, N, S, D) tensor of the whole sequence ever exists;
- inside a block the scan is sequential in time, in place (``h_t += a_t * h_{t-1}``);
- the state is laid out (S, D), not (D, S): the contractions over S (``y = C . h`` and
  ``dL/d(delta u) = B . lam``) and over D (``dL/dC``, ``dL/dB``) are then batched products of a
  row vector by a matrix with contiguous rows, several times faster here than a product and a sum
  or a matrix-vector product over a short inner dimension;
- ``exp(x)`` is computed as ``exp2(x log2 e)`` (log2 e folded into A once): PyTorch's exp2 ran
  about 4x faster than its exp on this CPU (AVX-512), and the decays ``a`` in (0, 1] differ from
  exp's by less than 1e-7;
- the forward pass keeps only the state entering each block, (batch, N / T, S, D); the backward
  pass visits the blocks in reverse, recomputes each block's states from its entry state (as
  Mamba's kernel recomputes them), and runs the adjoint recurrence
  ``lam_t = dy_t C_t + a_{t+1} lam_{t+1}`` backwards, carrying ``a_t lam_t`` across blocks.

About 3x faster than the slice-by-slice version before it (whole sequences of one sample at a
time: at 196 tokens each op of its token loop touched 4k elements), forward and backward, at
batch 64, D = 256, S = 16 on one thread; equal to the plain formulation within float rounding.
A second derivative (GraSP's Hessian-vector product asks for one), ``torch.jit.trace`` (ONNX
export) and tensors on a GPU take the plain, differentiable formulation
(``selective_scan_reference``). A ``torch.compile``'d block was tried: it took tens of seconds
to compile per shape and ran no faster than the eager block, so there is none.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from search_spaces.layers import _native_scan
from search_spaces.layers._scan import linear_recurrence
from search_spaces.layers.common import plain_grads

# Elements of one time step of a block, b * S * D (a (8, 16, 256) slice in float32: 128 kB), and of
# one block's (b, T, S, D) buffer (2 MB in float32). Measured on one CPU thread at batch 64,
# D = 256, S = 16: larger steps or blocks fall out of cache, smaller ones pay for more ops.
STEP_ELEMENTS = 1 << 15
BLOCK_ELEMENTS = 1 << 19
_LOG2E = 1.0 / math.log(2.0)
_scratch_cache = threading.local()


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The plain formulation (differentiable twice, traceable): states for all steps, then C . h."""
    a = torch.exp(delta[..., None] * A)
    h = linear_recurrence(a, (delta * u)[..., None] * B[:, :, None, :], dim=1)
    return torch.einsum("bnds,bns->bnd", h, C)


def _plan(bsz: int, n: int, state: int) -> tuple[int, int]:
    """(samples per slice, time steps per block) for ``state = S * D`` elements of state per sample."""
    per = min(bsz, max(1, -(-STEP_ELEMENTS // state)))
    per = -(-bsz // -(-bsz // per))  # the same number of slices, as even as they go
    return per, max(1, min(n, BLOCK_ELEMENTS // (per * state)))


def _scratch(count: int, numel: int, like: Tensor) -> list[Tensor]:
    """``count`` work buffers of ``numel`` elements, kept between calls (per thread and dtype, 8 MB
    at most at the default sizes in float32): allocated afresh, buffers of this size came as new
    memory pages on every call, whose page faults made the batch-1 forward pass 3x slower. One
    call of a pass uses them at a time, from start to end, and passes do not nest."""
    cache = getattr(_scratch_cache, "buffers", None)
    if cache is None:
        cache = _scratch_cache.buffers = {}
    buf = cache.get(like.dtype)
    if buf is None or buf.numel() < count * numel:
        buf = cache[like.dtype] = torch.empty(count * numel, dtype=like.dtype)
    return [buf[i * numel:(i + 1) * numel] for i in range(count)]


def _blocks(bsz: int, n: int, per: int, steps: int) -> list[tuple[int, int, int, int]]:
    """(s0, s1, t0, t1) of every block, slice by slice, in time order within a slice."""
    return [(s0, min(bsz, s0 + per), t0, min(n, t0 + steps))
            for s0 in range(0, bsz, per) for t0 in range(0, n, steps)]


def _scan_block(a: Tensor, h: Tensor, h0: Tensor) -> None:
    """In place along dim 1 of (b, T, S, D): ``h_t += a_t * h_{t-1}``, with ``h_{-1} = h0``."""
    hs, as_ = h.unbind(1), a.unbind(1)  # views made in one call: cheaper than indexing per step
    hs[0].addcmul_(as_[0], h0)
    for t in range(1, len(hs)):
        hs[t].addcmul_(as_[t], hs[t - 1])


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, per: int, steps: int,
             keep: bool) -> tuple[Tensor, Tensor | None]:
    """``y`` block by block (slices of ``per`` samples, ``steps`` time steps), and if ``keep`` the
    state entering every block, (batch, blocks, S, D) (zero for the first): all the backward
    pass needs besides the inputs."""
    bsz, n, d = u.shape
    s = A.shape[1]
    a2 = (A * _LOG2E).T.contiguous()  # (S, D): exp(delta A) = exp2(delta a2)
    y = u.new_empty(bsz, n, d)
    states = u.new_empty(bsz, -(-n // steps), s, d) if keep else None
    abuf, hbuf = _scratch(2, per * steps * s * d, u)
    dubuf = u.new_empty(per * steps * d)  # delta u, of one block at a time
    carry = u.new_empty(per, s, d)
    for s0, s1, t0, t1 in _blocks(bsz, n, per, steps):
        b, m = s1 - s0, t1 - t0
        h0 = carry[:b]
        if t0 == 0:
            h0.zero_()
        if states is not None:
            states[s0:s1, t0 // steps].copy_(h0)
        a = abuf[:b * m * s * d].view(b, m, s, d)
        torch.mul(delta[s0:s1, t0:t1, None, :], a2, out=a).exp2_()
        h = hbuf[:b * m * s * d].view(b, m, s, d)
        du = torch.mul(delta[s0:s1, t0:t1], u[s0:s1, t0:t1], out=dubuf[:b * m * d].view(b, m, d))
        torch.mul(B[s0:s1, t0:t1, :, None], du[:, :, None, :], out=h)
        _scan_block(a, h, h0)
        y[s0:s1, t0:t1] = torch.bmm(C[s0:s1, t0:t1].reshape(b * m, 1, s), h.view(b * m, s, d)).view(b, m, d)
        h0.copy_(h[:, -1])
    return y, states


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                C: Tensor, grad_enabled: bool) -> Tensor:
        per, steps = _plan(u.shape[0], u.shape[1], A.numel())
        # under no_grad an input may still require grad (a parameter): nothing to keep then
        y, states = _forward(u, delta, A, B, C, per, steps, keep=grad_enabled and any(ctx.needs_input_grad[:5]))
        ctx.save_for_backward(u, delta, A, B, C, states)
        ctx.plan = (per, steps)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, states = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain formulation instead
            return (*plain_grads(selective_scan_reference, (u, delta, A, B, C), gy), None)
        want_u, want_delta, want_A, want_B, want_C = ctx.needs_input_grad[:5]
        want_lam = want_u or want_delta or want_A or want_B  # everything but dL/dC needs the adjoint
        want_g = want_delta or want_A  # dL/d(delta_t A), through a_t
        bsz, n, d = u.shape
        s = A.shape[1]
        per, steps = ctx.plan
        a2 = (A * _LOG2E).T.contiguous()
        at = A.T.contiguous()
        # every block writes its part of each wanted gradient; addmm sums dL/dA, (S, D) flattened
        gdu = u.new_empty(bsz, n, d) if want_u or want_delta else None  # dL/d(delta u)
        gda = u.new_empty(bsz, n, d) if want_delta else None  # dL/d(delta) through a
        gB = u.new_empty(bsz, n, s) if want_B else None
        gC = u.new_empty(bsz, n, s) if want_C else None
        gA = u.new_zeros(1, s * d) if want_A else None
        abuf, hbuf, lbuf, gbuf = _scratch(4, per * steps * s * d, u)
        dubuf = u.new_empty(per * steps * d)  # delta u, of one block at a time
        carry = u.new_empty(per, s, d)  # a_t lam_t at the first step of the block after this one
        ones = u.new_ones(1, per * steps)
        for s0, s1, t0, t1 in reversed(_blocks(bsz, n, per, steps)):
            b, m = s1 - s0, t1 - t0
            bm, shape, size = b * m, (b, m, s, d), b * m * s * d
            if t1 == n:
                carry.zero_()
            # the block's decays and states again, from the state that entered it
            a = abuf[:size].view(shape)
            dl = delta[s0:s1, t0:t1, None, :]
            torch.mul(dl, a2, out=a).exp2_()
            h = hbuf[:size].view(shape)
            h0 = states[s0:s1, t0 // steps]
            du = torch.mul(delta[s0:s1, t0:t1], u[s0:s1, t0:t1], out=dubuf[:b * m * d].view(b, m, d))
            torch.mul(B[s0:s1, t0:t1, :, None], du[:, :, None, :], out=h)
            _scan_block(a, h, h0)
            if gC is not None:  # dL/dC_t = h_t . dy_t (over D)
                gyb = gy[s0:s1, t0:t1].reshape(bm, 1, d)
                gC[s0:s1, t0:t1] = torch.bmm(gyb, h.view(bm, s, d).transpose(1, 2)).view(b, m, s)
            if not want_lam:
                continue
            # lam_t = dL/dh_t over all paths: dy_t C_t + a_{t+1} lam_{t+1}, backwards in time
            lam = lbuf[:size].view(shape)
            torch.mul(C[s0:s1, t0:t1, :, None], gy[s0:s1, t0:t1, None, :], out=lam)
            lams, as_ = lam.unbind(1), a.unbind(1)
            lams[-1].add_(carry[:b])
            for t in range(m - 2, -1, -1):
                lams[t].addcmul_(as_[t + 1], lams[t + 1])
            torch.mul(as_[0], lams[0], out=carry[:b])
            lv = lam.view(bm, s, d)
            if gdu is not None:  # dL/d(delta_t u_t) = B_t . lam_t (over S)
                gdu[s0:s1, t0:t1] = torch.bmm(B[s0:s1, t0:t1].reshape(bm, 1, s), lv).view(b, m, d)
            if gB is not None:  # dL/dB_t = lam_t . (delta_t u_t) (over D)
                gB[s0:s1, t0:t1] = torch.bmm(du.view(bm, 1, d), lv.transpose(1, 2)).view(b, m, s)
            if not want_g:
                continue
            # dL/d(delta_t A) = lam_t * a_t * h_{t-1}, with h_{-1} the block's entry state
            g = gbuf[:size].view(shape)
            torch.mul(lam[:, 1:], h[:, :-1], out=g[:, 1:])
            torch.mul(lam[:, 0], h0, out=g[:, 0])
            g.mul_(a)
            if gA is not None:  # dL/dA = sum over samples and steps of delta_t * that; lam is free now
                torch.mul(g, dl, out=lam)
                gA.addmm_(ones[:, :bm], lam.view(bm, s * d))
            if gda is not None:  # its part of dL/d(delta_t): sum over S of A * that
                gda[s0:s1, t0:t1] = g.mul_(at).sum(2)
        gdelta = gda.addcmul_(gdu, u) if gda is not None and gdu is not None else None
        gu = gdu.mul_(delta) if gdu is not None and want_u else None  # in place, after gdelta
        return gu, gdelta, gA.view(s, d).T.contiguous() if gA is not None else None, gB, gC, None


class _NativeSelectiveScan(torch.autograd.Function):
    """The scan in native code (``_native_scan``): keeps only the inputs; the backward pass
    recomputes the states tile by tile."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                C: Tensor, reverse: bool) -> Tensor:
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.reverse = reverse
        return _native_scan.forward(u, delta, A, B, C, reverse)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: Tensor) -> tuple[Tensor | None, ...]:
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain formulation instead
            return (*plain_grads(_reference_in_order, inputs, gy, ctx.reverse), None)
        grads = _native_scan.backward(*inputs, gy, ctx.reverse)
        return (*(g if want else None for g, want in zip(grads, ctx.needs_input_grad, strict=False)), None)


def _reference_in_order(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, reverse: bool) -> Tensor:
    """The plain formulation, scanned from the last token to the first if ``reverse``."""
    if not reverse:
        return selective_scan_reference(u, delta, A, B, C)
    return selective_scan_reference(u.flip(1), delta.flip(1), A, B.flip(1), C.flip(1)).flip(1)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, reverse: bool = False,
                   native: bool = True) -> Tensor:
    """``y`` (batch, N, D) of the selective scan (see the module docstring), zero initial state;
    ``reverse``: from the last token to the first (the backward branch of Vision Mamba's block).
    float32 on a CPU runs the native kernel where it could be built (``_native_scan``, about 3x
    faster than the fused form here; ``native`` False skips it). Other CPU dtypes take the fused
    form above. On a GPU the fused form's per-token loop would be one kernel launch per token and
    block, so other devices take the plain form (a log-depth parallel scan)."""
    if torch.jit.is_tracing() or u.numel() == 0 or A.numel() == 0 or u.device.type != "cpu":
        return _reference_in_order(u, delta, A, B, C, reverse)
    if native and _native_scan.supports(u, A) and all(t.dtype == torch.float32 for t in (delta, A, B, C)):
        return _NativeSelectiveScan.apply(u, delta, A, B, C, reverse)
    if reverse:
        return _SelectiveScan.apply(u.flip(1), delta.flip(1), A, B.flip(1), C.flip(1), torch.is_grad_enabled()).flip(1)
    return _SelectiveScan.apply(u, delta, A, B, C, torch.is_grad_enabled())
