"""Supernet variants, all off by default: FairNAS strictly fair mixer sampling (Chu, Zhang, Xu 2021),
single-path uniform sampling without the sandwich's ends (SPOS, Guo et al. 2020) and a few
fine-tuning steps of an extracted subnet before it is evaluated."""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nas.data import load
from predictors.precision import activation_dtype, to_precision
from predictors.supernet import (
    CKPT_NAME,
    SupernetError,
    TrainConfig,
    _optimizer,
    accuracy,
    evaluate_subnet,
    fair_paths,
    finetune,
    has_batchnorm,
    load_checkpoint,
    recalibrate_bn,
    sandwich,
    supernet_step,
    train_supernet,
)
from search_spaces.spec import ArchSpec
from search_spaces.supernet import Supernet, SupernetFrame, get_frame

# the tiny frame with the 10 token mixers it had when these figures (the digest of the old sandwich's
# draws, the fair paths' counts, which random subnets have BatchNorm) were taken: ssd and hydra came later
_MIXERS10 = ("attention", "cascaded_group", "gated_linear", "identity", "linear", "pool", "sepconv", "single_head",
             "spectral", "ssm")
TINY = replace(get_frame("tiny"), stages=tuple(replace(sf, token_mixers=_MIXERS10) for sf in get_frame("tiny").stages))
SMALL = get_frame("small")
FAIR = TrainConfig(sampling="fair")


def _old_sandwich(frame: SupernetFrame, cfg: TrainConfig, step: int) -> list[ArchSpec]:
    """``sandwich`` as it was before the ``sampling`` option (copied verbatim)."""
    rng = random.Random(f"{cfg.seed}:{step}")
    specs = [frame.largest(rng), frame.smallest(rng)]
    specs += [frame.random(rng.randrange(2**31)) for _ in range(cfg.n_random)]
    return [s.with_precision(frame.precisions[0]) for s in specs]


# sha256 over the spec hashes of the old sandwich for seeds (0, 3) x steps (0, 1, 7, 100) x n_random
# (0, 2, 3) on the tiny frame, recorded before the change
OLD_SANDWICH_DIGEST = "4c3e9145abbd27a631bc5f17ac864b056a33f7163ea540d37e403057025a2148"


def _paths(frame: SupernetFrame, cfg: TrainConfig, step: int) -> list[ArchSpec]:
    specs = sandwich(frame, cfg, step)
    return specs[2:]


# --------------------------------------------------------------------------------------------
# fair sampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [TINY, SMALL], ids=["tiny", "small"])
def test_fair_step_uses_every_token_mixer_once_per_stage_at_block_0(frame: SupernetFrame) -> None:
    m = max(len(sf.token_mixers) for sf in frame.stages)
    for seed, step in ((0, 0), (0, 1), (5, 37)):
        specs = sandwich(frame, replace(FAIR, seed=seed), step)
        assert len(specs) == 2 + m
        largest, smallest, paths = specs[0], specs[1], specs[2:]
        assert [st.depth for st in largest.stages] == [sf.max_depth for sf in frame.stages]
        assert [st.width for st in largest.stages] == [sf.max_width for sf in frame.stages]
        assert all(st.depth == 1 for st in smallest.stages)
        for i, sf in enumerate(frame.stages):
            tokens = Counter(p.stages[i].mixers()[0][0] for p in paths)
            assert tokens == Counter(sf.token_mixers), (seed, step, i)
            channels = Counter(p.stages[i].mixers()[0][1] for p in paths)
            assert set(channels) == set(sf.channel_mixers)
            assert max(channels.values()) - min(channels.values()) <= 1
            for j in range(1, sf.max_depth):  # deeper positions: a path of depth <= j skips them
                used = [p.stages[i].mixers()[j] for p in paths if p.stages[i].depth > j]
                assert max(Counter(t for t, _ in used).values(), default=0) <= 1
                assert max(Counter(c for _, c in used).values(), default=0) <= -(-m // len(sf.channel_mixers))


def test_fair_paths_cycle_a_stage_with_fewer_mixers() -> None:
    frame = replace(TINY, stages=(replace(TINY.stages[0], token_mixers=("pool", "attention", "identity"),
                                          channel_mixers=("mlp", "glu")),
                                  TINY.stages[1]))
    m = len(TINY.stages[1].token_mixers)
    for step in range(5):
        paths = _paths(frame, FAIR, step)
        assert len(paths) == m
        for p in paths:
            frame.check(p)
        counts = Counter(p.stages[0].mixers()[0][0] for p in paths)
        assert set(counts) == {"pool", "attention", "identity"}
        assert sorted(counts.values()) == [3, 3, 4]  # floor(10/3) or ceil(10/3)
        assert sorted(Counter(p.stages[0].mixers()[0][1] for p in paths).values()) == [5, 5]
        assert Counter(p.stages[1].mixers()[0][0] for p in paths) == Counter(TINY.stages[1].token_mixers)


def test_fair_paths_without_per_block_mixers_use_one_mixer_per_stage() -> None:
    frame = replace(TINY, per_block=False)
    for step in range(5):
        paths = _paths(frame, FAIR, step)
        for p in paths:
            frame.check(p)
            assert all(len(set(st.mixers())) == 1 for st in p.stages)
        for i, sf in enumerate(frame.stages):
            assert Counter(p.stages[i].token_mixer for p in paths) == Counter(sf.token_mixers)


def test_fair_sampling_is_deterministic_per_seed_and_step() -> None:
    cfg = replace(FAIR, seed=3)

    def hashes(c: TrainConfig, step: int) -> list[str]:
        return [s.hash for s in sandwich(TINY, c, step)]

    assert hashes(cfg, 7) == hashes(cfg, 7) == hashes(TrainConfig.from_dict(json.loads(json.dumps(asdict(cfg)))), 7)
    assert hashes(cfg, 7) != hashes(cfg, 8)
    assert hashes(cfg, 7) != hashes(replace(cfg, seed=4), 7)
    # the sandwich ends are drawn exactly as with uniform sampling; n_random is not used
    assert hashes(cfg, 7)[:2] == hashes(replace(cfg, sampling="uniform"), 7)[:2]
    assert hashes(cfg, 7) == hashes(replace(cfg, n_random=5), 7)
    # fair_paths itself draws from the generator only
    assert [s.hash for s in fair_paths(TINY, random.Random(1))] == [s.hash for s in fair_paths(TINY, random.Random(1))]


@pytest.mark.parametrize("frame", [TINY, SMALL], ids=["tiny", "small"])
def test_every_fair_spec_is_a_subnet_and_the_structure_stays_random(frame: SupernetFrame) -> None:
    seen: dict[str, set] = {"depth": set(), "width": set(), "ratio": set(), "heads": set()}
    for step in range(30):
        for s in sandwich(frame, FAIR, step):
            frame.check(s)
            assert s.precision == frame.precisions[0]
        for p in _paths(frame, FAIR, step):
            st = p.stages[-1]
            seen["depth"].add(st.depth)
            seen["width"].add(st.width)
            seen["ratio"].add(st.mlp_ratio)
            seen["heads"].add(st.heads)
    sf = frame.stages[-1]
    assert seen["depth"] == set(range(1, sf.max_depth + 1))
    assert seen["width"] == set(sf.widths) and seen["ratio"] == set(sf.mlp_ratios)
    assert seen["heads"] >= set(sf.heads)


def test_uniform_sampling_is_unchanged() -> None:
    digest = hashlib.sha256()
    for seed in (0, 3):
        for step in (0, 1, 7, 100):
            for n_random in (0, 2, 3):
                cfg = TrainConfig(seed=seed, n_random=n_random)
                assert TrainConfig(seed=seed, n_random=n_random, sampling="uniform") == cfg
                new, old = sandwich(TINY, cfg, step), _old_sandwich(TINY, cfg, step)
                assert [s.hash for s in new] == [s.hash for s in old]
                for s in new:
                    digest.update(s.hash.encode())
    assert digest.hexdigest() == OLD_SANDWICH_DIGEST
    for step in range(10):
        assert [s.hash for s in sandwich(SMALL, TrainConfig(), step)] == \
            [s.hash for s in _old_sandwich(SMALL, TrainConfig(), step)]


def test_sampling_option_is_json_native_and_checked() -> None:
    cfg = TrainConfig(sampling="fair", seed=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    assert TrainConfig().sampling == "uniform"
    with pytest.raises(SupernetError, match="sampling must be one of uniform, fair"):
        TrainConfig(sampling="greedy")


def test_one_fair_step_updates_every_token_mixer_at_block_0() -> None:
    """The m paths' gradients are accumulated into one optimizer step: every token mixer with
    weights at block 0 of every stage moves (uniform sampling reaches only a few)."""
    net = Supernet(TINY, seed=0).train()
    cfg = TrainConfig(batch_size=8, sampling="fair", distill=True)
    opt = _optimizer(net, cfg)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    x, y = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.randint(0, 10, (8,))
    supernet_step(net, opt, x, y, sandwich(TINY, cfg, 0), cfg)
    after = dict(net.named_parameters())
    for i, sf in enumerate(TINY.stages):
        for t in sf.token_mixers:
            names = [k for k in before if k.startswith(f"stages.{i}.blocks.0.token_mixers.{t}.")]
            if names:
                assert any(not torch.equal(before[k], after[k]) for k in names), (i, t)


SPOS = TrainConfig(sampling="single_path", n_random=3, distill=False)


def test_single_path_draws_only_the_random_subnets() -> None:
    """SPOS (Guo et al. 2020): ``n_random`` uniform draws from (seed, step), no largest or smallest."""
    for frame in (TINY, SMALL):
        for seed in (0, 5):
            cfg = replace(SPOS, seed=seed)
            for step in range(40):
                rng = random.Random(f"{seed}:{step}")
                ref = [frame.random(rng.randrange(2**31)).with_precision(frame.precisions[0]) for _ in range(3)]
                got = sandwich(frame, cfg, step)
                assert [s.hash for s in got] == [s.hash for s in ref]
    # the sandwich's first subnet is the largest every step; single-path draws are smaller on average
    big = statistics.mean(_params(SMALL, sandwich(SMALL, TrainConfig(n_random=3), k)[0]) for k in range(20))
    spos = [_params(SMALL, s) for k in range(20) for s in sandwich(SMALL, SPOS, k)]
    assert statistics.mean(spos) < 0.8 * big


def _params(frame: SupernetFrame, spec: ArchSpec) -> int:
    from search_spaces.hybrid_vit import build

    return sum(p.numel() for p in build(spec, num_classes=frame.num_classes, img_size=frame.img_size,
                                         in_chans=frame.in_chans).parameters())


def test_single_path_needs_subnets_and_no_distillation() -> None:
    with pytest.raises(SupernetError, match="set distill=False and n_random >= 1"):
        TrainConfig(sampling="single_path")  # distillation is on by default
    with pytest.raises(SupernetError, match="set distill=False and n_random >= 1"):
        TrainConfig(sampling="single_path", distill=False, n_random=0)
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(SPOS)))) == SPOS


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_train() -> object:
    return load("digits", "train", limit=128, img_size=16)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fair_training_checkpoints_and_resumes_exactly(small_train: object, tmp_path: Path) -> None:
    cfg = TrainConfig(batch_size=64, seed=1, sampling="fair")
    ref = train_supernet(TINY, small_train, 2, config=cfg, out=tmp_path / "a")  # 4 steps straight
    part = train_supernet(TINY, small_train, 2, config=cfg, out=tmp_path / "b", max_steps=3)  # stops mid-epoch
    assert part.train_state.step == 3
    resumed = train_supernet(TINY, small_train, 2, config=cfg, out=tmp_path / "b")
    assert resumed.train_state.step == 4
    assert _same_weights(ref, resumed) and not _same_weights(ref, part)
    _, ckpt = load_checkpoint(tmp_path / "b")
    assert ckpt["config"]["sampling"] == "fair" and ckpt["step"] == 4
    # uniform sampling on a fair run's directory is another recipe
    with pytest.raises(SupernetError, match="another recipe"):
        train_supernet(TINY, small_train, 2, config=replace(cfg, sampling="uniform"), out=tmp_path / "b")


def test_single_path_training_checkpoints_and_resumes_exactly(small_train: object, tmp_path: Path) -> None:
    cfg = replace(SPOS, batch_size=64, seed=1)
    ref = train_supernet(TINY, small_train, 2, config=cfg, out=tmp_path / "a")
    part = train_supernet(TINY, small_train, 2, config=cfg, out=tmp_path / "b", max_steps=3)
    resumed = train_supernet(TINY, small_train, 2, config=cfg, out=tmp_path / "b")
    assert (part.train_state.step, resumed.train_state.step) == (3, 4)
    assert _same_weights(ref, resumed) and not _same_weights(ref, part)
    assert all(math.isfinite(v) for v in ref.train_state.losses or [])
    _, ckpt = load_checkpoint(tmp_path / "b")
    assert ckpt["config"]["sampling"] == "single_path" and ckpt["config"]["distill"] is False


def test_a_study_trains_single_path_and_a_continued_one_keeps_its_recipe(small_train: object,
                                                                          tmp_path: Path) -> None:
    """The study recipe is single path without distillation (HybridBench: README); a study's
    supernet keeps the recipe its plan.json records (the sandwich without distillation of the ninth
    session), and one whose plan predates the record (the sandwich with distillation) continues
    with that."""
    from types import SimpleNamespace

    from predictors.supernet import legacy_study_recipe, study_recipe, train_within

    for n, chans in ((10_000, 3), (100, 1)):
        cfg = study_recipe(n, chans)
        assert (cfg.sampling, cfg.n_random, cfg.distill) == ("single_path", 4, False)
    data = SimpleNamespace(train=small_train, in_chans=1)

    def job(out: Path) -> SimpleNamespace:
        return SimpleNamespace(frame=TINY.to_json(), out=str(out), epochs=2, max_epochs=2, plan_seconds=None,
                               counted=0.0, seed=0)

    res = train_within(job(tmp_path / "new"), data)
    _, ckpt = load_checkpoint(tmp_path / "new")
    plan = json.loads((tmp_path / "new" / "plan.json").read_text())
    assert ckpt["config"] == asdict(study_recipe(len(small_train), 1)) and plan["config"] == ckpt["config"]  # type: ignore[arg-type]
    assert ckpt["config"]["sampling"] == "single_path" and res["metrics"]["complete"] == 1.0
    # a study of the ninth session: its plan records the sandwich without distillation
    mid = replace(study_recipe(len(small_train), 1), sampling="uniform", n_random=2)  # type: ignore[arg-type]
    train_supernet(TINY, small_train, 2, config=mid, out=tmp_path / "mid", max_steps=1)
    (tmp_path / "mid" / "plan.json").write_text(json.dumps({"epochs": 2, "steps": None, "config": asdict(mid)}))
    res = train_within(job(tmp_path / "mid"), data)
    _, ckpt = load_checkpoint(tmp_path / "mid")
    assert res["metrics"]["complete"] == 1.0 and ckpt["config"] == asdict(mid)
    # an older study: its plan has no recipe, and its checkpoint was trained with distillation
    old = legacy_study_recipe(study_recipe(len(small_train), 1))  # type: ignore[arg-type]
    assert (old.sampling, old.n_random, old.distill) == ("uniform", 2, True)
    train_supernet(TINY, small_train, 2, config=old, out=tmp_path / "old", max_steps=1)
    (tmp_path / "old" / "plan.json").write_text(json.dumps({"epochs": 2, "steps": None}))
    res = train_within(job(tmp_path / "old"), data)
    _, ckpt = load_checkpoint(tmp_path / "old")
    assert res["metrics"]["complete"] == 1.0 and ckpt["step"] == res["metrics"]["total_steps"]
    assert ckpt["config"] == asdict(old)
    assert json.loads((tmp_path / "old" / "plan.json").read_text())["config"] == asdict(old)


def test_a_checkpoint_without_the_sampling_field_still_resumes(small_train: object, tmp_path: Path) -> None:
    cfg = TrainConfig(batch_size=64, seed=2, n_random=1)
    ref = train_supernet(TINY, small_train, 1, config=cfg)  # 2 steps straight
    train_supernet(TINY, small_train, 1, config=cfg, out=tmp_path, max_steps=1)
    path = tmp_path / CKPT_NAME
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["config"]["sampling"]  # as written before the field existed
    torch.save(ckpt, path)
    with pytest.raises(SupernetError, match="another recipe"):  # an old run was uniform, not fair
        train_supernet(TINY, small_train, 1, config=replace(cfg, sampling="fair"), out=tmp_path)
    resumed = train_supernet(TINY, small_train, 1, config=cfg, out=tmp_path)
    assert resumed.train_state.step == 2 and _same_weights(ref, resumed)
    _, ckpt = load_checkpoint(tmp_path)
    assert ckpt["config"] == asdict(cfg)  # rewritten with the field


# --------------------------------------------------------------------------------------------
# fine-tuning before evaluation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net_and_data() -> tuple[Supernet, object, object]:
    train = load("digits", "train", limit=256, img_size=16)
    test = load("digits", "test", limit=128, img_size=16)
    net = Supernet(TINY, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval(), train, test


def _today(net: Supernet, spec: ArchSpec, data: object, calib: object) -> float:
    """evaluate_subnet as it was before fine-tuning existed."""
    model = net.extract(spec)
    if has_batchnorm(model):
        recalibrate_bn(model, calib, batches=16)
    model = to_precision(model, spec.precision, "cpu", inplace=True)
    return accuracy(model, data, batch_size=512, dtype=activation_dtype(spec.precision))


def test_zero_finetune_steps_give_todays_value(net_and_data: tuple) -> None:
    net, train, test = net_and_data
    assert has_batchnorm(net.extract(TINY.random(4))) and not has_batchnorm(net.extract(TINY.random(9)))
    for spec in (TINY.largest(), TINY.random(4), TINY.random(9), TINY.largest().with_precision("int8")):
        want = _today(net, spec, test, train)
        assert evaluate_subnet(net, spec, test, calib=train) == want
        assert evaluate_subnet(net, spec, test, calib=train, finetune_steps=0, finetune_data=train, seed=5) == want


def test_finetuning_leaves_the_supernet_alone_and_is_deterministic(net_and_data: tuple) -> None:
    net, train, test = net_and_data
    spec = TINY.random(4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kw = {"calib": train, "finetune_steps": 4, "finetune_data": train, "finetune_lr": 1e-3, "finetune_batch": 64}
    a = evaluate_subnet(net, spec, test, **kw)
    b = evaluate_subnet(net, spec, test, **kw)
    with torch.no_grad():  # callers may hold grad off; fine-tuning turns it on for itself
        c = evaluate_subnet(net, spec, test, **kw)
    assert a == b == c
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training


def test_finetune_trains_the_copy_deterministically(net_and_data: tuple) -> None:
    net, train, _ = net_and_data
    spec = TINY.random(4)
    start = net.extract(spec)

    def tuned(seed: int, steps: int = 10) -> torch.nn.Module:
        return finetune(net.extract(spec), train, steps, lr=1e-3, batch_size=64, seed=seed)

    a, b, c = tuned(0), tuned(0), tuned(1)
    assert not a.training  # the mode it came in with
    sa, sb, sc, s0 = a.state_dict(), b.state_dict(), c.state_dict(), start.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], s0[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

    def loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model.eval()(train.x), train.y))

    assert loss(tuned(0, 30)) < loss(start)


def test_finetuning_arguments_are_checked(net_and_data: tuple) -> None:
    net, train, test = net_and_data
    with pytest.raises(SupernetError, match="needs finetune_data"):
        evaluate_subnet(net, TINY.largest(), test, calib=train, finetune_steps=3)
    with pytest.raises(SupernetError, match="non-negative integer"):
        evaluate_subnet(net, TINY.largest(), test, calib=train, finetune_steps=-1, finetune_data=train)
    with pytest.raises(SupernetError, match="fine-tuning data"):
        evaluate_subnet(net, TINY.largest(), test, calib=train, finetune_steps=1, finetune_data=object())


# --------------------------------------------------------------------------------------------
# few-shot sub-supernets (Zhao et al. 2021): split on stage 0's first token mixer
# --------------------------------------------------------------------------------------------


def test_split_subnet_moves_a_subnet_into_the_part_and_nothing_else() -> None:
    per_stage = replace(TINY, per_block=False)
    for seed in range(40):
        spec = TINY.random(seed)
        for mixer in ("attention", "ssm", "pool"):
            moved = TINY.split_subnet(spec, mixer)
            TINY.check(moved)  # still a subnet of the frame
            got, was = moved.stages[0].mixers(), spec.stages[0].mixers()
            assert got[0] == (mixer, was[0][1]) and got[1:] == was[1:]
            assert moved.stages[1:] == spec.stages[1:] and moved.precision == spec.precision
            assert (moved.stages[0].depth, moved.stages[0].width, moved.stages[0].mlp_ratio) == \
                (spec.stages[0].depth, spec.stages[0].width, spec.stages[0].mlp_ratio)
            assert TINY.split_subnet(moved, mixer) is moved  # already in the part: as it is
        # a frame without per-block mixers moves the whole stage
        whole = per_stage.random(seed)
        moved = per_stage.split_subnet(whole, "sepconv")
        per_stage.check(moved)
        assert {t for t, _ in moved.stages[0].mixers()} == {"sepconv"}
    with pytest.raises(ValueError, match="not one of stage 0"):
        TINY.split_subnet(TINY.random(0), "ssd")  # not in this frame


def test_a_split_sandwich_draws_the_same_subnets_moved_into_the_part() -> None:
    for step in (0, 1, 9):
        plain = sandwich(TINY, TrainConfig(seed=3), step)
        split = sandwich(TINY, TrainConfig(seed=3, split_token_mixer="linear"), step)
        assert split == [TINY.split_subnet(s, "linear") for s in plain]
        assert {s.stages[0].mixers()[0][0] for s in split} == {"linear"}


def test_a_sub_supernet_starts_from_init_and_trains_only_its_first_mixer(small_train: object,
                                                                         tmp_path: Path) -> None:
    init = train_supernet(TINY, small_train, 1, config=TrainConfig(batch_size=64, seed=4))
    cfg = TrainConfig(batch_size=64, seed=4, split_token_mixer="sepconv")
    start = train_supernet(TINY, small_train, 1, config=cfg, init=init, max_steps=0)
    assert _same_weights(start, init) and start is not init
    sub = train_supernet(TINY, small_train, 1, config=cfg, out=tmp_path, init=init)
    before, after = init.state_dict(), sub.state_dict()
    first = "stages.0.blocks.0.token_mixers."
    moved = {k.removeprefix(first).split(".")[0] for k in after
             if k.startswith(first) and not torch.equal(after[k], before[k])}
    assert moved == {"sepconv"}  # the other mixers of that block were never drawn there
    assert not torch.equal(after["stages.0.blocks.1.norm1.weight"], before["stages.0.blocks.1.norm1.weight"])
    _, ckpt = load_checkpoint(tmp_path)
    assert ckpt["config"]["split_token_mixer"] == "sepconv"
    with pytest.raises(SupernetError, match="another recipe"):  # the whole space is another recipe
        train_supernet(TINY, small_train, 1, config=replace(cfg, split_token_mixer=None), out=tmp_path)
    with pytest.raises(SupernetError, match="split_token_mixer 'ssd' is not one of stage 0"):
        train_supernet(TINY, small_train, 1, config=replace(cfg, split_token_mixer="ssd"))
    with pytest.raises(SupernetError, match="init is a supernet of another frame"):
        train_supernet(TINY, small_train, 1, config=cfg, init=Supernet(get_frame("tiny"), seed=0))
