"""Jobs beside a study, for the ``nas`` CLI and Python callers: specs in, zero-cost proxies,
latency, supernet training and evaluation, and exports. Each checks its own limits
(:func:`check_limits`) and refuses bad input with a one-line :class:`~nas.search.SearchError`,
so the CLI only parses and prints. The study lifecycle itself is :mod:`nas.lifecycle`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from nas.lifecycle import find_study, load_dataset, open_store, resolve_frame, resolve_target
from nas.search import SearchError
from nas.store import Store

__all__ = [
    "LIMITS",
    "build_for_data",
    "catalog",
    "check_limits",
    "describe",
    "device_for",
    "device_info",
    "device_line",
    "evaluate_subnets",
    "export",
    "measure_latency",
    "parse_spec",
    "read_specs",
    "score_proxies",
    "space",
    "train_supernet",
]


# --------------------------------------------------------------------------------------------
# jobs outside a study: specs in, proxies, latency, supernet training and evaluation
# --------------------------------------------------------------------------------------------


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


#: bounds of counts and sizes (keyword -> low, high): a larger value is a typo, and would hang or exhaust memory
LIMITS = {"n": (1, 10_000), "seed": (0, 2**32 - 1), "img_size": (1, 4096), "num_classes": (1, 1_000_000),
          "in_chans": (1, 1024), "batch_size": (1, 65_536), "repeats": (1, 100_000), "warmup": (0, 100_000),
          "threads": (1, max(256, 4 * (os.cpu_count() or 1))), "epochs": (1, 1000), "n_random": (0, 64),
          "calib_batches": (1, 10_000), "ckpt_every": (1, 10**9), "trial": (0, 2**31 - 1),
          "data_limit": (1, 10_000_000), "test_limit": (0, 10_000_000)}


def check_limits(high: dict[str, int] | None = None, **values: int | None) -> None:
    """SearchError unless each given value (None: not given) is within :data:`LIMITS` (or ``high``);
    the message names the option, ``img_size`` as ``--img-size``."""
    for key, v in values.items():
        low, top = LIMITS[key][0], (high or {}).get(key, LIMITS[key][1])
        flag = "--" + key.replace("_", "-")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise SearchError(f"{flag} must be an integer, got {_short(v, 40)}")
        if v is not None and v < low:
            raise SearchError(f"{flag} must be at least {low}, got {v}")
        if v is not None and v > top:
            shown = str(v) if len(str(v)) <= 24 else str(v)[:20] + "…"
            raise SearchError(f"{flag} must be between {low:,} and {top:,}, got {shown}")


def space(name: str) -> Any:
    """The search space ``name`` (SearchError naming the spaces there are)."""
    from search_spaces import get_space

    try:
        return get_space(name)
    except ValueError as e:
        raise SearchError(str(e)) from None


def catalog() -> dict[str, Any]:
    """The search spaces (name, first sentence of their description, default input) and every
    registered token and channel mixer (layout, cost in tokens, paper), as ``nas spaces --json``."""
    import re

    from search_spaces import get_space, list_spaces
    from search_spaces.registry import CHANNEL_MIXERS, TOKEN_MIXERS, token_mixer_names

    token_mixer_names()  # registers the built-in mixers
    spaces = []
    for name in list_spaces():
        sp = get_space(name)
        doc = " ".join((sp.__doc__ or "").split())
        first = re.match(r"(.+?[.!?])(\s|$)", doc)  # the whole first sentence, never cut mid-way
        spaces.append({"name": name, "doc": first.group(1) if first else doc, "img_size": sp.default_img_size,
                       "num_classes": sp.default_num_classes})
    mixers = [{"kind": kind, "name": n, "layout": cls.layout, "complexity": getattr(cls, "complexity", ""),
               "paper": cls.paper} for kind, table in (("token", TOKEN_MIXERS), ("channel", CHANNEL_MIXERS))
              for n, cls in sorted(table.items())]
    return {"spaces": spaces, "mixers": mixers}


def parse_spec(space: Any, text: str, what: str = "spec") -> Any:
    """A spec of ``space`` from JSON text (for nb201 also a bare cell string); SearchError naming ``what``."""
    text = text.strip()
    if space.name == "nb201" and text.startswith("|"):
        text = json.dumps({"space": "nb201", "version": 1, "arch": text})
    try:
        return space.spec_from_json(text)
    except (ValueError, RecursionError) as e:
        raise SearchError(f"invalid {what}: {e or 'nested too deeply'}") from None


def read_specs(space: Any, spec: str | None = None, preset: str | None = None, *, many: bool = False) -> list[Any]:
    """Exactly one of a preset name, or a spec file (``-``: stdin); with ``many`` a file may hold
    several specs as JSON lines (as ``nas sample --json`` writes them)."""
    import sys
    from pathlib import Path

    if (spec is None) == (preset is None):
        raise SearchError("give exactly one of --spec FILE|- or --preset NAME")
    if preset is not None:
        from search_spaces.hybrid_vit import PRESETS

        if space.name != "hybrid_vit" or preset not in PRESETS:
            names = ", ".join(sorted(PRESETS)) if space.name == "hybrid_vit" else "none for this space"
            raise SearchError(f"unknown preset {_short(preset)} for space {space.name!r}; presets: {names}")
        return [PRESETS[preset]]
    assert spec is not None
    if spec != "-":
        try:
            found = Path(spec).is_file()
        except OSError:  # a name too long for the file system
            found = False
        if not found:
            raise SearchError(f"spec file {_short(spec)} not found; pass a JSON file from 'nas sample --json' or - "
                              "for stdin")
    try:
        text = sys.stdin.read() if spec == "-" else Path(spec).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SearchError(f"cannot read a spec from {'stdin' if spec == '-' else 'spec file ' + _short(spec)}: {e}") \
            from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if many and len(lines) > 1 and all(ln.lstrip().startswith("{") and ln.rstrip().endswith("}") for ln in lines):
        return [parse_spec(space, ln, f"spec on line {i + 1}") for i, ln in enumerate(lines)]
    return [parse_spec(space, text)]


def build_for_data(space: Any, spec: Any, num_classes: int, in_chans: int, img_size: int) -> Any:
    """Build ``spec`` for a dataset's classes, channels and resolution."""
    if space.name == "hybrid_vit":
        from search_spaces.hybrid_vit import build

        return build(spec, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    return space.build(spec, num_classes=num_classes, img_size=img_size)


def describe(space: Any, spec: str | None = None, preset: str | None = None, *, img_size: int | None = None,
             num_classes: int | None = None) -> dict[str, Any]:
    """Parameters, FLOPs and per-stage rows of a spec file (``-``: stdin) or preset, with the spec."""
    check_limits(img_size=img_size, num_classes=num_classes)
    s = read_specs(space, spec, preset)[0]
    try:
        return {**space.describe(s, img_size=img_size, num_classes=num_classes), "spec": s.to_dict()}
    except ValueError as e:
        raise SearchError(str(e)) from None


def device_info(target: str = "auto", *, threads: int | None = None) -> dict[str, Any]:
    """The fingerprint of the ``target`` device (NVML on NVIDIA GPUs, the CPU otherwise) and the
    precisions it runs natively (``precisions``)."""
    from predictors.latency import device_fingerprint
    from predictors.precision import supported_precisions

    check_limits(threads=threads)
    dev = device_for(target)
    fp = device_fingerprint(str(dev), threads=threads)
    fp["precisions"] = list(supported_precisions(dev if fp["kind"] == "cuda" else "cpu"))
    return fp


def device_line(fp: Mapping[str, Any]) -> str:
    """The identifying fields of a device fingerprint, in a few words."""
    if fp.get("kind") in ("cuda", "gpu"):
        keys = (("memory_mb", "{} MiB"), ("compute_capability", "cc {}"), ("driver", "driver {}"),
                ("power_limit_w", "{} W"))
    else:
        keys = (("usable_cores", "{} cores"), ("torch_threads", "{} torch thread(s)"), ("isa", "{}"),
                ("torch", "torch {}"))
    return ", ".join(fmt.format(fp[k]) for k, fmt in keys if fp.get(k) not in (None, ""))


def device_for(target: str) -> Any:
    """``auto``, ``cpu`` or ``cuda[:i]`` as a torch device (SearchError when it is not here)."""
    from predictors.latency import LatencyError, parse_device

    try:
        return parse_device(resolve_target(target))
    except LatencyError as e:
        raise SearchError(str(e)) from None


def score_proxies(space: Any, spec: Any, *, data: str = "digits", names: list[str] | None = None,
                  batch_size: int = 64, img_size: int | None = None, seed: int = 0,
                  per_layer: bool = False) -> dict[str, Any]:
    """Zero-cost proxy scores of ``spec`` on one class-balanced batch of ``data`` (as ``nas proxies --json``)."""
    from nas.data import one_batch
    from predictors.zero_cost import ALL_PROXIES, PROXIES, compute

    check_limits(batch_size=batch_size, img_size=img_size or space.default_img_size, seed=seed)
    wanted = list(PROXIES) if names is None else names
    bad = [n for n in wanted if n not in ALL_PROXIES]
    if bad or not wanted:
        raise SearchError(f"unknown proxy {_short(bad[0] if bad else '', 40)}; choose from: {', '.join(ALL_PROXIES)}")
    size = img_size or space.default_img_size
    ds = load_dataset(data, limit=batch_size, img_size=size, seed=seed)
    if batch_size > len(ds):
        raise SearchError(f"--batch-size {batch_size} is more than the {len(ds)} training images of {data}; ask fewer")
    try:
        x, y = one_batch(ds, batch_size, seed=seed)
        in_chans = ds.in_chans
        if space.name == "nb201" and in_chans != 3:  # the benchmark's stem is RGB
            x, in_chans = x.expand(-1, 3, -1, -1).contiguous(), 3
        model = build_for_data(space, spec, ds.num_classes, in_chans, size)
    except ValueError as e:
        raise SearchError(str(e)) from None
    import torch

    torch.manual_seed(seed)
    result = compute(model, x, y, names=wanted, per_layer=per_layer)
    return {"space": space.name, "hash": spec.hash, "short": spec.short(), "data": data,
            "batch_size": int(x.shape[0]), "img_size": size,
            "scores": {k: v for k, v in result.items() if k != "per_layer"},
            **({"per_layer": result["per_layer"]} if per_layer else {})}


def measure_latency(space: Any, specs: list[Any] | None = None, *, n: int | None = None, seed: int = 0,
                    target: str = "auto", precision: str | None = None, batch_size: int = 1,
                    img_size: int | None = None, num_classes: int | None = None, warmup: int = 10,
                    repeats: int = 50, threads: int | None = None, cuda_graph: bool = False) -> dict[str, Any]:
    """Measured latency of ``specs`` (or ``n`` random ones drawn from what the device runs) on a
    device, as ``nas latency --json``: the fingerprint and, per spec, the measurement's fields."""
    from predictors.latency import LatencyError, measure
    from predictors.precision import PrecisionError, check_precision, supported_precisions
    from search_spaces.counting import count_params

    check_limits(batch_size=batch_size, repeats=repeats, n=n, threads=threads, img_size=img_size,
                 num_classes=num_classes, warmup=warmup, seed=seed)
    dev = device_for(target)
    try:
        if precision is not None:
            check_precision(precision, dev)
    except PrecisionError as e:
        raise SearchError(str(e)) from None
    if specs is None:
        if space.name == "hybrid_vit" and precision is None:  # draw only what this device runs
            space = space.with_choices(precisions=supported_precisions(dev))
        specs = [space.random(seed + i) for i in range(n or 0)]
    size, classes = img_size or space.default_img_size, num_classes or space.default_num_classes
    out, fp = [], None
    for s in specs:
        try:
            model = build_for_data(space, s, classes, 3, size)
            r = measure(model, (3, size, size), dev, precision or getattr(s, "precision", "fp32"),
                        batch_size=batch_size, warmup=warmup, repeats=repeats, threads=threads,
                        cuda_graph=cuda_graph, seed=seed)
        except (LatencyError, PrecisionError, ValueError) as e:
            raise SearchError(f"{s.short()}: {e}") from None
        d = r.to_dict()
        fp = d.pop("fingerprint")
        out.append({"hash": s.hash, "short": s.short(), "spec": s.to_dict(), "params": count_params(model), **d})
    return {"fingerprint": fp, "img_size": size, "num_classes": classes, "results": out}


def train_supernet(frame: str, data: str, epochs: int, out: str, *, space: str = "hybrid_vit",
                   data_limit: int | None = None,
                   img_size: int | None = None, target: str = "auto", threads: int = 1, ckpt_every: int = 100,
                   progress: Callable[[Any, float], None] | None = None, started: Callable[[Any, Any], None] | None
                   = None, **recipe: Any) -> dict[str, Any]:
    """Train (or continue: the same ``out`` again) a supernet over ``frame`` (see :func:`resolve_frame`)
    on ``data``; ``recipe``: TrainConfig fields. ``started(frame, dataset)`` is called before the first
    step. The result as ``nas supernet train --json`` prints it."""
    from pathlib import Path

    import torch

    from predictors.supernet import SAMPLINGS, SupernetError, TrainConfig, train_supernet
    from search_spaces._runtime import retain_freed_memory

    if space != "hybrid_vit":
        raise SearchError(f"supernets exist for space hybrid_vit only, not {_short(space, 40)}")
    check_limits(epochs=epochs, batch_size=recipe.get("batch_size"), threads=threads, data_limit=data_limit,
                 img_size=img_size, ckpt_every=ckpt_every, n_random=recipe.get("n_random"), seed=recipe.get("seed"))
    lr = recipe.get("lr", 2e-3)
    if not isinstance(lr, (int, float)) or not 0 < lr <= 10 or lr != lr:
        raise SearchError(f"--lr must be positive, finite and at most 10, got {lr}")
    sampling = recipe.get("sampling", "uniform")
    if sampling not in SAMPLINGS:
        raise SearchError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {_short(str(sampling), 40)}")
    if sampling == "single_path" and recipe.get("distill", True):
        raise SearchError("--sampling single_path trains no largest subnet to distill from: add --no-distill")
    if sampling == "single_path" and recipe.get("n_random", 2) < 1:
        raise SearchError("--sampling single_path trains --n-random subnets a step: give --n-random 1 or more")
    try:
        config = TrainConfig(**recipe)
    except SupernetError as e:
        raise SearchError(str(e)) from None
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise SearchError(f"--out {_short(out)} is a file; pass a directory")
    folder = out_path if out_path.is_dir() else out_path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise SearchError(f"--out: folder {_short(str(folder))} does not exist or is not writable; create it or "
                          "pick another place")
    dev = device_for(target)
    fr = resolve_frame(frame, load_dataset(data, limit=1), img_size)
    ds = load_dataset(data, limit=data_limit, img_size=fr.img_size)
    torch.set_num_threads(threads)
    retain_freed_memory()  # see search_spaces/_runtime.py
    if started is not None:
        started(fr, ds)
    try:
        net = train_supernet(fr, ds, epochs, config=config, out=out_path, ckpt_every=ckpt_every,
                             meta={"data": data, "limit": data_limit, "img_size": fr.img_size}, progress=progress,
                             device=dev)
    except SupernetError as e:
        raise SearchError(str(e)) from None
    st = net.train_state  # type: ignore[attr-defined]
    return {"ckpt": str(out_path / "supernet.pt"), "out": out, "steps": st.step, "seconds": st.seconds,
            "loss": (st.history or [{}])[-1].get("loss", float("nan")), "data": data, "images": len(ds),
            "frame": fr.to_dict()}


def evaluate_subnets(ckpt: str, specs: list[Any] | None = None, *, n: int | None = None, seed: int = 0,
                     data: str | None = None, test_limit: int | None = 2000, calib_batches: int = 16,
                     precision: str | None = None, target: str = "auto", threads: int = 1) -> dict[str, Any]:
    """Inherited-weight accuracy of ``specs`` (or ``n`` random subnets of the frame) with BatchNorm
    recalibrated on training images, as ``nas supernet eval --json``; the data defaults to the
    checkpoint's training data."""
    import time

    import torch

    from predictors.precision import PrecisionError
    from predictors.supernet import SupernetError, evaluate_subnet, load_checkpoint

    if (specs is None) == (n is None):
        raise SearchError("give exactly one of --spec FILE|- or --n N")
    check_limits(n=n, threads=threads, calib_batches=calib_batches, seed=seed, test_limit=test_limit)
    torch.set_num_threads(threads)
    dev = device_for(target)
    try:
        net, meta = load_checkpoint(ckpt)
    except SupernetError as e:
        raise SearchError(str(e)) from None
    fr = net.frame
    specs = specs if specs is not None else [fr.random(seed + i) for i in range(n or 0)]
    for s in specs:
        try:
            fr.check(s)
        except ValueError as e:
            raise SearchError(f"{s.short()}: {e}") from None
    source = data or meta.get("meta", {}).get("data")
    if not source:
        raise SearchError("the checkpoint does not record its data; pass --data")
    test = load_dataset(source, "test", limit=test_limit or None, img_size=fr.img_size)
    calib = load_dataset(source, "train", limit=calib_batches * 128, img_size=fr.img_size)
    if test.in_chans != fr.in_chans or int(test.y.max()) >= fr.num_classes:
        raise SearchError(f"{source} has {test.in_chans} channels / {test.num_classes} classes; the supernet takes "
                          f"{fr.in_chans} / {fr.num_classes}")
    net.eval()
    rows = []
    for s in specs:
        t0 = time.perf_counter()
        try:
            acc = evaluate_subnet(net, s, test, calib=calib, calib_batches=calib_batches, precision=precision,
                                  device=str(dev))
        except (PrecisionError, SupernetError, ValueError) as e:
            raise SearchError(f"{s.short()}: {e}") from None
        rows.append({"hash": s.hash, "short": s.short(), "precision": precision or s.precision, "accuracy": acc,
                     "seconds": time.perf_counter() - t0, "spec": s.to_dict()})
    return {"ckpt": str(ckpt), "data": source, "images": len(test), "results": rows}


def export(out: str | os.PathLike[str], *, storage: str | Store | None = None, name: str | None = None,
           spec: Any = None, pick: str | None = None, trial: int | None = None, arch: str | None = None,
           weights: str | os.PathLike[str] | None = None, onnx: str | os.PathLike[str] | None = None,
           num_classes: int | None = None, img_size: int | None = None, in_chans: int | None = None,
           preset: str | None = None, onnx_compatible: bool = False, weights_format: str | None = None) -> Any:
    """Write a standalone model file for an architecture of study ``name`` (its front's ``pick``:
    accuracy, latency or knee, the best that exports to ONNX with ``onnx_compatible``; or
    ``trial``; or ``arch``, a hash prefix), for ``spec`` (an ArchSpec, or a spec file, ``-`` for
    stdin) or for a hybrid_vit ``preset``; with ``weights`` (safetensors, or a torch state dict
    by ``weights_format`` or the suffix) and a checked ``onnx`` file when asked. The ExportResult;
    nothing is written when anything is refused."""
    from pathlib import Path

    from nas.export import ExportError, check_paths, export_study, write_export

    if sum(x is not None for x in (name, spec, preset)) != 1:
        raise SearchError("give one of a study NAME, --spec FILE or --preset NAME (not both)")
    if name is None and (pick or trial is not None or arch or onnx_compatible):
        raise SearchError("--pick, --trial, --arch and --onnx-compatible choose from a study; with --spec or "
                          "--preset leave them out")
    # the studies' image range: the export runs the model once to check it
    check_limits({"img_size": 1024}, num_classes=num_classes, img_size=img_size, in_chans=in_chans, trial=trial)
    if isinstance(spec, str) or preset is not None:
        from search_spaces import get_space

        spec = read_specs(get_space("hybrid_vit"), spec if isinstance(spec, str) else None, preset)[0]
    paths = [None if p is None else Path(p) for p in (out, weights, onnx)]
    given = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    try:
        check_paths(*paths, weights_fmt=weights_format)  # type: ignore[arg-type]
        if name is not None:
            store = open_store(storage)
            find_study(store, name)
            return export_study(store, name, paths[0], pick=pick, trial=trial,  # type: ignore[arg-type]
                                arch=arch, weights=paths[1], onnx=paths[2], onnx_compatible=onnx_compatible,
                                weights_fmt=weights_format, **given)
        sizes = {"num_classes": 10, "img_size": 32, "in_chans": 3, **{k: v for k, v in given.items() if v is not None}}
        return write_export(spec, paths[0], weights=paths[1], onnx=paths[2],  # type: ignore[arg-type]
                            weights_fmt=weights_format, **sizes)
    except ExportError as e:
        raise SearchError(str(e)) from None
