"""hybrid_vit: specs (JSON, hash, validation), random sampling, building, presets vs timm."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from search_spaces import ArchSpec, BlockSpec, HeadSpec, StageSpec, StemSpec, count_flops, count_params, get_space
from search_spaces.hybrid_vit import PRESETS, HybridViTChoices, HybridViTSpace, build

SPACE = get_space("hybrid_vit")
N_RANDOM = 200


@pytest.fixture(scope="module")
def random_specs() -> list[ArchSpec]:
    return [SPACE.random(seed) for seed in range(N_RANDOM)]


def test_random_specs_round_trip_json_exactly(random_specs: list[ArchSpec]) -> None:
    for spec in random_specs:
        text = spec.to_json()
        back = ArchSpec.from_json(text)
        assert back == spec
        assert back.to_json() == text
        assert back.hash == spec.hash
        assert ArchSpec.from_json(spec.to_json(indent=2)) == spec  # pretty form parses to the same spec


def test_random_specs_are_diverse(random_specs: list[ArchSpec]) -> None:
    assert len({s.hash for s in random_specs}) == N_RANDOM
    used_tm = {tm for s in random_specs for st in s.stages for tm, _ in st.mixers()}
    used_cm = {cm for s in random_specs for st in s.stages for _, cm in st.mixers()}
    assert used_tm == set(SPACE.choices.token_mixers or __import__("search_spaces").token_mixer_names())
    assert used_cm == {"mlp", "glu", "conv_ffn", "nested"}
    assert {len(s.stages) for s in random_specs} == {1, 2, 3, 4}
    assert {s.precision for s in random_specs} == {"fp32", "bf16", "fp16", "int8", "fp8"}
    assert any(st.blocks for s in random_specs for st in s.stages), "per-block mixers never sampled"
    assert {s.stem.stride for s in random_specs} == {4, 8, 16}


def test_hash_is_stable_across_processes(random_specs: list[ArchSpec]) -> None:
    code = ("import search_spaces as s; sp = s.get_space('hybrid_vit'); "
            "print(','.join(sp.random(i).hash for i in range(5)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out.split(",") == [s.hash for s in random_specs[:5]]


def test_known_hash_never_changes() -> None:
    """The identity of an architecture must not drift between releases (stored studies key on it)."""
    spec = ArchSpec(stem=StemSpec("conv", 4), stages=(StageSpec(depth=2, width=64, token_mixer="pool"),))
    assert spec.to_json() == (
        '{"head":{"norm":"layernorm","pool":"avg"},"pos_embed":"none","precision":"fp32","space":"hybrid_vit",'
        '"stages":[{"blocks":[],"channel_mixer":"mlp","depth":2,"downsample":"none","heads":1,"layer_scale":null,'
        '"mlp_ratio":4.0,"norm":"layernorm","token_mixer":"pool","width":64}],'
        '"stem":{"kind":"conv","norm":"none","stride":4},"version":1}'
    )
    import hashlib

    assert spec.hash == hashlib.sha256(spec.to_json().encode()).hexdigest()


def test_random_specs_build_and_forward_at_32(random_specs: list[ArchSpec]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for spec in random_specs:
        model = SPACE.build(spec)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, 10), spec.short()
        assert torch.isfinite(y).all(), spec.short()


def test_sample_with_real_optuna_trial_uses_hierarchical_names() -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    names: set[str] = set()
    for _ in range(30):
        trial = study.ask()
        spec = SPACE.sample(trial)
        assert isinstance(spec, ArchSpec)
        names |= set(trial.params)
        study.tell(trial, float(len(spec.stages)))
    assert {"stem.kind", "stem.stride", "num_stages", "s0.depth", "s0.width", "precision"} <= names
    assert any(n.startswith("s1.") and n.endswith("token_mixer") for n in names)
    assert any(".b0." in n for n in names), "per-block names like s1.b0.token_mixer"
    # the same trial parameters rebuild the same spec (define-by-run is deterministic)
    best = study.trials[0]
    fixed = optuna.trial.FixedTrial(best.params)
    assert SPACE.sample(fixed) == SPACE.sample(optuna.trial.FixedTrial(best.params))


def test_choices_restrict_the_space() -> None:
    sp = HybridViTSpace(HybridViTChoices(token_mixers=("pool", "linear"), precisions=("bf16",), max_stages=2))
    for seed in range(30):
        s = sp.random(seed)
        assert s.precision == "bf16" and len(s.stages) <= 2
        assert {tm for st in s.stages for tm, _ in st.mixers()} <= {"pool", "linear"}


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    spec = SPACE.random(3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build(spec, 10, 32), build(spec, 10, 32)
    assert torch.rand(1) == before
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = build(spec, 10, 32, seed=1)
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


# ---- canonical form and validation ------------------------------------------------------------


def _stage(**kw: object) -> StageSpec:
    return StageSpec(**{"depth": 2, "width": 64, "token_mixer": "attention", "heads": 4, **kw})  # type: ignore[arg-type]


def test_canonical_form_makes_equal_nets_hash_equal() -> None:
    a = ArchSpec(StemSpec(), (_stage(mlp_ratio=4),))
    b = ArchSpec(StemSpec(), (_stage(mlp_ratio=4.0),))
    assert a.hash == b.hash
    same_blocks = ArchSpec(StemSpec(), (_stage(blocks=(BlockSpec("attention", "mlp"),) * 2),))
    assert same_blocks == a and same_blocks.stages[0].blocks == ()
    no_heads = ArchSpec(StemSpec(), (_stage(token_mixer="pool", heads=8),))
    assert no_heads.stages[0].heads == 1
    ds = ArchSpec(StemSpec(), (_stage(downsample="patch2"), _stage(downsample="patch2")))
    assert ds.stages[0].downsample == "none" and ds.stages[1].downsample == "patch2"


BAD = [
    (lambda: ArchSpec(StemSpec(), (_stage(token_mixer="softmax"),)), "unknown token mixer 'softmax'"),
    (lambda: ArchSpec(StemSpec(), (_stage(channel_mixer="ffn"),)), "unknown channel mixer 'ffn'"),
    (lambda: ArchSpec(StemSpec(), (_stage(width=66, heads=4),)), "not divisible by heads"),
    (lambda: ArchSpec(StemSpec(), (_stage(depth=0),)), "depth must be in"),
    (lambda: ArchSpec(StemSpec(), ()), "non-empty"),
    (lambda: ArchSpec(StemSpec(), (_stage(),) * 5), "at most 4"),
    (lambda: StemSpec(stride=3), "stem.stride"),
    (lambda: StemSpec(kind="resnet"), "stem.kind"),
    (lambda: ArchSpec(StemSpec(), (_stage(norm="rms"),)), "norm must be one of"),
    (lambda: ArchSpec(StemSpec(), (_stage(mlp_ratio=0),)), "mlp_ratio"),
    (lambda: ArchSpec(StemSpec(), (_stage(),), precision="int4"), "precision"),
    (lambda: ArchSpec(StemSpec(), (_stage(width=True),)), "width must be an integer"),
    (lambda: ArchSpec(StemSpec(), (_stage(blocks=(BlockSpec("pool", "mlp"),)),)), "blocks has 1 entries"),
    (lambda: ArchSpec(StemSpec(), (_stage(), _stage()), head=HeadSpec(pool="cls")), "single-stage"),
    (lambda: ArchSpec(StemSpec(), (_stage(token_mixer="pool"),), head=HeadSpec(pool="cls")), "class token"),
    (lambda: ArchSpec.from_json("{not json"), "not valid JSON"),
    (lambda: ArchSpec.from_json("[1, 2]"), "JSON object"),
    (lambda: ArchSpec.from_json('{"space": "nb201", "arch": "x"}'), "space 'nb201'"),
    (lambda: ArchSpec.from_json('{"stem": {"kind": "conv", "stride": 4}, "stages": [], "extra": 1}'), "unknown field"),
    (lambda: ArchSpec.from_json('{"stem": {"kind": "conv", "stride": 4}, "stages": [{"width": 8}]}'), "missing"),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_invalid_specs_raise_one_line_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


# ---- presets are the published models ------------------------------------------------------------


def test_preset_parameter_counts_are_timms() -> None:
    assert count_params(build(PRESETS["deit_tiny"], num_classes=1000, img_size=224)) == 5_717_416
    assert count_params(build(PRESETS["poolformer_s12"], num_classes=1000, img_size=224)) == 11_915_176


def _timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize(("preset", "timm_name"), [("deit_tiny", "deit_tiny_patch16_224"),
                                                   ("poolformer_s12", "poolformer_s12"),
                                                   ("deit_small", "deit_small_patch16_224")])
def test_presets_match_timm_parameter_count_and_flops(preset: str, timm_name: str) -> None:
    timm = _timm()
    ref = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    ours = build(PRESETS[preset], num_classes=1000, img_size=224)
    assert count_params(ours) == sum(p.numel() for p in ref.parameters())
    assert count_flops(ours, (1, 3, 224, 224)) == count_flops(ref, (1, 3, 224, 224))


def _load_from_timm_deit(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    sd = ref.state_dict()
    mapped = {"stem.proj.weight": sd["patch_embed.proj.weight"], "stem.proj.bias": sd["patch_embed.proj.bias"],
              "cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"], "head_norm.weight": sd["norm.weight"],
              "head_norm.bias": sd["norm.bias"], "head.weight": sd["head.weight"], "head.bias": sd["head.bias"]}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            rest = rest.replace("attn.", "token_mixer.").replace("mlp.", "channel_mixer.")
            mapped[f"stages.0.blocks.{i}.{rest}"] = v
    ours.load_state_dict(mapped, strict=True)


def _load_from_timm_poolformer(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    mapped = {}
    for k, v in ref.state_dict().items():
        k2 = k.replace("stem.conv", "stem.proj").replace("downsample.conv", "downsample.proj")
        k2 = k2.replace("layer_scale1.scale", "ls1.gamma").replace("layer_scale2.scale", "ls2.gamma")
        k2 = k2.replace(".mlp.", ".channel_mixer.").replace("head.norm", "head_norm").replace("head.fc", "head")
        if ".channel_mixer." in k2 and v.ndim == 4:
            v = v[:, :, 0, 0]
        mapped[k2] = v
    ours.load_state_dict(mapped, strict=True)


@pytest.mark.parametrize(("preset", "timm_name", "loader"), [
    ("deit_tiny", "deit_tiny_patch16_224", _load_from_timm_deit),
    ("poolformer_s12", "poolformer_s12", _load_from_timm_poolformer),
])
def test_presets_compute_the_same_function_as_timm(preset: str, timm_name: str, loader) -> None:
    """Not only the same count: timm's weights loaded into our preset give timm's outputs."""
    timm = _timm()
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, num_classes=1000).eval()
    for p in ref.parameters():  # non-trivial layer scales / norms so every path matters
        p.data.add_(torch.randn_like(p) * 0.02)
    ours = build(PRESETS[preset], num_classes=1000, img_size=224).eval()
    loader(ours, ref)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_learned_pos_embed_resamples_to_other_resolutions() -> None:
    spec = replace(PRESETS["deit_tiny"], stages=(replace(PRESETS["deit_tiny"].stages[0], depth=1),))
    model = build(spec, num_classes=10, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
        assert model(torch.randn(1, 3, 96, 48)).shape == (1, 10)


def test_describe_reports_params_flops_and_stages() -> None:
    info = SPACE.describe(PRESETS["poolformer_s12"], img_size=224, num_classes=1000)
    assert info["params"] == 11_915_176
    assert [r["name"] for r in info["stages"]] == ["stem", "s0", "s1", "s2", "s3"]
    assert [r["grid"] for r in info["stages"]] == ["56x56", "56x56", "28x28", "14x14", "7x7"]
    # PoolFormer-S12 is reported at 1.8 GMACs (Yu et al. 2022, Table 1); torch counts conv/linear exactly
    assert 1.7e9 < info["macs"] < 1.95e9
    assert sum(r["params"] for r in info["stages"]) + 512 * 2 + 512 * 1000 + 1000 == info["params"]
    json.dumps(info)


def test_nested_width_runs_smaller_ffns() -> None:
    spec = ArchSpec(StemSpec(), (_stage(channel_mixer="nested"),))
    model = build(spec, 10, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        model.set_nested_width(0.25)
        quarter = model(x)
        model.set_nested_width(1.0)
        assert torch.equal(model(x), full)
    assert not torch.allclose(full, quarter)
