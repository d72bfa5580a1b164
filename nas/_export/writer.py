"""Write the model file of one architecture: the blocks it uses, from the templates in blocks.py,
and its model class, stages written out, from the spec.

The file reads as if written by hand for that architecture: a typed ``Config``, one class per
block type it uses, the stages spelled out in the model's ``__init__``, the spec once (in the
header). Its ``state_dict`` keys and shapes, its initial weights for a seed and its outputs equal
``search_spaces.hybrid_vit.build(spec)``'s (tests/test_export.py checks presets, random and
forced specs; tests/test_export_blocks.py every registered mixer).
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from search_spaces.spec import ArchSpec

# spec name -> (template class, how a stage constructs it from its locals dim, heads, ratio, g)
TOKEN_MIXERS: dict[str, tuple[str, str]] = {
    "attention": ("Attention", "Attention(dim, heads)"),
    "single_head": ("SingleHeadAttention", "SingleHeadAttention(dim)"),
    "cascaded_group": ("CascadedGroupAttention", "CascadedGroupAttention(dim, heads, (g, g))"),
    "linear": ("LinearAttention", "LinearAttention(dim, heads)"),
    "gated_linear": ("BidirectionalGLA", "BidirectionalGLA(dim, heads)"),
    "ssm": ("BidirectionalMamba", "BidirectionalMamba(dim)"),
    "ssd": ("BidirectionalMamba2", "BidirectionalMamba2(dim)"),
    "hydra": ("Hydra", "Hydra(dim)"),
    "spectral": ("GlobalFilter", "GlobalFilter(dim, (g, g))"),
    "pool": ("Pooling", "Pooling()"),
    "sepconv": ("SepConv", "SepConv(dim)"),
    "identity": ("IdentityMixer", "IdentityMixer()"),
}
CHANNEL_MIXERS: dict[str, tuple[str, str]] = {
    "mlp": ("Mlp", "Mlp(dim, ratio)"),
    "glu": ("SwiGLU", "SwiGLU(dim, ratio)"),
    "conv_ffn": ("ConvFFN", "ConvFFN(dim, ratio)"),
    "nested": ("NestedMlp", "NestedMlp(dim, ratio)"),
}
NORMS = {"layernorm": "LayerNormAny", "groupnorm1": "GroupNorm1", "batchnorm": "BatchNormAny", "none": "nn.Identity"}
# what the header says of each mixer (the class docstrings name the papers)
_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}
_MARK = re.compile(r"\s*# \[(!?)(\w+)\]\s?(.*)$")
_ALT = re.compile(r"^(\s*)#\[(!?)(\w+)\] (.*)$")
_IMPORTS = (  # (name the code uses, import line): the standard library first, then torch
    ("math", "import math"),
    ("dataclass", "from dataclasses import dataclass"),
    ("Any", "from typing import Any"),
    ("torch", "import torch"),
    ("F", "import torch.nn.functional as F"),
)
_DEFAULT_STATS = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # ImageNet's, timm's default


class MissingTemplate(ValueError):
    """A mixer of the spec has no template in nas/_export/blocks.py."""


@dataclass
class _Def:
    name: str
    order: int
    text: str
    deps: set[str]


@functools.cache
def _templates() -> dict[str, _Def]:
    """Every top-level definition of blocks.py, by name, with the template names it refers to."""
    from nas._export import blocks

    source = inspect.getsource(blocks)
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, _Def] = {}
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "\n".join(lines[first - 1:node.end_lineno])
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            out[node.name] = _Def(node.name, i, text, used)
    for d in out.values():
        d.deps = {n for n in d.deps if n in out and n != d.name}
    return out


def _render(text: str, flags: set[str]) -> str:
    """A template's text with its ``# [flag]`` lines and ``#[flag] CODE`` alternatives resolved."""
    out = []
    for line in text.splitlines():
        alt = _ALT.match(line)
        if alt:
            indent, neg, flag, code = alt.groups()
            if (flag in flags) != bool(neg):
                out.append(indent + code)
            continue
        mark = _MARK.search(line)
        if mark:
            neg, flag, comment = mark.groups()
            if (flag in flags) == bool(neg):
                continue
            line = line[:mark.start()] + (f"  # {comment}" if comment else "")
        out.append(line)
    return "\n".join(out)


def _closure(roots: set[str]) -> list[_Def]:
    """The templates ``roots`` and everything they use, in blocks.py's order."""
    table = _templates()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += table[name].deps
    return sorted((table[n] for n in seen), key=lambda d: d.order)


def _layout(kind: str, name: str) -> str:
    from search_spaces.registry import get_channel_mixer, get_token_mixer

    return (get_token_mixer(name) if kind == "token" else get_channel_mixer(name)).layout


def _layouts_needed(spec: ArchSpec, tokens: bool) -> tuple[bool, str]:
    """Whether any block must convert between maps and tokens (as the library's Block does at run
    time), and the layout the last block leaves: the file converts only where needed."""
    state, needed, c_in = ("nlc" if tokens else "nchw"), False, spec.stages[0].width
    for st in spec.stages:
        if st.downsample != "none" or st.width != c_in:
            needed |= state == "nlc"
            state = "nchw"
        for tm, cm in st.mixers():
            for layout in (_layout("token", tm), _layout("channel", cm)):
                if layout != "any" and layout != state:
                    needed, state = True, layout
        c_in = st.width
    return needed, state


def _stem(spec: ArchSpec) -> tuple[str, str, str]:
    """(construction, grid-side expression, comment) of the stem."""
    k, s, w = spec.stem.kind, spec.stem.stride, spec.stages[0].width
    norm = NORMS[spec.stem.norm]
    norm_call = f"{norm}(cfg.widths[0])" if norm != "nn.Identity" else "nn.Identity()"
    if k == "patch":
        return (f"Stem(nn.Conv2d(cfg.in_chans, cfg.widths[0], {s}, {s}), {norm_call})", f"cfg.img_size // {s}",
                f"{s}x{s} patches (ViT)")
    if k == "overlap":
        return (f"Stem(nn.Conv2d(cfg.in_chans, cfg.widths[0], {s + 3}, {s}, padding=2), {norm_call})",
                f"(cfg.img_size + 4 - {s + 3}) // {s} + 1", f"overlapping {s + 3}x{s + 3} patches (PoolFormer)")
    n = int(math.log2(s))
    layers, c_in = [], "cfg.in_chans"
    for i in range(n):
        c_out = "cfg.widths[0]" if i == n - 1 else str(max(16, w // 2 ** (n - 1 - i)))
        layers.append(f"nn.Conv2d({c_in}, {c_out}, 3, 2, 1, bias=False), nn.BatchNorm2d({c_out})"
                      + (", nn.GELU()," if i < n - 1 else ","))
        c_in = c_out
    body = "".join(f"\n            {ln}" for ln in layers)
    return (f"Stem(nn.Sequential({body}\n        ), {norm_call})", f"(cfg.img_size + {s - 1}) // {s}",
            f"{n} 3x3 stride-2 conv-BN layers (LeViT)")


def _fit(line: str) -> list[str]:
    """A ``Block(...)`` line of a stage, broken before its norm argument when over 120 columns."""
    if len(line) <= 120:
        return [line]
    head, sep, rest = line.partition("), ")  # after the token mixer's call
    head2, sep2, rest2 = rest.partition("), ")  # after the channel mixer's call
    indent = " " * (line.index("Block(") + len("Block("))
    return [head + sep + head2 + sep2.rstrip(), indent + rest2]


def _side(kind: str, stride: int, n: int) -> int:
    if kind == "patch":
        return n // stride
    if kind == "overlap":
        return (n + 4 - stride - 3) // stride + 1
    return -(-n // stride)


def _json_lines(spec: ArchSpec) -> list[str]:
    """The spec as JSON over a few lines (json.loads of them gives spec.to_dict()), 110 columns."""
    d = spec.to_dict()
    stages = d.pop("stages")
    head = json.dumps(d)[:-1] + ', "stages": ['
    out = textwrap.wrap(head, 106, break_long_words=False, break_on_hyphens=False)
    for i, st in enumerate(stages):
        text = json.dumps(st) + ("]}" if i == len(stages) - 1 else ",")
        out += textwrap.wrap(text, 104, initial_indent="  ", subsequent_indent="   ", break_long_words=False,
                             break_on_hyphens=False)
    return out


def _number(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _device_line(device: Any) -> str:
    if not device:
        return "none (no latency measured)"
    if not isinstance(device, dict):
        return str(device)
    keys = ("name", "kind", "driver", "cuda", "torch", "memory_gb", "power_limit_w", "threads", "key")
    shown = [f"{k} {device[k]}" for k in keys if device.get(k) not in (None, "") and k != "name"]
    return f"{device.get('name') or device.get('kind', 'device')} ({', '.join(shown)})" if shown else \
        str(device.get("name") or json.dumps(device, sort_keys=True, default=str))


def _wrap(text: str, indent: str = "") -> list[str]:
    """A free-text header line as lines of at most 106 characters (the file is checked at 120),
    continuation lines indented by four spaces; never broken inside a word or at a hyphen (a word
    longer than that, a long path, stays whole on its own line, which ruff's E501 does not flag)."""
    return textwrap.wrap(text, 106, initial_indent=indent, subsequent_indent=indent + "    ",
                         break_on_hyphens=False, break_long_words=False)


def _header(spec: ArchSpec, cls: str, params: int, sizes: dict[str, int], meta: dict[str, Any],
            norm: dict[str, Any]) -> str:
    c, n = sizes["in_chans"], sizes["img_size"]
    short = textwrap.wrap(spec.short(), 104, subsequent_indent="    ", break_on_hyphens=False)
    weights = meta.get("weights") or {}
    lines = [
        f"{cls}: a hybrid vision backbone found with hybrid-NAS, as one PyTorch file (imports only torch).",
        "",
        *short,
        f"{params:,} parameters for {sizes['num_classes']} classes at {c}x{n}x{n}.",
        "",
        "    import torch",
        "    import model  # this file",
        "",
        f"    net = model.build_model().eval()  # precision {spec.precision}"
        + (f": {_DTYPES[spec.precision].split('.')[1]} parameters" if spec.precision in _DTYPES else ""),
        "    net.load_state_dict(torch.load(\"model.pt\"))  # or safetensors.torch.load_file(\"model.safetensors\")",
        f"    logits = net(model.preprocess(images))  # images: (B, {c}, H, W), uint8 or floats in [0, 1]",
        "",
        f"Input: resized to {n}x{n} (bilinear, antialiased), then normalized per channel with MEAN and STD:",
        *_wrap(f"{norm['source']}.", indent="    "),
    ]
    if spec.precision in ("int8", "fp8"):
        lines += _wrap(f"Precision {spec.precision}: build_model() is float32; to_precision(net) after loading the "
                       f"weights swaps in {spec.precision} linear layers.")
    # the weights' source can be long ("trained (1.5 of 3 epochs: stopped early)"), like a study's
    # name or data: wrapped, so that the file stays within the line length it is checked against
    if weights.get("format") == "safetensors":
        lines += _wrap(f"Weights: {weights.get('file', 'model.safetensors')} ({weights.get('source', 'initial')}); "
                       "reading it needs `pip install safetensors`.")
    elif weights.get("format") == "torch":
        lines += _wrap(f"Weights: {weights.get('file', 'model.pt')} ({weights.get('source', 'initial')}), a "
                       "torch.save state dict: torch.load(path).")
    else:
        lines.append("Weights: none written with this file (`nas export --weights F.safetensors|F.pt` writes them).")
    if meta.get("study"):
        pick = f", {meta['pick']}" if meta.get("pick") else ""
        lines += _wrap(f"Study: {meta['study']}{pick}; data {meta.get('data')}.")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += _wrap("Metrics: " + ", ".join(f"{k} {_number(v)}" for k, v in sorted(metrics.items())))
    if "device" in meta or meta.get("study"):
        lines += _wrap(f"Device (latency): {_device_line(meta.get('device'))}")
    known = {"study", "pick", "data", "metrics", "device", "weights", "normalization"}
    for k, v in sorted((k, v) for k, v in meta.items() if k not in known):
        lines += textwrap.wrap(f"{k}: {json.dumps(v, default=str)}", 106, subsequent_indent="    ")
    lines += ["", f"Spec (JSON; SPEC_HASH is the sha256 of its canonical form, {spec.hash[:12]}...):",
              *("    " + ln for ln in _json_lines(spec))]
    text = "\n".join(ln.rstrip() for ln in lines)
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')  # the header is data: keep it a plain string
    return f'"""{text}\n"""\n'


def normalization(in_chans: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The input normalization to record: the study's (``meta["normalization"]``) or stated defaults."""
    given = meta.get("normalization")
    if given and len(given.get("mean", ())) == in_chans:
        return given
    mean, std = _DEFAULT_STATS.get(in_chans, ((0.5,) * in_chans, (0.5,) * in_chans))
    what = "ImageNet's" if in_chans in _DEFAULT_STATS else "0.5 / 0.5"
    return {"mean": list(mean), "std": list(std),
            "source": f"defaults ({what}; no study data): replace them with your training data's statistics"}


def generate(spec: ArchSpec, *, num_classes: int, img_size: int, in_chans: int, cls: str, fn_name: str,
             params: int, metadata: dict[str, Any] | None = None) -> str:
    """The source of the model file (see the module docstring); MissingTemplate for a mixer without one."""
    meta = dict(metadata or {})
    pairs = [p for st in spec.stages for p in st.mixers()]
    for t, c in pairs:
        if t not in TOKEN_MIXERS or c not in CHANNEL_MIXERS:
            missing = t if t not in TOKEN_MIXERS else c
            raise MissingTemplate(f"mixer {missing!r} has no export template; add one to nas/_export/blocks.py")
    cls_tok, pos = spec.head.pool == "cls", spec.pos_embed == "learned"
    layouts, last_layout = _layouts_needed(spec, cls_tok or pos)
    ls_any = any(st.layer_scale is not None for st in spec.stages)
    quant = spec.precision in ("int8", "fp8")
    uses = {t for t, _ in pairs}
    flags = {f for f, on in (("layouts", layouts), ("quant", quant), ("layer_scale", ls_any),
                             ("ssm", "ssm" in uses)) if on}
    grid_mixers = {"cascaded_group", "spectral"}
    heads_mixers = {"attention", "cascaded_group", "linear", "gated_linear"}

    roots = {"Stem", "Stage", "Block", "DropPath"} | {TOKEN_MIXERS[t][0] for t, _ in pairs}
    roots |= {CHANNEL_MIXERS[c][0] for _, c in pairs}
    norms = {spec.stem.norm, spec.head.norm} | {st.norm for st in spec.stages}
    roots |= {NORMS[k] for k in norms if k != "none"}
    roots |= {"Downsample" for i, st in enumerate(spec.stages)
              if st.downsample == "conv3" or (st.downsample == "none" and i and st.width != spec.stages[i - 1].width)}
    roots |= {"PatchMerging" for st in spec.stages if st.downsample == "patch2"}
    roots |= {"Int8Linear"} if spec.precision == "int8" else {"Fp8Linear"} if spec.precision == "fp8" else set()
    if ls_any:
        roots.add("LayerScale")
    if layouts:
        roots.add("to_layout")
    defs = _closure(roots)
    precision_defs = [d for d in defs if d.name in ("Int8Linear", "Fp8Linear")]
    blocks = "\n\n\n".join(_render(d.text, flags) for d in defs if d not in precision_defs)

    # ---- the model class: stem, stages written out, head --------------------------------------------
    n0 = img_size
    stem_code, side_expr, stem_what = _stem(spec)
    side = _side(spec.stem.kind, spec.stem.stride, n0)
    need_grid_until = max([i for i, st in enumerate(spec.stages) if {t for t, _ in st.mixers()} & grid_mixers],
                          default=-1)
    w0 = spec.stages[0].width
    init: list[str] = [
        f"        # stem, {stem_what}: (B, {in_chans}, {n0}, {n0}) images -> (B, {w0}, {side}, {side}) maps",
        f"        self.stem = {stem_code}",
    ]
    if pos or need_grid_until >= 0:
        init += [f"        g = {side_expr}  # side of the token grid",
                 "        if g < 1:",
                 f"            raise ValueError(f\"img_size {{cfg.img_size}} is too small for the stem's stride "
                 f"{spec.stem.stride}\")"]
    prefix = 1 if cls_tok else 0
    if cls_tok:
        init.append("        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.widths[0]))  # put before the tokens")
    if pos:
        init += ["        self.pos_grid = (g, g)",
                 f"        self.pos_embed = nn.Parameter(torch.zeros(1, {'1 + ' * prefix}g * g, cfg.widths[0]))"
                 "  # one per token"]
    total = sum(st.depth for st in spec.stages)
    rates = f"torch.linspace(0, cfg.drop_path, {total}).tolist()" if total > 1 else "[cfg.drop_path]"
    init += [f"        rates = iter({rates})  # drop-path rate of each block, up to cfg.drop_path",
             "        self.stages = nn.ModuleList()"]
    g_side = side
    for i, st in enumerate(spec.stages):
        mixers = st.mixers()
        tms = {t for t, _ in mixers}
        prev = spec.stages[i - 1].width if i else w0
        down, what = None, ""
        if st.downsample == "conv3":
            down, what = "Downsample(nn.Conv2d(cfg.widths[{p}], dim, 3, 2, 1))", "3x3 stride-2 conv"
        elif st.downsample == "patch2":
            down, what = "PatchMerging(cfg.widths[{p}], dim)", "2x2 patch merging"
        elif i and st.width != prev:
            down, what = "Downsample(nn.Conv2d(cfg.widths[{p}], dim, 1))", "1x1 conv to the new width"
        new_side = (g_side + 1) // 2 if st.downsample != "none" else g_side
        uniq = sorted(set(mixers), key=mixers.index)
        blocks_what = f"{st.depth} block{'s' * (st.depth > 1)}"
        if st.downsample != "none":
            entry = (f"a {what} halves the grid ({g_side}x{g_side} -> {new_side}x{new_side} at {n0} px), "
                     f"then {blocks_what}")
        else:
            entry = (f"a {what}, then " if down else "") + f"{blocks_what} on the {g_side}x{g_side} grid"
        init.append(f"        # stage {i}, {st.width} channels: {entry}")
        g_side = new_side
        local = ["dim"] + (["heads"] if tms & heads_mixers else []) + ["ratio"] + (["ls"] if ls_any else [])
        src = {"dim": f"cfg.widths[{i}]", "heads": f"cfg.heads[{i}]", "ratio": f"cfg.mlp_ratios[{i}]",
               "ls": f"cfg.layer_scales[{i}]"}
        init.append(f"        {', '.join(local)} = {', '.join(src[v] for v in local)}")
        if st.downsample != "none" and i <= need_grid_until:
            init.append("        g = (g + 1) // 2")
        norm = NORMS[st.norm]
        tail = f"{norm}, next(rates)" + (", ls" if ls_any else "")
        block = "Block(dim, {}, {}, " + tail + ")"
        ds = "None" if down is None else down.format(p=i - 1)
        calls = [block.format(TOKEN_MIXERS[t][1], CHANNEL_MIXERS[c][1]) for t, c in mixers]
        one = f"        self.stages.append(Stage({ds}, [{calls[0]}]))"
        if len(mixers) == 1 and len(one) <= 120:
            init.append(one)
        elif len(uniq) == 1 and len(mixers) > 1:
            init += [f"        self.stages.append(Stage({ds}, [",
                     *_fit(f"            {calls[0]} for _ in range({st.depth})"),
                     "        ]))"]
        else:
            init.append(f"        self.stages.append(Stage({ds}, [")
            init += [ln for call in calls for ln in _fit(f"            {call},")]
            init.append("        ]))")
    head_norm = NORMS[spec.head.norm]
    init += [f"        self.head_norm = {head_norm}(cfg.widths[-1])" if head_norm != "nn.Identity"
             else "        self.head_norm = nn.Identity()",
             "        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()",
             "        self.init_weights()"]

    skip_dt = ' and not name.endswith("dt_proj")' if "ssm" in uses else ""
    weights_init = [
        "    def init_weights(self) -> None:",
        '        """ViT/DeiT initialisation: Linear and Conv2d weights truncated-normal (std 0.02), biases 0."""',
        "        for name, m in self.named_modules():",
        "            if isinstance(m, (nn.Linear, nn.Conv2d)):",
        "                nn.init.trunc_normal_(m.weight, std=0.02)",
        f"                if m.bias is not None{skip_dt}:" + ("  # Mamba's delta bias keeps its own init"
                                                             if skip_dt else ""),
        "                    nn.init.zeros_(m.bias)",
    ]
    if pos:
        weights_init.append("        nn.init.trunc_normal_(self.pos_embed, std=0.02)")
    if cls_tok:
        weights_init.append("        nn.init.normal_(self.cls_token, std=1e-6)")
    if "name" not in skip_dt:
        weights_init[2] = "        for m in self.modules():"

    feats = ["    def forward_features(self, x: Tensor) -> Tensor:",
             '        """(B, C, H, W) images -> the last stage\'s features, in the layout its last block left."""',
             f"        x = self.stem(x)  # (B, {in_chans}, H, W) -> (B, {w0}, h, w)",
             "        hw = (x.shape[-2], x.shape[-1])"]
    if cls_tok or pos:
        feats.append("        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C) tokens")
    if cls_tok:
        feats.append("        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)"
                     "  # (B, 1 + h*w, C)")
    if pos:
        feats.append("        x = x + self.position_embedding(hw)")
    feats += ["        for stage in self.stages:", "            x, hw = stage(x, hw)", "        return x"]

    pos_fn: list[str] = []
    if pos:
        pos_fn = [
            "    def position_embedding(self, hw: tuple[int, int]) -> Tensor:",
            '        """The learned position table, resized bicubically for a grid other than the training one."""',
            "        if hw == self.pos_grid:",
            "            return self.pos_embed",
            *(["        prefix, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # the class token's, the grid's"]
              if prefix else ["        grid = self.pos_embed"]),
            "        grid = grid.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)  # (1, h*w, C) -> (1, C, h, w)",
            "        grid = F.interpolate(grid, size=hw, mode=\"bicubic\", align_corners=False)",
            "        grid = grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], -1)  # back to (1, h*w, C)",
            "        return torch.cat([prefix, grid], dim=1)" if prefix else "        return grid",
            "",
        ]

    if cls_tok:
        pool = "        x = x[:, 0]  # the class token: (B, C)"
    elif last_layout == "nchw":
        pool = "        x = x.mean(dim=(2, 3))  # average over the grid: (B, C, h, w) -> (B, C)"
    else:
        pool = "        x = x.mean(dim=1)  # average over the tokens: (B, N, C) -> (B, C)"
    head_call = "self.head_norm(x)" if head_norm in ("LayerNormAny", "nn.Identity") else \
        "self.head_norm(x[:, :, None, None]).flatten(1)"
    head = ["    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:",
            '        """Pooled, normalized features (pre_logits) or class logits."""',
            pool,
            f"        x = {head_call}",
            "        return x if pre_logits else self.head(x)"]

    stage_count = len(spec.stages)
    doc = (f"A MetaFormer (Yu et al. 2022, MetaFormer Is Actually What You Need for Vision): stem, "
           f"{stage_count} stage{'s' * (stage_count > 1)} of\n    token- and channel-mixer blocks, "
           f"{'class-token' if cls_tok else 'average'} pooling, classifier (timm's forward_features / forward_head).")
    model = "\n".join([
        f"class {cls}(nn.Module):",
        f'    """{doc}"""',
        "",
        "    def __init__(self, cfg: Config) -> None:",
        "        super().__init__()",
        "        self.cfg = cfg",
        *init,
        "",
        *weights_init,
        "",
        *feats,
        "",
        *pos_fn,
        *head,
        "",
        "    def forward(self, x: Tensor) -> Tensor:",
        "        return self.forward_head(self.forward_features(x))",
    ])

    # ---- Config, build_model, preprocess, precision, timm ----------------------------------------------
    widths = tuple(st.width for st in spec.stages)
    heads = tuple(st.heads for st in spec.stages)
    ratios = tuple(st.mlp_ratio for st in spec.stages)
    config = [
        "@dataclass",
        "class Config:",
        '    """The sizes of this architecture (the spec in the header); build_model() takes any of them."""',
        "",
        f"    num_classes: int = {num_classes}  # classifier outputs (0: no classifier, features only)",
        f"    img_size: int = {img_size}  # training resolution: sets the token grids built into the weights",
        f"    in_chans: int = {in_chans}",
        "    drop_path: float = 0.0  # stochastic depth of the last block (training only)",
        f"    widths: tuple[int, ...] = {widths!r}  # channels per stage",
        f"    heads: tuple[int, ...] = {heads!r}  # attention heads per stage (1 where no mixer has heads)",
        f"    mlp_ratios: tuple[float, ...] = {ratios!r}  # channel-mixer hidden width / width",
    ]
    if ls_any:
        config.append(f"    layer_scales: tuple[float | None, ...] = {tuple(st.layer_scale for st in spec.stages)!r}"
                      "  # LayerScale init (CaiT)")
    norm = normalization(in_chans, meta)
    source_comment = "\n".join(textwrap.wrap(
        f"The input the model was trained on: per-channel mean and std, in pixel units of [0, 1], of "
        f"{norm['source']}. preprocess() applies them.", 100, initial_indent="# ", subsequent_indent="# ",
        break_on_hyphens=False))
    act_dtype = _DTYPES.get(spec.precision, "torch.float32")
    build = f'''

def build_model(precision: str = PRECISION, seed: int = 0, **config: Any) -> {cls}:
    """The network for Config(**config) (e.g. num_classes=100), initialised from ``seed``: seed 0
    gives the weights the search started from. precision "bf16" / "fp16" casts the parameters
    (load_state_dict casts float32 weights on load); "fp32", "int8" and "fp8" keep float32."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        model = {cls}(Config(**config))
    dtype = {{"bf16": torch.bfloat16, "fp16": torch.float16}}.get(precision)
    return model if dtype is None else model.to(dtype)


{source_comment}
MEAN = {tuple(float(v) for v in norm["mean"])!r}
STD = {tuple(float(v) for v in norm["std"])!r}


def preprocess(images: Tensor, size: int = Config.img_size, dtype: torch.dtype = {act_dtype}) -> Tensor:
    """(B, C, H, W) uint8 images (0-255) or floats in [0, 1] -> the model's input: resized to ``size``
    (bilinear, antialiased, as in training), normalized with MEAN and STD, as ``dtype``."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()  # pixels in [0, 1]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (MEAN, STD))  # (1, C, 1, 1)
    return ((x - mean) / std).to(dtype)
'''
    precision = ""
    if quant:
        layer = "Int8Linear" if spec.precision == "int8" else "Fp8Linear"
        fits = " and not (child.in_features % 16 or child.out_features % 16)" if spec.precision == "fp8" else ""
        keep = ' and name != "dt_proj"' if "ssm" in uses else ""
        if keep and fits:  # too long for one line
            fits = fits.replace(" and not", " \\\n                    and not")
        why = ("\n            # dt_proj's weight is read directly by the Mamba branch, in float32: it stays"
               if keep else "")
        why += ("\n            # torch._scaled_mm takes sizes that are multiples of 16 only" if fits else "")
        cast = "\n    model.to(torch.bfloat16)  # the rest of the network runs in bfloat16" \
            if spec.precision == "fp8" else ""
        convert = f'''def to_precision(model: nn.Module) -> nn.Module:
    """The model in eval mode at {spec.precision}: every nn.Linear swapped for a {layer}.
    Call it after load_state_dict (the state dict changes)."""
    model.eval(){cast}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):{why}
            if type(child) is nn.Linear{keep}{fits}:
                setattr(parent, name, {layer}(child))
    return model.eval()'''
        precision = "\n\n\n".join([_render(d.text, flags) for d in precision_defs] + [convert])
        precision = f"\n\n# {spec.precision} inference: convert a trained model with to_precision(model).\n\n\n" \
            + precision + "\n"
    timm = f'''

def {fn_name}(pretrained: bool = False, **kwargs: Any) -> {cls}:
    """timm entry point: timm.create_model("{fn_name}", num_classes=..., img_size=...)."""
    if pretrained:
        raise ValueError("{fn_name}: no pretrained weights ship with this file; load a state dict instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's, not the model's
        kwargs.pop(key, None)
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    return build_model(**kwargs)


try:  # importing this file registers the model with timm, when timm is installed
    from timm.models import register_model
except Exception:  # timm missing or not importable: the file works without it
    register_model = None
if register_model is not None:
    register_model({fn_name})
'''
    constants = (f'\nSPEC_HASH = "{spec.hash}"\nMODEL_NAME = "{fn_name}"  # its name for timm\n'
                 f'PRECISION = "{spec.precision}"\n')
    body = ("\n\n\n" + blocks + "\n\n\n" + "\n".join(config) + "\n\n\n" + model + "\n\n" + constants + build
            + precision + timm)
    header = _header(spec, cls, params, {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans},
                     meta, norm)
    used = {n.id for n in ast.walk(ast.parse(body)) if isinstance(n, ast.Name)}
    std = [line for name, line in _IMPORTS[:3] if name in used]
    third = [line for name, line in _IMPORTS[3:] if name in used]
    if used & {"Tensor", "nn"}:
        third.append("from torch import " + ", ".join(n for n in ("Tensor", "nn") if n in used))
    imports = "\n\n".join(["from __future__ import annotations", "\n".join(std), "\n".join(third)])
    code = header + "\n" + imports + body
    ast.parse(code)  # a generator bug must never write a broken file
    return code


def file_stats(code: str) -> dict[str, int]:
    """Line counts of a Python file: ``lines``; ``code`` (lines with code other than a docstring);
    ``comments`` (lines holding a ``#`` comment, alone or after code); ``docstring``; ``blank``."""
    import io
    import tokenize

    code_lines: set[int] = set()
    comment_lines: set[int] = set()
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(code)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            doc_lines |= set(range(body[0].lineno, body[0].end_lineno + 1))  # type: ignore[operator]
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            comment_lines.add(tok.start[0])
        elif tok.type not in skip and tok.start[0] not in doc_lines:
            code_lines |= set(range(tok.start[0], tok.end[0] + 1))
    lines = code.splitlines()
    return {"lines": len(lines), "code": len(code_lines), "comments": len(comment_lines),
            "docstring": len(doc_lines), "blank": sum(1 for ln in lines if not ln.strip())}
