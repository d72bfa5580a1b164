"""The `nas` command line: parsing and printing only; :mod:`nas.lifecycle` (studies) and
:mod:`nas.jobs` (the verbs beside a study) do the work. Bad input is one line on stderr, exit
code 2, nothing written. One name means one thing on every verb."""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from typing import Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

EXIT_BAD_INPUT = 2
_MAX_ERROR = 300  # characters of an error line: a long bad value is never echoed whole
_RENAMED = {"--batch": "--batch-size", "--device": "--target"}  # old spelling -> new, on every verb
_LIMIT = {"search": "--data-limit", "train": "--data-limit", "eval": "--test-limit"}  # old --limit, by verb


class BadInput(Exception):
    """A user error: reported as one line, exit code 2."""


def _click_exc(name: str) -> tuple[type[BaseException], ...]:
    """Exception classes of click and of typer's vendored copy of it (typer >= 0.20 vendors click)."""
    found: list[type[BaseException]] = []
    for mod in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found += [c for c in [getattr(importlib.import_module(mod), name)] if c not in found]
    return tuple(found)


_EXIT, _ABORT = _click_exc("Exit"), _click_exc("Abort")
_NO_ARGS, _USAGE, _CLICK = _click_exc("NoArgsIsHelpError"), _click_exc("UsageError"), _click_exc("ClickException")


def _renamed(argv: list[str]) -> list[str]:
    """``argv`` with the old flag spellings replaced by the new ones (a note for each on stderr)."""
    verb = argv[1] if argv[:1] == ["supernet"] and len(argv) > 1 else (argv[0] if argv else "")
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        new = _LIMIT.get(verb) if flag == "--limit" else _RENAMED.get(flag)
        if new:
            print(f"nas: note: {flag} is now {new}", file=sys.stderr)
        out.append(new + eq + value if new else arg)
    return out


class _App(typer.Typer):
    """Typer app whose usage errors (and the library's SearchError) are one line on stderr, exit 2."""
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("prog_name", "nas")
        argv = _renamed(list(args[0] if args else kwargs.pop("args", None) or sys.argv[1:]))
        try:
            rv = typer.main.get_command(self).main(argv, standalone_mode=False, **kwargs)
        except _EXIT as e:
            sys.exit(getattr(e, "exit_code", 0))
        except _ABORT:
            _fail("aborted", code=1)
        except _NO_ARGS as e:
            print(e.format_message())  # type: ignore[attr-defined]
            sys.exit(0)
        except _CLICK as e:  # a usage error also points at --help
            ctx = getattr(e, "ctx", None)
            hint = "" if not isinstance(e, _USAGE) else f" (see 'nas {ctx.info_name} --help')" if ctx is not None \
                and ctx.parent else " (see 'nas --help')"
            _fail(e.format_message().replace("\n", " ") + hint)  # type: ignore[attr-defined]
        except (BadInput, ValueError) as e:  # ValueError: only the library's SearchError is the user's
            search = sys.modules.get("nas.search")
            if not isinstance(e, BadInput) and (search is None or not isinstance(e, search.SearchError)):
                raise
            _fail(str(e))
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``nas: error: MSG`` as one line of at most ~300 characters and exit with ``code``."""
    text = " ".join(str(msg).split())
    print(f"nas: error: {text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + '…'}", file=sys.stderr)
    sys.exit(code)


app = _App(help="hybrid-NAS: neural-architecture search for efficient hybrid vision backbones.",
           add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, no_args_is_help=True)


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="Print the package version and exit.")) -> None:
    """hybrid-NAS: neural-architecture search for efficient hybrid vision backbones."""
    if version:
        print(f"nas (hybrid-nas) {importlib.import_module('importlib.metadata').version('hybrid-nas')}")
        raise typer.Exit()


class _Console(Console):
    """rich's Console, but off a terminal (a pipe, a file, a test) lines are never wrapped or cut."""
    @property
    def size(self) -> Any:  # type: ignore[override]
        dims = super().size
        return dims if self.is_terminal else type(dims)(100_000, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(highlight=False, markup=False)


class _Lazy:
    """A module imported at first use: ``nas sample`` starts without the store, Ray or Optuna."""
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


lifecycle: Any = _Lazy("nas.lifecycle")
jobs: Any = _Lazy("nas.jobs")


def _fold(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` characters, broken only between tokens: at spaces, and
    inside a token longer than a line after its commas (per-block mixer lists)."""
    lines, cur = [], ""
    for word in text.split():
        for i, piece in enumerate([word] if len(word) <= width else re.findall(r"[^,]*,|[^,]+", word)):
            sep = "" if i else " "
            if cur and len(cur) + len(sep) + len(piece) > width:
                lines.append(cur)
                cur = piece
            else:
                cur = cur + sep + piece if cur else piece
    return "\n".join([*lines, cur])


def _table(title: str | None, cols: Any, rows: list[Any], fold: int | None = None, right: tuple[str, ...] = ()) -> None:
    """A table at the terminal's width that never cuts a cell: column ``fold`` (an architecture, prose)
    wraps at whole tokens; where the rest cannot fit, each row prints as lines (first cell alone)."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    avail = console.width - sum(w for i, w in enumerate(widths) if i != fold) - 3 * len(cols) - 2
    if title:
        console.print(title)
    if avail >= (0 if fold is None else min(widths[fold], 24)):
        t = Table(box=box.SIMPLE)
        for col in cols:
            t.add_column(col, justify="right" if col in right else "left", no_wrap=True)
        for r in rows:
            t.add_row(*[_fold(c, avail) if i == fold else c for i, c in enumerate(r)])
        console.print(t)
        return
    for r in rows:  # too narrow for a row: the first cell on a line of its own, the rest folded below it
        console.print(r[0], soft_wrap=True)
        rest = ", ".join(f"{c} {v}".replace(" ", "\0") for i, (c, v) in enumerate(zip(cols, r)) if i not in (0, fold))
        for indent, text in ((2, rest), (4, r[fold] if fold is not None else "")):  # a "column value" pair stays whole
            for line in _fold(text, max(console.width - indent, 24)).splitlines():
                console.print(" " * indent + line.replace("\0", " "), soft_wrap=True)


@contextlib.contextmanager
def _bar(quiet: bool, *columns: Any) -> Any:
    """A progress bar (none with ``quiet``) shown from the first ``update(**fields)`` on: bad input
    refused before any work prints nothing on stdout."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), *columns, TextColumn("{task.fields[i]}"),
                   TimeElapsedColumn(), console=console, disable=quiet)
    task = bar.add_task("", total=None, i="")
    try:
        yield lambda **kw: (bar.live.is_started or bar.start(), bar.update(task, **kw))
    finally:
        if bar.live.is_started:
            bar.stop()


def _emit(json_out: bool, obj: Any) -> bool:
    """With ``--json``: print ``obj`` as one JSON document; whether it did (then nothing else is printed)."""
    if json_out:
        print(json.dumps(obj, indent=2, default=str))
    return json_out


def _one_of(**given: Any) -> None:
    """BadInput unless exactly one option is given (keyword ``spec`` names ``--spec FILE|-``, and so on)."""
    if sum(v is not None for v in given.values()) != 1:
        flags = [f"--{k} {dict(spec='FILE|-', arch='STR', preset='NAME', n='N')[k]}" for k in given]
        raise BadInput(f"give exactly one of {', '.join(flags[:-1])} or {flags[-1]}")


def _opt(default: Any, flag: str, help: str) -> Any:
    return typer.Option(default, flag, help=help)


_JSON = _opt(False, "--json", "Machine-readable output (one JSON document on stdout).")
_TARGET = _opt("auto", "--target", "Device: auto (the GPU when torch sees one, else the CPU), cpu or cuda[:i].")
_STORAGE = _opt(None, "--storage", "Store: sqlite:///FILE or postgresql+psycopg://USER@HOST:PORT/DB (default: "
                                   "$NAS_STORAGE, else sqlite:///nas.db).")
_THREADS = _opt(1, "--threads", "CPU threads.")
_SPACE = _opt("hybrid_vit", "--space", "Search space (see 'nas spaces').")
_SPEC = _opt(None, "--spec", "Spec JSON file (for several: JSON lines), or - for stdin.")
_PRESET = _opt(None, "--preset", "A hybrid_vit preset instead of --spec.")
_DATA = _opt("digits", "--data", "digits | cifar10:PATH | imagefolder:PATH | npz:PATH")
_IMG = _opt(None, "--img-size", "Input resolution (default: the space's, frame's or study's).")
_CLASSES = _opt(None, "--num-classes", "Classifier outputs (default: the space's or study's).")
_SEED = _opt(0, "--seed", "First seed (spec i uses seed + i).")
_N = _opt(None, "--n", "N random architectures instead of --spec.")
_NAME = typer.Argument(..., help="Study name.")


@app.command()
def spaces(json_out: bool = _JSON) -> None:
    """List the search spaces and the registered token and channel mixers."""
    cat = jobs.catalog()
    if _emit(json_out, cat):
        return
    _table("search spaces", ("space", "default input", "description"),
           [(s["name"], f"{s['img_size']}px, {s['num_classes']} classes", s["doc"]) for s in cat["spaces"]], fold=2)
    _table("mixers", ("kind", "name", "layout", "tokens", "paper"), [tuple(m.values()) for m in cat["mixers"]], fold=4)


@app.command()
def sample(space: str = _SPACE, seed: int = _SEED, n: int = _opt(1, "--n", "How many specs."),
           json_out: bool = _opt(False, "--json", "One canonical spec JSON per line.")) -> None:
    """Draw random architectures from a space and print their specs."""
    sp = jobs.space(space)
    jobs.check_limits(n=n, seed=seed)
    specs = [sp.random(seed + i) for i in range(n)]
    if json_out:
        print("\n".join(s.to_json() for s in specs))
        return
    from search_spaces import count_params

    _table(f"{n} random {space} architectures (params at {sp.default_img_size}px, {sp.default_num_classes} classes)",
           ["seed", "hash", "params", "architecture"],
           [[str(seed + i), s.hash[:12], f"{count_params(sp.build(s)):,}", s.short()] for i, s in enumerate(specs)],
           fold=3)


@app.command()
def describe(space: str = _SPACE, spec: str | None = _SPEC, preset: str | None = _PRESET, img_size: int | None = _IMG,
             num_classes: int | None = _CLASSES, json_out: bool = _JSON) -> None:
    """Parameters, FLOPs and a per-stage table of one architecture."""
    info = jobs.describe(jobs.space(space), spec, preset, img_size=img_size, num_classes=num_classes)
    if _emit(json_out, info):
        return
    console.print(f"{info['short']}\nhash {info['hash']}\nparams {info['params']:,}   FLOPs {info['flops'] / 1e6:,.1f}M"
                  f" (MACs {info['macs'] / 1e6:,.1f}M) at {info['img_size']}x{info['img_size']}, {info['num_classes']}"
                  " classes" + (f", precision {info['precision']}" if "precision" in info else ""))
    _table(None, tuple(info["stages"][0]), [tuple(f"{v:,}" if isinstance(v, int) and k == "params" else str(v)
                                                  for k, v in r.items()) for r in info["stages"]], fold=6)


@app.command()
def proxies(space: str = _SPACE, spec: str | None = _SPEC, preset: str | None = _PRESET, data: str = _DATA,
            arch: str | None = _opt(None, "--arch", "Inline spec: JSON, or an NB201 cell string."),
            names: str | None = _opt(None, "--names", "Comma-separated proxies (default: the ten classic ones; "
                                     "the ViT-aware dss*, az_* on request)."),
            batch_size: int = _opt(64, "--batch-size", "Images in the (class-balanced) batch."),
            img_size: int | None = _IMG, seed: int = _opt(0, "--seed", "Seed of the batch and the proxies."),
            json_out: bool = _JSON,
            per_layer: bool = _opt(False, "--per-layer", "Also print node-wise (per-layer) values.")) -> None:
    """Zero-cost proxy scores of one architecture on one batch of real data."""
    sp = jobs.space(space)
    _one_of(spec=spec, arch=arch, preset=preset)
    s = jobs.parse_spec(sp, arch, "--arch") if arch is not None else jobs.read_specs(sp, spec, preset)[0]
    res = jobs.score_proxies(sp, s, data=data, batch_size=batch_size, img_size=img_size, seed=seed,
                                  per_layer=per_layer, names=None if not names else
                                  [n.strip() for n in names.split(",") if n.strip()])
    if _emit(json_out, {k: v for k, v in res.items() if k != "short"}):
        return
    console.print(f"{res['short']}  hash {s.hash[:12]}  data {data}  batch {res['batch_size']}  {res['img_size']}px")
    _table(None, ("proxy", "score"), [(k, f"{v:.6g}") for k, v in res["scores"].items()], right=("score",))
    for n, values in res.get("per_layer", {}).items():
        _table(f"{n} per layer", ("layer", "value"), [(k, f"{v:.4g}") for k, v in values.items()], right=("value",))


@app.command()
def device(target: str = _TARGET, json_out: bool = _JSON,
           threads: int | None = _opt(None, "--threads", "CPU threads to report (default: current).")) -> None:
    """The device fingerprint latency tables are keyed by (NVML on NVIDIA GPUs, the CPU otherwise)."""
    fp = jobs.device_info(target, threads=threads)
    if _emit(json_out, dict(sorted(fp.items()))):
        return
    _table(f"{fp['name']} ({jobs.device_line(fp)})  key {fp['key']}", ("field", "value"),
           [(k, ", ".join(v) if isinstance(v, list) else str(v)) for k, v in fp.items()], fold=1)


@app.command()
def latency(space: str = _SPACE, spec: str | None = _SPEC, preset: str | None = _PRESET, n: int | None = _N,
            seed: int = _SEED, target: str = _TARGET,
            precision: str | None = _opt(None, "--precision", "fp32|bf16|fp16|int8|fp8 (default: each spec's own)."),
            batch_size: int = _opt(1, "--batch-size", "Images a call."), img_size: int | None = _IMG,
            num_classes: int | None = _CLASSES, repeats: int = _opt(50, "--repeats", "Timed calls."),
            warmup: int = _opt(10, "--warmup", "Warm-up calls at least (then until stable)."), json_out: bool = _JSON,
            threads: int | None = _opt(None, "--threads", "CPU threads (default: torch's current)."),
            cuda_graph: bool = _opt(False, "--cuda-graph", "Replay a captured CUDA graph (GPU only).")) -> None:
    """Measured latency (median, p10/p90, CV, peak memory) of architectures on a device."""
    sp = jobs.space(space)
    _one_of(spec=spec, preset=preset, n=n)
    specs = None if n is not None else jobs.read_specs(sp, spec, preset, many=True)
    res = jobs.measure_latency(sp, specs, n=n, seed=seed, target=target, precision=precision,
                                    batch_size=batch_size, img_size=img_size, num_classes=num_classes, warmup=warmup,
                                    repeats=repeats, threads=threads, cuda_graph=cuda_graph)
    if _emit(json_out, res):
        return
    cols = ("hash", "params", "prec", "median", "p10", "p90", "cv %", "peak MiB", "img/s")
    fp = res["fingerprint"]
    _table(f"{fp['name']} ({jobs.device_line(fp)})  key {fp['key']}\nbatch {batch_size}, {res['img_size']}px, "
           f"{res['num_classes']} classes, {repeats} timed calls, times in ms",
           cols, [(r["hash"][:8], f"{r['params'] / 1e6:.2f}M", r["precision"], *(f"{r[k]:.3f}" for k in (
               "median_ms", "p10_ms", "p90_ms")), f"{100 * r['cv']:.1f}", "-" if r["peak_mem_mb"] is None else
               f"{r['peak_mem_mb']:.1f}", f"{r['throughput']:.0f}") for r in res["results"]],
           right=cols[3:] + cols[1:2])
    for r in res["results"]:
        arch = _fold(r["short"], max(console.width - 12, 24)).replace("\n", "\n" + 12 * " ")
        console.print(f"  {r['hash'][:8]}  {arch}", soft_wrap=True)


supernet_app = _App(help="Weight-sharing supernet: train once, evaluate subnets with inherited weights.",
                    no_args_is_help=True, rich_markup_mode=None)
app.add_typer(supernet_app, name="supernet")


@supernet_app.command("train")
def supernet_train(
    space: str = _opt("hybrid_vit", "--space", "Search space: hybrid_vit, or nb201 with --benchmark."),
    frame: str = _opt("auto", "--frame", "auto (tiny at 16px and below, else small), small, tiny or a JSON file."),
    data: str = _DATA, epochs: int = _opt(..., "--epochs", "Epochs over the training images."),
    out: str = _opt(..., "--out", "Checkpoint directory (an existing run there is resumed)."),
    data_limit: int | None = _opt(None, "--data-limit", "Use this many training images (class-balanced)."),
    img_size: int | None = _IMG, batch_size: int = _opt(128, "--batch-size", "Images a step."),
    lr: float = _opt(2e-3, "--lr", "Peak AdamW learning rate."), threads: int = _THREADS, target: str = _TARGET,
    n_random: int = _opt(2, "--n-random", "Random subnets a step besides the largest and smallest."),
    no_distill: bool = _opt(False, "--no-distill", "Train every subnet on the labels only."), json_out: bool = _JSON,
    sampling: str = _opt("uniform", "--sampling", "How a step's subnets are drawn: uniform (the sandwich rule), fair "
                         "(FairNAS) or single_path (SPOS: --n-random subnets and no largest or smallest; with "
                         "--no-distill). A study trains single_path, --n-random 4, --no-distill."),
    no_augment: bool = _opt(False, "--no-augment", "No random crops or flips."),
    no_flip: bool = _opt(False, "--no-flip", "Random crops but no horizontal flips (e.g. digits)."),
    seed: int = _opt(0, "--seed", "Seed of the weights, the data order and the subnets."),
    ckpt_every: int = _opt(100, "--ckpt-every", "Steps between checkpoints (also each epoch end)."),
) -> None:
    """Train a supernet (the sandwich rule, or --sampling); run the same command again to resume."""
    from rich.progress import MofNCompleteColumn

    with _bar(json_out, MofNCompleteColumn()) as update:

        def started(fr: Any, ds: Any) -> None:
            if not json_out:
                console.print(f"supernet over frame {frame}: {len(fr.stages)} stages, ~10^{fr.size():.1f} subnets; "
                              f"{data}: {len(ds)} images {fr.in_chans}x{fr.img_size}x{fr.img_size}, "
                              f"{fr.num_classes} classes")

        def progress(st: Any, loss: float) -> None:
            update(completed=st.step, total=st.total_steps, description="steps",
                   i=f"epoch {(st.step - 1) // st.steps_per_epoch + 1}/{epochs} loss {loss:.3f}")

        res = jobs.train_supernet(frame, data, epochs, out, space=space, data_limit=data_limit, img_size=img_size,
                                       target=target, threads=threads, ckpt_every=ckpt_every, progress=progress,
                                       started=started, lr=lr, batch_size=batch_size, n_random=n_random, seed=seed,
                                       distill=not no_distill, augment=not no_augment, flip=not no_flip,
                                       sampling=sampling)
    if _emit(json_out, res):
        return
    console.print(f"done: {res['steps']} steps, {res['seconds']:.0f} s of training, last epoch loss {res['loss']:.3f}; "
                  f"checkpoint {res['ckpt']}\nnext: nas supernet eval --ckpt {out} --n 5")


@supernet_app.command("eval")
def supernet_eval(
    ckpt: str = _opt(..., "--ckpt", "Directory (or file) of a supernet checkpoint."),
    spec: str | None = _SPEC, n: int | None = _N, seed: int = _SEED,
    data: str | None = _opt(None, "--data", "Evaluation data (default: the training data's)."),
    test_limit: int | None = _opt(2000, "--test-limit", "Class-balanced test images (0: all)."),
    calib_batches: int = _opt(16, "--calib-batches", "Training batches for BatchNorm recalibration."),
    precision: str | None = _opt(None, "--precision", "Override each spec's own precision."),
    target: str = _TARGET, threads: int = _THREADS, json_out: bool = _JSON,
) -> None:
    """Accuracy of subnets with weights inherited from a trained supernet (seconds each)."""
    specs = jobs.read_specs(jobs.space("hybrid_vit"), spec, many=True) if spec is not None else None
    res = jobs.evaluate_subnets(ckpt, specs, n=n, seed=seed, data=data, test_limit=test_limit,
                                     calib_batches=calib_batches, precision=precision, target=target, threads=threads)
    if _emit(json_out, res):
        return
    _table(f"inherited-weight accuracy on {res['images']} test images of {res['data']}",
           ["hash", "accuracy", "prec", "seconds", "subnet"],
           [[r["hash"][:8], f"{r['accuracy']:.4f}", r["precision"], f"{r['seconds']:.2f}", r["short"]]
            for r in res["results"]], fold=4, right=("accuracy", "seconds"))


def _run(json_out: bool, start: Any, name: str, url: str) -> None:
    """Run a study through ``start(progress)`` with a progress bar, then print its front."""
    from nas.search import StudyLost

    with _bar(json_out) as update:

        def progress(p: dict[str, Any]) -> None:
            unit, best = "trials" if p["kind"] == "trials" else "device-s", p["best"]
            unit = "simulated " + unit if p.get("simulated") and unit == "device-s" else unit
            update(completed=min(1.0, p["used"] / max(p["total"], 1e-9)), total=1.0, description=f"{p['stage']:>8}",
                   i=f"{p['used']:,.1f}/{p['total']:,.0f} {unit}  trials {p['trials']}  best acc "
                     f"{'-' if best is None else f'{best:.4f}'}  errors {p['errors']}")

        try:
            result = start(progress)
        except StudyLost as e:
            _fail(f"study {name!r} stopped: {e}", code=1)
        except lifecycle.StudyFailed as e:
            _fail(str(e), code=1)
        except KeyboardInterrupt:
            _fail(f"study {name!r} interrupted; continue with `{lifecycle.command('resume', name, url=url)}`", code=130)
    _print_front(result, json_out, url if result.status in ("completed", "stopped") else None)


def _print_front(summary: Any, json_out: bool, next_url: str | None = None) -> None:
    """The front as a table (or the summary as JSON); with ``next_url`` the next commands on that store."""
    info, rows = summary.study, summary.front
    if _emit(json_out, summary.to_dict()):
        return
    src = rows[0]["metrics"].get("source", "") if rows else ""
    key = "score" if src == "screen" else "accuracy"  # nothing trained: a screening score is never an accuracy
    what = (f"no architecture trained yet: screening ranking, not a front ({len(rows)}, score from screen)"
            if key == "score" else f"Pareto front ({len(rows)}, accuracy from {src or '-'})")
    cfg = info.config
    if src == "benchmark":  # nothing here was trained: say where the figures come from
        what = (f"Pareto front ({len(rows)}) from a benchmark, not trained here: {lifecycle.benchmark_source(cfg)}, "
                "simulated training cost")
    _table(f"study {info.name}: {info.status}, {summary.used_text}, {info.trials_done} evaluations; {what}",
           ["#", "hash", key, "latency ms", "params", "architecture"],
           [[str(r["rank"]), r["hash"][:10], f"{r['metrics'].get(key, float('nan')):.4f}",
             f"{r['metrics']['latency_ms']:.3f}" if "latency_ms" in r["metrics"] else "-",
             f"{int(r['metrics'].get('params', r.get('params') or 0)):,}", r["short"]] for r in rows],
           fold=5, right=("#", key, "latency ms", "params"))
    if next_url:
        console.print("next: " + " | ".join(lifecycle.command(*w, url=next_url) for w in (
            ("show", info.name), ("best", info.name, "--json"),
            ("resume", info.name, "--budget", lifecycle.increment_hint(
                summary.budget, training_s=cfg.get("benchmark_train_s") if cfg.get("benchmark") else None)))))


@app.command()
def search(
    space: str = _opt("hybrid_vit", "--space", "Search space: hybrid_vit, or nb201 with --benchmark."),
    budget: str = _opt(..., "--budget", "8gpu-h, 30gpu-m, 2cpu-h, 90s, 2h or 500trials."),
    data: str = _DATA, objectives: str = _opt("accuracy,latency", "--objectives", "accuracy plus latency/params/flops"),
    target: str = _opt("auto", "--target", "Device of the trials: auto (a cpu/gpu budget's, else the GPU if any), "
                                           "cpu or cuda"),
    precision: str = _opt("fp32", "--precision", "any, fp32, bf16, fp16, int8 or fp8."), storage: str | None = _STORAGE,
    max_params: str | None = _opt(None, "--max-params", "Parameter limit, e.g. 5M."),
    max_latency_ms: float | None = _opt(None, "--max-latency-ms", "Latency limit on the target."),
    img_size: int | None = _opt(None, "--img-size", "Image side (default: native, at least 16)."),
    study: str | None = _opt(None, "--study", "Study name (default: SPACE-DATE-TIME)."),
    workers: int = _opt(1, "--workers", "Trials run at once."), strategy: str = _opt("staged", "--strategy", "staged, "
                                                                                     "nsga2, rea or random."),
    address: str | None = _opt(None, "--address", "Join a Ray cluster: auto or HOST:PORT."),
    seed: int = _opt(0, "--seed", "Seed of the sampler, the data split and the weights."),
    stages: str | None = _opt(None, "--stages", "Budget shares, e.g. screen=0.15,supernet=0.35,latency=0.1,train=0.4."),
    frame: str = _opt("auto", "--frame", "Space: auto, tiny, small or a frame JSON file."),
    train_epochs: int = _opt(4, "--train-epochs", "Epochs of the short training."),
    early_stop: str = _opt("none", "--early-stop", "The train stage's early stopping: none, or asha (stops weak "
                                                   "trainings after 1, 2, 4... epochs)."),
    data_limit: int | None = _opt(None, "--data-limit", "Use this many training images (at least 20)."),
    supernet: str | None = _opt(None, "--supernet", "A trained supernet to use instead of training one."),
    parzc: str | None = _opt(None, "--parzc", "A saved ParZC predictor to screen with."),
    threads: int = _opt(1, "--threads", "Torch threads per trial."), json_out: bool = _JSON,
    supernet_workers: str = _opt("auto", "--supernet-workers", "Workers that train the supernet together (Ray "
                                                              "Train, DDP); auto: every GPU the trials do not hold "
                                                              "on --target cuda, else 1 (one process)."),
    train_workers: int = _opt(1, "--train-workers", "Workers that train each train-stage candidate together (Ray "
                                                   "Train, DDP); 1: one process."),
    gpus_per_trial: float = _opt(1.0, "--gpus-per-trial", "GPUs a trial holds on --target cuda, in (0, 1]: "
                                                         "0.25 lets four small trials share a GPU."),
    benchmark: str | None = _opt(None, "--benchmark", "nb201: a labels CSV (arch, accuracy) to look accuracies up "
                                                     "in instead of training."),
    benchmark_column: str | None = _opt(None, "--benchmark-column", "Its accuracy column (default: the one *_acc)."),
    benchmark_latency: str | None = _opt(None, "--benchmark-latency", "nb201: a latency CSV (arch, one column per "
                                                                     "device)."),
    device_column: str | None = _opt(None, "--device-column", "The device's column in it, e.g. titan_rtx_256_ms."),
    benchmark_train_s: float = _opt(1000.0, "--benchmark-train-seconds", "Simulated device-seconds of training the "
                                                                         "mean cell (cost scales with FLOPs)."),
    proxy_cache: str | None = _opt(None, "--proxy-cache", "A folder that shares zero-cost scores across benchmark "
                                                         "studies (each is still charged)."),
    screen_max: int | None = _opt(None, "--screen-max", "Candidates a screening round takes at most (benchmark "
                                                       "default 1000)."),
    screen_batch: int | None = _opt(None, "--screen-batch", "Candidates per screening request, 1-32 (default: "
                                                           "about 3 s of work); fixed, a seeded benchmark "
                                                           "search repeats itself."),
) -> None:
    """Search SPACE for the Pareto front of accuracy against latency within a budget."""
    options = {k: v for k, v in locals().items() if k not in ("budget", "study", "storage", "json_out", "stages")}
    from nas.store import mask_url

    store, info = lifecycle.create(storage, budget=budget, name=study, **options,
                                   **({} if stages is None else {"shares": stages}))
    if not json_out:
        console.print(f"study {info.name} on {mask_url(store.url)}: {strategy} search of {space} on {data}, budget "
                      f"{info.budget.get('text')}, target {info.config['target']}, {workers} worker(s)")
    _run(json_out, lambda progress: lifecycle.run(store, info.name, progress=progress), info.name, store.url)


@app.command()
def resume(name: str = _NAME, budget: str | None = _opt(None, "--budget", "Budget to add, e.g. +2gpu-h or +100trials."),
           storage: str | None = _STORAGE, json_out: bool = _JSON) -> None:
    """Continue a stopped, crashed or finished study; nothing stored is lost or repeated."""
    store = lifecycle.open_store(storage)

    def started(info: Any) -> None:
        if not json_out:
            console.print(f"resuming study {name} ({info.status}, {lifecycle.budget_text(info)})")

    _run(json_out, lambda progress: lifecycle.resume(store, name, budget, progress=progress, started=started), name,
         store.url)


@app.command()
def studies(storage: str | None = _STORAGE, json_out: bool = _JSON) -> None:
    """List the studies in a store."""
    from nas.store import mask_url

    store = lifecycle.open_store(storage)
    rows = store.studies()
    if _emit(json_out, [s.to_dict() for s in rows]):
        return
    best = {s.name: lifecycle.best_accuracy(store, s.name) for s in rows}
    _table(f"studies in {mask_url(store.url)}",
           ["name", "strategy", "status", "stage", "budget", "evaluations", "best acc", "updated"],
           [[s.name, s.config.get("strategy", ""), s.status, s.stage or "-", lifecycle.budget_text(s),
             str(s.trials_done), "-" if best[s.name] is None else f"{best[s.name]:.4f}", str(s.updated_at)[:19]]
            for s in rows])


@app.command()
def show(name: str = _NAME, storage: str | None = _STORAGE, json_out: bool = _JSON) -> None:
    """A study: configuration, budget, stages, errors and its Pareto front."""
    s = lifecycle.summary(lifecycle.open_store(storage), name)
    if _emit(json_out, s.to_dict()):
        return
    info, cfg = s.study, s.study.config
    console.print(f"study {name}: {info.status}{' (stage ' + info.stage + ')' if info.stage else ''}, "
                  f"{cfg.get('strategy')} search of {info.space} on {cfg.get('data')}, target {cfg.get('target')}, "
                  f"budget {s.used_text}, objectives {','.join(cfg.get('objectives', []))}")
    _table("", ["stage", "done", "errors", "device-s"],
           [[k, str(int(v["done"])), str(int(v["errors"])), f"{v['seconds']:,.1f}"] for k, v in s.stages.items()],
           right=("done", "errors", "device-s"))
    for e in s.errors[-3:]:
        console.print(f"error in {e.stage} trial {e.trial} (attempt {e.attempt}): "
                      f"{(e.error or '').strip().splitlines()[-1][:160]}")
    _print_front(s, False)


@app.command()
def best(name: str = _NAME, storage: str | None = _STORAGE, json_out: bool = _JSON) -> None:
    """The study's Pareto front, most accurate first."""
    s = lifecycle.summary(lifecycle.open_store(storage), name)
    if _emit(json_out, s.front):
        return
    _print_front(s, False)


@app.command()
def stop(name: str = _NAME, storage: str | None = _STORAGE, json_out: bool = _JSON) -> None:
    """Ask a running study to stop gracefully (its trials in flight finish and are kept)."""
    store = lifecycle.open_store(storage)
    res = lifecycle.stop(store, name)
    if _emit(json_out, res.to_dict()):
        return
    hint = f" (continue with `{lifecycle.command('resume', name, url=store.url)}`)" if res.action == "marked" else ""
    console.print(res.message + hint)


@app.command("export")
def export_cmd(
    name: str | None = typer.Argument(None, help="A study to export from (or use --spec)."),
    space: str = _opt("hybrid_vit", "--space", "Search space: hybrid_vit, or nb201 with --benchmark."),
    spec: str | None = _opt(None, "--spec", "Spec JSON file, or - for stdin (no study needed)."),
    pick: str | None = _opt(None, "--pick", "From the study's front: accuracy (default), latency or knee."),
    trial: int | None = _opt(None, "--trial", "The architecture of this Optuna trial number."),
    arch: str | None = _opt(None, "--arch", "An architecture hash (or a unique prefix)."),
    out: str = _opt(..., "--out", "The model file to write (e.g. model.py)."), num_classes: int | None = _CLASSES,
    img_size: int | None = _IMG, in_chans: int | None = _opt(None, "--in-chans", "Input channels (default: 3)."),
    weights: str | None = _opt(None, "--weights", "Also write weights: trained, else supernet's, else initial."),
    onnx: str | None = _opt(None, "--onnx", "Also write ONNX, checked with ONNX Runtime."), json_out: bool = _JSON,
    storage: str | None = _STORAGE, preset: str | None = _PRESET,
    onnx_compatible: bool = _opt(False, "--onnx-compatible", "Take the best front point (by --pick) that exports "
                                 "to ONNX, and say which."),
    weights_format: str | None = _opt(None, "--weights-format", "safetensors or torch (a torch.save state dict); "
                                      "default: from the --weights suffix."),
) -> None:
    """Write a standalone PyTorch file (imports only torch) for an architecture of a study, a spec or a preset."""
    if jobs.space(space).name != "hybrid_vit":
        raise BadInput(f"export supports space hybrid_vit only, not {space!r}")
    res = jobs.export(out, storage=storage, name=name, spec=spec, pick=pick, trial=trial, arch=arch,
                      weights=weights, onnx=onnx, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                      preset=preset, onnx_compatible=onnx_compatible, weights_format=weights_format)
    if _emit(json_out, {"out": out, "hash": res.spec.hash, "short": res.spec.short(), "study": name,
                          "picked": res.picked or None,
                          "weights": weights, "weights_source": res.weights_source,
                          "onnx": None if res.onnx is None else str(res.onnx), "onnx_error": res.onnx_error}):
        return
    if res.picked:
        console.print(f"exporting {res.picked}: {res.spec.hash[:12]}")
    if res.onnx is not None:
        console.print(f"wrote {res.onnx} (ONNX Runtime vs torch: max difference {res.onnx_error:.1e})")
    console.print(f"wrote {out} ({res.spec.short()}, hash {res.spec.hash[:12]})" + (f" from study {name}" * bool(name))
                  + (f" and {res.weights_source} weights {weights}" if weights is not None else ""))


@app.command()
def dashboard(
    host: str = _opt("127.0.0.1", "--host", "Address to bind; any non-loopback one requires a token."),
    port: int = _opt(8765, "--port", "TCP port."), storage: str | None = _STORAGE,
    token: str | None = _opt(None, "--token", "At least 16 characters (generated off loopback when not given)."),
    export_dir: str | None = _opt(None, "--export-dir", "Exports go here (default: nas_exports/ beside the store)."),
) -> None:
    """Web dashboard over the store: watch studies live, resume, stop and export them."""
    from pathlib import Path

    from nas.dashboard import DashboardError, check_bind, serve

    try:
        check_bind(host, port, token)
        store = lifecycle.open_store(storage)
        store.close()
        serve(store.url, host=host, port=port, token=token, export_dir=None if export_dir is None else Path(export_dir))
    except DashboardError as e:
        raise BadInput(str(e)) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    app()
