"""Weight-sharing supernet: exact subnets, shared storage, the sandwich step, exact resume, learning."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas.data import load
from predictors.precision import PrecisionError
from predictors.supernet import (
    SupernetError,
    TrainConfig,
    _optimizer,
    augment,
    evaluate_subnet,
    load_checkpoint,
    recalibrate_bn,
    sandwich,
    supernet_step,
    train_supernet,
)
from search_spaces import supernet as supernet_mod
from search_spaces.hybrid_vit import HybridViT, build
from search_spaces.layers.common import to_layout
from search_spaces.registry import (
    channel_mixer_names,
    fused_rule,
    get_channel_mixer,
    get_token_mixer,
    token_mixer_names,
)
from search_spaces.spec import ArchSpec, BlockSpec, StemSpec
from search_spaces.supernet import StageFrame, Supernet, SupernetFrame, frame_from_json, get_frame

TINY = get_frame("tiny")


@pytest.fixture(scope="module")
def tiny_net() -> Supernet:
    net = Supernet(TINY, seed=0)
    # break the symmetry of the init so every tensor (norm weights, LayerScale, biases) matters
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def digits() -> tuple:
    return load("digits", "train", img_size=16), load("digits", "test", img_size=16)


def _specs(n: int) -> list[ArchSpec]:
    return [TINY.random(seed) for seed in range(n)]


def test_frame_presets_cover_every_registered_mixer() -> None:
    for name in ("tiny", "small"):
        for sf in get_frame(name).stages:
            assert set(sf.token_mixers) == set(token_mixer_names())
            assert set(sf.channel_mixers) == set(channel_mixer_names())


def test_fifty_random_subnets_cover_all_mixers() -> None:
    tms, cms = set(), set()
    for s in _specs(50):
        TINY.check(s)
        for st in s.stages:
            for t, c in st.mixers():
                tms.add(t)
                cms.add(c)
    assert tms == set(token_mixer_names()) and cms == set(channel_mixer_names())


def test_extract_equals_forward_for_50_random_specs(tiny_net: Supernet) -> None:
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    specs = [*_specs(50), TINY.largest(), TINY.smallest()]
    worst = 0.0
    with torch.no_grad():
        for s in specs:
            ref = tiny_net(x, s)
            model = tiny_net.extract(s).eval()
            out = model(x)
            assert out.shape == (3, 10)
            worst = max(worst, float((out - ref).abs().max()))
    assert worst <= 1e-5


def test_extracted_model_is_a_plain_model_of_the_spec(tiny_net: Supernet) -> None:
    s = TINY.random(3)
    model = tiny_net.extract(s)
    assert type(model) is HybridViT and model.spec == s
    ref = build(s, num_classes=10, img_size=16, in_chans=1)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert not any(type(m).__module__ == supernet_mod.__name__ for m in model.modules())
    # its weights are copies: changing the supernet afterwards leaves it alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        tiny_net.head.weight.add_(1.0)
    try:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        with torch.no_grad():
            tiny_net.head.weight.sub_(1.0)


def test_subnet_differs_from_a_fresh_build(tiny_net: Supernet) -> None:
    """Inheritance is real: the subnet's weights are the supernet's, not a fresh init."""
    s = TINY.smallest()
    x = torch.randn(2, 1, 16, 16)
    fresh = build(s, num_classes=10, img_size=16, in_chans=1).eval()
    assert not torch.allclose(fresh(x), tiny_net.extract(s).eval()(x))


def test_elastic_slicing_shares_storage(tiny_net: Supernet) -> None:
    big, small = TINY.largest(), replace(TINY.largest(), stages=tuple(
        replace(st, width=TINY.stages[i].widths[0], mlp_ratio=2.0, heads=1 if st.heads == 1 else
                TINY.stages[i].heads_for(TINY.stages[i].widths[0])[0]) for i, st in enumerate(TINY.largest().stages)))
    small = ArchSpec.from_dict(small.to_dict())
    sup = dict(tiny_net.named_parameters())
    sub = tiny_net.sub_state(small)
    name = "stages.0.blocks.0.channel_mixer.fc1.weight"
    sname, _ = tiny_net.super_name(small, name)
    assert sname == f"stages.0.blocks.0.channel_mixers.{small.stages[0].channel_mixer}.fc1.weight"
    views = 0
    for k, t in sub.items():
        sname, _ = tiny_net.super_name(small, k)
        src = sup.get(sname)
        if src is None or t.ndim == 0:
            continue
        if supernet_mod._fused_rule(small, k) is None:
            assert t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr(), k
            assert t.shape <= src.shape
            views += 1
    assert views > 20
    # writes to the supernet show through the subnet's views
    w = sub["head.weight"]
    with torch.no_grad():
        tiny_net.head.weight[0, 0] += 3.0
    try:
        assert float(w[0, 0].detach()) == float(tiny_net.head.weight[0, 0].detach())
    finally:
        with torch.no_grad():
            tiny_net.head.weight[0, 0] -= 3.0
    assert tiny_net.sub_state(big)["head.weight"] is tiny_net.head.weight


def test_fused_qkv_is_sliced_per_segment() -> None:
    t = torch.arange(12.0).repeat_interleave(1).view(12, 1).expand(12, 2).contiguous()
    out = supernet_mod._take(t, (6, 1), 3)  # q, k, v of 4 rows each -> first 2 rows of each
    assert out[:, 0].tolist() == [0, 1, 4, 5, 8, 9]
    out = supernet_mod._take(torch.arange(40.0).view(40, 1), (36, 1), (None, 16, 16))  # Mamba's (dt, B, C)
    assert out[:, 0].tolist() == [*range(0, 4), *range(8, 24), *range(24, 40)]


MIXERS = [("token", n) for n in token_mixer_names()] + [("channel", n) for n in channel_mixer_names()]
MIXER_IDS = [f"{k}:{n}" for k, n in MIXERS]


def _mixer_cls(kind: str, name: str) -> type[nn.Module]:
    return get_token_mixer(name) if kind == "token" else get_channel_mixer(name)


def _perturb(module: nn.Module, seed: int) -> None:
    """Random offsets on every parameter and random BatchNorm statistics, so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.uniform_(0.5, 1.5, generator=g)


FUSED = [(k, n) for k, n in MIXERS if _mixer_cls(k, n).fused_slices]


@pytest.mark.parametrize(("kind", "name"), FUSED, ids=[f"{k}:{n}" for k, n in FUSED])
def test_extract_slices_fused_weights_as_the_mixer_declares(kind: str, name: str) -> None:
    """A subnet extracted from the supernet equals ``build(spec)`` loaded with weights the test slices
    itself, per segment as the mixer class's ``fused_slices`` says (and its forward agrees)."""
    cls = _mixer_cls(kind, name)
    frame = SupernetFrame(
        stem=StemSpec(kind="patch", stride=4, norm="layernorm"),
        stages=(StageFrame(max_depth=1, widths=(16, 32), heads=(2, 4), mlp_ratios=(2.0,), downsample="none",
                           token_mixers=(name,) if kind == "token" else ("pool",),
                           channel_mixers=(name,) if kind == "channel" else ("mlp",)),),
        img_size=16, in_chans=1, num_classes=10)
    net = Supernet(frame, seed=0)
    _perturb(net, 1)
    net.eval()
    spec = frame.smallest()
    sup = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    ref = build(spec, num_classes=10, img_size=16, in_chans=1).eval()
    state, fused = {}, 0
    for k, t in ref.state_dict().items():
        sname, mixer = net.super_name(spec, k)
        local = re.fullmatch(rf"stages\.0\.blocks\.0\.{kind}_mixer\.(.+)", k)
        rule = fused_rule(cls, local[1]) if local and mixer == name else None
        state[k] = supernet_mod._take(sup[sname], t.shape, rule).detach().clone()
        fused += rule is not None and t.shape != sup[sname].shape
    assert fused, f"{name}: no tensor was sliced by its fused_slices"
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)
        assert (net.extract(spec).eval()(x) - want).abs().max() <= 1e-5
        assert (net(x, spec) - want).abs().max() <= 1e-5


# (width, heads) of the narrow and the wide block in the embedding test below. The default doubles
# the width and, for mixers with heads, the heads too: a head's width and softmax scale stay the same.
_EMBED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    # one head whose width grows, so its qkv ConvBN is sliced (q and k of key_dim rows must stay
    # whole); the scale depends on key_dim only. With more heads the channel groups would not nest.
    "cascaded_group": ((16, 1), (32, 1)),
    # SHViT attends over pdim = dim / 4.67 channels and passes the rest through: the block nests
    # only where pdim agrees (4 at 20 and 23), and then qkv is not sliced at all (its rule, with
    # the one width-dependent segment last, is a plain leading slice anyway)
    "single_head": ((20, 1), (23, 1)),
}


# Mixers ending in an RMSNorm over all their inner channels (Mamba-2's and Hydra's gated norm):
# padded with zero channels, the wide block divides by more channels, so no narrow block nests in
# it exactly. The embedding test below takes the norm's statistics out of both blocks (each then
# multiplies by its weight and gate only); everything the slicing decides still has to agree.
_CHANNEL_NORMED = {"ssd", "hydra"}


@pytest.mark.parametrize(("kind", "name"), MIXERS, ids=MIXER_IDS)
def test_declared_slicing_keeps_every_segment_in_its_role(kind: str, name: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The slicing is right, checked against the block's own forward, not against the declaration.

    Take a wide block, zero every entry its narrow subnet does not inherit (found by slicing index
    tensors with the declared rules) and feed it the narrow input padded with zero channels: it
    must compute the narrow block, with zeros in the extra channels. A rule that hands the narrow
    block k rows cut from the wide block's q rows (or gate, Δ, ...) makes the two differ."""
    cls = _mixer_cls(kind, name)
    if name in _CHANNEL_NORMED:
        from search_spaces.layers._ssd import GatedRMSNorm

        monkeypatch.setattr(GatedRMSNorm, "forward", lambda self, y, z: y * self.weight * F.silu(z))
        monkeypatch.setattr(GatedRMSNorm, "normed", lambda self, y, z: y * F.silu(z))  # project()'s
    has_heads = kind == "token" and cls.uses_heads
    default = ((16, 2), (32, 4)) if has_heads else ((16, 1), (32, 1))
    (w_small, h_small), (w_big, h_big) = _EMBED.get(name, default)

    def make(dim: int, heads: int) -> nn.Module:
        torch.manual_seed(0)
        return cls(dim, heads=heads, grid=(4, 4)) if kind == "token" else cls(dim, mlp_ratio=2.0)

    big, small = make(w_big, h_big), make(w_small, h_small)
    _perturb(big, 2)
    big_tensors = {**dict(big.named_parameters()), **dict(big.named_buffers())}
    small_state = small.state_dict()
    keep = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in big_tensors.items()}
    state = {}
    with torch.no_grad():
        for n, t in small_state.items():
            src = big_tensors[n]
            if not t.shape:
                state[n] = src.clone()
                keep[n].fill_(True)
                continue
            rule = fused_rule(cls, n)
            index = torch.arange(src.numel()).view(src.shape)
            keep[n].view(-1)[supernet_mod._take(index, t.shape, rule).flatten()] = True
            state[n] = supernet_mod._take(src, t.shape, rule).clone()
        for n, t in big_tensors.items():
            t.mul_(keep[n])
    small.load_state_dict(state, strict=True)
    big.eval()
    small.eval()
    layout = "nlc" if cls.layout == "any" else cls.layout
    x = to_layout(torch.randn(2, w_small, 4, 4, generator=torch.Generator().manual_seed(3)), layout, (4, 4))
    ch = 1 if layout == "nchw" else 2  # the channel dim
    pad = torch.zeros(*x.shape[:ch], w_big - w_small, *x.shape[ch + 1:])
    with torch.no_grad():
        want = small(x, (4, 4))
        got = big(torch.cat([x, pad], dim=ch), (4, 4))
    head, tail = got.split([w_small, w_big - w_small], dim=ch)
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    assert float((head - want).abs().max()) <= tol, f"{name}: the narrow block is not a part of the wide one"
    assert float(tail.abs().max()) <= tol, f"{name}: the wide block's extra channels are not zero"


def test_gradients_reach_only_the_slices_used() -> None:
    net = Supernet(TINY, seed=0).train()
    s = ArchSpec.from_dict(replace(TINY.smallest(), stages=tuple(
        replace(st, token_mixer="attention", channel_mixer="mlp", heads=TINY.stages[i].heads_for(st.width)[0])
        for i, st in enumerate(TINY.smallest().stages))).to_dict())
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(net(x, s), y).backward()
    fc1 = net.stages[0].blocks[0].channel_mixers["mlp"].fc1.weight
    w0, hidden = s.stages[0].width, int(s.stages[0].width * s.stages[0].mlp_ratio)
    assert fc1.grad[:hidden, :w0].abs().sum() > 0
    assert fc1.grad[hidden:].abs().sum() == 0 and fc1.grad[:, w0:].abs().sum() == 0
    qkv = net.stages[0].blocks[0].token_mixers["attention"].qkv.weight  # rows [q | k | v], 32 each at max
    wmax = TINY.stages[0].max_width
    for seg in range(3):
        assert qkv.grad[seg * wmax: seg * wmax + w0, :w0].abs().sum() > 0
        assert qkv.grad[seg * wmax + w0:(seg + 1) * wmax].abs().sum() == 0
    assert net.stages[0].blocks[1].norm1.weight.grad is None  # depth 1: the second block is not used
    assert net.stages[0].blocks[0].norm1.weight.grad[:w0].abs().sum() > 0
    assert net.stages[0].blocks[0].token_mixers["pool"] is not None
    assert all(p.grad is None for p in net.stages[0].blocks[0].token_mixers["ssm"].parameters())


def test_sandwich_step_touches_exactly_the_weights_of_its_subnets() -> None:
    net = Supernet(TINY, seed=0).train()
    cfg = TrainConfig(batch_size=16, seed=0)
    opt = _optimizer(net, cfg)
    specs = sandwich(TINY, cfg, step=5)
    assert specs[0].stages[0].depth == TINY.stages[0].max_depth and specs[0].stages[-1].width == 48
    assert all(st.depth == 1 for st in specs[1].stages) and specs[1].stages[0].width == 16
    assert len(specs) == 2 + cfg.n_random
    used = {net.super_name(s, k)[0] for s in specs for k in net.sub_state(s)}
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    supernet_step(net, opt, x, y, specs, cfg)
    changed = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    untouched = set(before) - used
    assert changed <= used
    assert untouched and not (changed & untouched)
    assert len(changed) >= 0.8 * len([k for k in used if k in before])


def test_sandwich_is_deterministic_per_step() -> None:
    cfg = TrainConfig(seed=3)
    assert [s.hash for s in sandwich(TINY, cfg, 7)] == [s.hash for s in sandwich(TINY, cfg, 7)]
    assert [s.hash for s in sandwich(TINY, cfg, 7)] != [s.hash for s in sandwich(TINY, cfg, 8)]


def test_augment_crops_and_flips_per_image() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    again = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # every output row is a (possibly flipped, shifted) piece of an input row or zero padding
    vals = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= vals


def test_checkpoint_resume_gives_identical_next_steps(digits: tuple, tmp_path: Path) -> None:
    train = load("digits", "train", limit=192, img_size=16)
    cfg = TrainConfig(batch_size=64, seed=1, n_random=1)
    ref = train_supernet(TINY, train, 2, config=cfg, out=tmp_path / "a")  # 6 steps straight
    part = train_supernet(TINY, train, 2, config=cfg, out=tmp_path / "b", max_steps=4)
    assert part.train_state.step == 4
    resumed = train_supernet(TINY, train, 2, config=cfg, out=tmp_path / "b")
    assert resumed.train_state.step == 6
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], part.state_dict()[k]) for k in a)
    net, ckpt = load_checkpoint(tmp_path / "b")
    assert ckpt["step"] == 6 and [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in b.items())
    assert json.loads((tmp_path / "b" / "frame.json").read_text()) == TINY.to_dict()
    # another recipe or frame on the same directory is refused, and nothing is overwritten
    stamp = (tmp_path / "b" / "supernet.pt").stat().st_mtime_ns
    with pytest.raises(SupernetError, match="another recipe"):
        train_supernet(TINY, train, 3, config=cfg, out=tmp_path / "b")
    other = replace(TINY, layer_scale=1e-5)
    with pytest.raises(SupernetError, match="another frame"):
        train_supernet(other, train, 2, config=cfg, out=tmp_path / "b")
    assert (tmp_path / "b" / "supernet.pt").stat().st_mtime_ns == stamp


def test_tiny_supernet_learns_digits(digits: tuple) -> None:
    train, test = digits
    # no augmentation: flipped or shifted 8x8 digits are other digits or none
    cfg = TrainConfig(batch_size=64, lr=3e-3, seed=0, warmup_epochs=0.5, augment=False)
    net = train_supernet(TINY, train, 4, config=cfg).eval()
    accs = {name: evaluate_subnet(net, s, test, calib=train)
            for name, s in (("largest", TINY.largest()), ("smallest", TINY.smallest()), ("random", TINY.random(11)))}
    assert min(accs.values()) > 0.45, accs  # chance is 0.1; 4 epochs of a supernet of ~10^8 subnets
    # precision: int8 runs on CPU and costs little; fp8 needs a GPU and says so
    s8 = TINY.largest().with_precision("int8")
    assert abs(evaluate_subnet(net, s8, test, calib=train) - accs["largest"]) < 0.05
    with pytest.raises(PrecisionError):
        evaluate_subnet(net, TINY.largest().with_precision("fp8"), test, calib=train)


def test_recalibrate_bn_sets_the_plain_average_of_batch_statistics() -> None:
    model = build(TINY.smallest(), num_classes=10, img_size=16, in_chans=1)  # patch stem: no BN; use BN norm
    bn = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), bn)
    data = type("D", (), {})()
    data.x = torch.randn(64, 1, 8, 8)
    data.y = torch.zeros(64, dtype=torch.long)
    used = recalibrate_bn(net, data, batches=2, batch_size=32)
    assert used == 64
    from predictors.supernet import _order

    idx = _order(64, 0, 0xBA7C)
    with torch.no_grad():
        feats = [net[0](data.x[idx[i * 32:(i + 1) * 32]]) for i in range(2)]
    expect = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, expect, atol=1e-6)
    assert bn.momentum == 0.1 and recalibrate_bn(model, data) == 0


def test_frame_json_round_trip_and_errors() -> None:
    assert frame_from_json(TINY.to_json()) == TINY
    with pytest.raises(ValueError, match="unknown frame field"):
        SupernetFrame.from_dict({**TINY.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="divisible by none of the heads"):
        StageFrame(max_depth=2, widths=(24,), heads=(16,))
    with pytest.raises(ValueError, match="unknown token mixer"):
        StageFrame(max_depth=2, widths=(16,), token_mixers=("nope",))
    with pytest.raises(ValueError, match="invalid architecture"):
        replace(TINY, img_size=2)
    with pytest.raises(ValueError, match="unknown frame"):
        get_frame("huge")


def test_check_rejects_specs_outside_the_frame() -> None:
    s = TINY.largest()
    wide = ArchSpec.from_dict({**s.to_dict(), "stages": [{**s.to_dict()["stages"][0], "width": 64},
                                                         *s.to_dict()["stages"][1:]]})
    with pytest.raises(ValueError, match=r"width 64 not in \[16, 32\]"):
        TINY.check(wide)
    deep = replace(s, stages=(replace(s.stages[0], depth=3, blocks=()), *s.stages[1:]))
    with pytest.raises(ValueError, match="depth 3 > max 2"):
        TINY.check(ArchSpec.from_dict(deep.to_dict()))
    with pytest.raises(ValueError, match="1 stages"):
        TINY.check(replace(s, stages=s.stages[:1]))
    mixed = replace(s, stages=(replace(s.stages[0], blocks=(BlockSpec("pool", "mlp"), BlockSpec("ssm", "glu"))),
                               *s.stages[1:]))
    TINY.check(ArchSpec.from_dict(mixed.to_dict()))  # per-block mixers are part of the frame
    net = Supernet(TINY)
    with pytest.raises(ValueError, match="not a subnet"):
        net(torch.randn(1, 1, 16, 16), wide)
