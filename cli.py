"""The `nas` command line: spaces, sample, describe, proxies, latency, device.

Bad input (an unknown space, bad JSON, an invalid spec, a wrong flag) gets one line on stderr
and exit code 2; nothing is written.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A user error: reported as one line, exit code 2."""


def _click_exc(name: str) -> tuple[type[BaseException], ...]:
    """Exception classes of click and of typer's vendored copy of it (typer >= 0.20 vendors click)."""
    found: list[type[BaseException]] = []
    for mod in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


_EXIT, _ABORT = _click_exc("Exit"), _click_exc("Abort")
_NO_ARGS, _USAGE, _CLICK = _click_exc("NoArgsIsHelpError"), _click_exc("UsageError"), _click_exc("ClickException")


class _App(typer.Typer):
    """Typer app whose usage errors are one line on stderr with exit code 2."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("prog_name", "nas")
        try:
            rv = typer.main.get_command(self).main(*args, standalone_mode=False, **kwargs)
        except _EXIT as e:
            sys.exit(getattr(e, "exit_code", 0))
        except _ABORT:
            _fail("aborted", code=1)
        except _NO_ARGS as e:
            print(e.format_message())  # type: ignore[attr-defined]
            sys.exit(0)
        except _USAGE as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see 'nas {ctx.info_name} --help')" if ctx is not None and ctx.parent else " (see 'nas --help')"
            _fail(e.format_message().replace("\n", " ") + hint)  # type: ignore[attr-defined]
        except _CLICK as e:
            _fail(e.format_message().replace("\n", " "))  # type: ignore[attr-defined]
        except BadInput as e:
            _fail(str(e))
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"nas: error: {msg}", file=sys.stderr)
    sys.exit(code)


app = _App(
    help="hybrid-NAS: neural-architecture search for efficient hybrid vision backbones.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)
console = Console(highlight=False)


def _space(name: str) -> Any:
    from search_spaces import get_space

    try:
        return get_space(name)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _read_spec(space: Any, spec: str | None, preset: str | None) -> Any:
    if (spec is None) == (preset is None):
        raise BadInput("give exactly one of --spec FILE|- or --preset NAME")
    if preset is not None:
        from search_spaces.hybrid_vit import PRESETS

        if space.name != "hybrid_vit" or preset not in PRESETS:
            names = ", ".join(sorted(PRESETS)) if space.name == "hybrid_vit" else "none for this space"
            raise BadInput(f"unknown preset {preset!r} for space {space.name!r}; presets: {names}")
        return PRESETS[preset]
    return _parse_spec(space, _read_text(spec), "spec")


def _read_text(spec: str) -> str:
    """The text of a spec file, or of stdin for ``-``."""
    if spec == "-":
        return sys.stdin.read()
    path = Path(spec)
    if not path.is_file():
        raise BadInput(f"spec file {spec!r} not found; pass a JSON file from 'nas sample --json' or - for stdin")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read spec file {spec!r}: {e}") from None


def _parse_spec(space: Any, text: str, what: str) -> Any:
    """A spec from JSON text (or, for nb201, a bare cell string); BadInput naming ``what`` if invalid."""
    text = text.strip()
    if space.name == "nb201" and text.startswith("|"):
        text = json.dumps({"space": "nb201", "version": 1, "arch": text})
    try:
        return space.spec_from_json(text)
    except ValueError as e:
        raise BadInput(f"invalid {what}: {e}") from None


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise BadInput(f"{name} must be at least 1, got {value}")


@app.command()
def spaces(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the search spaces and the registered token and channel mixers."""
    from search_spaces import list_spaces
    from search_spaces.registry import CHANNEL_MIXERS, TOKEN_MIXERS, token_mixer_names

    token_mixer_names()
    spaces_info = []
    for name in list_spaces():
        sp = _space(name)
        spaces_info.append({"name": name, "doc": (sp.__doc__ or "").strip().splitlines()[0],
                            "img_size": sp.default_img_size, "num_classes": sp.default_num_classes})
    mixers = [
        {"kind": kind, "name": n, "layout": cls.layout, "complexity": getattr(cls, "complexity", ""),
         "paper": cls.paper}
        for kind, table in (("token", TOKEN_MIXERS), ("channel", CHANNEL_MIXERS))
        for n, cls in sorted(table.items())
    ]
    if json_out:
        print(json.dumps({"spaces": spaces_info, "mixers": mixers}, indent=2))
        return
    t = Table(title="search spaces")
    for col in ("space", "default input", "description"):
        t.add_column(col)
    for s in spaces_info:
        t.add_row(s["name"], f"{s['img_size']}px, {s['num_classes']} classes", s["doc"])
    console.print(t)
    t = Table(title="mixers")
    for col in ("kind", "name", "layout", "tokens", "paper"):
        t.add_column(col, overflow="fold")
    for m in mixers:
        t.add_row(m["kind"], m["name"], m["layout"], m["complexity"], m["paper"])
    console.print(t)


@app.command()
def sample(
    space: str = typer.Option("hybrid_vit", "--space", help="Search space name (see 'nas spaces')."),
    seed: int = typer.Option(0, "--seed", help="First seed; spec i uses seed + i."),
    n: int = typer.Option(1, "--n", help="How many specs."),
    json_out: bool = typer.Option(False, "--json", help="One canonical spec JSON per line."),
) -> None:
    """Draw random architectures from a space and print their specs."""
    sp = _space(space)
    _positive("--n", n)
    specs = [sp.random(seed + i) for i in range(n)]
    if json_out:
        for s in specs:
            print(s.to_json())
        return
    from search_spaces import count_params

    t = Table(title=f"{n} random {space} architectures (params at {sp.default_img_size}px, "
                    f"{sp.default_num_classes} classes)")
    for col in ("seed", "hash", "params", "architecture"):
        t.add_column(col, overflow="fold")
    for i, s in enumerate(specs):
        params = count_params(sp.build(s))
        t.add_row(str(seed + i), s.hash[:12], f"{params:,}", s.short())
    console.print(t)


@app.command()
def describe(
    space: str = typer.Option("hybrid_vit", "--space", help="Search space name."),
    spec: str | None = typer.Option(None, "--spec", help="Spec JSON file, or - for stdin."),
    preset: str | None = typer.Option(None, "--preset", help="A named preset instead of --spec (hybrid_vit)."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input resolution (default: the space's)."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Classifier size (default: the space's)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Parameters, FLOPs and a per-stage table of one architecture."""
    sp = _space(space)
    s = _read_spec(sp, spec, preset)
    if img_size is not None:
        _positive("--img-size", img_size)
    if num_classes is not None:
        _positive("--num-classes", num_classes)
    try:
        info = sp.describe(s, img_size=img_size, num_classes=num_classes)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if json_out:
        print(json.dumps({**info, "spec": s.to_dict()}, indent=2))
        return
    console.print(f"[bold]{info['short']}[/bold]")
    console.print(f"hash {info['hash']}")
    console.print(f"params {info['params']:,}   FLOPs {info['flops'] / 1e6:,.1f}M (MACs {info['macs'] / 1e6:,.1f}M) "
                  f"at {info['img_size']}x{info['img_size']}, {info['num_classes']} classes"
                  + (f", precision {info['precision']}" if "precision" in info else ""))
    rows = info["stages"]
    t = Table()
    for col in rows[0]:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*[f"{v:,}" if isinstance(v, int) and k == "params" else str(v) for k, v in r.items()])
    console.print(t)


def build_for_data(space: Any, spec: Any, num_classes: int, in_chans: int, img_size: int) -> Any:
    """Build ``spec`` for a dataset's classes, channels and resolution."""
    if space.name == "hybrid_vit":
        from search_spaces.hybrid_vit import build

        return build(spec, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    return space.build(spec, num_classes=num_classes, img_size=img_size)


@app.command()
def proxies(
    space: str = typer.Option("hybrid_vit", "--space", help="Search space name (hybrid_vit or nb201)."),
    spec: str | None = typer.Option(None, "--spec", help="Spec JSON file, or - for stdin."),
    arch: str | None = typer.Option(None, "--arch", help="Inline spec: JSON, or an NB201 cell string."),
    preset: str | None = typer.Option(None, "--preset", help="A hybrid_vit preset instead of --spec."),
    data: str = typer.Option("digits", "--data", help="digits | cifar10:PATH | imagefolder:PATH | npz:PATH"),
    names: str | None = typer.Option(None, "--names", help="Comma-separated proxies (default: all)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images in the (class-balanced) batch."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input resolution (default: the space's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batch and of random-input proxies."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also print node-wise (per-layer) values."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Zero-cost proxy scores of one architecture on one batch of real data."""
    sp = _space(space)
    given = [v is not None for v in (spec, arch, preset)]
    if sum(given) != 1:
        raise BadInput("give exactly one of --spec FILE|-, --arch STR or --preset NAME")
    s = _parse_spec(sp, arch, "--arch") if arch is not None else _read_spec(sp, spec, preset)
    _positive("--batch-size", batch_size)
    size = img_size or sp.default_img_size
    _positive("--img-size", size)
    from predictors.zero_cost import PROXIES, compute

    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else list(PROXIES)
    bad = [n for n in wanted if n not in PROXIES]
    if bad or not wanted:
        raise BadInput(f"unknown proxy {bad[0] if bad else names!r}; choose from: {', '.join(PROXIES)}")
    from nas.data import load, one_batch

    try:
        ds = load(data, split="train", limit=batch_size, img_size=size, seed=seed)
    except (ValueError, OSError) as e:
        raise BadInput(str(e).splitlines()[0]) from None
    x, y = one_batch(ds, batch_size, seed=seed)
    in_chans = ds.in_chans
    if space == "nb201" and in_chans != 3:  # the benchmark's stem is RGB
        x, in_chans = x.expand(-1, 3, -1, -1).contiguous(), 3
    try:
        model = build_for_data(sp, s, ds.num_classes, in_chans, size)
    except ValueError as e:
        raise BadInput(str(e)) from None
    import torch

    torch.manual_seed(seed)
    result = compute(model, x, y, names=wanted, per_layer=per_layer)
    if json_out:
        print(json.dumps({"space": space, "hash": s.hash, "data": data, "batch_size": int(x.shape[0]),
                          "img_size": size, "scores": {k: v for k, v in result.items() if k != "per_layer"},
                          **({"per_layer": result["per_layer"]} if per_layer else {})}, indent=2))
        return
    console.print(f"[bold]{s.short()}[/bold]  hash {s.hash[:12]}  data {data}  batch {x.shape[0]}  {size}px")
    t = Table()
    t.add_column("proxy")
    t.add_column("score", justify="right")
    for n in wanted:
        t.add_row(n, f"{result[n]:.6g}")
    console.print(t)
    if per_layer:
        for n, layers in result.get("per_layer", {}).items():
            t = Table(title=f"{n} per layer")
            t.add_column("layer", overflow="fold")
            t.add_column("value", justify="right")
            for layer, v in layers.items():
                t.add_row(layer, f"{v:.4g}")
            console.print(t)


def _read_specs(space: Any, spec: str | None, preset: str | None) -> list[Any]:
    """One spec (``--preset``, or a JSON file/stdin), or several: a file of JSON lines as
    ``nas sample --json`` writes them."""
    if spec is not None and preset is None:
        text = _read_text(spec)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and all(ln.lstrip().startswith("{") and ln.rstrip().endswith("}") for ln in lines):
            return [_parse_spec(space, ln, f"spec on line {i + 1}") for i, ln in enumerate(lines)]
        return [_parse_spec(space, text, "spec")]
    return [_read_spec(space, spec, preset)]


def _fingerprint_line(fp: dict[str, Any]) -> str:
    if fp["kind"] == "cuda":
        extra = [f"cc {fp.get('compute_capability')}", f"{fp.get('memory_mb')} MiB"]
        extra += [f"driver {fp['driver']}"] if "driver" in fp else []
        extra += [f"{fp['power_limit_w']} W"] if "power_limit_w" in fp else []
        extra += [f"SM {fp['sm_clock_max_mhz']} MHz"] if "sm_clock_max_mhz" in fp else []
    else:
        extra = [f"cores {fp['usable_cores']}", f"torch threads {fp['torch_threads']}", fp["isa"]]
    return f"{fp['name']} ({', '.join(str(e) for e in extra)})  key {fp['key']}"


@app.command()
def device(
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
    threads: int | None = typer.Option(None, "--threads", help="CPU: torch threads to report (default: current)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The device fingerprint latency tables are keyed by (NVML on NVIDIA GPUs, the CPU otherwise)."""
    from predictors.latency import device_fingerprint
    from predictors.precision import supported_precisions

    if threads is not None:
        _positive("--threads", threads)
    fp = device_fingerprint(device, threads=threads)
    fp["precisions"] = list(supported_precisions(device if fp["kind"] == "cuda" else "cpu"))
    if json_out:
        print(json.dumps(fp, indent=2, sort_keys=True))
        return
    if "requested" in fp:
        console.print(f"no CUDA device visible for {fp['requested']!r}: this is the CPU")
    t = Table(title=_fingerprint_line(fp))
    t.add_column("field")
    t.add_column("value", overflow="fold")
    for k, v in fp.items():
        t.add_row(k, ", ".join(v) if isinstance(v, list) else str(v))
    console.print(t)


@app.command()
def latency(
    space: str = typer.Option("hybrid_vit", "--space", help="Search space name."),
    spec: str | None = typer.Option(None, "--spec", help="Spec JSON file (one spec, or JSON lines), or - for stdin."),
    preset: str | None = typer.Option(None, "--preset", help="A hybrid_vit preset instead of --spec."),
    n: int | None = typer.Option(None, "--n", help="Measure N random architectures of the space instead."),
    seed: int = typer.Option(0, "--seed", help="First seed of the random architectures."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
    precision: str | None = typer.Option(None, "--precision",
                                         help="fp32|bf16|fp16|int8|fp8 (default: each spec's own)."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input resolution (default: the space's)."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Classifier outputs (default: the space's)."),
    warmup: int = typer.Option(10, "--warmup", help="Warm-up calls at least (then until stable)."),
    repeats: int = typer.Option(50, "--repeats", help="Timed calls."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: torch's current count)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="Replay a captured CUDA graph (GPU only)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Measured latency (median, p10/p90, CV, peak memory) of architectures on a device."""
    sp = _space(space)
    if (n is not None) + (spec is not None) + (preset is not None) != 1:
        raise BadInput("give exactly one of --spec FILE|-, --preset NAME or --n N")
    for name, value in (("--batch", batch), ("--repeats", repeats), ("--n", n), ("--threads", threads),
                        ("--img-size", img_size), ("--num-classes", num_classes)):
        if value is not None:
            _positive(name, value)
    if warmup < 0:
        raise BadInput(f"--warmup must be at least 0, got {warmup}")
    from predictors.latency import LatencyError, measure, parse_device
    from predictors.precision import PrecisionError, check_precision, supported_precisions
    from search_spaces.counting import count_params

    try:
        dev = parse_device(device)
        if precision is not None:
            check_precision(precision, dev)
    except (LatencyError, PrecisionError) as e:
        raise BadInput(str(e)) from None
    if n is not None:
        if sp.name == "hybrid_vit" and precision is None:  # draw only what this device runs
            sp = sp.with_choices(precisions=supported_precisions(dev))
        specs = [sp.random(seed + i) for i in range(n)]
    else:
        specs = _read_specs(sp, spec, preset)
    size = img_size or sp.default_img_size
    classes = num_classes or sp.default_num_classes
    rows = []
    for s in specs:
        prec = precision or getattr(s, "precision", "fp32")
        try:
            model = build_for_data(sp, s, classes, 3, size)
            r = measure(model, (3, size, size), dev, prec, batch_size=batch, warmup=warmup, repeats=repeats,
                        threads=threads, cuda_graph=cuda_graph, seed=seed)
        except (LatencyError, PrecisionError, ValueError) as e:
            raise BadInput(f"{s.short()}: {e}") from None
        rows.append((s, count_params(model), r))
    fp = rows[0][2].fingerprint
    if json_out:
        out = []
        for s, params, r in rows:
            d = r.to_dict()
            d.pop("fingerprint")
            out.append({"hash": s.hash, "short": s.short(), "spec": s.to_dict(), "params": params, **d})
        print(json.dumps({"fingerprint": fp, "img_size": size, "num_classes": classes, "results": out}, indent=2))
        return
    t = Table(title=f"{_fingerprint_line(fp)}\nbatch {batch}, {size}px, {classes} classes, {repeats} timed calls, "
                    "times in ms", box=box.SIMPLE)
    for col in ("hash", "params", "prec", "median", "p10", "p90", "cv %", "peak MiB", "img/s"):
        t.add_column(col, justify="left" if col in ("hash", "prec") else "right",
                     no_wrap=col in ("hash", "prec", "median"))
    for s, params, r in rows:
        t.add_row(s.hash[:8], f"{params / 1e6:.2f}M", r.precision, f"{r.median_ms:.3f}",
                  f"{r.p10_ms:.3f}", f"{r.p90_ms:.3f}", f"{100 * r.cv:.1f}",
                  "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}", f"{r.throughput:.0f}")
    console.print(t)
    for s, _, _ in rows:
        console.print(f"  {s.hash[:8]}  {s.short()}", soft_wrap=True)


if __name__ == "__main__":
    app()
