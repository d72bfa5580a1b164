"""The `nas` command line: spaces, sample, describe, proxies, latency, device, supernet train/eval.

Bad input (an unknown space, bad JSON, an invalid spec, a wrong flag) gets one line on stderr
and exit code 2; nothing is written.
"""

from __future__ import annotations

import contextlib
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


_MAX_ERROR = 300  # characters of an error line: a long bad value is never echoed whole


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``nas: error: MSG`` as one line of at most ~300 characters and exit with ``code``."""
    text = " ".join(str(msg).split())
    if len(text) > _MAX_ERROR:
        text = text[: _MAX_ERROR - 1] + "…"
    print(f"nas: error: {text}", file=sys.stderr)
    sys.exit(code)


def _show(value: Any, n: int = 80) -> str:
    """``repr(value)`` cut to about ``n`` characters, for echoing user input."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


app = _App(
    help="hybrid-NAS: neural-architecture search for efficient hybrid vision backbones.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)


class _Console(Console):
    """rich's Console, but where stdout is not a terminal (a pipe, a file, a test) nothing is wrapped
    or cut at 80 columns (or $COLUMNS): output for scripts and logs keeps whole lines."""

    _WIDE = 100_000

    @property
    def size(self) -> Any:  # type: ignore[override]
        dims = super().size
        if self.is_terminal:
            return dims
        return type(dims)(self._WIDE, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(highlight=False)


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
        try:
            return sys.stdin.read()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read a spec from stdin: {e}") from None
    path = Path(spec)
    try:
        found = path.is_file()
    except OSError:  # a name too long for the file system
        found = False
    if not found:
        raise BadInput(f"spec file {_show(spec)} not found; pass a JSON file from 'nas sample --json' or - for stdin")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read spec file {_show(spec)}: {e}") from None


def _parse_spec(space: Any, text: str, what: str) -> Any:
    """A spec from JSON text (or, for nb201, a bare cell string); BadInput naming ``what`` if invalid."""
    text = text.strip()
    if space.name == "nb201" and text.startswith("|"):
        text = json.dumps({"space": "nb201", "version": 1, "arch": text})
    try:
        return space.spec_from_json(text)
    except (ValueError, RecursionError) as e:
        raise BadInput(f"invalid {what}: {e or 'nested too deeply'}") from None


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise BadInput(f"{name} must be at least 1, got {value}")


#: Upper bounds of counts and sizes: a larger value is a typo, and would hang or exhaust memory.
MAX_IMG_SIZE = 4096
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 1024
MAX_BATCH = 65_536
MAX_COUNT = 10_000  # --n: architectures drawn or measured
MAX_REPEATS = 100_000
MAX_SEED = 2**32 - 1


def _max_threads() -> int:
    from nas.search import max_threads  # one bound for the CLI and for Python callers of prepare_study

    return max_threads()


def _max_epochs() -> int:
    from nas.search import MAX_TRAIN_EPOCHS

    return MAX_TRAIN_EPOCHS


def _between(name: str, value: int | None, low: int, high: int) -> None:
    """BadInput unless ``low <= value <= high`` (None passes: the option was not given)."""
    if value is None:
        return
    if not low <= value <= high:
        shown = str(value) if len(str(value)) <= 24 else str(value)[:20] + "…"
        raise BadInput(f"{name} must be between {low:,} and {high:,}, got {shown}")


def _ascii_number(name: str, text: str | None) -> None:
    """Counts and shares are written with ASCII digits (Python alone would read '３０' as 30)."""
    if text is not None and not text.isascii():
        raise BadInput(f"{name} {_show(text, 40)} has non-ASCII characters; write numbers with 0-9")


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
    _between("--n", n, 1, MAX_COUNT)
    _between("--seed", seed, 0, MAX_SEED)
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
    if img_size is not None:
        _positive("--img-size", img_size)
    if num_classes is not None:
        _positive("--num-classes", num_classes)
    _between("--img-size", img_size, 1, MAX_IMG_SIZE)
    _between("--num-classes", num_classes, 1, MAX_CLASSES)
    s = _read_spec(sp, spec, preset)
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
    _between("--batch-size", batch_size, 1, MAX_BATCH)
    size = img_size or sp.default_img_size
    _positive("--img-size", size)
    _between("--img-size", size, 1, MAX_IMG_SIZE)
    _between("--seed", seed, 0, MAX_SEED)
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
    if batch_size > len(ds):
        raise BadInput(f"--batch-size {batch_size} is more than the {len(ds)} training images of {data}; ask fewer")
    try:
        x, y = one_batch(ds, batch_size, seed=seed)
    except ValueError as e:
        raise BadInput(str(e)) from None
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
    _between("--threads", threads, 1, _max_threads())
    from predictors.latency import LatencyError, parse_device

    try:
        parse_device(device)
    except LatencyError as e:
        raise BadInput(str(e)) from None
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
    for name, value, high in (("--batch", batch, MAX_BATCH), ("--repeats", repeats, MAX_REPEATS),
                              ("--warmup", warmup, MAX_REPEATS), ("--n", n, MAX_COUNT),
                              ("--threads", threads, _max_threads()), ("--img-size", img_size, MAX_IMG_SIZE),
                              ("--num-classes", num_classes, MAX_CLASSES), ("--seed", seed, MAX_SEED)):
        _between(name, value, 0 if name in ("--warmup", "--seed") else 1, high)
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


# --------------------------------------------------------------------------------------------
# nas supernet train / eval
# --------------------------------------------------------------------------------------------

supernet_app = _App(help="Weight-sharing supernet: train once, evaluate subnets with inherited weights.",
                    no_args_is_help=True, rich_markup_mode=None)
app.add_typer(supernet_app, name="supernet")


def _writable_dir(flag: str, folder: Path) -> None:
    """BadInput unless ``folder`` exists and this process may create files in it."""
    import os

    folder = folder if str(folder) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"{flag}: folder {_show(str(folder))} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"{flag}: folder {_show(str(folder))} is not writable; pick another place")


def _load_data(source: str, split: str, limit: int | None, img_size: int | None, seed: int = 0) -> Any:
    from nas.data import load

    try:
        return load(source, split=split, limit=limit, img_size=img_size, seed=seed)
    except (ValueError, OSError) as e:
        raise BadInput(str(e).splitlines()[0]) from None


def _frame(frame: str, data: Any, img_size: int | None) -> Any:
    """A named frame adapted to the data's channels and classes, or a frame JSON file (checked)."""
    from search_spaces.supernet import FRAMES, frame_from_json, get_frame

    try:
        if frame in FRAMES:
            over: dict[str, Any] = {"in_chans": data.in_chans, "num_classes": data.num_classes}
            if img_size:
                over["img_size"] = img_size
            return get_frame(frame, **over)
        path = Path(frame)
        if not path.is_file():
            raise BadInput(f"unknown frame {frame!r}; pass one of {', '.join(sorted(FRAMES))} or a frame JSON file")
        return frame_from_json(path.read_text())
    except ValueError as e:
        raise BadInput(f"invalid frame: {e}") from None


@supernet_app.command("train")
def supernet_train(
    space: str = typer.Option("hybrid_vit", "--space", help="Search space (hybrid_vit)."),
    frame: str = typer.Option("small", "--frame", help="small | tiny | a frame JSON file."),
    data: str = typer.Option("digits", "--data", help="digits | cifar10:PATH | imagefolder:PATH | npz:PATH"),
    epochs: int = typer.Option(..., "--epochs", help="Epochs over the training images."),
    out: str = typer.Option(..., "--out", help="Checkpoint directory (an existing run there is resumed)."),
    limit: int | None = typer.Option(None, "--limit", help="Class-balanced subset of the training images."),
    img_size: int | None = typer.Option(None, "--img-size", help="Resize images (default: the frame's)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images a step."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak AdamW learning rate."),
    n_random: int = typer.Option(2, "--n-random", help="Random subnets a step besides the largest and smallest."),
    no_distill: bool = typer.Option(False, "--no-distill", help="Train every subnet on the labels only."),
    no_augment: bool = typer.Option(False, "--no-augment", help="No random crops or flips."),
    no_flip: bool = typer.Option(False, "--no-flip", help="Random crops but no horizontal flips (e.g. digits)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights, the data order and the subnets."),
    threads: int = typer.Option(1, "--threads", help="CPU threads."),
    ckpt_every: int = typer.Option(100, "--ckpt-every", help="Steps between checkpoints (also each epoch end)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
) -> None:
    """Train a supernet with the sandwich rule; run the same command again to resume."""
    if space != "hybrid_vit":
        raise BadInput(f"supernets exist for space hybrid_vit only, not {space!r}")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--threads", threads),
                        ("--limit", limit), ("--img-size", img_size), ("--ckpt-every", ckpt_every)):
        if value is not None:
            _positive(name, value)
    if not lr > 0 or n_random < 0:
        raise BadInput("--lr must be positive and --n-random at least 0")
    import math

    if not math.isfinite(lr) or lr > 10:
        raise BadInput(f"--lr must be a finite number at most 10, got {lr}")
    for name, value, high in (("--epochs", epochs, _max_epochs()), ("--batch-size", batch_size, MAX_BATCH),
                              ("--threads", threads, _max_threads()), ("--img-size", img_size, MAX_IMG_SIZE),
                              ("--n-random", n_random, 64), ("--seed", seed, MAX_SEED)):
        _between(name, value, 0 if name in ("--n-random", "--seed") else 1, high)
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise BadInput(f"--out {_show(out)} is a file; pass a directory")
    _writable_dir("--out", out_path if out_path.is_dir() else out_path.parent)
    from predictors.latency import LatencyError, parse_device
    from predictors.supernet import SupernetError, TrainConfig, train_supernet

    try:
        dev = parse_device(device)
    except LatencyError as e:
        raise BadInput(str(e)) from None
    probe = _load_data(data, "train", 1, None)
    fr = _frame(frame, probe, img_size)
    ds = _load_data(data, "train", limit, fr.img_size)
    cfg = TrainConfig(batch_size=batch_size, lr=lr, n_random=n_random, distill=not no_distill, seed=seed,
                      augment=not no_augment, flip=not no_flip)
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    torch.set_num_threads(threads)
    console.print(f"supernet over frame {frame}: {len(fr.stages)} stages, ~10^{fr.size():.1f} subnets; "
                  f"{data}: {len(ds)} images {fr.in_chans}x{fr.img_size}x{fr.img_size}, {fr.num_classes} classes")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  transient=False) as bar:
        task = bar.add_task("steps", total=None, info="")

        def progress(st: Any, loss: float) -> None:
            epoch = (st.step - 1) // st.steps_per_epoch + 1
            bar.update(task, completed=st.step, total=st.total_steps, info=f"epoch {epoch}/{epochs} loss {loss:.3f}")

        try:
            net = train_supernet(fr, ds, epochs, config=cfg, out=out_path, ckpt_every=ckpt_every,
                                 meta={"data": data, "limit": limit, "img_size": fr.img_size}, progress=progress,
                                 device=dev)
        except SupernetError as e:
            raise BadInput(str(e)) from None
    st = net.train_state  # type: ignore[attr-defined]
    last = (st.history or [{}])[-1]
    console.print(f"done: {st.step} steps, {st.seconds:.0f} s of training, last epoch loss "
                  f"{last.get('loss', float('nan')):.3f}; checkpoint {out_path / 'supernet.pt'}")
    console.print(f"next: nas supernet eval --ckpt {out} --n 5")


@supernet_app.command("eval")
def supernet_eval(
    ckpt: str = typer.Option(..., "--ckpt", help="Directory (or file) of a supernet checkpoint."),
    spec: str | None = typer.Option(None, "--spec", help="Spec JSON file (one, or JSON lines), or - for stdin."),
    n: int | None = typer.Option(None, "--n", help="Evaluate N random subnets of the frame instead."),
    seed: int = typer.Option(0, "--seed", help="First seed of the random subnets."),
    data: str | None = typer.Option(None, "--data", help="Evaluation data (default: the training data's)."),
    limit: int | None = typer.Option(2000, "--limit", help="Class-balanced subset of the test images (0: all)."),
    calib_batches: int = typer.Option(16, "--calib-batches", help="Training batches for BatchNorm recalibration."),
    precision: str | None = typer.Option(None, "--precision", help="Override each spec's own precision."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
    threads: int = typer.Option(1, "--threads", help="CPU threads."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Accuracy of subnets with weights inherited from a trained supernet (seconds each)."""
    if (spec is None) == (n is None):
        raise BadInput("give exactly one of --spec FILE|- or --n N")
    for name, value in (("--n", n), ("--threads", threads), ("--calib-batches", calib_batches)):
        if value is not None:
            _positive(name, value)
    if limit is not None and limit < 0:
        raise BadInput(f"--limit must be at least 0, got {limit}")
    for name, value, high in (("--n", n, MAX_COUNT), ("--threads", threads, _max_threads()),
                              ("--calib-batches", calib_batches, 10_000), ("--seed", seed, MAX_SEED)):
        _between(name, value, 0 if name == "--seed" else 1, high)
    import time

    import torch

    from predictors.precision import PrecisionError
    from predictors.supernet import SupernetError, evaluate_subnet, load_checkpoint

    torch.set_num_threads(threads)
    specs = _read_specs(_space("hybrid_vit"), spec, None) if spec is not None else None
    try:
        net, meta = load_checkpoint(ckpt)
    except SupernetError as e:
        raise BadInput(str(e)) from None
    fr = net.frame
    if specs is None:
        specs = [fr.random(seed + i) for i in range(n or 0)]
    for s in specs:
        try:
            fr.check(s)
        except ValueError as e:
            raise BadInput(f"{s.short()}: {e}") from None
    source = data or meta.get("meta", {}).get("data")
    if not source:
        raise BadInput("the checkpoint does not record its data; pass --data")
    test = _load_data(source, "test", limit or None, fr.img_size)
    calib = _load_data(source, "train", calib_batches * 128, fr.img_size)
    if test.in_chans != fr.in_chans or int(test.y.max()) >= fr.num_classes:
        raise BadInput(f"{source} has {test.in_chans} channels / {test.num_classes} classes; the supernet takes "
                       f"{fr.in_chans} / {fr.num_classes}")
    net.eval()
    rows = []
    for s in specs:
        t0 = time.perf_counter()
        try:
            acc = evaluate_subnet(net, s, test, calib=calib, calib_batches=calib_batches, precision=precision,
                                  device=device)
        except (PrecisionError, SupernetError, ValueError) as e:
            raise BadInput(f"{s.short()}: {e}") from None
        rows.append((s, acc, time.perf_counter() - t0))
    if json_out:
        print(json.dumps({"ckpt": str(ckpt), "data": source, "images": len(test), "results": [
            {"hash": s.hash, "short": s.short(), "precision": precision or s.precision, "accuracy": acc,
             "seconds": sec, "spec": s.to_dict()} for s, acc, sec in rows]}, indent=2))
        return
    t = Table(title=f"inherited-weight accuracy on {len(test)} test images of {source}", box=box.SIMPLE)
    for col in ("hash", "accuracy", "prec", "seconds", "subnet"):
        t.add_column(col, justify="right" if col in ("accuracy", "seconds") else "left",
                     overflow="fold" if col == "subnet" else "ellipsis")
    for s, acc, sec in rows:
        t.add_row(s.hash[:8], f"{acc:.4f}", precision or s.precision, f"{sec:.2f}", s.short())
    console.print(t)


# --------------------------------------------------------------------------------------------
# studies: nas search / resume / studies / show / best / stop
# --------------------------------------------------------------------------------------------

_STORAGE_HELP = "Store URL: sqlite:///nas.db (default) or postgresql+psycopg://USER@HOST:PORT/DB."


def _open_store(storage: str, must_exist: bool = False) -> Any:
    """The store at ``storage``. ``must_exist``: only an existing hybrid-NAS store is opened, and
    nothing is created, migrated or switched to WAL on the way (every verb but ``search``)."""
    from nas.store import Store, StoreError, validate_url

    try:  # a missing SQLite file is refused by Store(create=False) itself
        return Store(validate_url(storage), create=not must_exist)
    except StoreError as e:
        raise BadInput(str(e)) from None


def _study(store: Any, name: str) -> Any:
    from nas.store import StoreError, validate_study_name

    try:
        validate_study_name(name)
    except StoreError as e:
        raise BadInput(str(e)) from None
    info = store.get_study(name)
    if info is None:
        names = [s.name for s in store.studies()][-5:]
        hint = f"; studies here: {', '.join(names)}" if names else "; `nas studies` lists them"
        raise BadInput(f"no study {name!r} in {_show(store.url)}{hint}")
    return info


def _reachable(address: str) -> None:
    """A Ray head at HOST:PORT must accept a connection (ray.init would wait for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise BadInput(f"--address must be auto or HOST:PORT (port 1-65535), got {_show(address)}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise BadInput(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start "
                       f"--head` or leave out --address") from None


def _chaos() -> dict[int, str]:
    """``NAS_CHAOS="3:raise,5:kill"``: fail the first attempt of those trials (reliability tests)."""
    import os

    out: dict[int, str] = {}
    for part in filter(None, os.environ.get("NAS_CHAOS", "").split(",")):
        n, _, kind = part.partition(":")
        if kind not in ("raise", "kill") or not n.strip().isdigit():
            raise BadInput(f"NAS_CHAOS entry {part!r} must be ORDINAL:raise or ORDINAL:kill")
        out[int(n)] = kind
    return out


def _budget_text(info: Any) -> str:
    from nas.budget import Budget

    return Budget.from_dict(info.budget).used_text(info.used_seconds, info.trials_done)


def _already_running(store: Any, name: str) -> NoReturn:
    info = store.study(name)
    raise BadInput(f"study {name!r} is already running (pid {info.driver_pid} on {info.driver_host}); "
                   f"stop it with `nas stop {name}` or wait for it")


def _run_driver(store: Any, name: str, json_out: bool) -> None:
    """Hold the driver lease, run the study with a progress bar, print the front."""
    import os
    import socket

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from nas.search import SearchError, StudyLost, install_stop_handlers, run_study

    chaos = _chaos()
    pid, host = os.getpid(), socket.gethostname()
    if not store.acquire_driver(name, pid, host):
        _already_running(store, name)
    install_stop_handlers(store, name)
    status = "failed"
    try:
        with Progress(TextColumn("[bold]{task.fields[stage]:>8}"), BarColumn(), TextColumn("{task.description}"),
                      TimeElapsedColumn(), console=console, disable=json_out, transient=False) as bar:
            task = bar.add_task("", total=1.0, stage="start")

            def progress(p: dict[str, Any]) -> None:
                unit = "trials" if p["kind"] == "trials" else "device-s"
                best = "-" if p["best"] is None else f"{p['best']:.4f}"
                bar.update(task, completed=min(1.0, p["used"] / max(p["total"], 1e-9)), stage=p["stage"],
                           description=f"{p['used']:,.1f}/{p['total']:,.0f} {unit}  trials {p['trials']}  "
                                       f"best acc {best}  errors {p['errors']}")

            run_study(store, name, progress=progress, chaos=chaos)
        status = store.study(name).status
    except SearchError as e:
        store.set_status(name, "failed")
        raise BadInput(str(e)) from None
    except StudyLost as e:  # the store is gone or another driver owns the study: write nothing more
        status = "lost"
        _fail(f"study {name!r} stopped: {e}", code=1)
    except KeyboardInterrupt:
        status = "interrupted"
        store.set_status(name, "interrupted")
        _fail(f"study {name!r} interrupted; continue with `nas resume {name}`", code=130)
    except Exception as e:
        store.set_status(name, "failed")
        _fail(f"study {name!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
              f"stored results are kept, continue with `nas resume {name}`", code=1)
    finally:
        from nas.store import StoreError
        from workers.ray_tune import shutdown_ray

        with contextlib.suppress(StoreError):  # a store that is gone has no lease to give back
            store.release_driver(name, pid, host)
        shutdown_ray()
    _print_front(store, name, json_out, next_steps=status in ("completed", "stopped"))


def _front_json(store: Any, name: str) -> list[dict[str, Any]]:
    from search_spaces import spec_from_json

    out = []
    for row in store.front(name):
        spec = spec_from_json(row["spec"] if isinstance(row["spec"], str) else json.dumps(row["spec"]), "hybrid_vit")
        metrics = dict(row["metrics"])
        if metrics.get("source") == "screen" and "accuracy" in metrics:  # stored before screening had its own key
            metrics.setdefault("score", metrics.pop("accuracy"))
            metrics.pop("accuracy", None)
        out.append({"rank": row["rank"], "hash": row["arch_hash"], "short": spec.short(), "metrics": metrics,
                    "params": row.get("params"), "flops": row.get("flops"), "spec": spec.to_dict()})
    return out


def _print_front(store: Any, name: str, json_out: bool, next_steps: bool = False) -> None:
    info = store.study(name)
    rows = _front_json(store, name)
    if json_out:
        print(json.dumps({"study": info.to_dict(), "front": rows}, indent=2, default=str))
        return
    src = rows[0]["metrics"].get("source", "") if rows else ""
    screening = src == "screen"  # nothing trained: a screening ranking, its score never shown as accuracy
    what = (f"no architecture trained yet: screening ranking, not a front ({len(rows)}, score from screen)"
            if screening else f"Pareto front ({len(rows)}, accuracy from {src or '-'})")
    t = Table(title=f"study {name}: {info.status}, {_budget_text(info)}, {info.trials_done} evaluations; {what}",
              box=box.SIMPLE)
    key = "score" if screening else "accuracy"
    for col in ("#", "hash", key, "latency ms", "params", "architecture"):
        t.add_column(col, justify="left" if col in ("hash", "architecture") else "right",
                     overflow="fold" if col == "architecture" else "ellipsis")
    for r in rows:
        m = r["metrics"]
        t.add_row(str(r["rank"]), r["hash"][:10], f"{m.get(key, float('nan')):.4f}",
                  f"{m['latency_ms']:.3f}" if "latency_ms" in m else "-",
                  f"{int(m.get('params', r.get('params') or 0)):,}", r["short"])
    console.print(t)
    if next_steps:
        console.print(f"next: nas show {name} | nas best {name} --json | nas resume {name} --budget +1cpu-m"
                      + (f" --storage {store.url}" if store.url != "sqlite:///nas.db" else ""))


@app.command()
def search(
    space: str = typer.Option("hybrid_vit", "--space", help="Search space (hybrid_vit)."),
    budget: str = typer.Option(..., "--budget", help="8gpu-h, 30gpu-m, 2cpu-h, 90s, 2h or 500trials."),
    data: str = typer.Option("digits", "--data", help="digits | cifar10:PATH | imagefolder:PATH | npz:PATH."),
    objectives: str = typer.Option("accuracy,latency", "--objectives", help="accuracy plus latency/params/flops."),
    target: str = typer.Option("cpu", "--target", help="Device the trials run and are timed on: cpu or cuda."),
    precision: str = typer.Option("fp32", "--precision", help="any, fp32, bf16, fp16, int8 or fp8."),
    max_params: str | None = typer.Option(None, "--max-params", help="Parameter limit, e.g. 5M."),
    max_latency_ms: float | None = typer.Option(None, "--max-latency-ms", help="Latency limit on the target."),
    img_size: int | None = typer.Option(None, "--img-size", help="Image side (default: native, at least 16)."),
    study: str | None = typer.Option(None, "--study", help="Study name (default: SPACE-DATE-TIME)."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
    workers: int = typer.Option(1, "--workers", help="Trials run at once."),
    address: str | None = typer.Option(None, "--address", help="Join a Ray cluster: auto or HOST:PORT."),
    seed: int = typer.Option(0, "--seed"),
    strategy: str = typer.Option("staged", "--strategy", help="staged, nsga2 or random."),
    stages: str | None = typer.Option(None, "--stages", help="Budget shares, e.g. screen=0.15,supernet=0.35,"
                                                                "latency=0.1,train=0.4."),
    frame: str = typer.Option("auto", "--frame", help="Space: auto, tiny, small or a frame JSON file."),
    train_epochs: int = typer.Option(4, "--train-epochs", help="Epochs of the short training."),
    data_limit: int | None = typer.Option(None, "--limit", help="Use this many training images."),
    supernet: str | None = typer.Option(None, "--supernet", help="A trained supernet to use instead of training."),
    parzc: str | None = typer.Option(None, "--parzc", help="A saved ParZC predictor to screen with."),
    threads: int = typer.Option(1, "--threads", help="Torch threads per trial."),
    json_out: bool = typer.Option(False, "--json", help="Print the study and its front as JSON."),
) -> None:
    """Search SPACE for the Pareto front of accuracy against latency within a budget."""
    import datetime

    from nas.search import (
        SearchConfig,
        SearchError,
        create_study,
        parse_budget_arg,
        parse_count,
        parse_shares,
        prepare_study,
    )
    from nas.store import StoreError, validate_study_name, validate_url

    try:
        bud = parse_budget_arg(budget)
        _between("--img-size", img_size, 8, 1024)
        _between("--seed", seed, 0, MAX_SEED)
        _between("--limit", data_limit, 20, 10_000_000)
        for flag, text in (("--max-params", max_params), ("--stages", stages), ("--objectives", objectives),
                           ("--address", address)):
            _ascii_number(flag, text)
        if max_latency_ms is not None and not 0 < max_latency_ms < 1e9:
            raise BadInput(f"--max-latency-ms must be a positive number of milliseconds, got {max_latency_ms}")
        if space not in ("hybrid_vit",):
            _space(space)
            raise BadInput(f"nas search runs on space hybrid_vit; {space!r} is a benchmark space for the proxies")
        kw: dict[str, Any] = {}
        if stages is not None:
            kw["shares"] = parse_shares(stages)
        if address is not None and address != "auto" and ":" not in address:
            raise BadInput(f"--address must be auto or HOST:PORT, got {address!r}")
        if data_limit is not None and data_limit < 20:
            raise BadInput(f"--limit must be at least 20 images, got {data_limit}")
        cfg = SearchConfig(space=space, data=data, data_limit=data_limit,
                           objectives=tuple(o.strip() for o in objectives.split(",") if o.strip()), target=target,
                           precision=precision, max_params=parse_count(max_params, "--max-params")
                           if max_params is not None else None, max_latency_ms=max_latency_ms, img_size=img_size,
                           frame=frame, strategy=strategy, workers=workers, threads=threads, address=address,
                           seed=seed, train_epochs=train_epochs, supernet=supernet, parzc=parzc, **kw)
        url = validate_url(storage)
        name = validate_study_name(study if study is not None else
                                   f"{space}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if address not in (None, "auto"):
            _reachable(address)
        conf = prepare_study(name, cfg, bud, url)  # every check that needs no store: nothing written yet
    except (SearchError, StoreError) as e:
        raise BadInput(str(e)) from None
    store = _open_store(url)
    try:
        create_study(store, name, cfg, bud, conf)
    except (SearchError, StoreError) as e:
        raise BadInput(str(e)) from None
    if not json_out:
        console.print(f"study {name} on {store.url}: {cfg.strategy} search of {space} on {data}, budget {bud}, "
                      f"target {target}, {workers} worker(s)")
    _run_driver(store, name, json_out)


@app.command()
def resume(
    name: str = typer.Argument(..., help="Study name."),
    budget: str | None = typer.Option(None, "--budget", help="Budget to add, e.g. +2gpu-h or +100trials."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the study and its front as JSON."),
) -> None:
    """Continue a stopped, crashed or finished study; nothing stored is lost or repeated."""
    from nas.budget import Budget, BudgetError
    from nas.search import SearchError, parse_budget_arg

    add = None
    if budget is not None:
        try:
            add = parse_budget_arg(budget, increment=True)
        except SearchError as e:
            raise BadInput(str(e)) from None
    store = _open_store(storage, must_exist=True)
    info = _study(store, name)
    if info.status == "completed" and add is None:
        raise BadInput(f"study {name!r} is complete; give it more budget, e.g. --budget +1cpu-m")
    if add is not None:
        try:
            new = Budget.from_dict(info.budget) + add
        except BudgetError as e:
            raise BadInput(str(e)) from None
    import os
    import socket

    # the lease first: a resume refused because a driver is live must change nothing (it used to
    # clear that driver's pending `nas stop`, and the study ran on to completed)
    if not store.acquire_driver(name, os.getpid(), socket.gethostname()):
        _already_running(store, name)
    if add is not None:
        store.set_budget(name, new.to_dict())
    store.clear_stop(name)
    if not json_out:
        info = store.study(name)
        console.print(f"resuming study {name} ({info.status}, {_budget_text(info)})")
    _run_driver(store, name, json_out)


@app.command()
def studies(
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the studies in a store."""
    store = _open_store(storage, must_exist=True)
    rows = store.studies()
    if json_out:
        print(json.dumps([s.to_dict() for s in rows], indent=2, default=str))
        return
    t = Table(title=f"studies in {store.url}", box=box.SIMPLE)
    for col in ("name", "strategy", "status", "stage", "budget", "evaluations", "best acc", "updated"):
        t.add_column(col)
    for s in rows:
        front = store.front(s.name)
        best = max((r["metrics"].get("accuracy", 0.0) for r in front), default=None)
        t.add_row(s.name, s.config.get("strategy", ""), s.status, s.stage or "-", _budget_text(s),
                  str(s.trials_done), "-" if best is None else f"{best:.4f}", str(s.updated_at)[:19])
    console.print(t)


@app.command()
def show(
    name: str = typer.Argument(..., help="Study name."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """A study: configuration, budget, stages, errors and its Pareto front."""
    store = _open_store(storage, must_exist=True)
    info = _study(store, name)
    evals = store.evaluations(name)
    per: dict[str, list[float]] = {}
    for ev in evals:
        st = per.setdefault(ev.stage, [0, 0, 0.0])
        st[0 if ev.error is None else 1] += 1
        st[2] += ev.seconds
    errors = [ev for ev in evals if ev.error]
    if json_out:
        print(json.dumps({"study": info.to_dict(), "stages": {k: {"done": v[0], "errors": v[1], "seconds": v[2]}
                                                               for k, v in per.items()},
                          "errors": [e.to_dict() for e in errors[-20:]], "front": _front_json(store, name)},
                         indent=2, default=str))
        return
    cfg = info.config
    console.print(f"study {name}: {info.status}{' (stage ' + info.stage + ')' if info.stage else ''}, "
                  f"{cfg.get('strategy')} search of {info.space} on {cfg.get('data')}, target {cfg.get('target')}, "
                  f"budget {_budget_text(info)}, objectives {','.join(cfg.get('objectives', []))}")
    t = Table(title="stages", box=box.SIMPLE)
    for col in ("stage", "done", "errors", "device-s"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for k, v in per.items():
        t.add_row(k, str(int(v[0])), str(int(v[1])), f"{v[2]:,.1f}")
    console.print(t)
    for e in errors[-3:]:
        console.print(f"error in {e.stage} trial {e.trial} (attempt {e.attempt}): "
                      f"{(e.error or '').strip().splitlines()[-1][:160]}")
    _print_front(store, name, False)


@app.command()
def best(
    name: str = typer.Argument(..., help="Study name."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
    json_out: bool = typer.Option(False, "--json", help="The front with full specs as JSON."),
) -> None:
    """The study's Pareto front, most accurate first."""
    store = _open_store(storage, must_exist=True)
    _study(store, name)
    if json_out:
        print(json.dumps(_front_json(store, name), indent=2))
        return
    _print_front(store, name, False)


@app.command()
def stop(
    name: str = typer.Argument(..., help="Study name."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
) -> None:
    """Ask a running study to stop gracefully (its trials in flight finish and are kept)."""
    store = _open_store(storage, must_exist=True)
    info = _study(store, name)
    if info.status not in ("running", "created"):
        console.print(f"study {name} is {info.status}; nothing to stop")
        return
    store.request_stop(name)
    import os
    import socket

    if store.acquire_driver(name, os.getpid(), socket.gethostname()):  # no live driver: mark it directly
        store.set_status(name, "stopped")
        store.clear_stop(name)
        store.release_driver(name, os.getpid(), socket.gethostname())
        console.print(f"study {name} had no live driver; marked stopped (continue with `nas resume {name}`)")
        return
    console.print(f"stop requested; the driver of {name} (pid {info.driver_pid}) finishes its trials in flight")


@app.command("export")
def export_cmd(
    name: str | None = typer.Argument(None, help="A study to export from (or use --spec)."),
    space: str = typer.Option("hybrid_vit", "--space", help="Search space (hybrid_vit)."),
    spec: str | None = typer.Option(None, "--spec", help="Spec JSON file, or - for stdin (no study needed)."),
    pick: str | None = typer.Option(None, "--pick", help="From the study's front: accuracy (default), latency "
                                                          "or knee."),
    trial: int | None = typer.Option(None, "--trial", help="The architecture of this Optuna trial number."),
    arch: str | None = typer.Option(None, "--arch", help="An architecture hash (or a unique prefix)."),
    out_file: str = typer.Option(..., "--out", help="The model file to write (e.g. model.py)."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="build_model()'s default classes "
                                                                       "(the study's, or 10)."),
    img_size: int | None = typer.Option(None, "--img-size", help="build_model()'s default image side (the "
                                                                 "study's, or 32)."),
    in_chans: int | None = typer.Option(None, "--in-chans", help="build_model()'s default channels (the "
                                                                 "study's, or 3)."),
    weights_file: str | None = typer.Option(None, "--weights", help="Also write weights (safetensors): inherited "
                                                                    "from the study's supernet, else initial."),
    onnx_file: str | None = typer.Option(None, "--onnx", help="Also write ONNX, checked with ONNX Runtime."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
) -> None:
    """Write a standalone PyTorch file (imports only torch) for an architecture of a study or a spec."""
    out, weights = Path(out_file), None if weights_file is None else Path(weights_file)
    sp = _space(space)
    if sp.name != "hybrid_vit":
        raise BadInput(f"export supports space hybrid_vit only, not {space!r}")
    if (name is None) == (spec is None):
        raise BadInput("give a study NAME or --spec FILE (not both)")
    if spec is not None and (pick or trial is not None or arch):
        raise BadInput("--pick, --trial and --arch choose from a study; with --spec leave them out")
    for flag, v in (("--num-classes", num_classes), ("--img-size", img_size), ("--in-chans", in_chans)):
        if v is not None:
            _positive(flag, v)
    _between("--num-classes", num_classes, 1, MAX_CLASSES)
    _between("--img-size", img_size, 1, 1024)  # the studies' range; the export runs the model once to check
    _between("--in-chans", in_chans, 1, MAX_CHANNELS)
    _between("--trial", trial, 0, 2**31 - 1)
    from nas.export import ExportError, check_paths, export_study, write_export

    onnx = None if onnx_file is None else Path(onnx_file)
    given = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    try:
        check_paths(out, weights, onnx)
        if name is not None:
            store = _open_store(storage, must_exist=True)
            _study(store, name)
            res = export_study(store, name, out, pick=pick, trial=trial, arch=arch, weights=weights, onnx=onnx,
                               **given)
        else:
            arch_spec = _parse_spec(sp, _read_text(str(spec)), "spec")
            sizes = {"num_classes": 10, "img_size": 32, "in_chans": 3}
            sizes.update({k: v for k, v in given.items() if v is not None})
            res = write_export(arch_spec, out, weights=weights, onnx=onnx, **sizes)
    except ExportError as e:
        raise BadInput(str(e)) from None
    if res.onnx is not None:
        console.print(f"wrote {res.onnx} (ONNX Runtime vs torch: max difference {res.onnx_error:.1e})")
    console.print(f"wrote {out} ({res.spec.short()}, hash {res.spec.hash[:12]})"
                  + (f" from study {name}" if name else "")
                  + (f" and {res.weights_source} weights {weights}" if weights is not None else ""))


@app.command()
def dashboard(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any non-loopback one requires a token."),
    port: int = typer.Option(8765, "--port", help="TCP port."),
    storage: str = typer.Option("sqlite:///nas.db", "--storage", help=_STORAGE_HELP),
    token: str | None = typer.Option(None, "--token", help="Required on every request, at least 16 characters "
                                                            "(generated and printed when binding a non-loopback "
                                                            "address without one)."),
    export_dir: str | None = typer.Option(None, "--export-dir", help="Where exports are written and downloads "
                                                                     "served from (default: nas_exports/ beside "
                                                                     "the store)."),
) -> None:
    """Web dashboard over the store: watch studies live, resume, stop and export them."""
    from nas.dashboard import DashboardError, check_bind, serve

    try:
        check_bind(host, port, token)
    except DashboardError as e:
        raise BadInput(str(e)) from None
    store = _open_store(storage, must_exist=True)
    url = store.url
    store.close()
    try:
        serve(url, host=host, port=port, token=token, export_dir=None if export_dir is None else Path(export_dir))
    except DashboardError as e:
        raise BadInput(str(e)) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    app()
