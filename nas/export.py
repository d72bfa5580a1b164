"""Export an architecture as one standalone PyTorch file (imports only ``torch`` and ``math``).

The file is cut out of the project's own source, not re-written: the layer classes in
``search_spaces/layers/*.py`` and the assembly in ``search_spaces/hybrid_vit.py`` are parsed with
``ast``; the top-level classes, functions and constants the spec needs are collected (following
name references transitively) and copied verbatim as source text, in dependency order, with three
edits: registry decorators and ``ClassVar`` annotations are dropped, ``ArchSpec``-style
annotations name the file's ``Config`` view of the embedded spec dict, and the model class gets a
name derived from the spec hash. So its ``state_dict`` keys and shapes (and, for the same seed,
its initial weights) equal ``search_spaces.hybrid_vit.build(spec)``'s, like nanoGPT's single model
file. Only validated values are written into code: the spec is re-parsed with
``ArchSpec.from_json`` and embedded as the ``repr`` of its canonical dict.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import keyword
import math
import os
import pprint
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces.spec import ArchSpec

# modules the file is cut from, in emission order; (module, names allowed, or None for all)
_LAYER_MODULES = (
    "search_spaces.layers._scan",
    "search_spaces.layers._selective_scan",
    "search_spaces.layers.common",
    "search_spaces.layers.norm",
    "search_spaces.layers.attention",
    "search_spaces.layers.linear_attention",
    "search_spaces.layers.gated_linear",
    "search_spaces.layers.ssm",
    "search_spaces.layers.spectral",
    "search_spaces.layers.conv_mixers",
    "search_spaces.layers.channel_mixers",
)
_ASSEMBLY = ("search_spaces.hybrid_vit", frozenset({
    "_conv_out", "stem_grid", "downsample_grid", "init_weights", "Stem", "Downsample", "LayerScale",
    "DropPath", "Block", "Stage", "HybridViT",
}))
_PRECISION = ("predictors.precision", frozenset({
    "INT8_MAX", "FP8_MAX", "_EPS", "_channels_last_apply", "_LowPrecisionLinear", "Int8Linear", "Fp8Linear",
    "_replace_linears",
}))
_REGISTRY_DECORATORS = frozenset({"token_mixer", "channel_mixer", "register_space"})
_SPEC_TYPES = frozenset({"ArchSpec", "StemSpec", "StageSpec", "HeadSpec", "BlockSpec"})
_DROP_METHODS = {"HybridViT": frozenset({"pieces"})}  # latency-table plumbing, not part of a model file
_IMPORTS = (  # (name the code uses, import line), in isort order
    ("math", "import math"),
    ("torch", "import torch"),
    ("F", "import torch.nn.functional as F"),
)


@dataclass
class _Def:
    name: str
    module: str
    order: tuple[int, int]
    node: ast.stmt
    source: str  # the module's full source
    deps: set[str] = field(default_factory=set)


@functools.cache
def _definitions() -> dict[str, _Def]:
    """Every top-level definition of the source modules, by name (a name defined twice raises)."""
    table: dict[str, _Def] = {}
    groups = [(m, None) for m in _LAYER_MODULES] + [_ASSEMBLY, _PRECISION]
    for mi, (modname, allowed) in enumerate(groups):
        __import__(modname)
        source = inspect.getsource(sys.modules[modname])
        tree = ast.parse(source)
        for si, node in enumerate(tree.body):
            names: list[str] = []
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                if name == "__all__" or (allowed is not None and name not in allowed):
                    continue
                if name in table:
                    raise RuntimeError(f"export: {name!r} is defined in both {table[name].module} and {modname}")
                table[name] = _Def(name, modname, (mi, si), node, source)
    for d in table.values():
        used = {n.id for n in ast.walk(d.node) if isinstance(n, ast.Name)}
        d.deps = {n for n in used if n in table and n != d.name}
    return table


def _ordered(roots: list[str]) -> list[_Def]:
    """The roots and everything they reference, dependencies first (DFS post-order, source order)."""
    table = _definitions()
    seen: set[str] = set()
    out: list[_Def] = []

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        d = table[name]
        for dep in sorted(d.deps, key=lambda n: table[n].order):
            visit(dep)
        out.append(d)

    for r in sorted(roots, key=lambda n: table[n].order):
        visit(r)
    return out


def _offsets(source: str) -> list[int]:
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def _render(d: _Def, renames: dict[str, str]) -> str:
    """The definition's source text with decorators, ClassVar annotations, spec-type names and
    dropped methods edited out (by position, so comments and formatting stay as written)."""
    src, node = d.source, d.node
    starts = _offsets(src)

    def pos(line: int, col: int) -> int:
        return starts[line - 1] + len(src[starts[line - 1]:].encode()[:col].decode())

    first = min([node.lineno] + [dec.lineno for dec in getattr(node, "decorator_list", [])])
    begin, end = starts[first - 1], starts[node.end_lineno]  # type: ignore[index]  (keeps a trailing noqa)
    edits: list[tuple[int, int, str]] = []
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Name) and target.id in _REGISTRY_DECORATORS:
            edits.append((starts[dec.lineno - 1], starts[dec.end_lineno], ""))  # type: ignore[index]
    for sub in ast.walk(node):
        if isinstance(sub, ast.ClassDef):
            for stmt in sub.body:
                ann = getattr(stmt, "annotation", None)
                if (isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(ann, ast.Subscript)
                        and isinstance(ann.value, ast.Name) and ann.value.id == "ClassVar"):
                    edits.append((pos(stmt.target.end_lineno, stmt.target.end_col_offset),
                                  pos(ann.end_lineno, ann.end_col_offset), ""))
            for stmt in sub.body:
                if isinstance(stmt, ast.FunctionDef) and stmt.name in _DROP_METHODS.get(sub.name, ()):
                    lo = min([stmt.lineno] + [x.lineno for x in stmt.decorator_list])
                    edits.append((starts[lo - 2] if src[starts[lo - 2]:starts[lo - 1]].strip() == "" else
                                  starts[lo - 1], starts[stmt.end_lineno], ""))  # type: ignore[index]
        elif isinstance(sub, ast.Name) and sub.id in renames:
            edits.append((pos(sub.lineno, sub.col_offset), pos(sub.end_lineno, sub.end_col_offset),
                          renames[sub.id]))
        elif (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "numbers"
              and sub.attr == "Real"):  # the one stdlib module the layers use besides math
            edits.append((pos(sub.lineno, sub.col_offset), pos(sub.end_lineno, sub.end_col_offset),
                          "(int, float)"))
    if isinstance(node, ast.ClassDef) and node.name in renames:
        at = pos(node.lineno, node.col_offset) + len("class ")
        edits.append((at, at + len(node.name), renames[node.name]))
    text = src[begin:end]
    for a, b, new in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:a - begin] + new + text[b - begin:]
    return text.rstrip() + "\n"


def _used_names(code: str) -> set[str]:
    tree = ast.parse(code)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _class_name(spec: ArchSpec, class_name: str | None) -> str:
    name = class_name or f"HybridViT{spec.hash[:8]}"
    if not name.isidentifier() or not name[0].isupper() or name in _definitions():
        raise ValueError(f"class name {name!r} must be a CapWords Python identifier not used by a block")
    return name


def _literal(name: str, value: Any) -> str:
    """``NAME = <repr>`` wrapped to 110 columns, continuation lines aligned under the value."""
    text = pprint.pformat(value, width=110 - len(name) - 3, sort_dicts=False)
    pad = " " * (len(name) + 3)
    return f"{name} = " + text.replace("\n", "\n" + pad) + "\n"


def _docstring(spec: ArchSpec, cls: str, params: int, num_classes: int, img_size: int, in_chans: int,
               metadata: dict[str, Any] | None) -> str:
    lines = [
        f"{cls}: a hybrid_vit architecture exported by hybrid-NAS (`nas export`) as a standalone file.",
        "",
        "Imports only torch (and math). build_model() returns the network; its state_dict keys and shapes",
        "equal search_spaces.hybrid_vit.build(spec)'s, so weights saved from the search load directly:",
        "",
        "    model = build_model()",
        "    model.load_state_dict(safetensors.torch.load_file('model.safetensors'))  # nas export --weights",
        "    # or model.load_state_dict(torch.load('state_dict.pt')) for a state dict saved by torch.save",
        "",
        *textwrap.wrap(f"architecture: {spec.short()}", 110, subsequent_indent="    ", break_on_hyphens=False),
        f"hash: {spec.hash}",
        f"parameters: {params:,} (num_classes={num_classes}, img_size={img_size}, in_chans={in_chans})",
        f"precision: {spec.precision}",
    ]
    if spec.precision in ("bf16", "fp16"):
        lines.append(f"  build_model() casts the model to {spec.precision}; build_model(precision='fp32') keeps fp32.")
    elif spec.precision in ("int8", "fp8"):
        lines.append("  build_model() returns fp32 (state-dict compatible); to_precision(model) after loading the")
        lines.append(f"  weights swaps every nn.Linear for an {spec.precision} one.")
        if spec.precision == "fp8":
            lines.append("  fp8 runs through torch._scaled_mm, which is fast on CUDA GPUs of capability >= 8.9.")
    if metadata:
        lines.append("")
        lines.append("metadata:")
        lines += ["    " + ln for ln in json.dumps(metadata, indent=2, sort_keys=True, default=str).splitlines()]
    lines.append("")
    lines.append("spec (canonical JSON):")
    lines += ["    " + ln for ln in spec.to_json(indent=2).splitlines()]
    text = "\n".join(ln.rstrip() for ln in lines)
    # the header is data, not code: keep it a plain string whatever the metadata holds
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'"""{text}\n"""\n'


def generate(spec: ArchSpec, *, num_classes: int, img_size: int, in_chans: int, class_name: str | None = None,
             metadata: dict[str, Any] | None = None) -> str:
    """The source of a standalone model file for ``spec`` (see the module docstring).

    Raises ``ValueError`` for an invalid spec, a bad class name or sizes the spec cannot take."""
    from search_spaces.hybrid_vit import build
    from search_spaces.registry import get_channel_mixer, get_token_mixer

    if not isinstance(spec, ArchSpec):
        raise TypeError(f"generate() needs an ArchSpec, got {type(spec).__name__}")
    spec = ArchSpec.from_json(spec.to_json())  # validated, canonical
    for name, v, low in (("num_classes", num_classes, 0), ("img_size", img_size, 1), ("in_chans", in_chans, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if metadata is not None:
        json.dumps(metadata, default=str)  # must be JSON-able
    cls = _class_name(spec, class_name)
    params = sum(p.numel() for p in build(spec, num_classes, img_size, in_chans).parameters())

    pairs = [p for st in spec.stages for p in st.mixers()]
    tms = sorted({t for t, _ in pairs})
    cms = sorted({c for _, c in pairs})
    tm_cls = {t: get_token_mixer(t).__name__ for t in tms}
    cm_cls = {c: get_channel_mixer(c).__name__ for c in cms}
    renames = {n: "Config" for n in _SPEC_TYPES} | {"HybridViT": cls}
    quant = spec.precision in ("int8", "fp8")

    layer_roots = list(tm_cls.values()) + list(cm_cls.values()) + ["to_layout", "make_norm"]
    assembly_roots = sorted(_ASSEMBLY[1])
    precision_roots = ["_replace_linears", "Int8Linear" if spec.precision == "int8" else "Fp8Linear"] if quant else []
    defs = _ordered(layer_roots + assembly_roots + precision_roots)
    table = _definitions()
    layers = [d for d in defs if d.module in _LAYER_MODULES]
    assembly = [d for d in defs if d.module == _ASSEMBLY[0]]
    precision_defs = [d for d in defs if d.module == _PRECISION[0]]

    def section(title: str) -> str:
        bar = "# " + "-" * 98
        return f"\n\n{bar}\n# {title}\n{bar}\n"

    def join(ds: list[_Def]) -> str:
        out: list[str] = []
        for d in ds:
            funcs = (ast.ClassDef, ast.FunctionDef)
            blank = "\n\n" if isinstance(d.node, funcs) or (out and isinstance(table[out[-1][0]].node, funcs)) else ""
            out.append((d.name, ("\n" + blank if out else "\n") + _render(d, renames)))
        return "".join(t for _, t in out)

    tm_table = "{\n" + "".join(f"    {json.dumps(k)}: {v},\n" for k, v in tm_cls.items()) + "}"
    cm_table = "{\n" + "".join(f"    {json.dumps(k)}: {v},\n" for k, v in cm_cls.items()) + "}"
    fn_name = f"hybrid_vit_{spec.hash[:8]}" if class_name is None else _snake(cls)

    body = section("blocks (from search_spaces/layers)") + join(layers)
    body += section("the mixers this architecture uses, by spec name") + f"""
TOKEN_MIXERS: dict[str, type[nn.Module]] = {tm_table}
CHANNEL_MIXERS: dict[str, type[nn.Module]] = {cm_table}


def get_token_mixer(name: str) -> type[nn.Module]:
    return TOKEN_MIXERS[name]


def get_channel_mixer(name: str) -> type[nn.Module]:
    return CHANNEL_MIXERS[name]


class Config:
    \"\"\"Read-only attribute view of the spec dict: nested dicts become Configs, lists tuples.\"\"\"

    def __init__(self, data: dict) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                value = Config(value)
            elif isinstance(value, list):
                value = tuple(Config(v) if isinstance(v, dict) else v for v in value)
            setattr(self, key, value)

    def mixers(self) -> list[tuple[str, str]]:
        \"\"\"(token mixer, channel mixer) of every block of a stage.\"\"\"
        if self.blocks:
            return [(b.token_mixer, b.channel_mixer) for b in self.blocks]
        return [(self.token_mixer, self.channel_mixer)] * self.depth
"""
    body += section("assembly (from search_spaces/hybrid_vit.py)") + join(assembly)
    if precision_defs:
        body += section(f"{spec.precision} linear layers (from predictors/precision.py)") + join(precision_defs)
    body += section("this architecture") + "\n" + _literal("SPEC", spec.to_dict())
    body += f"""SPEC_HASH = {json.dumps(spec.hash)}
MODEL_NAME = {json.dumps(fn_name)}
PRECISION = {json.dumps(spec.precision)}
NUM_CLASSES, IMG_SIZE, IN_CHANS = {num_classes!r}, {img_size!r}, {in_chans!r}
_DTYPES = {{"bf16": torch.bfloat16, "fp16": torch.float16}}


def build_model(num_classes: int = NUM_CLASSES, img_size: int = IMG_SIZE, in_chans: int = IN_CHANS,
                precision: str = PRECISION, drop_path: float = 0.0, seed: int = 0) -> {cls}:
    \"\"\"The network, freshly initialised from ``seed`` (the same weights as the search's build(spec)).

    ``precision``: "bf16" / "fp16" cast the model (load_state_dict casts fp32 weights on load);
    "fp32", "int8" and "fp8" give fp32 parameters: for int8/fp8 load the weights, then call
    ``to_precision(model)`` where this file defines it (exports of int8/fp8 specs).\"\"\"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = {cls}(Config(SPEC), num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                      drop_path=drop_path)
    if precision in _DTYPES:
        model.to(_DTYPES[precision])
    return model
"""
    if quant:
        if spec.precision == "int8":
            make = "Int8Linear.from_float"
            extra = ""
        else:
            make = "lambda m: Fp8Linear.from_float(m) if Fp8Linear.fits(m) else None"
            extra = "    model.to(torch.bfloat16)\n"
        body += f"""

def to_precision(model: nn.Module) -> nn.Module:
    \"\"\"The model in eval mode at {spec.precision}: every nn.Linear (except those a block reads directly)
    swapped for a {spec.precision} layer. Call after load_state_dict; the state dict changes.\"\"\"
    model.eval()
{extra}    _replace_linears(model, {make})
    return model.eval()
"""
    body += f"""

def {fn_name}(pretrained: bool = False, **kwargs) -> {cls}:
    \"\"\"timm entry point: ``timm.create_model("{fn_name}", num_classes=..., img_size=...)``.\"\"\"
    if pretrained:
        raise ValueError("{fn_name}: no pretrained weights ship with this file; load a state dict instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return build_model(**kwargs)


try:  # importing this file registers the model with timm when timm is installed
    from timm.models import register_model
except Exception:  # timm missing (or not importable): the file works without it
    register_model = None
if register_model is not None:
    register_model({fn_name})
"""
    header = _docstring(spec, cls, params, num_classes, img_size, in_chans, metadata)
    used = _used_names(body)
    imports = [line for name, line in _IMPORTS if name in used]
    if used & {"Tensor", "nn"}:
        imports.append("from torch import " + ", ".join(n for n in ("Tensor", "nn") if n in used))
    std = [line for line in imports if line == "import math"]
    third = [line for line in imports if line != "import math"]
    blocks = ["from __future__ import annotations", *(["\n".join(std)] if std else []), "\n".join(third)]
    code = header + "\n" + "\n\n".join(blocks) + body
    ast.parse(code)  # a generator bug must never write a broken file
    return code


def _snake(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out if out.isidentifier() else "model"


__all__ = ["PICKS", "ExportError", "generate", "pick_from_study"]


# --------------------------------------------------------------------------------------------
# the study form: which architecture of a study to export
# --------------------------------------------------------------------------------------------

PICKS = ("accuracy", "latency", "knee")


class ExportError(ValueError):
    """An export request that cannot be served (one line: what was wrong and what to do)."""


def _knee(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The front point farthest from the line through its two extremes, both objectives scaled to
    [0, 1] (the usual knee of a 2-D Pareto front); the most accurate when the front has < 3 points."""
    pts = [(r["metrics"]["accuracy"], r["metrics"]["latency_ms"]) for r in rows]
    if len(pts) < 3:
        return rows[0]
    a_lo, a_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    t_lo, t_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    norm = [((a_hi - a) / max(a_hi - a_lo, 1e-12), (t - t_lo) / max(t_hi - t_lo, 1e-12)) for a, t in pts]
    # extremes: most accurate (0, y1) and fastest (x2, 0); distance of each point to that line
    i_acc = min(range(len(norm)), key=lambda i: norm[i][0])
    i_fast = min(range(len(norm)), key=lambda i: norm[i][1])
    (x1, y1), (x2, y2) = norm[i_acc], norm[i_fast]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    dist = [abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / length for x, y in norm]
    return rows[max(range(len(rows)), key=lambda i: dist[i])]


def pick_from_study(store: Any, name: str, *, pick: str | None = None, trial: int | None = None,
                    arch: str | None = None) -> tuple[ArchSpec, dict[str, Any], dict[str, int]]:
    """The spec of one architecture of study ``name`` (``pick`` from its front, an Optuna ``trial``
    number, or an ``arch`` hash or unique prefix), its metadata (metrics, device fingerprint, study)
    and its build sizes (num_classes, img_size, in_chans) from the study's frame."""
    info = store.get_study(name)
    if info is None:
        raise ExportError(f"no study {name!r} in {store.url}; `nas studies` lists them")
    if sum(x is not None for x in (pick, trial, arch)) > 1:
        raise ExportError("give one of --pick, --trial or --arch")
    evals = store.evaluations(name, errors=False)
    if trial is not None:
        hashes = {e.arch_hash for e in evals if e.trial == trial and e.arch_hash}
        if not hashes:
            raise ExportError(f"study {name!r} has no finished trial {trial}; `nas show {name}` lists them")
        h = hashes.pop()
    elif arch is not None:
        if not all(c in "0123456789abcdef" for c in arch.lower()) or not 4 <= len(arch) <= 64:
            raise ExportError(f"--arch must be 4 to 64 hex digits of an architecture hash, got {arch!r}")
        hashes = {e.arch_hash for e in evals if e.arch_hash and e.arch_hash.startswith(arch.lower())}
        if len(hashes) != 1:
            what = "no architecture" if not hashes else f"{len(hashes)} architectures"
            raise ExportError(f"{what} of study {name!r} match hash {arch!r}; give more digits")
        h = hashes.pop()
    else:
        front = [r for r in store.front(name) if "accuracy" in r["metrics"] and "latency_ms" in r["metrics"]]
        if not front:
            raise ExportError(f"study {name!r} has no Pareto front yet; run or resume it first")
        how = pick or "accuracy"
        if how not in PICKS:
            raise ExportError(f"--pick must be one of {', '.join(PICKS)}, got {how!r}")
        if how == "accuracy":
            row = max(front, key=lambda r: r["metrics"]["accuracy"])
        elif how == "latency":
            row = min(front, key=lambda r: r["metrics"]["latency_ms"])
        else:
            row = _knee(sorted(front, key=lambda r: -r["metrics"]["accuracy"]))
        h = row["arch_hash"]
    rec = store.architecture(h)
    if rec is None:
        raise ExportError(f"architecture {h[:12]} is not in the store")
    spec = ArchSpec.from_dict(rec["spec"] if isinstance(rec["spec"], dict) else json.loads(rec["spec"]))
    if spec.hash != h:
        raise ExportError(f"stored spec of {h[:12]} does not match its hash; the store is damaged")
    metrics: dict[str, Any] = {}
    device: dict[str, Any] | None = None
    for e in evals:  # later stages refine earlier ones: screen < supernet < latency < train
        if e.arch_hash == h:
            metrics.update({f"{e.stage}.{k}": v for k, v in e.metrics.items()})
            if e.device_key and e.stage in ("latency", "train"):
                device = next((d["fingerprint"] for d in store.devices() if d["key"] == e.device_key), device)
    frame = info.config.get("frame_json") or {}
    sizes = {"num_classes": int(frame.get("num_classes", 10)), "img_size": int(frame.get("img_size", 32)),
             "in_chans": int(frame.get("in_chans", 3))}
    meta = {"study": name, "data": info.config.get("data"), "metrics": metrics,
            "device": device}
    return spec, meta, sizes


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

def onnx_blockers(spec: ArchSpec) -> list[str]:
    """The reasons ``spec`` cannot be exported to ONNX (empty when it can): one per mixer it uses
    whose class declares an ``onnx_blocker`` (token mixers first, each kind by name)."""
    from search_spaces.registry import get_channel_mixer, get_token_mixer

    pairs = [p for st in spec.stages for p in st.mixers()]
    out = []
    for kind, names, get in (("token", {t for t, _ in pairs}, get_token_mixer),
                             ("channel", {c for _, c in pairs}, get_channel_mixer)):
        out += [f"{kind} mixer {m!r}: {get(m).onnx_blocker}" for m in sorted(names) if get(m).onnx_blocker]
    return out


def export_onnx(model: Any, spec: ArchSpec, in_chans: int, img_size: int,
                opset: int = 17) -> tuple[bytes, float]:
    """The ONNX bytes of ``model`` (fp32, dynamic batch) and the largest difference between ONNX
    Runtime's and torch's outputs on a random batch of 2, divided by the output scale when above 1.
    Every exportable mixer agrees to < 1e-6. Raises ExportError when a mixer of ``spec`` cannot be
    exported or ONNX Runtime is missing."""
    import io

    import torch

    blockers = onnx_blockers(spec)
    if blockers:
        raise ExportError(f"this architecture cannot be exported to ONNX: {'; '.join(blockers)}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--onnx needs onnxruntime to check the export (pip install onnxruntime)") from None
    model = model.float().eval()
    x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    data = buf.getvalue()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return data, float(abs(got - ref).max() / max(1.0, float(abs(ref).max())))


# --------------------------------------------------------------------------------------------
# writing an export: the model file, and optionally weights (safetensors) and ONNX
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    """What :func:`write_export` wrote."""

    spec: ArchSpec
    out: Path
    weights: Path | None = None
    weights_source: str = "initial"
    onnx: Path | None = None
    onnx_error: float = 0.0


def _shown(path: Path, n: int = 80) -> str:
    """A path for a message, cut to about ``n`` characters."""
    text = str(path)
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_writable(flag: str, path: Path) -> None:
    """ExportError unless ``path`` can be written: it is not a folder, and its folder exists and is
    writable, or the nearest existing ancestor is (the missing folders are created on writing)."""
    try:
        if path.is_dir():
            raise ExportError(f"{flag} {_shown(path)} is a directory; pass a file name")
        parent = path.parent if str(path.parent) else Path(".")
        while not parent.exists():
            if parent.parent == parent:
                break
            parent = parent.parent
        if not parent.is_dir():
            raise ExportError(f"{flag} {_shown(path)}: {_shown(parent)} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ExportError(f"{flag} {_shown(path)}: folder {_shown(parent)} is not writable; write elsewhere")
        if path.exists() and not os.access(path, os.W_OK):
            raise ExportError(f"{flag} {_shown(path)} exists and is read-only; remove it or write elsewhere")
    except OSError as e:  # a name too long, a loop of links, ...
        raise ExportError(f"{flag} {_shown(path)} cannot be written: {e.strerror or type(e).__name__}") from None


def check_paths(out: Path, weights: Path | None = None, onnx: Path | None = None) -> None:
    """Refuse output paths an export cannot write (ExportError, before anything is written)."""
    _check_writable("--out", out)
    if out.suffix != ".py" or not out.stem.isidentifier() or keyword.iskeyword(out.stem):
        raise ExportError(f"--out {_shown(out)} must be an importable file name ending in .py (e.g. model.py)")
    if weights is not None:
        if weights.suffix != ".safetensors":
            raise ExportError(f"--weights {_shown(weights)} must be a file name ending in .safetensors")
        _check_writable("--weights", weights)
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise ExportError("--weights needs the safetensors package (pip install safetensors)") from None
    if onnx is not None:
        if onnx.suffix != ".onnx":
            raise ExportError(f"--onnx {_shown(onnx)} must be a file name ending in .onnx")
        _check_writable("--onnx", onnx)


def check_forward(code: str, img_size: int, in_chans: int) -> None:
    """Run the generated file's ``build_model()`` (fp32) on a batch of two images, in eval and in
    train mode: ExportError (one line) when the architecture cannot take these sizes."""
    import torch

    namespace: dict[str, Any] = {"__name__": "nas_export_check"}
    # the exact file that is about to be written, but not registered with timm (this is only a check)
    code = code.replace("from timm.models import register_model", "raise ImportError")
    try:
        exec(compile(code, "<export>", "exec"), namespace)
        model = namespace["build_model"](precision="fp32")
        x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for train in (False, True):
                model.train(train)
                model(x)
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ExportError(f"the model cannot run on {in_chans}x{img_size}x{img_size} images ({first}); "
                          "pick another --img-size or --in-chans") from None


def _write_all(files: list[tuple[Path, bytes]]) -> None:
    """Write every file or none: each goes to a temporary file beside it first, and only when all
    are written are they renamed into place. ExportError (one line) on a failed write."""
    staged: list[tuple[str, Path]] = []
    made: list[Path] = []  # folders this call created, removed again when a write fails

    def undo() -> None:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()

    try:
        for path, data in files:
            missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir()
                made.append(folder)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as e:
        undo()
        raise ExportError(f"cannot write {_shown(Path(e.filename or ''))}: {e.strerror or type(e).__name__}; "
                          "nothing was written") from None
    except BaseException:
        undo()
        raise


def _weight_files(info: Any) -> tuple[Path, Path]:
    """A study's kept weights: the train stage's folder and the supernet checkpoint."""
    workdir = Path(info.config.get("workdir", ""))
    return workdir / "weights", workdir / "supernet" / "supernet.pt"


def study_has_weights(info: Any) -> bool:
    """Whether study ``info`` kept weights an export can carry (trained models or a supernet)."""
    if not info.config.get("workdir"):
        return False
    trained, ckpt = _weight_files(info)
    return ckpt.is_file() or (trained.is_dir() and any(trained.iterdir()))


def study_weights(store: Any, name: str, spec: ArchSpec, model: Any) -> tuple[Any, str]:
    """The best weights study ``name`` has for ``spec``: the train stage's fully trained model
    ("trained"), else the supernet's weights for the subnet with BatchNorm recalibrated on the
    study's training data ("supernet-inherited"), else ``model`` unchanged ("initial")."""
    import torch

    from workers.evaluate import trained_weights_file

    info = store.study(name)
    trained_dir, ckpt = _weight_files(info)
    trained = trained_weights_file(trained_dir, spec.hash)
    if trained.is_file():
        model.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True), strict=True)
        return model.eval(), "trained"
    if not ckpt.is_file():
        return model, "initial"
    from nas.search import SearchConfig, load_data
    from predictors.supernet import has_batchnorm, load_checkpoint, recalibrate_bn

    net, _ = load_checkpoint(ckpt)
    try:
        net.frame.check(spec)
    except ValueError:
        return model, "initial"
    sub = net.extract(spec)
    if has_batchnorm(sub):
        recalibrate_bn(sub, load_data(SearchConfig.from_dict(info.config)).train)
    return sub.eval(), "supernet-inherited"


def write_export(spec: ArchSpec, out: Path, *, num_classes: int, img_size: int, in_chans: int,
                 metadata: dict[str, Any] | None = None, weights: Path | None = None, onnx: Path | None = None,
                 store: Any = None, study: str | None = None) -> ExportResult:
    """Generate and write the model file for ``spec`` (plus safetensors ``weights`` and checked
    ``onnx`` when asked). Everything is computed and checked first and then written atomically,
    so a refused export writes nothing. With a ``store`` and ``study`` the weights are the study's
    (see :func:`study_weights`) and the export is recorded in the store."""
    check_paths(out, weights, onnx)
    sizes = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    try:
        code = generate(spec, metadata=metadata, **sizes)
    except ValueError as e:
        raise ExportError(str(e).splitlines()[0]) from None
    check_forward(code, img_size, in_chans)
    if onnx is not None and onnx_blockers(spec):
        raise ExportError(f"--onnx: this architecture cannot be exported to ONNX: {'; '.join(onnx_blockers(spec))}")
    model, source = None, "initial"
    if weights is not None or onnx is not None:
        from search_spaces.hybrid_vit import build

        model = build(spec, num_classes, img_size, in_chans)
        if store is not None and study is not None:
            model, source = study_weights(store, study, spec, model)
    onnx_bytes, onnx_err = b"", 0.0
    if onnx is not None:
        onnx_bytes, onnx_err = export_onnx(model, spec, in_chans, img_size)
        if onnx_err > 1e-3:
            raise ExportError(f"--onnx: ONNX Runtime differs from torch by {onnx_err:.2e} (> 1e-3); nothing written")
    files = [(out, code.encode())]
    if weights is not None:
        from safetensors.torch import save

        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # type: ignore[union-attr]
        files.append((weights, save(state, metadata={"spec_hash": spec.hash, "weights": source})))
    if onnx is not None:
        files.append((onnx, onnx_bytes))
    _write_all(files)
    if store is not None and study is not None:
        store.add_export(study, spec.hash, str(out.resolve()), "py")
    return ExportResult(spec, out, weights, source, onnx, onnx_err)


def export_study(store: Any, name: str, out: Path, *, pick: str | None = None, trial: int | None = None,
                 arch: str | None = None, weights: Path | None = None, onnx: Path | None = None,
                 num_classes: int | None = None, img_size: int | None = None,
                 in_chans: int | None = None) -> ExportResult:
    """Export one architecture of study ``name`` (see :func:`pick_from_study`) to ``out``; the
    build sizes default to the study's. Used by ``nas export NAME`` and the dashboard."""
    spec, meta, sizes = pick_from_study(store, name, pick=pick, trial=trial, arch=arch)
    for k, v in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if v is not None:
            sizes[k] = v
    return write_export(spec, out, metadata=meta, weights=weights, onnx=onnx, store=store, study=name, **sizes)
