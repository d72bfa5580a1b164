"""predictors.precision: bf16/int8/fp8 conversions stay close to fp32; int8 shrinks Linear weights;
precisions a device cannot run natively are clear errors."""

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
from search_spaces.spec import ArchSpec, StageSpec, StemSpec

CPU = supported_precisions("cpu")
# measured on the presets at 32px: bf16 0.7-1.4%, int8 1.0-3.4% relative error of the logits
TOL = {"bf16": 0.03, "int8": 0.06}
# random architectures are deeper/odder at random init (bf16 up to ~8% on 30 seeds): looser bound
TOL_RANDOM = {"bf16": 0.1, "int8": 0.1}


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _compare(model: nn.Module, precision: str) -> float:
    x = _batch()
    with torch.no_grad():
        ref = model.eval()(x)
        out = to_precision(model, precision)(x.to(activation_dtype(precision)))
    assert out.shape == ref.shape and torch.isfinite(out.float()).all()
    return relative_error(out, ref)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["hybrid_tiny", "deit_tiny", "poolformer_s12"])
def test_presets_stay_close_to_fp32(name: str, precision: str) -> None:
    if precision not in CPU:
        pytest.skip(f"{precision} has no native kernels on this CPU")
    assert _compare(build(PRESETS[name], 10, 32), precision) <= TOL[precision]


@pytest.mark.parametrize("seed", range(6))
def test_random_archs_stay_close_to_fp32(seed: int) -> None:
    model = build(get_space("hybrid_vit").random(seed), 10, 32)
    for precision in ("bf16", "int8"):
        if precision in CPU:
            assert _compare(model, precision) <= TOL_RANDOM[precision], precision


def test_conversion_leaves_the_original_alone() -> None:
    model = build(PRESETS["hybrid_tiny"], 10, 32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = to_precision(model, "int8")
    assert model.training and not q.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, Int8Linear) for m in q.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_int8_shrinks_linear_weights_and_keeps_marked_layers_float() -> None:
    model = build(PRESETS["hybrid_tiny"], 10, 32)  # has an ssm stage: its dt_proj is marked _keep_float
    plain = [m for m in model.modules() if type(m) is nn.Linear and not getattr(m, "_keep_float", False)]
    kept = [m for m in model.modules() if getattr(m, "_keep_float", False)]
    assert plain and kept
    q = to_precision(model, "int8")
    qlin = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(qlin) == len(plain)
    assert all(m.qweight.dtype == torch.int8 for m in qlin)
    assert sum(type(m) is nn.Linear and getattr(m, "_keep_float", False) for m in q.modules()) == len(kept)
    fp32_bytes = sum(m.weight.numel() * m.weight.element_size() for m in plain)
    int8_bytes = sum(m.qweight.numel() * m.qweight.element_size() for m in qlin)
    assert 3.5 <= fp32_bytes / int8_bytes <= 4.1


def test_int8_linear_numerics_in_both_layouts_and_sliced() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    q = Int8Linear.from_float(lin)
    with torch.no_grad():
        for x in (torch.randn(20, 48), torch.randn(2, 10, 48)):
            assert relative_error(q(x), lin(x)) < 0.02
        x4 = torch.randn(2, 48, 5, 5)
        ref = F.conv2d(x4, lin.weight[:, :, None, None], lin.bias)
        assert relative_error(q.channel_forward(x4), ref) < 0.02
        x = torch.randn(7, 48)
        assert relative_error(q.channel_forward(x, rows=40), F.linear(x, lin.weight[:40], lin.bias[:40])) < 0.02
        assert relative_error(q.channel_forward(x[:, :24], cols=24), F.linear(x[:, :24], lin.weight[:, :24],
                                                                                 lin.bias)) < 0.03


def test_fp8_linear_numerics() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 128)
    f = Fp8Linear.from_float(lin)
    x = torch.randn(33, 64)
    try:
        out = f(x.bfloat16())
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on this CPU: {e}")
    with torch.no_grad():
        ref = lin(x)
        assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 0.08
        # a slice _scaled_mm cannot take (40 rows) goes through the dequantized path
        assert relative_error(f.channel_forward(x.bfloat16(), rows=40), ref[:, :40]) < 0.08
    assert Fp8Linear.fits(lin) and not Fp8Linear.fits(nn.Linear(64, 10))


def test_int8_runs_nchw_channel_mixers() -> None:
    spec = ArchSpec(stem=StemSpec("conv", 4), stages=(
        StageSpec(depth=1, width=32, token_mixer="pool", channel_mixer="conv_ffn", norm="groupnorm1"),
        StageSpec(depth=1, width=64, token_mixer="sepconv", channel_mixer="mlp", norm="batchnorm")))
    assert _compare(build(spec, 10, 32), "int8") <= TOL["int8"]


def test_unsupported_precisions_are_clear_errors() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(PrecisionError, match="compute capability"):
        to_precision(model, "fp8", "cpu")
    with pytest.raises(PrecisionError, match="int8 is dynamic quantization for CPUs"):
        check_precision("int8", "cuda")
    with pytest.raises(PrecisionError, match=r"unknown precision 'fp4'.*fp32, bf16, fp16, int8, fp8"):
        check_precision("fp4")
    if "fp16" not in CPU:
        with pytest.raises(PrecisionError, match="no native kernels"):
            check_precision("fp16", "cpu")
    assert CPU[0] == "fp32" and "fp8" not in CPU
