"""Export an architecture as one standalone PyTorch file (imports only ``torch``), with its weights
(safetensors or a torch state dict) and a checked ONNX file when asked.

The file is written by :mod:`nas._export.writer` from per-block templates (:mod:`nas._export.blocks`)
for that one architecture: a typed ``Config``, the blocks it uses, the stages written out, the spec
once in the header with the input normalization, metrics and latency device. Its ``state_dict``
keys and shapes, initial weights and outputs equal ``search_spaces.hybrid_vit.build(spec)``'s. Only
validated values are written into code: the spec is re-parsed with ``ArchSpec.from_json`` first.
"""

from __future__ import annotations

import contextlib
import io
import json
import keyword
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_spaces.spec import ArchSpec

WEIGHT_FORMATS = {"safetensors": (".safetensors",), "torch": (".pt", ".pth")}


def _class_name(spec: ArchSpec, class_name: str | None) -> str:
    from nas._export.writer import _templates

    name = class_name or f"HybridViT{spec.hash[:8]}"
    if not name.isidentifier() or not name[0].isupper() or name in _templates() or name == "Config":
        raise ValueError(f"class name {name!r} must be a CapWords Python identifier not used by a block")
    return name


def generate(spec: ArchSpec, *, num_classes: int, img_size: int, in_chans: int, class_name: str | None = None,
             metadata: dict[str, Any] | None = None) -> str:
    """The source of a standalone model file for ``spec`` (see the module docstring). ``metadata``:
    what the header records (study, pick, data, metrics, device, normalization, weights; other keys
    are listed as JSON). Raises ``ValueError`` for an invalid spec, a bad class name or sizes."""
    from nas._export.writer import generate as write
    from search_spaces.hybrid_vit import build

    if not isinstance(spec, ArchSpec):
        raise TypeError(f"generate() needs an ArchSpec, got {type(spec).__name__}")
    spec = ArchSpec.from_json(spec.to_json())  # validated, canonical
    for name, v, low in (("num_classes", num_classes, 0), ("img_size", img_size, 1), ("in_chans", in_chans, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if metadata is not None:
        json.dumps(metadata, default=str)  # must be JSON-able
    cls = _class_name(spec, class_name)
    fn_name = f"hybrid_vit_{spec.hash[:8]}" if class_name is None else _snake(cls)
    params = sum(p.numel() for p in build(spec, num_classes, img_size, in_chans).parameters())
    return write(spec, num_classes=num_classes, img_size=img_size, in_chans=in_chans, cls=cls, fn_name=fn_name,
                 params=params, metadata=metadata)


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


def _knee_distances(rows: list[dict[str, Any]]) -> list[float]:
    """Each front point's distance to the line through the front's two extremes, both objectives
    scaled to [0, 1] (the knee is the farthest: the usual knee of a 2-D Pareto front); with fewer
    than 3 points, the most accurate point counts as the knee."""
    pts = [(r["metrics"]["accuracy"], r["metrics"]["latency_ms"]) for r in rows]
    if len(pts) < 3:
        return [p[0] for p in pts]
    a_lo, a_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    t_lo, t_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    norm = [((a_hi - a) / max(a_hi - a_lo, 1e-12), (t - t_lo) / max(t_hi - t_lo, 1e-12)) for a, t in pts]
    # extremes: most accurate (0, y1) and fastest (x2, 0); distance of each point to that line
    i_acc = min(range(len(norm)), key=lambda i: norm[i][0])
    i_fast = min(range(len(norm)), key=lambda i: norm[i][1])
    (x1, y1), (x2, y2) = norm[i_acc], norm[i_fast]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    return [abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / length for x, y in norm]


def _ranked(front: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """The front's points, best first by ``how``: accuracy (highest), latency (lowest) or knee
    (farthest from the extremes' line), ties broken by accuracy."""
    rows = sorted(front, key=lambda r: -r["metrics"]["accuracy"])
    if how == "accuracy":
        return rows
    if how == "latency":
        return sorted(rows, key=lambda r: r["metrics"]["latency_ms"])
    dist = _knee_distances(rows)
    return [rows[i] for i in sorted(range(len(rows)), key=lambda i: -dist[i])]


def _knee(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The knee of a front (see :func:`_knee_distances`)."""
    return _ranked(rows, "knee")[0]


def _spec_of(store: Any, h: str) -> ArchSpec:
    rec = store.architecture(h)
    if rec is None:
        raise ExportError(f"architecture {h[:12]} is not in the store")
    spec = ArchSpec.from_dict(rec["spec"] if isinstance(rec["spec"], dict) else json.loads(rec["spec"]))
    if spec.hash != h:
        raise ExportError(f"stored spec of {h[:12]} does not match its hash; the store is damaged")
    return spec


def data_normalization(source: str | None, in_chans: int) -> dict[str, Any] | None:
    """The per-channel mean and std the study's data were normalized with (nas.data computes them
    per source, on a fixed sample of its training images), or None when the data cannot be read."""
    if not source:
        return None
    try:
        from nas.data import open_dataset

        ds = open_dataset(source, "train", limit=20)
        mean, std = [float(v) for v in ds.mean], [float(v) for v in ds.std]
    except (ValueError, OSError, ImportError):
        return None
    if len(mean) != in_chans:
        return None
    return {"mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std],
            "source": f"the study's training images ({source})"}


def pick_from_study(store: Any, name: str, *, pick: str | None = None, trial: int | None = None,
                    arch: str | None = None,
                    onnx_compatible: bool = False) -> tuple[ArchSpec, dict[str, Any], dict[str, int]]:
    """The spec of one architecture of study ``name`` (``pick`` from its front, an Optuna ``trial``
    number, or an ``arch`` hash or unique prefix), its metadata (study, pick, metrics, the latency
    device's fingerprint, the input normalization of the study's data) and its build sizes
    (num_classes, img_size, in_chans) from the study's frame. ``onnx_compatible``: the best front
    point by ``pick`` whose mixers all export to ONNX (``meta["pick"]`` says which it took)."""
    info = store.get_study(name)
    if info is None:
        raise ExportError(f"no study {name!r} in {store.url}; `nas studies` lists them")
    if sum(x is not None for x in (pick, trial, arch)) > 1:
        raise ExportError("give one of --pick, --trial or --arch")
    if onnx_compatible and (trial is not None or arch is not None):
        raise ExportError("--onnx-compatible picks from the front; leave out --trial and --arch")
    evals = store.evaluations(name, errors=False)
    how = pick or "accuracy"
    if trial is not None:
        hashes = {e.arch_hash for e in evals if e.trial == trial and e.arch_hash}
        if not hashes:
            raise ExportError(f"study {name!r} has no finished trial {trial}; `nas show {name}` lists them")
        h, picked = hashes.pop(), f"trial {trial}"
    elif arch is not None:
        if not all(c in "0123456789abcdef" for c in arch.lower()) or not 4 <= len(arch) <= 64:
            raise ExportError(f"--arch must be 4 to 64 hex digits of an architecture hash, got {arch!r}")
        hashes = {e.arch_hash for e in evals if e.arch_hash and e.arch_hash.startswith(arch.lower())}
        if len(hashes) != 1:
            what = "no architecture" if not hashes else f"{len(hashes)} architectures"
            raise ExportError(f"{what} of study {name!r} match hash {arch!r}; give more digits")
        h = hashes.pop()
        picked = f"architecture {h[:12]}"
    else:
        if how not in PICKS:
            raise ExportError(f"--pick must be one of {', '.join(PICKS)}, got {how!r}")
        front = [r for r in store.front(name) if "accuracy" in r["metrics"] and "latency_ms" in r["metrics"]]
        if not front:
            raise ExportError(f"study {name!r} has no Pareto front yet; run or resume it first")
        ranked = _ranked(front, how)
        h = ranked[0]["arch_hash"]
        picked = f"the front's {'most accurate' if how == 'accuracy' else 'fastest' if how == 'latency' else 'knee'}" \
                 " point"
        if onnx_compatible:
            ok = [r for r in ranked if not onnx_blockers(_spec_of(store, r["arch_hash"]))]
            if not ok:
                raise ExportError(f"no point of study {name!r}'s front ({len(front)}) exports to ONNX (each uses "
                                  "a mixer without an ONNX operator); export without --onnx")
            if ok[0]["arch_hash"] != h:
                rank = ranked.index(ok[0]) + 1
                picked = (f"the best front point by {how} that exports to ONNX ({_ordinal(rank)} of {len(ranked)}; "
                          f"{h[:12]}, the first, uses {', '.join(onnx_blockers(_spec_of(store, h)))})")
                h = ok[0]["arch_hash"]
    spec = _spec_of(store, h)
    metrics: dict[str, Any] = {}
    device: dict[str, Any] | None = None
    latency_devices = [e.device_key for e in evals if e.stage == "latency" and e.device_key]
    for e in evals:  # later stages refine earlier ones: screen < supernet < latency < train
        if e.arch_hash == h:
            metrics.update({f"{e.stage}.{k}": v for k, v in e.metrics.items()})
            if e.device_key and e.stage == "latency":
                latency_devices.insert(0, e.device_key)  # its own measurement first
    if latency_devices:
        fingerprints = {d["key"]: d["fingerprint"] for d in store.devices()}
        device = next((fingerprints[k] for k in latency_devices if k in fingerprints), None)
    frame = info.config.get("frame_json") or {}
    sizes = {"num_classes": int(frame.get("num_classes", 10)), "img_size": int(frame.get("img_size", 32)),
             "in_chans": int(frame.get("in_chans", 3))}
    meta = {"study": name, "pick": picked, "data": info.config.get("data"), "metrics": metrics, "device": device}
    return spec, meta, sizes


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


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
    picked: str = ""  # which point of a study's front, and why (e.g. with --onnx-compatible)


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


def weights_format(weights: Path, fmt: str | None = None) -> str:
    """The format of a weights file: ``fmt`` (safetensors or torch), else from its suffix
    (.safetensors; .pt or .pth); ExportError when they disagree or neither says."""
    by_suffix = next((f for f, sfx in WEIGHT_FORMATS.items() if weights.suffix in sfx), None)
    if fmt is not None and fmt not in WEIGHT_FORMATS:
        raise ExportError(f"--weights-format must be safetensors or torch, got {fmt!r}")
    if fmt is None and by_suffix is None:
        raise ExportError(f"--weights {_shown(weights)} must end in .safetensors, .pt or .pth "
                          "(or pass --weights-format)")
    if fmt is not None and by_suffix is not None and fmt != by_suffix:
        raise ExportError(f"--weights {_shown(weights)} looks like {by_suffix}, not --weights-format {fmt}; "
                          f"name it *{WEIGHT_FORMATS[fmt][0]}")
    return fmt or by_suffix  # type: ignore[return-value]


def check_paths(out: Path, weights: Path | None = None, onnx: Path | None = None, *,
                weights_fmt: str | None = None) -> None:
    """Refuse output paths an export cannot write (ExportError, before anything is written)."""
    _check_writable("--out", out)
    if out.suffix != ".py" or not out.stem.isidentifier() or keyword.iskeyword(out.stem):
        raise ExportError(f"--out {_shown(out)} must be an importable file name ending in .py (e.g. model.py)")
    if weights is None and weights_fmt is not None:
        raise ExportError("--weights-format needs --weights FILE")
    if weights is not None:
        fmt = weights_format(weights, weights_fmt)
        _check_writable("--weights", weights)
        if fmt == "safetensors":
            try:
                import safetensors.torch  # noqa: F401
            except ImportError:
                raise ExportError("--weights F.safetensors needs the safetensors package (pip install "
                                  "safetensors), or write F.pt (--weights-format torch)") from None
    if onnx is not None:
        if onnx.suffix != ".onnx":
            raise ExportError(f"--onnx {_shown(onnx)} must be a file name ending in .onnx")
        _check_writable("--onnx", onnx)


def check_forward(code: str, img_size: int, in_chans: int) -> None:
    """Run the generated file's ``build_model()`` (fp32) on a batch of two images, in eval and in
    train mode: ExportError (one line) when the architecture cannot take these sizes."""
    import sys
    import types

    import torch

    # the exact file that is about to be written, as a module (its dataclass looks itself up there),
    # but not registered with timm: this is only a check
    module = types.ModuleType("nas_export_check")
    code = code.replace("from timm.models import register_model", "raise ImportError")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "<export>", "exec"), module.__dict__)
        model = module.build_model(precision="fp32")
        x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for train in (False, True):
                model.train(train)
                model(x)
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ExportError(f"the model cannot run on {in_chans}x{img_size}x{img_size} images ({first}); "
                          "pick another --img-size or --in-chans") from None
    finally:
        sys.modules.pop(module.__name__, None)


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
    """The best weights study ``name`` has for ``spec``: the train stage's model ("trained"; "trained
    (k of n epochs: stopped early)" for one that ASHA or the allowance stopped: the weights its front
    accuracy was measured with), else the supernet's weights for the subnet with BatchNorm
    recalibrated on the study's training data ("supernet-inherited"), else ``model`` unchanged
    ("initial")."""
    import torch

    from workers.evaluate import trained_epochs, trained_weights_file

    info = store.study(name)
    trained_dir, ckpt = _weight_files(info)
    trained = trained_weights_file(trained_dir, spec.hash)
    if trained.is_file():
        model.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True), strict=True)
        done = trained_epochs(trained_dir, spec.hash)
        if done is not None and done[0] < done[1]:
            return model.eval(), f"trained ({round(done[0], 2):g} of {done[1]} epochs: stopped early)"
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
                 store: Any = None, study: str | None = None, weights_fmt: str | None = None) -> ExportResult:
    """Generate and write the model file for ``spec`` (plus its weights, safetensors or a torch
    state dict by ``weights_fmt`` or the file's suffix, and a checked ``onnx`` when asked).
    Everything is computed and checked first and then written atomically, so a refused export
    writes nothing. With a ``store`` and ``study`` the weights are the study's (see
    :func:`study_weights`) and the export is recorded in the store."""
    check_paths(out, weights, onnx, weights_fmt=weights_fmt)
    fmt = None if weights is None else weights_format(weights, weights_fmt)
    sizes = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    if onnx is not None and onnx_blockers(spec):
        hint = "; --onnx-compatible picks the best front point that exports" if study is not None else ""
        raise ExportError(f"--onnx: this architecture cannot be exported to ONNX: {'; '.join(onnx_blockers(spec))}"
                          + hint)
    model, source = None, "initial"
    if weights is not None or onnx is not None:
        from search_spaces.hybrid_vit import build

        model = build(spec, num_classes, img_size, in_chans)
        if store is not None and study is not None:
            model, source = study_weights(store, study, spec, model)
    meta = dict(metadata or {})
    if weights is not None:
        meta["weights"] = {"format": fmt, "file": weights.name, "source": f"{source} weights"}
    try:
        code = generate(spec, metadata=meta, **sizes)
    except ValueError as e:
        raise ExportError(str(e).splitlines()[0]) from None
    check_forward(code, img_size, in_chans)
    onnx_bytes, onnx_err = b"", 0.0
    if onnx is not None:
        onnx_bytes, onnx_err = export_onnx(model, spec, in_chans, img_size)
        if onnx_err > 1e-3:
            raise ExportError(f"--onnx: ONNX Runtime differs from torch by {onnx_err:.2e} (> 1e-3); nothing written")
    files = [(out, code.encode())]
    if weights is not None:
        import torch

        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # type: ignore[union-attr]
        if fmt == "safetensors":
            from safetensors.torch import save

            files.append((weights, save(state, metadata={"spec_hash": spec.hash, "weights": source})))
        else:
            buf = io.BytesIO()
            torch.save(state, buf)
            files.append((weights, buf.getvalue()))
    if onnx is not None:
        files.append((onnx, onnx_bytes))
    _write_all(files)
    if store is not None and study is not None:
        store.add_export(study, spec.hash, str(out.resolve()), "py")
    return ExportResult(spec, out, weights, source, onnx, onnx_err, str(meta.get("pick") or ""))


def export_study(store: Any, name: str, out: Path, *, pick: str | None = None, trial: int | None = None,
                 arch: str | None = None, weights: Path | None = None, onnx: Path | None = None,
                 num_classes: int | None = None, img_size: int | None = None, in_chans: int | None = None,
                 onnx_compatible: bool = False, weights_fmt: str | None = None) -> ExportResult:
    """Export one architecture of study ``name`` (see :func:`pick_from_study`) to ``out``; the
    build sizes default to the study's, the input normalization is its data's. Used by
    ``nas export NAME`` and the dashboard."""
    spec, meta, sizes = pick_from_study(store, name, pick=pick, trial=trial, arch=arch,
                                        onnx_compatible=onnx_compatible)
    for k, v in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if v is not None:
            sizes[k] = v
    norm = data_normalization(meta.get("data"), sizes["in_chans"])
    meta["normalization"] = norm or {
        "mean": [0.5] * sizes["in_chans"], "std": [0.5] * sizes["in_chans"],
        "source": f"NOT the study's: its data {meta.get('data')!r} could not be read here, so 0.5 / 0.5 stand in; "
                  "replace them with the training data's per-channel statistics"}
    return write_export(spec, out, metadata=meta, weights=weights, onnx=onnx, store=store, study=name,
                        weights_fmt=weights_fmt, **sizes)
