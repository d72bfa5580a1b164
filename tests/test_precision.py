"""predictors.precision: bf16/int8 conversions of real networks stay close to fp32, the original model is
left alone, int8 shrinks every quantizable Linear ~4x, the Int8Linear/Fp8Linear modules are numerically
sound in both layouts and under MatFormer slicing, and precisions a device cannot run are clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from predictors.precision import (
    Fp8Linear,
    Int8Linear,
    PrecisionError,
    activation_dtype,
    check_precision,
    relative_error,
    supported_precisions,
    to_precision,
)
from search_spaces import get_space
from search_spaces.hybrid_vit import PRESETS, build
from search_spaces.spec import PRECISIONS, ArchSpec, StageSpec, StemSpec

CPU = supported_precisions("cpu")
# Relative error of the logits vs fp32 on the presets at 32px, 10 classes, random init (measured on an
# AVX512 EPYC: bf16 0.006-0.015, int8 0.010-0.031). Bounds: bf16 <= 0.03, int8 <= 0.06 (about 2x headroom).
TOL = {"bf16": 0.03, "int8": 0.06}
# Random architectures are deeper/odder (e.g. pool mixers, whose ``pool(x) - x`` cancels badly in bf16;
# up to 0.097 in bf16 and 0.039 in int8 over seeds 0-39): the looser bound bf16 <= 0.1, int8 <= 0.1.
TOL_RANDOM = {"bf16": 0.1, "int8": 0.1}
# A single quantized layer: int8 measured ~0.007, fp8 E4M3 ~0.035 (3 mantissa bits).
TOL_INT8_LAYER = 0.02
TOL_FP8_LAYER = 0.08


def _need(precision: str) -> None:
    if precision not in CPU:
        pytest.skip(f"{precision} has no native kernels on this CPU (supported here: {', '.join(CPU)})")


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _compare(model: nn.Module, precision: str, x: torch.Tensor | None = None) -> float:
    """Relative error of ``to_precision(model, precision)`` vs the fp32 model on a fixed batch."""
    x = _batch() if x is None else x
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = to_precision(model, precision)(x.to(activation_dtype(precision)))
    assert out.shape == ref.shape
    assert out.dtype == activation_dtype(precision)
    assert torch.isfinite(out.float()).all()
    return relative_error(out, ref)


def _qweight_bytes(model: nn.Module) -> int:
    """Bytes of the Int8Linear weights in ``model``."""
    return sum(m.qweight.numel() * m.qweight.element_size() for m in model.modules() if isinstance(m, Int8Linear))


# ------------------------------------------------------------------------------ whole networks


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["hybrid_tiny", "deit_tiny", "poolformer_s12"])
def test_presets_stay_close_to_fp32(name: str, precision: str) -> None:
    _need(precision)
    assert _compare(build(PRESETS[name], 10, 32), precision) <= TOL[precision]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("seed", range(8))
def test_random_archs_stay_close_to_fp32(seed: int, precision: str) -> None:
    _need(precision)
    spec = get_space("hybrid_vit").random(seed).with_precision("fp32")
    assert _compare(build(spec, 10, 32), precision) <= TOL_RANDOM[precision], spec.short()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_conversion_leaves_the_original_alone(precision: str) -> None:
    _need(precision)
    model = build(PRESETS["hybrid_tiny"], 10, 32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    q = to_precision(model, precision, "cpu")
    # the original: same weights, still fp32, still training, its Linear modules still the same nn.Linear
    assert model.training and all(m.training for m in model.modules())
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert {name: m for name, m in model.named_modules() if type(m) is nn.Linear} == linears
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    # the copy: eval mode, on the device, at the precision
    assert q is not model and not q.training
    # (every module but the freshly made Int8Linear ones: see test_int8_layers_are_in_eval_mode_too)
    assert not any(m.training for m in q.modules() if not isinstance(m, Int8Linear))
    assert all(t.device.type == "cpu" for t in [*q.parameters(), *q.buffers()])
    if precision == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in q.parameters())
    else:
        assert any(isinstance(m, Int8Linear) for m in q.modules())
        assert all(p.dtype == torch.float32 for p in q.parameters())  # everything but the Linears stays fp32


def test_int8_layers_are_in_eval_mode_too() -> None:
    q = to_precision(build(PRESETS["deit_tiny"], 10, 32), "int8")
    assert not any(m.training for m in q.modules())


def test_inplace_conversion_returns_the_same_model() -> None:
    model = build(PRESETS["deit_tiny"], 10, 32).train()
    q = to_precision(model, "int8", "cpu", inplace=True)
    assert q is model and not model.training
    assert not any(type(m) is nn.Linear for m in model.modules())


# ------------------------------------------------------------------------------ int8 weights


def test_int8_replaces_every_plain_linear_and_keeps_marked_ones_float() -> None:
    model = build(PRESETS["hybrid_tiny"], 10, 32)  # its ssm stage has a dt_proj marked _keep_float
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear and not getattr(m, "_keep_float", False)}
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear and getattr(m, "_keep_float", False)}
    assert plain and kept and all(n.endswith("dt_proj") for n in kept)
    q = to_precision(model, "int8")
    modules = dict(q.named_modules())
    assert {n for n, m in modules.items() if isinstance(m, Int8Linear)} == plain
    assert {n for n, m in modules.items() if type(m) is nn.Linear} == kept
    assert all(modules[n].weight.dtype == torch.float32 for n in kept)
    assert all(modules[n].qweight.dtype == torch.int8 for n in plain)
    # ~4x smaller: int8 qweight bytes vs the fp32 weight bytes of the same layers
    fp32_bytes = sum(m.weight.numel() * m.weight.element_size()
                     for n, m in model.named_modules() if n in plain)
    int8_bytes = _qweight_bytes(q)
    assert 3.5 <= fp32_bytes / int8_bytes <= 4.1


def test_int8_weights_are_symmetric_per_output_channel() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    q = Int8Linear.from_float(lin)
    w = lin.weight.detach()
    assert q.qweight.shape == w.shape and q.weight_scale.shape == (96,)
    assert torch.equal(q.qweight.abs().amax(dim=1), torch.full((96,), 127, dtype=torch.int8))  # full range per row
    err = (q.qweight.float() * q.weight_scale[:, None] - w).abs()
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()  # rounding error at most half a step
    assert torch.equal(q.bias, lin.bias.detach())
    assert set(q.state_dict()) == {"qweight", "weight_scale", "bias"}
    assert Int8Linear.from_float(nn.Linear(48, 96, bias=False)).bias is None


# ------------------------------------------------------------------------------ Int8Linear numerics


def test_int8_linear_2d_and_3d_inputs() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    q = Int8Linear.from_float(lin)
    with torch.no_grad():
        for x in (torch.randn(20, 48), torch.randn(2, 10, 48)):
            out = q(x)
            assert out.shape == (*x.shape[:-1], 96) and out.dtype == torch.float32
            assert relative_error(out, lin(x)) < TOL_INT8_LAYER
        x = torch.randn(5, 48)
        assert relative_error(q(x.bfloat16()), lin(x)) < TOL_INT8_LAYER  # bf16 in, bf16 out
        assert q(x.bfloat16()).dtype == torch.bfloat16
        assert torch.equal(q(torch.zeros(3, 48)), lin.bias.expand(3, -1))  # all-zero tokens: exactly the bias
        lin2 = nn.Linear(10, 7, bias=False)  # sizes that are not multiples of anything
        assert relative_error(Int8Linear.from_float(lin2)(x[:, :10]), lin2(x[:, :10])) < TOL_INT8_LAYER


def test_int8_linear_channel_forward_on_nchw_is_the_1x1_conv() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    q = Int8Linear.from_float(lin)
    x4 = torch.randn(2, 48, 5, 7)
    with torch.no_grad():
        ref = F.conv2d(x4, lin.weight[:, :, None, None], lin.bias)
        out = q.channel_forward(x4)
        assert out.shape == (2, 96, 5, 7)
        assert relative_error(out, ref) < TOL_INT8_LAYER
        # MatFormer slices in the NCHW layout too
        ref = F.conv2d(x4[:, :24], lin.weight[:40, :24, None, None], lin.bias[:40])
        assert relative_error(q.channel_forward(x4[:, :24], rows=40, cols=24), ref) < TOL_INT8_LAYER


def test_int8_linear_matformer_slices() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    q = Int8Linear.from_float(lin)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        out = q.channel_forward(x, rows=40)
        assert out.shape == (2, 7, 40)
        assert relative_error(out, F.linear(x, lin.weight[:40], lin.bias[:40])) < TOL_INT8_LAYER
        out = q.channel_forward(x[..., :24], cols=24)
        assert out.shape == (2, 7, 96)
        assert relative_error(out, F.linear(x[..., :24], lin.weight[:, :24], lin.bias)) < TOL_INT8_LAYER
        out = q.channel_forward(x[..., :24], rows=40, cols=24)
        assert relative_error(out, F.linear(x[..., :24], lin.weight[:40, :24], lin.bias[:40])) < TOL_INT8_LAYER


def test_int8_nested_mlp_at_half_width_matches_fp32() -> None:
    """The MatFormer (nested) mixer of hybrid_tiny runs fc1[:m] / fc2[:, :m] through Int8Linear's slices."""
    model = build(PRESETS["hybrid_tiny"], 10, 32).eval()
    q = to_precision(model, "int8")
    model.set_nested_width(0.5)
    q.set_nested_width(0.5)
    x = _batch()
    with torch.no_grad():
        ref, out = model(x), q(x)
        assert relative_error(out, ref) <= TOL["int8"]
        model.set_nested_width(1.0)
        assert relative_error(out, model(x)) > 0.1  # the slice really changed the network


def test_int8_model_runs_channel_mixers_in_both_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """pool (NCHW) token mixers feed conv_ffn and mlp in NCHW; an attention stage feeds mlp tokens (B, N, C)."""
    spec = ArchSpec(stem=StemSpec("conv", 4), stages=(
        StageSpec(depth=1, width=32, token_mixer="pool", channel_mixer="conv_ffn", norm="groupnorm1"),
        StageSpec(depth=2, width=64, token_mixer="pool", channel_mixer="mlp", norm="groupnorm1"),
        StageSpec(depth=1, width=64, token_mixer="attention", channel_mixer="mlp", heads=2, downsample="none")))
    ndims: list[int] = []
    original = Int8Linear.channel_forward

    def spy(self: Int8Linear, x: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
        ndims.append(x.ndim)
        return original(self, x, rows, cols)

    monkeypatch.setattr(Int8Linear, "channel_forward", spy)
    assert _compare(build(spec, 10, 32), "int8") <= TOL["int8"]
    assert set(ndims) == {3, 4}  # both layouts went through the quantized layers


# ------------------------------------------------------------------------------ Fp8Linear (on CPU)


def _fp8_or_skip(f: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            return f(x)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        pytest.skip(f"torch._scaled_mm does not run on this CPU: {e}")


def test_fp8_linear_numerics_through_scaled_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 128)
    assert Fp8Linear.fits(lin)
    f = Fp8Linear.from_float(lin)
    assert f.qweight.dtype == torch.float8_e4m3fn and f.weight_scale.ndim == 0
    assert f.bias is not None and f.bias.dtype == torch.bfloat16
    x = torch.randn(33, 64)
    _fp8_or_skip(f, x.bfloat16())
    calls: list[int] = []
    scaled_mm = torch._scaled_mm

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    with torch.no_grad():
        ref = lin(x)
        out = f(x.bfloat16())
        assert calls, "a 64->128 layer should go through torch._scaled_mm"
        assert out.shape == (33, 128) and out.dtype == torch.bfloat16
        assert relative_error(out, ref) < TOL_FP8_LAYER
        out3 = f(x.view(3, 11, 64).bfloat16())
        assert out3.shape == (3, 11, 128) and relative_error(out3, ref.view(3, 11, 128)) < TOL_FP8_LAYER
        x4 = torch.randn(2, 64, 5, 5)
        ref4 = F.conv2d(x4, lin.weight[:, :, None, None], lin.bias)
        assert relative_error(f.channel_forward(x4.bfloat16()), ref4) < TOL_FP8_LAYER
        # a MatFormer slice of multiples of 16 still goes through _scaled_mm
        n_calls = len(calls)
        out = f.channel_forward(x[:, :48].bfloat16(), rows=32, cols=48)
        assert len(calls) == n_calls + 1 and out.shape == (33, 32)
        assert relative_error(out, F.linear(x[:, :48], lin.weight[:32, :48], lin.bias[:32])) < TOL_FP8_LAYER


def test_fp8_fits_only_multiples_of_16() -> None:
    assert Fp8Linear.fits(nn.Linear(16, 32))
    assert not Fp8Linear.fits(nn.Linear(64, 10))
    assert not Fp8Linear.fits(nn.Linear(24, 32))


def test_fp8_slices_scaled_mm_cannot_take_are_dequantized(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 128)
    f = Fp8Linear.from_float(lin)
    x = torch.randn(33, 64)
    _fp8_or_skip(f, x.bfloat16())

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a slice that is not a multiple of 16 must not reach torch._scaled_mm")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with torch.no_grad():
        out = f.channel_forward(x.bfloat16(), rows=40)  # 40 output rows
        assert out.shape == (33, 40) and out.dtype == torch.bfloat16
        assert relative_error(out, F.linear(x, lin.weight[:40], lin.bias[:40])) < TOL_FP8_LAYER
        out = f.channel_forward(x[:, :40].bfloat16(), cols=40)  # 40 input columns
        assert relative_error(out, F.linear(x[:, :40], lin.weight[:, :40], lin.bias)) < TOL_FP8_LAYER


# ------------------------------------------------------------------------------ errors and support


def test_fp8_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(PrecisionError, match="compute capability"):
        to_precision(nn.Linear(4, 4), "fp8", "cpu")
    with pytest.raises(PrecisionError, match="compute capability"):
        check_precision("fp8", "cpu")


def test_int8_on_cuda_is_a_clear_error_even_without_a_gpu() -> None:
    # check_precision looks at the device type, then the precision: no GPU is touched for int8
    with pytest.raises(PrecisionError, match="int8 is dynamic quantization for CPUs"):
        check_precision("int8", "cuda")
    with pytest.raises(PrecisionError, match="int8 is dynamic quantization for CPUs"):
        to_precision(nn.Linear(4, 4), "int8", "cuda")


def test_unknown_precision_lists_the_choices() -> None:
    with pytest.raises(PrecisionError, match="unknown precision 'fp4'") as info:
        check_precision("fp4")
    assert all(p in str(info.value) for p in PRECISIONS)
    with pytest.raises(PrecisionError, match="unknown precision"):
        to_precision(nn.Linear(4, 4), "fp4")
    with pytest.raises(PrecisionError, match="unknown precision"):
        activation_dtype("fp4")
    assert issubclass(PrecisionError, ValueError)


def test_fp16_on_this_cpu() -> None:
    if "fp16" in CPU:
        check_precision("fp16", "cpu")  # native here: no error
        return
    with pytest.raises(PrecisionError, match="no native kernels"):
        check_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="no native kernels"):
        to_precision(nn.Linear(4, 4), "fp16", "cpu")


def test_supported_precisions_and_activation_dtypes() -> None:
    assert CPU[0] == "fp32" and "int8" in CPU and "fp8" not in CPU
    assert list(CPU) == [p for p in PRECISIONS if p in CPU]  # in PRECISIONS order
    assert activation_dtype("fp32") == activation_dtype("int8") == torch.float32
    assert activation_dtype("bf16") == activation_dtype("fp8") == torch.bfloat16
    assert activation_dtype("fp16") == torch.float16
    with pytest.raises(PrecisionError, match="not supported"):
        check_precision("bf16", "meta")
