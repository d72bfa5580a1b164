"""Weight-sharing supernet over hybrid_vit: one network that holds every architecture of a frame.

A :class:`SupernetFrame` fixes the stem, the number of stages, each stage's downsampling and norm,
the image size and the classes; per stage it lists the choices a subnet may take: depth (up to a
maximum), width, heads, MLP ratio, and the token and channel mixers (per stage or per block).

Weight sharing (Cai et al. 2020, Once-for-All; Chen et al. 2021, AutoFormer; Devvrit et al. 2023,
MatFormer):

- **depth**: a subnet of depth d uses the first d blocks of its stage (OFA's elastic depth);
- **width, MLP ratio, heads**: every weight of a subnet is the leading slice of the supernet's
  weight (the first ``w`` channels, the first ``hidden`` units). Fused projections are sliced
  per segment (q, k and v of a ``qkv`` each keep their first rows; SwiGLU's gate and value;
  Mamba's x and z and its (Δ, B, C) projection), as AutoFormer slices q, k, v separately. Each
  mixer class declares its fused tensors in ``fused_slices`` (see ``search_spaces.registry``);
- **mixer choice**: each block holds one instance of every token and channel mixer of its stage.

A subnet is never a separate implementation: ``forward(x, spec)`` runs the very ``HybridViT``
of ``spec`` (built once on the meta device and cached) through ``torch.func.functional_call``
with the sliced supernet tensors, and ``extract(spec)`` builds the same ``HybridViT`` with copies
of them. So the extracted model is a plain model of ``spec`` whose outputs equal the supernet's.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from search_spaces._space import RandomTrial, Trial
from search_spaces.hybrid_vit import Downsample, HybridViT, LayerScale, Stem, build, init_weights
from search_spaces.layers.norm import make_norm
from search_spaces.registry import (
    SliceRule,
    channel_mixer_names,
    fused_rule,
    get_channel_mixer,
    get_token_mixer,
    token_mixer_names,
)
from search_spaces.spec import DOWNSAMPLES, PRECISIONS, ArchSpec, BlockSpec, HeadSpec, StageSpec, StemSpec

__all__ = ["FRAMES", "StageFrame", "Supernet", "SupernetFrame", "frame_from_json", "get_frame"]


# --------------------------------------------------------------------------------------------
# the frame
# --------------------------------------------------------------------------------------------


def _tuple(where: str, name: str, value: Any, kind: type | tuple[type, ...]) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{where}.{name} must be a non-empty list, got {repr(value)[:60]}")
    out = tuple(value)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"{where}.{name} holds {repr(v)[:60]}, not a {getattr(kind, '__name__', 'number')}")
    if len(set(out)) != len(out):
        raise ValueError(f"{where}.{name} lists a choice twice: {list(out)}")
    return out


@dataclass(frozen=True)
class StageFrame:
    """The choices of one stage: depth 1..``max_depth``, ``widths``, ``heads``, ``mlp_ratios`` and the
    token/channel mixers each block may use. ``norm`` and ``downsample`` are fixed."""

    max_depth: int
    widths: tuple[int, ...]
    heads: tuple[int, ...] = (1,)
    mlp_ratios: tuple[float, ...] = (2.0, 3.0, 4.0)
    token_mixers: tuple[str, ...] = ()  # () = every registered token mixer
    channel_mixers: tuple[str, ...] = ()
    norm: str = "layernorm"
    downsample: str = "conv3"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int) or not 1 <= self.max_depth <= 64:
            raise ValueError(f"stage.max_depth must be an integer in [1, 64], got {self.max_depth!r}")
        set_(self, "widths", tuple(sorted(_tuple("stage", "widths", self.widths, int))))
        if min(self.widths) < 1:
            raise ValueError(f"stage.widths must be positive, got {list(self.widths)}")
        set_(self, "heads", tuple(sorted(_tuple("stage", "heads", self.heads, int))))
        if min(self.heads) < 1 or max(self.widths) > 8192 or max(self.heads) > 1024:
            raise ValueError(f"stage.heads must be in [1, 1024] and widths at most 8192, got heads {list(self.heads)}")
        ratios = _tuple("stage", "mlp_ratios", self.mlp_ratios, (int, float))
        set_(self, "mlp_ratios", tuple(sorted(float(r) for r in ratios)))
        tms = tuple(self.token_mixers) or tuple(token_mixer_names())
        cms = tuple(self.channel_mixers) or tuple(channel_mixer_names())
        for name in _tuple("stage", "token_mixers", tms, str):
            get_token_mixer(name)
        for name in _tuple("stage", "channel_mixers", cms, str):
            get_channel_mixer(name)
        set_(self, "token_mixers", tms)
        set_(self, "channel_mixers", cms)
        if not isinstance(self.norm, str) or not isinstance(self.downsample, str):
            raise ValueError("stage.norm and stage.downsample must be strings")
        make_norm(self.norm, 8)
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"stage.downsample must be one of {', '.join(DOWNSAMPLES)}; got {self.downsample!r}")
        if any(get_token_mixer(t).uses_heads for t in self.token_mixers):
            for w in self.widths:
                if not self.heads_for(w):
                    raise ValueError(f"stage width {w} is divisible by none of the heads {list(self.heads)}; "
                                     "add a head count that divides it")

    @property
    def max_width(self) -> int:
        return self.widths[-1]

    def heads_for(self, width: int) -> tuple[int, ...]:
        """Head counts that divide ``width``."""
        return tuple(h for h in self.heads if width % h == 0)


@dataclass(frozen=True)
class SupernetFrame:
    """What every subnet of one supernet shares: stem, stage count, per-stage choices, head,
    position embedding, layer scale, image size, input channels, classes and precisions."""

    stem: StemSpec
    stages: tuple[StageFrame, ...]
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    head_norm: str = "layernorm"
    pos_embed: str = "none"
    layer_scale: float | None = None
    per_block: bool = True  # blocks of a stage may take different mixers
    precisions: tuple[str, ...] = ("fp32",)

    def __post_init__(self) -> None:
        if not isinstance(self.stem, StemSpec):
            raise ValueError("frame.stem must be a StemSpec")
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else ()
        if not stages or not all(isinstance(s, StageFrame) for s in stages) or len(stages) > 4:
            raise ValueError("frame.stages must hold 1 to 4 StageFrame entries")
        object.__setattr__(self, "stages", stages)
        for name in ("img_size", "in_chans", "num_classes"):
            v = getattr(self, name)
            high = {"img_size": 4096, "in_chans": 1024, "num_classes": 1_000_000}[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
                raise ValueError(f"frame.{name} must be an integer in [1, {high:,}], got {str(v)[:40]!r}")
        object.__setattr__(self, "precisions", _tuple("frame", "precisions", self.precisions, str))
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ValueError(f"frame.precisions: {p!r} is not one of {', '.join(PRECISIONS)}")
        # every corner of the frame must be a valid spec (catches a too-small image, bad norms, ...)
        rng = random.Random(0)
        for pick in (0, -1):
            spec = self._corner(pick, rng)
            try:
                with torch.device("meta"):
                    HybridViT(spec, num_classes=self.num_classes, img_size=self.img_size, in_chans=self.in_chans)
            except ValueError as e:
                raise ValueError(f"frame gives an invalid architecture: {e}") from None

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-native (lists, not tuples): equal to what ``json.loads(to_json())`` gives."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> SupernetFrame:
        if not isinstance(data, dict):
            raise ValueError("a frame must be a JSON object")
        data = dict(data)
        allowed = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(data) - allowed)
        if extra:
            raise ValueError(f"unknown frame field {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")
        if "stem" not in data or "stages" not in data:
            raise ValueError("a frame needs 'stem' and 'stages'")
        stem, stages = data.pop("stem"), data.pop("stages")
        if not isinstance(stem, dict):
            raise ValueError("frame.stem must be a JSON object")
        if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
            raise ValueError("frame.stages must be a list of JSON objects")
        for key, kind in (("head_norm", str), ("pos_embed", str), ("per_block", bool)):
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"frame.{key} must be a {kind.__name__}, got {type(data[key]).__name__}")
        if data.get("layer_scale") is not None and (isinstance(data["layer_scale"], bool)
                                                    or not isinstance(data["layer_scale"], (int, float))):
            raise ValueError(f"frame.layer_scale must be a number or null, got {type(data['layer_scale']).__name__}")
        try:
            return cls(stem=StemSpec(**stem), stages=tuple(StageFrame(**st) for st in stages), **data)
        except TypeError as e:
            raise ValueError(f"bad frame field: {e}") from None

    # ---- subnets ----------------------------------------------------------------------------
    def _spec(self, stages: list[StageSpec], precision: str) -> ArchSpec:
        return ArchSpec(stem=self.stem, stages=tuple(stages), head=HeadSpec(pool="avg", norm=self.head_norm),
                        pos_embed=self.pos_embed, precision=precision)

    def _stage_spec(self, i: int, sf: StageFrame, depth: int, width: int, heads: int, ratio: float,
                    mixers: list[tuple[str, str]]) -> StageSpec:
        blocks = tuple(BlockSpec(t, c) for t, c in mixers) if len(set(mixers)) > 1 else ()
        return StageSpec(depth=depth, width=width, token_mixer=mixers[0][0], channel_mixer=mixers[0][1],
                         heads=heads, mlp_ratio=ratio, norm=sf.norm, downsample=sf.downsample if i else "none",
                         layer_scale=self.layer_scale, blocks=blocks)

    def sample(self, trial: Trial) -> ArchSpec:
        """Define-by-run (Optuna-style names ``s1.width``, ``s0.b1.token_mixer``): a subnet of the frame."""
        stages = []
        for i, sf in enumerate(self.stages):
            p = f"s{i}."
            depth = trial.suggest_int(p + "depth", 1, sf.max_depth)
            width = trial.suggest_categorical(p + "width", sf.widths)
            if depth > 1 and self.per_block and trial.suggest_categorical(p + "per_block", (False, True)):
                mixers = [(trial.suggest_categorical(f"{p}b{j}.token_mixer", sf.token_mixers),
                           trial.suggest_categorical(f"{p}b{j}.channel_mixer", sf.channel_mixers))
                          for j in range(depth)]
            else:
                mixers = [(trial.suggest_categorical(p + "token_mixer", sf.token_mixers),
                           trial.suggest_categorical(p + "channel_mixer", sf.channel_mixers))] * depth
            heads = 1
            if any(get_token_mixer(t).uses_heads for t, _ in mixers):
                heads = trial.suggest_categorical(p + "heads", sf.heads_for(width))
            ratio = trial.suggest_categorical(p + "mlp_ratio", sf.mlp_ratios)
            stages.append(self._stage_spec(i, sf, depth, width, heads, ratio, mixers))
        precision = trial.suggest_categorical("precision", self.precisions)
        return self._spec(stages, precision)

    def random(self, seed: int) -> ArchSpec:
        """A uniformly drawn subnet (seeded)."""
        return self.sample(RandomTrial(seed))

    def _corner(self, pick: int, rng: random.Random, mixers: str = "first") -> ArchSpec:
        stages = []
        for i, sf in enumerate(self.stages):
            depth = sf.max_depth if pick == -1 else 1
            width = sf.widths[pick]
            if mixers == "random":
                if self.per_block:
                    mix = [(rng.choice(sf.token_mixers), rng.choice(sf.channel_mixers)) for _ in range(depth)]
                else:
                    mix = [(rng.choice(sf.token_mixers), rng.choice(sf.channel_mixers))] * depth
            else:
                mix = [(sf.token_mixers[0], sf.channel_mixers[0])] * depth
            heads = 1
            if any(get_token_mixer(t).uses_heads for t, _ in mix):
                hs = sf.heads_for(width) or (1,)
                heads = hs[len(hs) // 2] if mixers == "random" else hs[0]
            stages.append(self._stage_spec(i, sf, depth, width, heads, sf.mlp_ratios[pick], mix))
        return self._spec(stages, self.precisions[0])

    def split_subnet(self, spec: ArchSpec, token_mixer: str) -> ArchSpec:
        """``spec`` with ``token_mixer`` in the first block of stage 0 (in all of stage 0's blocks
        when the frame does not mix per block): the subnet's counterpart in the part of the space
        that a few-shot sub-supernet trains (Zhao et al. 2021, "Few-shot Neural Architecture
        Search", split on that block's token mixer). Its heads stay when the stage already uses them,
        else they are the middle of the width's choices (as ``largest`` draws them); a subnet already
        in that part is returned as it is."""
        st, sf = spec.stages[0], self.stages[0]
        if token_mixer not in sf.token_mixers:
            raise ValueError(f"token mixer {token_mixer!r} is not one of stage 0's {list(sf.token_mixers)}")
        mixers = st.mixers()
        if mixers[0][0] == token_mixer:
            return spec
        first = (token_mixer, mixers[0][1])
        mixers = [first, *mixers[1:]] if self.per_block else [first] * st.depth
        heads = 1
        if any(get_token_mixer(t).uses_heads for t, _ in mixers):
            hs = sf.heads_for(st.width) or (1,)
            heads = st.heads if st.heads in hs else hs[len(hs) // 2]
        stage = self._stage_spec(0, sf, st.depth, st.width, heads, st.mlp_ratio, mixers)
        return replace(spec, stages=(stage, *spec.stages[1:]))

    def largest(self, rng: random.Random | None = None) -> ArchSpec:
        """Maximum depth, width and MLP ratio everywhere; mixers drawn from ``rng`` (first choice without)."""
        return self._corner(-1, rng or random.Random(0), "random" if rng else "first")

    def smallest(self, rng: random.Random | None = None) -> ArchSpec:
        """Depth 1, the smallest width and MLP ratio everywhere; mixers drawn from ``rng``."""
        return self._corner(0, rng or random.Random(0), "random" if rng else "first")

    def check(self, spec: ArchSpec) -> None:
        """ValueError (one line) if ``spec`` is not a subnet of this frame."""
        if not isinstance(spec, ArchSpec):
            raise ValueError(f"expected a hybrid_vit ArchSpec, got {type(spec).__name__}")
        problems = []
        if spec.stem != self.stem:
            problems.append(f"stem {spec.stem.kind}/{spec.stem.stride} (norm {spec.stem.norm}) is not the frame's "
                            f"{self.stem.kind}/{self.stem.stride} (norm {self.stem.norm})")
        if len(spec.stages) != len(self.stages):
            problems.append(f"{len(spec.stages)} stages, the frame has {len(self.stages)}")
        if spec.head.pool != "avg" or spec.head.norm != self.head_norm:
            problems.append(f"head must be avg pool with {self.head_norm} norm")
        if spec.pos_embed != self.pos_embed:
            problems.append(f"pos_embed {spec.pos_embed!r} is not the frame's {self.pos_embed!r}")
        for i, (st, sf) in enumerate(zip(spec.stages, self.stages)):
            w = f"stage {i}"
            if st.depth > sf.max_depth:
                problems.append(f"{w} depth {st.depth} > max {sf.max_depth}")
            if st.width not in sf.widths:
                problems.append(f"{w} width {st.width} not in {list(sf.widths)}")
            if st.mlp_ratio not in sf.mlp_ratios:
                problems.append(f"{w} mlp_ratio {st.mlp_ratio:g} not in {list(sf.mlp_ratios)}")
            if st.norm != sf.norm:
                problems.append(f"{w} norm {st.norm!r} is not the frame's {sf.norm!r}")
            if i and st.downsample != sf.downsample:
                problems.append(f"{w} downsample {st.downsample!r} is not the frame's {sf.downsample!r}")
            if st.layer_scale != self.layer_scale:
                problems.append(f"{w} layer_scale {st.layer_scale} is not the frame's {self.layer_scale}")
            mixers = st.mixers()
            if not self.per_block and len(set(mixers)) > 1:
                problems.append(f"{w} mixes blocks but the frame has per_block false")
            for t, c in mixers:
                if t not in sf.token_mixers:
                    problems.append(f"{w} token mixer {t!r} not in {list(sf.token_mixers)}")
                if c not in sf.channel_mixers:
                    problems.append(f"{w} channel mixer {c!r} not in {list(sf.channel_mixers)}")
            if any(get_token_mixer(t).uses_heads for t, _ in mixers) and st.heads not in sf.heads:
                problems.append(f"{w} heads {st.heads} not in {list(sf.heads)}")
        if problems:
            raise ValueError("spec is not a subnet of the frame: " + "; ".join(dict.fromkeys(problems)))

    def size(self) -> float:
        """log10 of the number of distinct subnets (a rough count: heads and precision included)."""
        total = math.log10(len(self.precisions))
        for sf in self.stages:
            per_depth = []
            for d in range(1, sf.max_depth + 1):
                mix = len(sf.token_mixers) * len(sf.channel_mixers)
                n_mix = mix**d if self.per_block else mix
                per_depth.append(n_mix)
            total += math.log10(sum(per_depth) * len(sf.widths) * len(sf.mlp_ratios) * len(sf.heads))
        return total


def _frames() -> dict[str, SupernetFrame]:
    small = SupernetFrame(
        stem=StemSpec(kind="conv", stride=4),
        stages=(
            StageFrame(max_depth=2, widths=(32, 48, 64), heads=(1, 2), downsample="none"),
            StageFrame(max_depth=2, widths=(64, 96, 128), heads=(2, 4)),
            StageFrame(max_depth=2, widths=(128, 192, 256), heads=(4, 8)),
        ),
        img_size=32, in_chans=3, num_classes=10,
    )
    # for 8x8 single-channel digits: a few seconds an epoch on one CPU core. The stem is normalised:
    # without it the stream's scale depends on the mixer choice (pooling adds its unit-scale
    # normalised input, projections add small outputs) and pooling subnets sat at chance.
    tiny = SupernetFrame(
        stem=StemSpec(kind="patch", stride=4, norm="layernorm"),
        stages=(
            StageFrame(max_depth=2, widths=(16, 32), heads=(1, 2), mlp_ratios=(2.0, 4.0), downsample="none"),
            StageFrame(max_depth=2, widths=(32, 48), heads=(2, 4), mlp_ratios=(2.0, 4.0), downsample="patch2"),
        ),
        img_size=16, in_chans=1, num_classes=10,
    )
    return {"small": small, "tiny": tiny}


FRAMES: dict[str, SupernetFrame] = _frames()


def frame_from_json(text: str) -> SupernetFrame:
    from search_spaces.spec import loads

    return SupernetFrame.from_dict(loads(text, "frame"))


def get_frame(name: str, **overrides: Any) -> SupernetFrame:
    """A named frame (``small``, ``tiny``), optionally with fields replaced (img_size, in_chans, ...)."""
    if name not in FRAMES:
        raise ValueError(f"unknown frame {name!r}; choose one of {', '.join(sorted(FRAMES))} or pass a JSON file")
    return replace(FRAMES[name], **overrides) if overrides else FRAMES[name]


# --------------------------------------------------------------------------------------------
# slicing
# --------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^(stages\.\d+\.blocks\.\d+\.)(token_mixer|channel_mixer)\.(.+)$")


def _in_mixer(spec: ArchSpec, name: str) -> tuple[str, str, str, str] | None:
    """For a subnet tensor inside a mixer, (block prefix, ``"token_mixer"`` or ``"channel_mixer"``,
    the mixer's registered name, the tensor's name inside the mixer); ``None`` elsewhere."""
    m = _BLOCK_RE.match(name)
    if not m:
        return None
    prefix, kind, local = m.groups()
    i, j = (int(v) for v in re.findall(r"\d+", prefix))
    tm, cm = spec.stages[i].mixers()[j]
    return prefix, kind, tm if kind == "token_mixer" else cm, local


def _segment_sizes(rule: SliceRule, n: int) -> list[int]:
    if isinstance(rule, int):
        return [n // rule] * rule
    fixed = sum(s for s in rule if s is not None)
    return [n - fixed if s is None else s for s in rule]


def _take(t: Tensor, shape: Sequence[int], rule: SliceRule | None = None) -> Tensor:
    """The leading ``shape`` block of ``t``; with a fused ``rule`` the leading block of each segment
    of dim 0 (a copy, as segments are not contiguous; gradients flow back to ``t``)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    if t.ndim != len(shape) or any(a > b for a, b in zip(shape, t.shape)):
        raise ValueError(f"cannot slice a {tuple(t.shape)} tensor to {shape}")
    rest = tuple(slice(0, n) for n in shape[1:])
    if rule is None:
        return t[(slice(0, shape[0]), *rest)]
    parts, off = [], 0
    for big, small in zip(_segment_sizes(rule, t.shape[0]), _segment_sizes(rule, shape[0])):
        parts.append(t[(slice(off, off + small), *rest)])
        off += big
    return torch.cat(parts, dim=0)


def _fused_rule(spec: ArchSpec, name: str) -> SliceRule | None:
    """The segment rule of the subnet tensor ``name``, as its mixer's class declares it in
    ``fused_slices``; ``None`` outside the mixers and for unfused tensors."""
    where = _in_mixer(spec, name)
    if where is None:
        return None
    _, kind, mixer, local = where
    return fused_rule(get_token_mixer(mixer) if kind == "token_mixer" else get_channel_mixer(mixer), local)


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _max_shapes(probes: Sequence[dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Per tensor name, the elementwise largest shape over ``probes`` (name -> shape maps)."""
    out: dict[str, tuple[int, ...]] = {}
    for p in probes:
        for name, shape in p.items():
            prev = out.get(name)
            out[name] = shape if prev is None else tuple(max(a, b) for a, b in zip(prev, shape))
    return out


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        p = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
        for attr in ("_no_reinit", "_no_weight_decay"):
            if hasattr(owner._parameters[leaf], attr):
                setattr(p, attr, True)
        owner._parameters[leaf] = p
    else:
        owner._buffers[leaf] = value


def _grow(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` enlarged to ``shape`` by tiling (used where no single configuration has the full shape)."""
    reps = [math.ceil(b / a) if a else 1 for a, b in zip(t.shape, shape)]
    return t.repeat(*reps)[tuple(slice(0, n) for n in shape)].clone()


# --------------------------------------------------------------------------------------------
# the supernet
# --------------------------------------------------------------------------------------------


class _SuperBlock(nn.Module):
    """A block holding every mixer of its stage (names as in ``hybrid_vit.Block``, mixers keyed).

    The pre-norms and LayerScales are shared by all mixer choices. A copy per choice was tried
    (bench/supernet_rank.py, CIFAR-10): Kendall tau 0.31 against 0.38 shared, within the noise,
    for more parameters, so they stay shared."""

    def __init__(self, sf: StageFrame, grid: tuple[int, int], layer_scale: float | None, seed: int) -> None:
        super().__init__()
        w = sf.max_width
        self.norm1 = make_norm(sf.norm, w)
        self.norm2 = make_norm(sf.norm, w)
        self.ls1 = LayerScale(w, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(w, layer_scale) if layer_scale is not None else nn.Identity()
        self.token_mixers = nn.ModuleDict(
            {t: _max_module(get_token_mixer(t), t, _token_configs(sf, t, grid), seed) for t in sf.token_mixers})
        self.channel_mixers = nn.ModuleDict(
            {c: _max_module(get_channel_mixer(c), c, _channel_configs(sf), seed) for c in sf.channel_mixers})


def _token_configs(sf: StageFrame, name: str, grid: tuple[int, int]) -> list[dict[str, Any]]:
    uses_heads = get_token_mixer(name).uses_heads
    return [{"dim": w, "heads": h, "grid": grid}
            for w in sf.widths for h in (sf.heads_for(w) if uses_heads else (1,))]


def _channel_configs(sf: StageFrame) -> list[dict[str, Any]]:
    return [{"dim": w, "mlp_ratio": r} for w in sf.widths for r in sf.mlp_ratios]


def _make(cls: type[nn.Module], cfg: dict[str, Any]) -> nn.Module:
    cfg = dict(cfg)
    dim = cfg.pop("dim")
    return cls(dim, **cfg)


def _max_module(cls: type[nn.Module], name: str, configs: list[dict[str, Any]], seed: int) -> nn.Module:
    """A mixer instance whose every tensor is as large as that tensor in any of ``configs``.

    The instance is the configuration with the most tensors (then parameters), initialised as the assembly
    initialises; a tensor that some other configuration has larger is taken from a configuration
    that has it at full size, or else tiled."""
    with torch.device("meta"):
        probes = [{n: tuple(t.shape) for n, t in _tensors(_make(cls, c))} for c in configs]
    shapes = _max_shapes(probes)
    sizes = [(len(p), sum(math.prod(shape) for shape in p.values())) for p in probes]
    best = max(range(len(configs)), key=lambda i: (sizes[i], i))

    def real(i: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = _make(cls, configs[i])
            init_weights(m)
        return m

    module = real(best)
    have = dict(_tensors(module))
    missing = sorted(set(shapes) - set(have))
    if missing:
        raise RuntimeError(f"{name}: the largest configuration lacks tensors {missing[:3]} of smaller ones")
    for tname, shape in shapes.items():
        if tuple(have[tname].shape) == shape:
            continue
        donor = next((i for i, p in enumerate(probes) if p[tname] == shape), None)
        value = dict(_tensors(real(donor)))[tname].detach() if donor is not None else _grow(have[tname].detach(),
                                                                                              shape)
        _set_tensor(module, tname, value.clone())
    return module


class Supernet(nn.Module):
    """Every subnet of a :class:`SupernetFrame` in one network (see the module docstring).

    ``forward(x, spec)`` runs the subnet of ``spec``; ``extract(spec)`` returns it as a plain
    ``HybridViT`` with copied weights; ``sub_state(spec)`` gives its state dict as slices of
    the supernet's tensors (views where a slice is contiguous in memory)."""

    def __init__(self, frame: SupernetFrame, seed: int = 0, cache_size: int = 64) -> None:
        super().__init__()
        self.frame = frame
        self.cache_size = cache_size
        self._templates: OrderedDict[str, tuple[HybridViT, list[tuple[str, str, tuple[int, ...], Any]]]] = \
            OrderedDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            widths = [sf.max_width for sf in frame.stages]
            self.stem = Stem(frame.stem, frame.in_chans, widths[0])
            grid = self.stem.out_grid(frame.img_size, frame.img_size)
            self.pos_embed = None
            if frame.pos_embed == "learned":
                self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], widths[0]))
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            stages = []
            c_in = widths[0]
            for i, sf in enumerate(frame.stages):
                stage = nn.Module()
                kind = sf.downsample if i else "none"
                stage.downsample = Downsample(kind, c_in, sf.max_width)
                if i and kind == "none":  # a 1x1 projection whenever the widths differ
                    stage.downsample.proj = nn.Conv2d(c_in, sf.max_width, 1)
                grid = stage.downsample.out_grid(*grid)
                stage.blocks = nn.ModuleList(
                    _SuperBlock(sf, grid, frame.layer_scale, seed=seed * 1000 + 100 * i + j)
                    for j in range(sf.max_depth))
                stages.append(stage)
                c_in = sf.max_width
            self.stages = nn.ModuleList(stages)
            self.head_norm = make_norm(frame.head_norm, widths[-1])
            self.head = nn.Linear(widths[-1], frame.num_classes)
            init_weights(self.stem)
            init_weights(self.stages)  # mixers were initialised on their own; re-init is the same rule
            init_weights(self.head)

    # ---- mapping ------------------------------------------------------------------------
    def _entry(self, spec: ArchSpec) -> tuple[HybridViT, list[tuple[str, str, tuple[int, ...], Any]]]:
        """The cached meta-device model of ``spec`` and its slicing plan: for every tensor of the
        subnet, (its name, the supernet tensor behind it, its shape, the fused-segment rule)."""
        key = spec.hash
        entry = self._templates.get(key)
        if entry is None:
            self.frame.check(spec)
            with torch.device("meta"):
                model = HybridViT(spec, num_classes=self.frame.num_classes, img_size=self.frame.img_size,
                                  in_chans=self.frame.in_chans)
            plan = []
            for name, t in _tensors(model):
                plan.append((name, self.super_name(spec, name)[0], tuple(t.shape), _fused_rule(spec, name)))
            entry = self._templates[key] = (model, plan)
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return entry

    def template(self, spec: ArchSpec) -> HybridViT:
        """The (cached) meta-device ``HybridViT`` of ``spec``: structure only, no storage."""
        return self._entry(spec)[0]

    def super_name(self, spec: ArchSpec, name: str) -> tuple[str, str | None]:
        """The supernet tensor behind ``name`` of the subnet, and the mixer whose slicing rules apply."""
        where = _in_mixer(spec, name)
        if where is None:
            return name, None
        prefix, kind, mixer, local = where
        return f"{prefix}{kind}s.{mixer}.{local}", mixer

    def sub_state(self, spec: ArchSpec) -> dict[str, Tensor]:
        """The subnet's parameters and buffers, named as in ``build(spec)``, sliced from the supernet."""
        mine = dict(_tensors(self))
        return {name: mine[sname] if not shape else _take(mine[sname], shape, rule)
                for name, sname, shape, rule in self._entry(spec)[1]}

    # ---- use ----------------------------------------------------------------------------
    def forward(self, x: Tensor, spec: ArchSpec) -> Tensor:
        """Logits of the subnet ``spec`` (shared weights; gradients reach the supernet)."""
        template = self.template(spec)
        template.train(self.training)
        return torch.func.functional_call(template, self.sub_state(spec), (x,), strict=True)

    def extract(self, spec: ArchSpec) -> HybridViT:
        """A plain ``HybridViT`` of ``spec`` (as ``build(spec)`` makes it) with the inherited weights."""
        self.frame.check(spec)
        model = build(spec, num_classes=self.frame.num_classes, img_size=self.frame.img_size,
                      in_chans=self.frame.in_chans)
        with torch.no_grad():
            state = {k: v.detach().clone() for k, v in self.sub_state(spec).items()}
        model.load_state_dict(state, strict=True)
        dev = next(self.parameters()).device
        return model.to(dev).train(self.training)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
