"""What the proxies observe inside a forward pass, and the state surgery some of them need.

- :func:`prunable_layers`: the layers the gradient proxies cover (Conv2d and Linear, as the
  reference's ``get_layer_metric_array``), in module order.
- :class:`LayerOutputs`: records the output of every call that applies a layer's weight (what the
  reference's dummy identity after each Conv2d/Linear sees), for fisher.
- :class:`ActivationCodes`: the binary codes of activation inputs and their Hamming kernel, for nwot.
- :func:`remove_batchnorm` / :func:`restore`: synflow's BN removal, and putting a working copy back
  to the original model's parameters, buffers and forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

# Activation modules whose input nwot binarises: the reference's rule ("ReLU" in the class name,
# which also takes LeakyReLU, ReLU6 and MetaFormer's StarReLU), generalised to the smooth
# activations of transformer-style blocks.
_SMOOTH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU,
)


def prunable_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every Conv2d / Linear (subclasses included), in module order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, LAYER_TYPES)]


def is_activation(module: nn.Module) -> bool:
    """An activation module nwot hooks: ReLU-like by class name (the reference's test) or GELU/SiLU/..."""
    return "ReLU" in type(module).__name__ or isinstance(module, _SMOOTH_ACTIVATIONS)


@dataclass
class LayerCall:
    """One application of a layer's weight: its output and the output's channel dimension."""

    layer: int
    output: Tensor
    channel_dim: int


class LayerOutputs(TorchFunctionMode):
    """Record the output of every ``conv2d`` / ``linear`` call whose weight is (a view of) the
    weight of one of ``layers``.

    The reference (zero-cost-nas ``fisher.py``) replaces each Conv2d/Linear ``forward`` by one
    that routes the output through an identity module with a backward hook. That sees only calls
    of the module's own ``forward``; watching the functional calls also sees a layer whose weight
    a block applies directly (``linear_any``'s 1x1-convolution path, MatFormer's weight slices),
    which the reference silently scores 0. For layers called as modules both see the same tensor.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self._index = {id(m.weight): i for i, (_, m) in enumerate(layers)}
        self.calls: list[LayerCall] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.conv2d or func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, Tensor):
                layer = self._index.get(id(weight))
                if layer is None and weight._base is not None:
                    layer = self._index.get(id(weight._base))
                if layer is not None and isinstance(out, Tensor):
                    self.calls.append(LayerCall(layer, out, 1 if func is torch.conv2d else out.ndim - 1))
        return out


class ActivationCodes:
    """Context manager: forward hooks on every activation module (:func:`is_activation`) that
    binarise the module's input, ``c = x > 0`` per sample, and accumulate the Hamming kernel
    ``K += c c^T + (1 - c)(1 - c)^T`` (Mellor et al. 2021, ICML version) over all hooked calls.

    ``c c^T + (1-c)(1-c)^T = 2 c c^T - s 1^T - 1 s^T + d`` with s the row sums and d the code
    length: one matmul per call. Entries are integers; each call's product is exact in float32
    up to 2^24 units (float64 beyond) and ``K`` accumulates in float64, as the reference's numpy sum.
    """

    def __init__(self, net: nn.Module, batch: int) -> None:
        self.net = net
        self.batch = batch
        self.kernel: Tensor | None = None
        self.calls = 0
        self._handles: list[Any] = []
        self._last_input: Tensor | None = None
        self._last_version = -1
        self._last_k: Tensor | None = None

    def __enter__(self) -> ActivationCodes:
        for m in self.net.modules():
            if is_activation(m):
                self._handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_input = self._last_k = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not args or not isinstance(args[0], Tensor) or args[0].ndim == 0 or args[0].shape[0] != self.batch:
            return
        x = args[0]
        if x is self._last_input and x._version == self._last_version and self._last_k is not None:
            # e.g. NB201's ReLUConvBN: "ReLU" is in its class name too, so (as in the reference) it
            # counts the same input as the ReLU inside it; the codes are computed once
            k = self._last_k
        else:
            with torch.no_grad():
                flat = x.detach().reshape(self.batch, -1)
                d = flat.shape[1]
                # torch.gt into a float buffer: the codes in one pass (x > 0 then a cast is ~10x slower)
                dtype = torch.float32 if d < 2**24 else torch.float64
                codes = torch.gt(flat, 0, out=flat.new_empty(flat.shape, dtype=dtype))
                gram = (codes @ codes.T).to(torch.float64)
                s = codes.sum(dim=1).to(torch.float64)
                k = 2.0 * gram - s[:, None] - s[None, :] + float(d)
            self._last_input, self._last_version, self._last_k = x, x._version, k
        self.kernel = k if self.kernel is None else self.kernel + k
        self.calls += 1


def _identity(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return x


def remove_batchnorm(net: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm1d/2d (subclasses included) an identity, as the reference's
    ``copynet(bn=False)`` does for synflow; returns the patched modules (see :func:`restore`)."""
    patched = []
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.forward = _identity  # instance attribute: shadows the class's forward
            patched.append(m)
    return patched


@torch.no_grad()
def restore(net: nn.Module, original: nn.Module, patched: list[nn.Module]) -> None:
    """Put ``net`` (a deep copy of ``original``) back to the original's parameters and buffers
    (values and dtypes) and undo :func:`remove_batchnorm`."""
    for m in patched:
        if "forward" in m.__dict__:
            del m.forward
    patched.clear()
    for m, o in zip(net.modules(), original.modules()):
        for key, p in m._parameters.items():
            if p is not None:
                p.data = o._parameters[key].detach().clone()
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = o._buffers[key].detach().clone()


def fan_in(module: nn.Module) -> int:
    """Elements per output channel of the weight: ``prod(weight.shape[1:])``."""
    return math.prod(module.weight.shape[1:])
