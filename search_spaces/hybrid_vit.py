"""The hybrid_vit search space: MetaFormer-style stages (Yu et al., CVPR 2022, "MetaFormer Is
Actually What You Need for Vision") whose token and channel mixers are chosen per stage or per
block, on a conv/patch stem, with downsampling between stages and a precision carried in the spec.

The same assembly expresses known models exactly: ``build(PRESETS["deit_tiny"], 1000, 224)`` has
timm's ``deit_tiny_patch16_224`` parameter count (Touvron et al. 2021) and ``poolformer_s12`` has
timm's ``poolformer_s12`` count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces._space import SearchSpace, Trial, register_space
from search_spaces.counting import count_flops, count_params
from search_spaces.layers.common import to_layout
from search_spaces.layers.norm import make_norm
from search_spaces.registry import channel_mixer_names, get_channel_mixer, get_token_mixer, token_mixer_names
from search_spaces.spec import PRECISIONS, ArchSpec, BlockSpec, HeadSpec, StageSpec, StemSpec

# --------------------------------------------------------------------------------------------
# assembly
# --------------------------------------------------------------------------------------------


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def stem_grid(kind: str, stride: int, h: int, w: int) -> tuple[int, int]:
    """Token grid after a stem of ``kind`` and ``stride`` on an h x w image."""
    if kind == "patch":
        return h // stride, w // stride
    if kind == "overlap":
        k = stride + 3
        return _conv_out(h, k, stride, 2), _conv_out(w, k, stride, 2)
    for _ in range(int(math.log2(stride))):
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    return h, w


def downsample_grid(kind: str, h: int, w: int) -> tuple[int, int]:
    """Token grid after a between-stage downsampling of ``kind``."""
    return (h, w) if kind == "none" else ((h + 1) // 2, (w + 1) // 2)


def init_weights(module: nn.Module) -> None:
    """The assembly's initialisation (ViT/DeiT): Linear and Conv2d weights ~ trunc-normal(0.02),
    biases zero, except parameters a block marks ``_no_reinit`` (Mamba's Δ bias, A, D)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if not getattr(m.weight, "_no_reinit", False):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)


class Stem(nn.Module):
    """Patch embedding ("patch", ViT), overlapping patch embedding ("overlap", PoolFormer) or a
    stack of 3x3 stride-2 conv-BN layers with GELU between them ("conv", LeViT/EfficientViT)."""

    def __init__(self, spec: StemSpec, in_chans: int, width: int) -> None:
        super().__init__()
        self.kind, self.stride = spec.kind, spec.stride
        if spec.kind == "patch":
            self.proj = nn.Conv2d(in_chans, width, spec.stride, spec.stride)
        elif spec.kind == "overlap":
            self.proj = nn.Conv2d(in_chans, width, spec.stride + 3, spec.stride, padding=2)
        else:
            n = int(math.log2(spec.stride))
            layers: list[nn.Module] = []
            c_in = in_chans
            for i in range(n):
                c_out = width if i == n - 1 else max(16, width // 2 ** (n - 1 - i))
                layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out)]
                if i < n - 1:
                    layers.append(nn.GELU())
                c_in = c_out
            self.proj = nn.Sequential(*layers)
        self.norm = make_norm(spec.norm, width)

    def out_grid(self, h: int, w: int) -> tuple[int, int]:
        return stem_grid(self.kind, self.stride, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Downsample(nn.Module):
    """Between stages: 3x3 stride-2 conv ("conv3", PoolFormer), 2x2 stride-2 patch merging conv
    ("patch2", Swin/PVT style; odd grids are zero-padded), or a 1x1 projection ("none")."""

    def __init__(self, kind: str, c_in: int, c_out: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv3":
            self.proj: nn.Module = nn.Conv2d(c_in, c_out, 3, 2, 1)
        elif kind == "patch2":
            self.proj = nn.Conv2d(c_in, c_out, 2, 2)
        elif c_in != c_out:
            self.proj = nn.Conv2d(c_in, c_out, 1)
        else:
            self.proj = nn.Identity()

    def out_grid(self, h: int, w: int) -> tuple[int, int]:
        return downsample_grid(self.kind, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "patch2" and (x.shape[-2] % 2 or x.shape[-1] % 2):
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.proj(x)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al. 2021, "Going deeper with
    Image Transformers"), for either layout."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma.view(1, -1, 1, 1) if x.ndim == 4 else self.gamma)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """MetaFormer block: x + ls(token_mixer(norm(x))), then x + ls(channel_mixer(norm(x))).

    Each mixer runs in the layout it declares; the block converts before each branch."""

    def __init__(self, dim: int, token_mixer: str, channel_mixer: str, *, heads: int, mlp_ratio: float,
                 norm: str, layer_scale: float | None, grid: tuple[int, int], drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.token_mixer = get_token_mixer(token_mixer)(dim, heads=heads, grid=grid)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = make_norm(norm, dim)
        self.channel_mixer = get_channel_mixer(channel_mixer)(dim, mlp_ratio=mlp_ratio)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = to_layout(x, self.token_mixer.layout, hw)
        x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x), hw)))
        x = to_layout(x, self.channel_mixer.layout, hw)
        return x + self.drop_path(self.ls2(self.channel_mixer(self.norm2(x), hw)))


class Stage(nn.Module):
    """A downsampling layer followed by ``depth`` blocks at one width."""

    def __init__(self, spec: StageSpec, c_in: int, grid: tuple[int, int], drop_paths: list[float]) -> None:
        super().__init__()
        self.downsample = Downsample(spec.downsample, c_in, spec.width)
        self.grid = self.downsample.out_grid(*grid)
        self.blocks = nn.ModuleList(
            Block(spec.width, tm, cm, heads=spec.heads, mlp_ratio=spec.mlp_ratio, norm=spec.norm,
                  layer_scale=spec.layer_scale, grid=self.grid, drop_path=dp)
            for (tm, cm), dp in zip(spec.mixers(), drop_paths)
        )

    @property
    def has_downsample(self) -> bool:
        """False when the stage is entered without any layer (same width, no downsampling)."""
        return not isinstance(self.downsample.proj, nn.Identity)

    def forward_downsample(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        if not self.has_downsample:
            return x, hw
        x = self.downsample(to_layout(x, "nchw", hw))
        return x, (x.shape[-2], x.shape[-1])

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = self.forward_downsample(x, hw)
        for blk in self.blocks:
            x = blk(x, hw)
        return x, hw


class HybridViT(nn.Module):
    """A hybrid_vit network built from an ArchSpec (timm-style ``forward_features``/``forward_head``)."""

    def __init__(self, spec: ArchSpec, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.spec, self.num_classes, self.img_size = spec, num_classes, img_size
        widths = [s.width for s in spec.stages]
        self.stem = Stem(spec.stem, in_chans, widths[0])
        grid = self.stem.out_grid(img_size, img_size)
        if min(grid) < 1:
            raise ValueError(f"image size {img_size} is too small for stem stride {spec.stem.stride}")
        self.num_prefix = 1 if spec.head.pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, widths[0])) if self.num_prefix else None
        self.pos_grid = grid
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.num_prefix + grid[0] * grid[1], widths[0]))
                          if spec.pos_embed == "learned" else None)
        total = sum(s.depth for s in spec.stages)
        rates = torch.linspace(0, drop_path, total, device="cpu").tolist() if total > 1 else [drop_path] * total
        stages, c_in, k = [], widths[0], 0
        for st in spec.stages:
            stage = Stage(st, c_in, grid, rates[k:k + st.depth])
            stages.append(stage)
            grid, c_in, k = stage.grid, st.width, k + st.depth
        self.stages = nn.ModuleList(stages)
        self.num_features = widths[-1]
        self.head_norm = make_norm(spec.head.norm, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Add the learned position embedding, resampled bicubically if the grid differs."""
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is None:
            return x
        pos = self.pos_embed
        if hw != self.pos_grid:
            prefix, grid = pos[:, : self.num_prefix], pos[:, self.num_prefix:]
            c = grid.shape[-1]
            grid = grid.reshape(1, *self.pos_grid, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
            pos = torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], c)], dim=1)
        return x + pos

    def forward_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem, then (as tokens) the class token and position embedding if the spec has them."""
        x = self.stem(x)
        hw = (x.shape[-2], x.shape[-1])
        if self.num_prefix or self.pos_embed is not None:
            x = self._pos_embed(x.flatten(2).transpose(1, 2), hw)
        return x, hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the last stage: (B, C, H, W) or (B, P + H*W, C), as its last block left them."""
        x, hw = self.forward_stem(x)
        for stage in self.stages:
            x, hw = stage(x, hw)
        return x

    def pieces(self, x: torch.Tensor) -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
        """The forward pass cut into the pieces a latency table measures: ``(name, fn, args)`` for
        the stem, each stage's downsampling, each block and the head, in order, with the inputs
        each piece gets on ``x`` (the pass is run once to collect them)."""
        out: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [("stem", self.forward_stem, (x,))]
        x, hw = self.forward_stem(x)
        for i, stage in enumerate(self.stages):
            if stage.has_downsample:
                out.append((f"s{i}.down", stage.forward_downsample, (x, hw)))
                x, hw = stage.forward_downsample(x, hw)
            for j, blk in enumerate(stage.blocks):
                out.append((f"s{i}.b{j}", blk, (x, hw)))
                x = blk(x, hw)
        out.append(("head", self.forward_head, (x,)))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))
        elif self.num_prefix:
            x = x[:, 0]
        else:
            x = x.mean(dim=1)
        x = self.head_norm(x[:, :, None, None]).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_nested_width(self, width: float) -> None:
        """Run every nested (MatFormer) channel mixer at ``width`` of its hidden units."""
        for m in self.modules():
            if hasattr(m, "set_width") and m is not self:
                m.set_width(width)


def build(spec: ArchSpec, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3,
          drop_path: float = 0.0, seed: int = 0) -> HybridViT:
    """A freshly initialised HybridViT; the same arguments give the same weights (global RNG untouched)."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"build() needs an ArchSpec, got {type(spec).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HybridViT(spec, num_classes=num_classes, img_size=img_size, in_chans=in_chans, drop_path=drop_path)


# --------------------------------------------------------------------------------------------
# presets: known models expressed exactly
# --------------------------------------------------------------------------------------------


def _deit(width: int, heads: int) -> ArchSpec:
    return ArchSpec(
        stem=StemSpec(kind="patch", stride=16),
        stages=(StageSpec(depth=12, width=width, token_mixer="attention", channel_mixer="mlp", heads=heads,
                          mlp_ratio=4.0, norm="layernorm"),),
        head=HeadSpec(pool="cls", norm="layernorm"),
        pos_embed="learned",
    )


def _poolformer(depths: tuple[int, ...]) -> ArchSpec:
    widths = (64, 128, 320, 512)
    return ArchSpec(
        stem=StemSpec(kind="overlap", stride=4),
        stages=tuple(StageSpec(depth=d, width=w, token_mixer="pool", channel_mixer="mlp", mlp_ratio=4.0,
                               norm="groupnorm1", downsample="conv3", layer_scale=1e-5)
                     for d, w in zip(depths, widths)),
        head=HeadSpec(pool="avg", norm="layernorm"),
    )


def _presets() -> dict[str, ArchSpec]:
    hybrid = ArchSpec(
        stem=StemSpec(kind="conv", stride=4),
        stages=(
            StageSpec(depth=2, width=48, token_mixer="sepconv", channel_mixer="conv_ffn", mlp_ratio=3.0,
                      norm="batchnorm"),
            StageSpec(depth=2, width=96, token_mixer="ssm", channel_mixer="glu", mlp_ratio=3.0),
            StageSpec(depth=3, width=192, heads=4, mlp_ratio=3.0,
                      blocks=(BlockSpec("gated_linear", "mlp"), BlockSpec("attention", "mlp"),
                              BlockSpec("spectral", "nested"))),
        ),
        head=HeadSpec(pool="avg", norm="layernorm"),
    )
    return {
        "deit_tiny": _deit(192, 3),
        "deit_small": _deit(384, 6),
        "poolformer_s12": _poolformer((2, 2, 6, 2)),
        "poolformer_s24": _poolformer((4, 4, 12, 4)),
        "hybrid_tiny": hybrid,
    }


# the mixers are registered by now: importing search_spaces.layers above registers them
PRESETS: dict[str, ArchSpec] = _presets()


# --------------------------------------------------------------------------------------------
# the space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HybridViTChoices:
    """What ``sample`` draws from. Restrict any field to narrow the space (e.g. precisions)."""

    stem_kinds: tuple[str, ...] = ("conv", "patch", "overlap")
    stem_strides: tuple[int, ...] = (4, 8, 16)
    max_stages: int = 4
    max_depth: int = 4
    first_widths: tuple[int, ...] = (32, 48, 64, 96, 128)
    width_growth: tuple[float, ...] = (1.0, 1.5, 2.0)
    max_width: int = 768
    heads: tuple[int, ...] = (1, 2, 4, 8)
    mlp_ratios: tuple[float, ...] = (2.0, 3.0, 4.0)
    token_mixers: tuple[str, ...] | None = None  # None: every registered token mixer
    channel_mixers: tuple[str, ...] | None = None
    norms: tuple[str, ...] = ("layernorm", "groupnorm1", "batchnorm")
    downsamples: tuple[str, ...] = ("conv3", "patch2")
    layer_scales: tuple[float | None, ...] = (None, 1e-5)
    pos_embeds: tuple[str, ...] = ("none", "learned")
    precisions: tuple[str, ...] = PRECISIONS


def _round8(x: float) -> int:
    return max(8, round(x / 8.0) * 8)


@register_space("hybrid_vit")
class HybridViTSpace(SearchSpace):
    """Hybrid vision backbones: 1-4 stages, each with its own depth, width, heads, MLP ratio,
    norm, downsampling and token/channel mixers (per stage or per block), plus precision."""

    default_img_size: ClassVar[int] = 32
    default_num_classes: ClassVar[int] = 10

    def __init__(self, choices: HybridViTChoices | None = None) -> None:
        self.choices = choices or HybridViTChoices()

    def with_choices(self, **changes: Any) -> HybridViTSpace:
        """This space with some choices replaced, e.g. ``with_choices(precisions=("bf16",))``."""
        return type(self)(replace(self.choices, **changes))

    def sample(self, trial: Trial) -> ArchSpec:
        """Define-by-run; parameter names are hierarchical (``s2.token_mixer``, ``s1.b0.channel_mixer``)."""
        c = self.choices
        tms = tuple(c.token_mixers or token_mixer_names())
        cms = tuple(c.channel_mixers or channel_mixer_names())
        stem = StemSpec(kind=trial.suggest_categorical("stem.kind", c.stem_kinds),
                        stride=trial.suggest_categorical("stem.stride", c.stem_strides))
        n_stages = trial.suggest_int("num_stages", 1, c.max_stages)
        stages = []
        width = 0
        for i in range(n_stages):
            p = f"s{i}."
            depth = trial.suggest_int(p + "depth", 1, c.max_depth)
            if i == 0:
                width = trial.suggest_categorical(p + "width", c.first_widths)
            else:
                width = min(c.max_width, _round8(width * trial.suggest_categorical(p + "growth", c.width_growth)))
            blocks: tuple[BlockSpec, ...] = ()
            if depth > 1 and trial.suggest_categorical(p + "per_block", (False, True)):
                blocks = tuple(BlockSpec(trial.suggest_categorical(f"{p}b{j}.token_mixer", tms),
                                         trial.suggest_categorical(f"{p}b{j}.channel_mixer", cms))
                               for j in range(depth))
                tm, cm = blocks[0].token_mixer, blocks[0].channel_mixer
            else:
                tm = trial.suggest_categorical(p + "token_mixer", tms)
                cm = trial.suggest_categorical(p + "channel_mixer", cms)
            mixers = [b.token_mixer for b in blocks] or [tm]
            heads = 1
            if any(get_token_mixer(t).uses_heads for t in mixers):
                heads = trial.suggest_categorical(p + "heads", c.heads)
            stages.append(StageSpec(
                depth=depth, width=width, token_mixer=tm, channel_mixer=cm, heads=heads,
                mlp_ratio=trial.suggest_categorical(p + "mlp_ratio", c.mlp_ratios),
                norm=trial.suggest_categorical(p + "norm", c.norms),
                downsample=trial.suggest_categorical(p + "downsample", c.downsamples) if i else "none",
                layer_scale=trial.suggest_categorical(p + "layer_scale", c.layer_scales),
                blocks=blocks,
            ))
        pool = "avg"
        if n_stages == 1:
            names = [m for pair in stages[0].mixers() for m in pair]
            prefix_ok = all(getattr(get_token_mixer(t), "supports_prefix", False) for t, _ in stages[0].mixers()) \
                and all(get_channel_mixer(cm_).supports_prefix for _, cm_ in stages[0].mixers())
            if prefix_ok and names:
                pool = trial.suggest_categorical("head.pool", ("avg", "cls"))
        return ArchSpec(
            stem=stem, stages=tuple(stages), head=HeadSpec(pool=pool, norm="layernorm"),
            pos_embed=trial.suggest_categorical("pos_embed", c.pos_embeds),
            precision=trial.suggest_categorical("precision", c.precisions),
        )

    def build(self, spec: ArchSpec, num_classes: int | None = None, img_size: int | None = None) -> HybridViT:
        return build(spec, num_classes=self.default_num_classes if num_classes is None else num_classes,
                     img_size=img_size or self.default_img_size)

    def spec_from_json(self, text: str) -> ArchSpec:
        return ArchSpec.from_json(text)

    def spec_from_dict(self, data: dict[str, Any]) -> ArchSpec:
        return ArchSpec.from_dict(data)

    def describe(self, spec: ArchSpec, img_size: int | None = None, num_classes: int | None = None) -> dict[str, Any]:
        """Parameters, FLOPs at ``img_size`` and a per-stage table (grid, params, FLOPs, mixers)."""
        img_size = img_size or self.default_img_size
        model = self.build(spec, num_classes=num_classes, img_size=img_size)
        flops = count_flops(model, (1, 3, img_size, img_size))
        rows = []
        stem_grid = model.stem.out_grid(img_size, img_size)
        rows.append({"name": "stem", "grid": f"{stem_grid[0]}x{stem_grid[1]}", "depth": "",
                     "width": spec.stages[0].width, "heads": "", "mlp_ratio": "",
                     "mixers": f"{spec.stem.kind} stride {spec.stem.stride}",
                     "params": count_params(model.stem)})
        for i, (st, stage) in enumerate(zip(spec.stages, model.stages)):
            mixers = st.mixers()
            uniq = sorted(set(mixers), key=mixers.index)
            rows.append({
                "name": f"s{i}", "grid": f"{stage.grid[0]}x{stage.grid[1]}", "depth": st.depth, "width": st.width,
                "heads": st.heads, "mlp_ratio": st.mlp_ratio,
                "mixers": ", ".join(f"{t}+{c}" + (f" x{mixers.count((t, c))}" if len(uniq) > 1 else "")
                                    for t, c in uniq),
                "params": count_params(stage),
            })
        return {
            "space": self.name, "hash": spec.hash, "short": spec.short(), "img_size": img_size,
            "num_classes": model.num_classes, "precision": spec.precision,
            "params": count_params(model), "flops": flops, "macs": flops // 2, "stages": rows,
        }
