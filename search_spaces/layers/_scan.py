"""Parallel scan for first-order linear recurrences, in pure PyTorch (no custom kernels).

``h_t = a_t * h_{t-1} + b_t`` is an associative scan over pairs ``(a, b)`` with the operator
``(a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2)`` (Blelloch 1990, "Prefix sums and their
applications"; used for selective state spaces by Gu & Dao 2023, Mamba, and for gated linear
attention by Yang et al. 2024, GLA). The scan here is chunked so that its total work is O(N):

1. split the sequence into chunks of at most ``CHUNK`` steps (padding the tail with ``a=1, b=0``);
2. Hillis & Steele (1986) doubling inside every chunk: ``ceil(log2 CHUNK)`` steps, so
   O(N log CHUNK) = O(N) work, which gives each chunk's local prefix and decay products;
3. the chunk-end values form the same problem at length N / CHUNK: recurse;
4. fix up each chunk with the state it receives from the previous chunk.

Work is N * (const + const / CHUNK + ...) = O(N); depth is O(log N). The forward works in place
on fresh buffers; the backward pass is the adjoint recurrence, i.e. the same scan in reverse time,
so autograd keeps only ``a`` and ``h`` instead of every doubling step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 16


def _eager() -> bool:
    """False while ``torch.jit.trace`` records a graph (also inside ``torch.onnx.export``)."""
    return not torch.jit.is_tracing()


def _doubling(a: Tensor, b: Tensor, need_a: bool) -> tuple[Tensor, Tensor]:
    """Hillis-Steele inclusive scan along dim 1 of (C, T, R) buffers: returns ``b`` holding the
    in-chunk states and (if ``need_a``) ``a`` the in-chunk products of ``a``. Eager mode works in
    place on the buffers; under tracing (``torch.onnx.export``) it is out of place, because the
    tracer records in-place writes into slices of a buffer that is read again wrongly."""
    t, inplace = a.shape[1], _eager()
    s = 1
    while s < t:
        if inplace:
            b[:, s:].add_(a[:, s:] * b[:, :-s])  # the product is a temporary: no overlapping writes
        else:
            b = torch.cat([b[:, :s], torch.addcmul(b[:, s:], a[:, s:], b[:, :-s])], 1)
        if need_a or 2 * s < t:
            if inplace:
                a[:, s:].copy_(a[:, s:] * a[:, :-s])
            else:
                a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], 1)
        s *= 2
    return a, b


def _scan_2d(a: Tensor, b: Tensor) -> Tensor:
    """Scan along dim 0 of (N, R) tensors with zero initial state; ``a``, ``b`` are not modified."""
    n, r = a.shape
    chunks = math.ceil(n / CHUNK)
    size = math.ceil(n / chunks)  # <= CHUNK; pads fewer than `chunks` steps in total
    pad = chunks * size - n
    # Fresh buffers (also when pad == 0), padded with a = 1, b = 0, that the doubling overwrites.
    a = torch.cat([a, a.new_ones(pad, r)]).view(chunks, size, r)
    b = torch.cat([b, b.new_zeros(pad, r)]).view(chunks, size, r)
    a, b = _doubling(a, b, need_a=chunks > 1)
    if chunks > 1:
        # State at the end of every chunk: the same recurrence over the chunk-end values.
        ends = _scan_2d(a[:, -1], b[:, -1])
        fix = a[1:] * ends[:-1, None]  # fix up with the state entering each chunk
        if _eager():
            b[1:].add_(fix)
        else:
            b = torch.cat([b[:1], b[1:] + fix])
    return b.reshape(chunks * size, r)[:n]


class _LinearScan(torch.autograd.Function):
    """Scan along dim 0 of (N, R) tensors. The backward pass is the adjoint recurrence run in
    reverse time, ``l_t = g_t + a_{t+1} l_{t+1}``, ``db_t = l_t``, ``da_t = l_t h_{t-1}``: one more
    scan instead of autograd through every doubling step (saves only ``a`` and ``h``). It is
    written with differentiable ops, so double backward (Hessian-vector products) works too."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: Tensor, b: Tensor) -> Tensor:
        h = _scan_2d(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        a, h = ctx.saved_tensors
        a_next = torch.cat([a[1:], a.new_zeros(1, a.shape[1])])
        lam = _LinearScan.apply(a_next.flip(0), grad.flip(0)).flip(0)
        h_prev = torch.cat([h.new_zeros(1, h.shape[1]), h[:-1]])
        return lam * h_prev, lam


def linear_recurrence(a: Tensor, b: Tensor, dim: int = 1, h0: Tensor | None = None) -> Tensor:
    """All states ``h_t = a_t * h_{t-1} + b_t`` along ``dim`` (elementwise), ``h_{-1} = h0`` or 0.

    ``a`` and ``b`` are broadcast to a common shape; ``h0`` must broadcast to that shape with
    ``dim`` removed. Differentiable by autograd (twice); computes in the inputs' promoted dtype.
    O(N) work in the sequence length N, O(log N) sequential depth.
    """
    a, b = torch.broadcast_tensors(a, b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    dim = dim % a.ndim
    if h0 is not None:  # fold the initial state into the first input: b_0 += a_0 * h0
        first = torch.addcmul(b.narrow(dim, 0, 1), a.narrow(dim, 0, 1), h0.to(dtype).unsqueeze(dim))
        b = torch.cat([first, b.narrow(dim, 1, b.shape[dim] - 1)], dim=dim)
    if a.numel() == 0:
        return b.clone()
    n = a.shape[dim]
    a_t = a.movedim(dim, 0)
    shape = a_t.shape
    h = _LinearScan.apply(a_t.reshape(n, -1), b.movedim(dim, 0).reshape(n, -1))
    return h.reshape(shape).movedim(0, dim)
