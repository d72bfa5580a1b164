"""Counting: parameters, FLOPs (torch's own flop counter) and total operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                            out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter has no formula for the CPU flash-attention kernel that SDPA dispatches to on CPU
_aten = torch.ops.aten
_EXTRA: dict[Any, Any] = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _EXTRA[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
_FORMULAS = {**flop_registry, **{k: shape_wrapper(v) for k, v in _EXTRA.items()}}


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass at ``input_shape`` counted by ``torch.utils.flop_counter``.

    Convention of that counter: a multiply-add is 2 FLOPs (so MACs = FLOPs / 2); it counts
    matmuls, convolutions and attention (CPU attention kernels included), not element-wise ops or FFTs.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(input_shape, device=device)
        with FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet not in _FORMULAS and func is not torch.ops.prim.device.default:
            # e.g. CPU attention kernels: count the composite's decomposition (as FlopCounterMode does)
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if packet in _FORMULAS:
            self.total += int(_FORMULAS[packet](*args, **kwargs, out_val=out))
        else:
            leaves, _ = tree_flatten(out)
            self.total += sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))
        return out


def count_ops(fn: Callable[[], Any]) -> int:
    """Total operation count of ``fn()``: FLOPs of matmul/conv/attention (torch's flop formulas)
    plus one per output element of every other op. Used to check complexity claims by counting,
    not timing."""
    counter = _OpCounter()
    with counter:
        fn()
    return counter.total
