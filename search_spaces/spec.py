"""Architecture specs: frozen dataclasses, canonical JSON and a stable hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any, ClassVar


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj``: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def spec_hash(canonical: str) -> str:
    """sha256 hex digest of a canonical JSON text: the identity of an architecture everywhere."""
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
STEM_KINDS = ("patch", "overlap", "conv")
STEM_STRIDES = (4, 8, 16)
DOWNSAMPLES = ("conv3", "patch2", "none")
POOLS = ("avg", "cls")
POS_EMBEDS = ("none", "learned")
MAX_STAGES = 4
SPEC_VERSION = 1


def loads(text: str, what: str = "spec") -> Any:
    """``json.loads`` for user input: ValueError (one line) on bad or too deeply nested JSON."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"{what} must be JSON text, got {type(text).__name__}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError(f"{what} JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{what} is not valid JSON: {type(e).__name__}") from None


def _show(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to about ``n`` characters (bad values are echoed, never whole)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_name(where: str, name: str, value: Any) -> None:
    """A mixer/norm/... name must be a string (a list or dict is a bad spec, not a crash)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}.{name} must be a string, got {type(value).__name__} {_show(value)}")


def _norms() -> tuple[str, ...]:
    from search_spaces.layers.norm import NORMS

    return NORMS


def _check_int(where: str, name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.{name} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{where}.{name} must be in [{low}, {high}], got {value}")


def _check_choice(where: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}.{name} must be one of {', '.join(choices)}; got {_show(value)}")


def _as_float(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.{name} must be a number, got {_show(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{where}.{name} is too large, got {_show(value)}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{where}.{name} must be finite, got {_show(value)}")
    return out


@dataclass(frozen=True)
class StemSpec:
    """Stem: "patch" (conv k=s, stride s; ViT), "overlap" (conv k=s+3, pad 2; PoolFormer) or
    "conv" (log2(s) 3x3 stride-2 conv-BN-GELU layers; LeViT/EfficientViT), then ``norm``."""

    kind: str = "conv"
    stride: int = 4
    norm: str = "none"

    def __post_init__(self) -> None:
        _check_choice("stem", "kind", self.kind, STEM_KINDS)
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride not in STEM_STRIDES:
            raise ValueError(f"stem.stride must be one of 4, 8, 16; got {_show(self.stride)}")
        _check_choice("stem", "norm", self.norm, _norms())


@dataclass(frozen=True)
class BlockSpec:
    """The mixers of one block (a per-block override of its stage's mixers)."""

    token_mixer: str
    channel_mixer: str

    def __post_init__(self) -> None:
        _check_name("block", "token_mixer", self.token_mixer)
        _check_name("block", "channel_mixer", self.channel_mixer)


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``depth`` blocks of ``width`` channels, entered through ``downsample``.

    ``blocks`` (optional, one per block) overrides the stage's token/channel mixer per block.
    ``layer_scale`` is the LayerScale init value (Touvron et al. 2021, CaiT) or None.
    """

    depth: int
    width: int
    token_mixer: str = "attention"
    channel_mixer: str = "mlp"
    heads: int = 1
    mlp_ratio: float = 4.0
    norm: str = "layernorm"
    downsample: str = "conv3"
    layer_scale: float | None = None
    blocks: tuple[BlockSpec, ...] = ()

    def validate(self, where: str) -> None:
        from search_spaces.registry import get_channel_mixer, get_token_mixer

        _check_int(where, "depth", self.depth, 1, 64)
        _check_int(where, "width", self.width, 1, 8192)
        _check_int(where, "heads", self.heads, 1, 1024)
        if not 0.0 < self.mlp_ratio <= 16.0:
            raise ValueError(f"{where}.mlp_ratio must be in (0, 16], got {self.mlp_ratio}")
        _check_choice(where, "norm", self.norm, _norms())
        _check_choice(where, "downsample", self.downsample, DOWNSAMPLES)
        if self.layer_scale is not None and not 0.0 < self.layer_scale <= 10.0:
            raise ValueError(f"{where}.layer_scale must be None or in (0, 10], got {self.layer_scale}")
        for i, (tm, cm) in enumerate(self.mixers()):
            try:
                tm_cls = get_token_mixer(tm)
                get_channel_mixer(cm)
            except ValueError as e:
                raise ValueError(f"{where}.block{i}: {e}") from None
            if tm_cls.uses_heads and self.width % self.heads:
                raise ValueError(
                    f"{where}: width {self.width} is not divisible by heads {self.heads} "
                    f"(token mixer {tm!r} splits channels into heads)"
                )
            multiple = getattr(tm_cls, "width_multiple", 1)  # e.g. SSD heads of a fixed channel count
            if self.width % multiple:
                near = max(multiple, self.width // multiple * multiple)
                raise ValueError(f"{where}: width {self.width} is not a multiple of {multiple}, which token mixer "
                                 f"{tm!r} needs; choose a width such as {near}")

    def mixers(self) -> list[tuple[str, str]]:
        """(token mixer, channel mixer) of every block."""
        if self.blocks:
            return [(b.token_mixer, b.channel_mixer) for b in self.blocks]
        return [(self.token_mixer, self.channel_mixer)] * self.depth


@dataclass(frozen=True)
class HeadSpec:
    """Classifier head: pool ("avg" over grid tokens or the "cls" token), norm, then Linear."""

    pool: str = "avg"
    norm: str = "layernorm"

    def __post_init__(self) -> None:
        _check_choice("head", "pool", self.pool, POOLS)
        _check_choice("head", "norm", self.norm, _norms())


@dataclass(frozen=True)
class ArchSpec:
    """A hybrid_vit architecture. Valid by construction; canonical, so equal nets hash equally.

    Canonical form: floats are floats; stage 0 has downsample "none" (the stem feeds it);
    ``heads`` is 1 in stages where no mixer uses heads; per-block mixers that are all the
    same collapse to the stage's, and otherwise the stage's fields equal block 0's.
    """

    stem: StemSpec
    stages: tuple[StageSpec, ...]
    head: HeadSpec = field(default_factory=HeadSpec)
    pos_embed: str = "none"
    precision: str = "fp32"

    space: ClassVar[str] = "hybrid_vit"

    def __post_init__(self) -> None:
        from search_spaces.registry import get_channel_mixer, get_token_mixer

        if not isinstance(self.stem, StemSpec) or not isinstance(self.head, HeadSpec):
            raise ValueError("ArchSpec needs a StemSpec stem and a HeadSpec head")
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else None
        if not stages or not all(isinstance(s, StageSpec) for s in stages):
            raise ValueError("ArchSpec.stages must be a non-empty sequence of StageSpec")
        if len(stages) > MAX_STAGES:
            raise ValueError(f"ArchSpec has {len(stages)} stages; at most {MAX_STAGES} are allowed")
        canon = []
        for i, st in enumerate(stages):
            where = f"stages[{i}]"
            _check_name(where, "token_mixer", st.token_mixer)
            _check_name(where, "channel_mixer", st.channel_mixer)
            _check_int(where, "depth", st.depth, 1, 64)
            mlp_ratio = _as_float(where, "mlp_ratio", st.mlp_ratio)
            ls = None if st.layer_scale is None else _as_float(where, "layer_scale", st.layer_scale)
            blocks = tuple(st.blocks)
            if not all(isinstance(b, BlockSpec) for b in blocks):
                raise ValueError(f"{where}.blocks must hold BlockSpec entries")
            tm, cm = st.token_mixer, st.channel_mixer
            if blocks and len(blocks) != st.depth:
                raise ValueError(f"{where}.blocks has {len(blocks)} entries but depth is {st.depth}")
            if blocks:
                if len({(b.token_mixer, b.channel_mixer) for b in blocks}) == 1:
                    tm, cm, blocks = blocks[0].token_mixer, blocks[0].channel_mixer, ()
                else:
                    tm, cm = blocks[0].token_mixer, blocks[0].channel_mixer
            st = replace(st, mlp_ratio=mlp_ratio, layer_scale=ls, blocks=blocks, token_mixer=tm,
                         channel_mixer=cm, downsample="none" if i == 0 else st.downsample)
            st.validate(where)
            if not any(get_token_mixer(t).uses_heads for t, _ in st.mixers()):
                st = replace(st, heads=1)
            canon.append(st)
        object.__setattr__(self, "stages", tuple(canon))
        _check_choice("spec", "pos_embed", self.pos_embed, POS_EMBEDS)
        _check_choice("spec", "precision", self.precision, PRECISIONS)
        if self.head.pool == "cls":
            if len(canon) != 1:
                raise ValueError("head.pool 'cls' needs a single-stage (isotropic) model; use pool 'avg'")
            for t, c in canon[0].mixers():
                for name, cls in ((t, get_token_mixer(t)), (c, get_channel_mixer(c))):
                    if not cls.supports_prefix:
                        raise ValueError(f"head.pool 'cls' needs mixers that accept a class token; "
                                         f"{name!r} does not (use pool 'avg')")

    # ---- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the canonical structure)."""
        return {
            "space": self.space,
            "version": SPEC_VERSION,
            "stem": asdict(self.stem),
            "stages": [
                {**{k: v for k, v in asdict(s).items() if k != "blocks"},
                 "blocks": [asdict(b) for b in s.blocks]}
                for s in self.stages
            ],
            "head": asdict(self.head),
            "pos_embed": self.pos_embed,
            "precision": self.precision,
        }

    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON (``indent`` only for display; the hash uses the compact form)."""
        if indent is None:
            return canonical_json(self.to_dict())
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @cached_property
    def hash(self) -> str:
        """sha256 of the canonical JSON."""
        return spec_hash(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        """Parse and validate; ValueError with a one-line reason on bad JSON or a bad spec."""
        return cls.from_dict(loads(text, "spec"))

    @classmethod
    def from_dict(cls, data: Any) -> ArchSpec:
        if not isinstance(data, dict):
            raise ValueError("spec must be a JSON object")
        data = dict(data)
        space = data.pop("space", cls.space)
        if space != cls.space:
            raise ValueError(f"spec is for space {_show(space)}, not {cls.space!r}")
        version = data.pop("version", SPEC_VERSION)
        if isinstance(version, bool) or version != SPEC_VERSION:
            raise ValueError(f"spec version {_show(version)} is not supported (this release reads {SPEC_VERSION})")
        _no_extra("spec", data, {"stem", "stages", "head", "pos_embed", "precision"})
        if "stem" not in data or "stages" not in data:
            raise ValueError("spec needs 'stem' and 'stages'")
        if not isinstance(data["stages"], list):
            raise ValueError("spec.stages must be a list")
        stages = []
        for i, s in enumerate(data["stages"]):
            where = f"stages[{i}]"
            s = dict(_obj(where, s))
            blocks = s.pop("blocks", [])
            if not isinstance(blocks, list):
                raise ValueError(f"{where}.blocks must be a list")
            bl = tuple(_make(f"{where}.blocks[{j}]", BlockSpec, _obj(where, b)) for j, b in enumerate(blocks))
            stages.append(_make(where, StageSpec, {**s, "blocks": bl}))
        return cls(
            stem=_make("stem", StemSpec, _obj("stem", data["stem"])),
            stages=tuple(stages),
            head=_make("head", HeadSpec, _obj("head", data.get("head", {}))),
            pos_embed=data.get("pos_embed", "none"),
            precision=data.get("precision", "fp32"),
        )

    # ---- description ----------------------------------------------------------------------
    def short(self) -> str:
        """One line, e.g. ``conv/4 | 2x64 pool+mlp | 4x128 attention(h4)+glu r3 | bf16``."""
        parts = [f"{self.stem.kind}/{self.stem.stride}"]
        for st in self.stages:
            mixers = st.mixers()
            uniq = sorted(set(mixers), key=mixers.index)
            mix = ",".join(f"{t}+{c}" for t, c in uniq)
            heads = f" h{st.heads}" if st.heads > 1 else ""
            parts.append(f"{st.depth}x{st.width} {mix}{heads} r{st.mlp_ratio:g}")
        tail = self.precision if self.head.pool == "avg" else f"cls {self.precision}"
        return " | ".join([*parts, tail])

    def with_precision(self, precision: str) -> ArchSpec:
        return replace(self, precision=precision)

    def mixer_fractions(self, token_mixers: Sequence[str], channel_mixers: Sequence[str]) -> list[float]:
        """The share of the blocks that use each of ``token_mixers``, then each of ``channel_mixers``
        (a mixer not listed counts in neither): the architecture encoding a predictor fitted on
        labels uses (``bench/hybridbench_ranking.py``; counts of operations as encoding: White et
        al., NeurIPS 2021, "How Powerful are Performance Predictors in Neural Architecture Search?")."""
        blocks = [m for st in self.stages for m in st.mixers()]
        n = len(blocks)
        return ([sum(t == name for t, _ in blocks) / n for name in token_mixers]
                + [sum(c == name for _, c in blocks) / n for name in channel_mixers])


def _obj(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object")
    return value


def _no_extra(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ValueError(f"unknown field {_show(extra[0])} in {where}; allowed: {', '.join(sorted(allowed))}")


def _make(where: str, cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    _no_extra(where, data, names)
    try:
        return cls(**data)
    except TypeError:
        missing = sorted(n for n in names if n not in data)
        raise ValueError(f"{where} is missing a field ({', '.join(missing)})") from None
