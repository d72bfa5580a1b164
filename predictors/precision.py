"""Run a model at the precision its spec carries: fp32, bf16, fp16, int8 or fp8.

- bf16 / fp16: the whole model in that dtype (LayerNorm and softmax statistics stay float32 inside
  torch's kernels). On CPU only where oneDNN has native kernels for it (AVX512-BF16/AMX for bf16,
  AVX512-FP16/AMX-FP16 for fp16); elsewhere a :class:`PrecisionError`, because emulated kernels
  would report a latency no deployment sees.
- int8: dynamic quantization of every ``nn.Linear`` on CPU (Jacob et al., CVPR 2018, "Quantization
  and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"): weights
  symmetric per output channel, activations symmetric per token, measured at run time, int8 x int8
  -> int32 through ``torch._int_mm``; everything else stays float32.
- fp8: every ``nn.Linear`` whose sizes are multiples of 16 through ``torch._scaled_mm`` in E4M3
  with per-tensor scales (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"); the rest of
  the model in bf16. Needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper).

A linear layer whose weight a block reads directly marks itself ``_keep_float = True`` and is left
as it is. Channel mixers call quantized layers through ``channel_forward`` (see
``search_spaces.layers.channel_mixers.apply_fc``), so NCHW 1x1 maps and MatFormer slices work too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.spec import PRECISIONS

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-12


class PrecisionError(ValueError):
    """A precision this device cannot run (natively), with what to do instead."""


def activation_dtype(precision: str) -> torch.dtype:
    """dtype of the tensors flowing between layers at ``precision``."""
    _check_name(precision)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(precision, torch.float32)


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _mkldnn_supports(kind: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported")())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: str | torch.device = "cpu") -> None:
    """Raise :class:`PrecisionError` unless ``device`` runs ``precision`` natively."""
    _check_name(precision)
    dev = torch.device(device)
    if precision == "fp32":
        return
    if dev.type == "cpu":
        if precision in ("bf16", "fp16") and not _mkldnn_supports(precision):
            need = "AVX512-BF16 or AMX" if precision == "bf16" else "AVX512-FP16 or AMX-FP16"
            raise PrecisionError(f"{precision} has no native kernels on this CPU (needs {need}); "
                                 f"use fp32 or int8 on it, or measure {precision} on a GPU (--target cuda)")
        if precision == "int8" and not hasattr(torch, "_int_mm"):
            raise PrecisionError("int8 needs torch._int_mm (torch >= 2.2); upgrade torch or use fp32")
        if precision == "fp8":
            raise PrecisionError("fp8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada/Hopper); "
                                 "this is a CPU: use fp32, bf16 or int8 here, or --target cuda on such a GPU")
        return
    if dev.type != "cuda":
        raise PrecisionError(f"device {str(dev)!r} is not supported; use cpu or cuda[:i]")
    if precision == "int8":
        raise PrecisionError("int8 is dynamic quantization for CPUs; on a GPU use fp8 (compute capability "
                             ">= 8.9), bf16 or fp16")
    if not torch.cuda.is_available():
        raise PrecisionError(f"no CUDA GPU is visible to torch for {precision} on {str(dev)!r}; use --target cpu")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("this GPU has no bf16 support (compute capability < 8.0); use fp16 or fp32")
    if precision == "fp8":
        cc = torch.cuda.get_device_capability(dev)
        if cc < (8, 9) or not hasattr(torch, "float8_e4m3fn"):
            raise PrecisionError(f"fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU has "
                                 f"{cc[0]}.{cc[1]}: use bf16 or fp16")


def supported_precisions(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """The precisions ``device`` runs natively, in ``PRECISIONS`` order."""
    out = []
    for p in PRECISIONS:
        try:
            check_precision(p, device)
        except PrecisionError:
            continue
        out.append(p)
    return tuple(out)


def _channels_last_apply(fn, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """Apply a (..., C) -> (..., C') map to the channel dim of an NCHW tensor."""
    return fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _LowPrecisionLinear(nn.Module):
    """Shared plumbing: slicing for MatFormer, both layouts; subclasses implement ``_matmul``."""

    kind = ""
    qweight: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def _sliced(self, rows: int | None, cols: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(weight, weight scale, bias) restricted to the first ``rows`` outputs / ``cols`` inputs."""
        w, scale, bias = self.qweight, self.weight_scale, self.bias
        if rows is not None:
            w, bias = w[:rows], None if bias is None else bias[:rows]
            scale = scale[:rows] if scale.ndim else scale
        if cols is not None:
            w = w[:, :cols].contiguous()
        return w, scale, bias

    def _matmul(self, x2: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _mm(self, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        lead = x.shape[:-1]
        return self._matmul(x.reshape(-1, x.shape[-1]), *self._sliced(rows, cols)).reshape(*lead, -1)

    def forward(self, x: Tensor) -> Tensor:
        return self._mm(x)

    def channel_forward(self, x: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        """Over the channels of (B, N, C) or (B, C, H, W), optionally on the first rows/cols."""
        if x.ndim == 4:
            return _channels_last_apply(lambda t: self._mm(t, rows, cols), x)
        return self._mm(x, rows, cols)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8Linear(_LowPrecisionLinear):
    """Dynamically quantized linear layer: int8 weights (symmetric, per output channel), int8
    activations (symmetric, per token, computed at run time), int32 accumulation."""

    kind = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(_EPS) / INT8_MAX
        q.qweight = (w / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8).to(w.device)
        q.weight_scale = scale
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def _matmul(self, x2: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        xf = x2.float()
        x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(_EPS) / INT8_MAX
        xq = (xf / x_scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        y = torch._int_mm(xq, w.t()).float().mul_(x_scale).mul_(scale)
        if bias is not None:
            y = y.add_(bias)
        return y.to(x2.dtype)


class Fp8Linear(_LowPrecisionLinear):
    """Linear layer in float8 E4M3: per-tensor weight scale fixed at conversion, per-tensor
    activation scale computed at run time, ``torch._scaled_mm`` with bf16 output."""

    kind = "fp8_e4m3"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, out_dtype)
        w = linear.weight.detach().float()
        scale = w.abs().amax().clamp_min(_EPS) / FP8_MAX
        q.qweight = (w / scale).to(torch.float8_e4m3fn)
        q.weight_scale = scale
        if linear.bias is not None:
            q.bias = linear.bias.detach().to(out_dtype).clone()
        return q

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """Whether ``_scaled_mm`` can take this layer (both sizes multiples of 16)."""
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def _matmul(self, x2: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        if x2.shape[1] % 16 or w.shape[0] % 16:  # a MatFormer slice _scaled_mm cannot take: dequantized
            return F.linear(x2.to(self.out_dtype), (w.float() * scale).to(self.out_dtype), bias)
        x_scale = x2.abs().amax().float().clamp_min(_EPS) / FP8_MAX
        xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=scale, bias=bias, out_dtype=self.out_dtype)


def _replace_linears(model: nn.Module, make) -> int:  # type: ignore[no-untyped-def]
    """Swap every plain ``nn.Linear`` (not marked ``_keep_float``) for ``make(linear)`` (None: keep)."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not getattr(child, "_keep_float", False):
                new = make(child)
                if new is not None:
                    setattr(parent, name, new)
                    n += 1
    return n


def to_precision(model: nn.Module, precision: str, device: str | torch.device = "cpu", *,
                 inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) in eval mode on ``device`` at ``precision``.

    Raises :class:`PrecisionError` where the device cannot run the precision natively."""
    check_precision(precision, device)
    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval().to(device)
    if precision in ("bf16", "fp16"):
        model.to(activation_dtype(precision))
    elif precision == "int8":
        _replace_linears(model, Int8Linear.from_float)
    elif precision == "fp8":
        model.to(torch.bfloat16)
        _replace_linears(model, lambda m: Fp8Linear.from_float(m) if Fp8Linear.fits(m) else None)
    return model.eval()  # the swapped-in layers too


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(_EPS))


__all__ = ["FP8_MAX", "INT8_MAX", "Fp8Linear", "Int8Linear", "PrecisionError", "activation_dtype",
           "check_precision", "relative_error", "supported_precisions",
           "to_precision"]
