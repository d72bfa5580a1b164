"""HybridBench: ground-truth accuracy for hybrid_vit architectures under one fixed recipe.

    .venv/bin/python bench/hybridbench.py sample                 # fix the architecture list (seeded)
    .venv/bin/python bench/hybridbench.py train --workers 2      # train every (architecture, seed); resumable
    .venv/bin/python bench/hybridbench.py proxies                # params, FLOPs, every zero-cost proxy
    .venv/bin/python bench/hybridbench.py latency                # CPU latency at batch 1 and 64 (run alone)
    .venv/bin/python bench/hybridbench.py supernet               # one supernet, inherited accuracy of each
    .venv/bin/python bench/hybridbench.py fewshot --variant fewshot4   # few-shot sub-supernets split from it
    .venv/bin/python bench/hybridbench.py table                  # bench/data/hybridbench_c10_v1.csv
    .venv/bin/python bench/hybridbench.py summary                # what is done, spread, seed-to-seed tau

The architectures come from the ``small`` frame (32px, 3 stages) with the precisions this CPU runs
natively (fp32, bf16, int8). They are drawn stratified (see :func:`sample_archs`): the k-th one is
led by the (k mod 10)-th token mixer and a rotating channel mixer, so every prefix of the list
covers the mixers evenly. The list is fixed by its seed and stored as JSON.

Training is the search's own train stage (``workers.evaluate.evaluate(spec, "train", ...)``: AdamW,
warm-up + cosine, label smoothing, no augmentation, fp32, then conversion to the spec's precision)
from scratch on a class-balanced subset of the CIFAR-10 train split. Each epoch is scored on a
class-balanced 2,000-image subset of the test split (the learning curve); the finished model is
scored on the full test split at the spec's precision (``test_acc``) and in fp32. A second seed
changes the initial weights and the data order; tau between the two seeds is the noise ceiling.

Every (architecture, seed) result is one JSON file in the cache (``--cache``), written atomically
when it finishes, so an interrupted run loses at most the trainings in flight and ``train`` again
continues. Results are keyed by a digest of the recipe: another recipe never mixes in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_spaces._space import RandomTrial  # noqa: E402
from search_spaces.spec import ArchSpec  # noqa: E402
from search_spaces.supernet import SupernetFrame, get_frame  # noqa: E402

DEFAULT_DATA = f"imagefolder:{ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"
DEFAULT_ARCHS = ROOT / "bench" / "data" / "hybridbench_archs.json"
DEFAULT_CACHE = ROOT / ".bench_cache" / "hybridbench"
DEFAULT_TABLE = ROOT / "bench" / "data" / "hybridbench_c10_v1.csv"
LEAD_P = 0.6  # probability that a block takes its architecture's lead token / channel mixer


# --------------------------------------------------------------------------------------------
# the architecture list
# --------------------------------------------------------------------------------------------


class _LeadTrial(RandomTrial):
    """A seeded random trial that picks the lead mixers with probability ``LEAD_P`` (else uniform)."""

    def __init__(self, seed: int, lead_token: str, lead_channel: str) -> None:
        super().__init__(seed)
        self._lead = {"token_mixer": lead_token, "channel_mixer": lead_channel}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        kind = name.rsplit(".", 1)[-1]
        if name not in self.params and kind in self._lead and self._lead[kind] in choices \
                and self._rng.random() < LEAD_P:
            self.params[name] = self._lead[kind]
        return super().suggest_categorical(name, choices)


def bench_frame(name: str = "small") -> SupernetFrame:
    """The frame the benchmark draws from: ``name`` with every precision this CPU runs natively."""
    from predictors.precision import supported_precisions

    frame = get_frame(name)
    precisions = tuple(p for p in supported_precisions("cpu") if p in ("fp32", "bf16", "fp16", "int8"))
    return replace(frame, precisions=precisions)


def sample_archs(frame: SupernetFrame, n: int, seed: int) -> list[ArchSpec]:
    """``n`` distinct subnets of ``frame``. The k-th is led by token mixer ``k mod T`` and channel
    mixer ``(k + k // T) mod C``: each block takes the lead mixers with probability ``LEAD_P``
    (uniform otherwise), so every mixer leads about n / T (n / C) architectures and appears in
    more; depth, width, heads, MLP ratio, per-block choice and precision are uniform."""
    tms, cms = frame.stages[0].token_mixers, frame.stages[0].channel_mixers
    out: list[ArchSpec] = []
    seen: set[str] = set()
    draw = seed * 1_000_003
    for k in range(n):
        tm, cm = tms[k % len(tms)], cms[(k + k // len(tms)) % len(cms)]
        while True:
            draw += 1
            spec = frame.sample(_LeadTrial(draw, tm, cm))
            used = {t for st in spec.stages for t, _ in st.mixers()}
            if tm in used and spec.hash not in seen:
                break
        seen.add(spec.hash)
        out.append(spec)
    return out


def load_archs(path: Path) -> tuple[SupernetFrame, list[ArchSpec], dict[str, Any]]:
    doc = json.loads(Path(path).read_text())
    frame = SupernetFrame.from_dict(doc["frame"])
    specs = [ArchSpec.from_dict(a["spec"]) for a in doc["archs"]]
    for a, s in zip(doc["archs"], specs):
        if a["hash"] != s.hash:
            raise SystemExit(f"{path}: architecture {a['id']} does not hash to {a['hash'][:12]}; regenerate the list")
    return frame, specs, doc


def mixer_counts(spec: ArchSpec) -> Counter[str]:
    """Blocks per token mixer and per channel mixer."""
    c: Counter[str] = Counter()
    for st in spec.stages:
        for t, m in st.mixers():
            c[t] += 1
            c[m] += 1
    return c


def cmd_sample(args: argparse.Namespace) -> None:
    frame = bench_frame(args.frame)
    specs = sample_archs(frame, args.n, args.seed)
    tms, cms = frame.stages[0].token_mixers, frame.stages[0].channel_mixers
    archs = [{"id": i, "hash": s.hash, "lead_token_mixer": tms[i % len(tms)],
              "lead_channel_mixer": cms[(i + i // len(tms)) % len(cms)], "spec": s.to_dict()}
             for i, s in enumerate(specs)]
    doc = {"frame_name": args.frame, "frame": frame.to_dict(), "n": args.n, "seed": args.seed,
           "lead_p": LEAD_P, "archs": archs}
    out = Path(args.archs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    present: Counter[str] = Counter()
    for s in specs:
        present.update(set(mixer_counts(s)))
    print(f"{len(specs)} architectures of frame {args.frame} (seed {args.seed}) -> {out}")
    print("architectures using each mixer: " + ", ".join(f"{m} {present[m]}" for m in (*tms, *cms)))
    print("precision: " + ", ".join(f"{p} {n}" for p, n in Counter(s.precision for s in specs).items()))


# --------------------------------------------------------------------------------------------
# data and recipe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Everything the trained accuracy depends on, besides the architecture and the seed."""

    data: str
    img_size: int
    train_limit: int  # class-balanced subset of the train split (0: all)
    test_limit: int  # class-balanced subset of the test split (0: all)
    curve_limit: int  # class-balanced test images scored after every epoch
    epochs: int
    batch: int
    lr: float

    def digest(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_of(args: argparse.Namespace, frame: SupernetFrame) -> Recipe:
    return Recipe(data=args.data, img_size=frame.img_size, train_limit=args.train_limit,
                  test_limit=args.test_limit, curve_limit=args.curve_limit, epochs=args.epochs,
                  batch=args.batch, lr=args.lr)


def data_file(cache: Path, r: Recipe) -> Path:
    return cache / f"data_{r.digest()}.pt"


def prepare_data(cache: Path, r: Recipe) -> Path:
    """Decode the train subset and the test split once into one tensor file the workers share."""
    from nas.data import load

    path = data_file(cache, r)
    if path.is_file():
        return path
    from predictors._io import atomic_write

    t0 = time.perf_counter()
    tr = load(r.data, "train", limit=r.train_limit or None, img_size=r.img_size, seed=0)
    te = load(r.data, "test", limit=r.test_limit or None, img_size=r.img_size, seed=0)
    payload = {"train_x": tr.x, "train_y": tr.y, "test_x": te.x, "test_y": te.y,
               "num_classes": tr.num_classes, "mean": tr.mean, "std": tr.std}
    atomic_write(path, lambda f: torch.save(payload, f), durable=False)
    print(f"data: {len(tr.x)} train / {len(te.x)} test images decoded in {time.perf_counter() - t0:.0f} s -> {path}",
          flush=True)
    return path


def _balanced(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a class-balanced subset of ``n`` labels (all when n >= len(y)), sorted."""
    if n <= 0 or n >= len(y):
        return torch.arange(len(y))
    k = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    idx = [(y == c).nonzero().flatten() for c in range(k)]
    take = [i[torch.randperm(len(i), generator=gen)[:n // k]] for i in idx]
    return torch.cat(take).sort().values


# --------------------------------------------------------------------------------------------
# training one (architecture, seed)
# --------------------------------------------------------------------------------------------


def result_file(cache: Path, r: Recipe, spec_hash: str, seed: int) -> Path:
    return cache / f"train_{r.digest()}" / f"{spec_hash[:16]}_s{seed}.json"


def weights_dir(cache: Path, r: Recipe, seed: int) -> Path:
    return cache / f"train_{r.digest()}" / f"weights_s{seed}"


_DATA: dict[str, Any] = {}


def _data(path: str) -> dict[str, Any]:
    if path not in _DATA:
        _DATA.clear()
        _DATA[path] = torch.load(path, weights_only=False)
    return _DATA[path]


def train_one(spec_dict: dict[str, Any], seed: int, recipe: dict[str, Any], data_path: str,
              cache: str) -> dict[str, Any]:
    """Train one architecture with the search's train stage; score it on the test split."""
    from predictors.precision import activation_dtype, to_precision
    from predictors.supernet import accuracy
    from search_spaces.hybrid_vit import build
    from workers.evaluate import EvalConfig, EvalData, Split, evaluate

    torch.set_num_threads(1)
    r = Recipe(**recipe)
    spec = ArchSpec.from_dict(spec_dict)
    d = _data(data_path)
    curve_idx = _balanced(d["test_y"], r.curve_limit, seed=1)
    data = EvalData(Split(d["train_x"], d["train_y"]), Split(d["test_x"][curve_idx], d["test_y"][curve_idx]),
                    int(d["num_classes"]))
    curve: list[float] = []
    wdir = weights_dir(Path(cache), r, seed)
    cfg = EvalConfig(train_epochs=r.epochs, train_batch=r.batch, train_lr=r.lr, threads=1, seed=seed,
                     weights_dir=str(wdir))
    t0 = time.perf_counter()
    ev = evaluate(spec, "train", data, "cpu", config=cfg, report=lambda _e, m: curve.append(m["accuracy"]))
    train_s = time.perf_counter() - t0
    model = build(spec, num_classes=data.num_classes, img_size=r.img_size, in_chans=int(d["train_x"].shape[1]))
    model.load_state_dict(torch.load(wdir / f"{spec.hash}.pt", weights_only=True))
    model.eval()
    test = Split(d["test_x"], d["test_y"])
    acc_fp32 = accuracy(model, test, batch_size=256)
    acc = acc_fp32
    if spec.precision != "fp32":
        q = to_precision(model, spec.precision, "cpu", inplace=False)
        acc = accuracy(q, test, batch_size=256, dtype=activation_dtype(spec.precision))
    out = {"hash": spec.hash, "seed": seed, "recipe": recipe, "test_acc": acc, "test_acc_fp32": acc_fp32,
           "curve": curve, "train_seconds": train_s, "seconds": time.perf_counter() - t0,
           "steps": ev.metrics.get("steps"), "params": ev.params, "device": ev.device}
    from predictors._io import atomic_write

    atomic_write(result_file(Path(cache), r, spec.hash, seed), lambda f: f.write(json.dumps(out).encode()),
                 durable=False)
    return out


def jobs(specs: list[ArchSpec], seeds: Sequence[int], second_n: int) -> list[tuple[int, int]]:
    """(architecture index, seed) in the order they run: the first ``second_n`` architectures get
    every seed before the rest get the first, so the noise ceiling is known early."""
    out = []
    for i in range(len(specs)):
        for s in seeds if i < second_n else seeds[:1]:
            out.append((i, s))
    return out


def runs_file(table: Path) -> Path:
    """Every finished training of the recipe (JSON lines, curves included), committed beside the
    table, so that a fresh clone continues the benchmark instead of training again."""
    return table.with_name(table.stem + "_runs.jsonl")


def import_runs(cache: Path, r: Recipe, path: Path) -> int:
    """Copy the results of ``path`` made with recipe ``r`` into the cache where it lacks them."""
    from predictors._io import atomic_write

    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else None
        if rec and rec.get("recipe") == r.__dict__:
            f = result_file(cache, r, rec["hash"], int(rec["seed"]))
            if not f.is_file():
                res = {k: v for k, v in rec.items() if k != "id"}  # as train_one wrote it
                atomic_write(f, lambda fh, o=res: fh.write(json.dumps(o).encode()), durable=False)
                n += 1
    return n


def cmd_train(args: argparse.Namespace) -> None:
    frame, specs, _ = load_archs(Path(args.archs))
    if args.only:
        specs = specs[:args.only]
    cache = Path(args.cache)
    r = recipe_of(args, frame)
    imported = import_runs(cache, r, runs_file(Path(args.out)))
    if imported:
        print(f"{imported} finished trainings taken from {runs_file(Path(args.out))} into the cache", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(i, s) for i, s in jobs(specs, seeds, args.second_seed_n)
            if not result_file(cache, r, specs[i].hash, s).is_file()]
    total = len(jobs(specs, seeds, args.second_seed_n))
    print(f"recipe {r.digest()}: {r}", flush=True)
    print(f"{total - len(todo)}/{total} trainings cached; {len(todo)} to run on {args.workers} processes", flush=True)
    if not todo:
        return
    dpath = str(prepare_data(cache, r))
    payload = r.__dict__
    done = total - len(todo)
    def show(i: int, s: int, res: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{total}] #{i} s{s} test {res['test_acc']:.4f} (fp32 {res['test_acc_fp32']:.4f}) "
              f"{res['seconds']:.0f} s  {specs[i].short()}", flush=True)

    if args.workers == 1:  # in this process (tests, debugging)
        for i, s in todo:
            show(i, s, train_one(specs[i].to_dict(), s, payload, dpath, str(cache)))
        return
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        pending = {pool.submit(train_one, specs[i].to_dict(), s, payload, dpath, str(cache)): (i, s) for i, s in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                i, s = pending.pop(f)
                show(i, s, f.result())


# --------------------------------------------------------------------------------------------
# measurements: proxies, params, FLOPs (any time) and latency (alone on the machine)
# --------------------------------------------------------------------------------------------


def proxy_file(cache: Path, r: Recipe, spec_hash: str) -> Path:
    return cache / f"proxies_{r.digest()}" / f"{spec_hash[:16]}.json"


def proxies_one(spec_dict: dict[str, Any], data_path: str, batch: int, names: list[str],
                nodes: bool = True) -> dict[str, Any]:
    """Params, FLOPs and every zero-cost proxy of the untrained model (seed 0) on one fixed,
    class-balanced batch of training images (``_balanced``, seed 0). The same recipe as the search's
    screen stage (seed-0 weights, 64 balanced images), but not its very batch: that one is drawn by
    ``workers.evaluate._balanced_batch``, which picks other images. ``names``: the proxies to compute
    (a cached record is completed with the missing ones only); ``nodes``: ParZC's features too."""
    from predictors.parzc import node_features
    from predictors.zero_cost import compute
    from search_spaces.counting import count_flops, count_params
    from search_spaces.hybrid_vit import build

    torch.set_num_threads(1)
    spec = ArchSpec.from_dict(spec_dict)
    d = _data(data_path)
    idx = _balanced(d["train_y"], batch, seed=0)
    x, y = d["train_x"][idx], d["train_y"][idx]
    model = build(spec, num_classes=int(d["num_classes"]), img_size=x.shape[-1], in_chans=x.shape[1], seed=0)
    out: dict[str, Any] = {"hash": spec.hash, "params": count_params(model),
                           "flops": count_flops(model, (1, *x.shape[1:]))}
    t0 = time.perf_counter()
    res = compute(model, x, y, names=[n for n in names if n not in ("params", "flops")])
    out["proxy_seconds"] = time.perf_counter() - t0
    out.update({f"zc_{k}": float(v) for k, v in res.items() if isinstance(v, (int, float))})
    # ParZC's node-wise statistics (its own compute call: per-layer values of its proxies)
    if nodes:
        out["parzc_nodes"] = node_features(model, x, y).tolist()
    return out


def cmd_proxies(args: argparse.Namespace) -> None:
    from predictors._io import atomic_write
    from predictors.zero_cost import ALL_PROXIES

    frame, specs, _ = load_archs(Path(args.archs))
    cache = Path(args.cache)
    r = recipe_of(args, frame)
    names = list(ALL_PROXIES)
    todo: list[tuple[ArchSpec, list[str], bool]] = []  # (spec, proxies missing, ParZC features missing)
    for s in specs:
        f = proxy_file(cache, r, s.hash)
        have = json.loads(f.read_text()) if f.is_file() else {}
        missing = [n for n in names if n not in ("params", "flops") and f"zc_{n}" not in have]
        if missing or "parzc_nodes" not in have:
            todo.append((s, missing, "parzc_nodes" not in have))
    print(f"{len(specs) - len(todo)}/{len(specs)} architectures have every proxy ({', '.join(names)})", flush=True)
    if not todo:
        return
    dpath = str(prepare_data(cache, r))

    def store(n: int, res: dict[str, Any]) -> None:
        path = proxy_file(cache, r, res["hash"])
        old = json.loads(path.read_text()) if path.is_file() else {}
        if "proxy_seconds" in old:  # a completed record: the time of all its proxies together
            res["proxy_seconds"] += old["proxy_seconds"]
        atomic_write(path, lambda fh: fh.write(json.dumps({**old, **res}).encode()), durable=False)
        if n % 20 == 0 or n == len(todo):
            print(f"  proxies {n}/{len(todo)}", flush=True)

    if args.workers == 1:
        for n, (s, miss, nodes) in enumerate(todo, 1):
            store(n, proxies_one(s.to_dict(), dpath, args.proxy_batch, miss, nodes))
        return
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futs = [pool.submit(proxies_one, s.to_dict(), dpath, args.proxy_batch, miss, nodes) for s, miss, nodes in todo]
        for n, f in enumerate(futs, 1):
            store(n, f.result())


def latency_file(cache: Path, spec_hash: str) -> Path:
    return cache / "latency_cpu" / f"{spec_hash[:16]}.json"


def cmd_latency(args: argparse.Namespace) -> None:
    """Median CPU latency at batch 1 and 64, one thread, at the spec's precision. Run it alone on
    the machine: it measures sequentially in this process."""
    from predictors._io import atomic_write
    from predictors.latency import measure
    from search_spaces.hybrid_vit import build

    frame, specs, _ = load_archs(Path(args.archs))
    cache = Path(args.cache)
    torch.set_num_threads(1)
    todo = [s for s in specs if not latency_file(cache, s.hash).is_file()]
    print(f"{len(specs) - len(todo)}/{len(specs)} architectures measured; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    shape = (frame.in_chans, frame.img_size, frame.img_size)
    for n, s in enumerate(todo, 1):
        model = build(s, num_classes=frame.num_classes, img_size=frame.img_size, in_chans=frame.in_chans).eval()
        out: dict[str, Any] = {"hash": s.hash, "load_before": os.getloadavg()[0]}
        for b, reps in ((1, args.repeats), (64, max(5, args.repeats // 4))):
            m = measure(model, shape, "cpu", precision=s.precision, batch_size=b, warmup=max(3, reps // 5),
                        repeats=reps, threads=1)
            out[f"lat_cpu_b{b}_ms"], out[f"lat_cpu_b{b}_cv"] = m.median_ms, m.cv
        out["fingerprint"] = m.device
        atomic_write(latency_file(cache, s.hash), lambda fh, o=out: fh.write(json.dumps(o).encode()), durable=False)
        if n % 20 == 0 or n == len(todo):
            print(f"  latency {n}/{len(todo)} (load {os.getloadavg()[0]:.2f})", flush=True)


# --------------------------------------------------------------------------------------------
# supernet
# --------------------------------------------------------------------------------------------


def supernet_dir(cache: Path, r: Recipe, variant: str) -> Path:
    return cache / f"supernet_{r.digest()}" / variant


def supernet_recipe(args: argparse.Namespace, n_train: int, in_chans: int) -> Any:
    """A variant's supernet recipe for this many images: ``study_recipe``'s optimiser, batch, lr and
    augmentation, with the sampling, subnets a step and distillation of the variant's flags. The
    flags' defaults are the first HybridBench attempts' recipe, the search's until session 9: the
    sandwich rule, 2 random subnets, in-place distillation (the search's recipe now is
    ``--sampling single_path --n-random 4 --no-distill``)."""
    from predictors.supernet import study_recipe

    base = study_recipe(n_train, in_chans, seed=0)
    cfg = replace(base, sampling=args.sampling, n_random=args.n_random, distill=not args.no_distill,
                  lr=args.supernet_lr or base.lr, seed=args.supernet_seed)
    # --no-augment matches the standalone recipe, which trains without crop or flip
    return replace(cfg, augment=False, flip=False) if args.no_augment else cfg


def cmd_supernet(args: argparse.Namespace) -> None:
    """Train one supernet of the benchmark's frame on the same training images (resumable from
    its checkpoint), then read every benchmark architecture's accuracy with inherited weights on
    the test split at the spec's precision (BatchNorm recalibrated on training images, after
    ``--finetune-steps`` steps of fine-tuning when asked)."""
    from predictors.supernet import load_checkpoint, train_supernet
    from search_spaces._runtime import retain_freed_memory
    from workers.evaluate import Split

    frame, specs, _ = load_archs(Path(args.archs))
    cache = Path(args.cache)
    r = recipe_of(args, frame)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the search's supernet job (search_spaces/_runtime.py)
    d = torch.load(prepare_data(cache, r), weights_only=False)
    train, test = Split(d["train_x"], d["train_y"]), Split(d["test_x"], d["test_y"])
    out = supernet_dir(cache, r, args.variant)
    cfg = supernet_recipe(args, len(train.x), frame.in_chans)
    (out / "variant.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "variant.json").write_text(json.dumps({"config": cfg.__dict__, "epochs": args.supernet_epochs,
                                                  "finetune_steps": args.finetune_steps}, indent=1))
    t0 = time.perf_counter()
    net = train_supernet(frame, train, args.supernet_epochs, config=cfg, out=out,
                         progress=_progress(args.supernet_epochs))
    print(f"supernet {args.variant}: trained ({net.train_state.seconds:.0f} s of steps; "  # type: ignore[attr-defined]
          f"{time.perf_counter() - t0:.0f} s this call)", flush=True)
    net, _ = load_checkpoint(out)
    net.eval()
    if args.only:  # evaluate only the first N architectures (the trained prefix)
        specs = specs[:args.only]
    inherited(net, specs, out / f"inherited_ft{args.finetune_steps}.json", train, test, args.finetune_steps)


def inherited(net: Any, specs: Sequence[ArchSpec], res_path: Path, train: Any, test: Any, finetune_steps: int,
              every: int = 20) -> dict[str, float]:
    """The inherited test accuracy of each of ``specs`` in the supernet ``net`` (BatchNorm recalibrated
    on ``train``, after ``finetune_steps`` of fine-tuning), by spec hash, continuing the results
    already in ``res_path`` and saving them there every ``every`` architectures and at the end."""
    from predictors._io import atomic_write
    from predictors.supernet import evaluate_subnet

    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    t0 = time.perf_counter()
    for n, s in enumerate(specs, 1):
        if s.hash in res:
            continue
        res[s.hash] = evaluate_subnet(net, s, test, calib=train, batch_size=256, finetune_steps=finetune_steps,
                                      finetune_data=train if finetune_steps else None, seed=0)
        if n % every == 0 or n == len(specs):
            atomic_write(res_path, lambda fh: fh.write(json.dumps(res).encode()), durable=False)
            print(f"  inherited accuracy {n}/{len(specs)} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    atomic_write(res_path, lambda fh: fh.write(json.dumps(res).encode()), durable=False)
    return res


def first_token_mixer(spec: ArchSpec) -> str:
    """The token mixer of stage 0's first block: the choice the few-shot sub-supernets split on."""
    return spec.stages[0].mixers()[0][0]


def fewshot_one(token_mixer: str, frame_dict: dict[str, Any], cfg_dict: dict[str, Any], epochs: int,
                base: str, out: str, data_path: str, spec_dicts: list[dict[str, Any]],
                finetune_steps: int) -> dict[str, float]:
    """One few-shot sub-supernet (Zhao et al. 2021): the one-shot supernet in ``base`` trained
    ``epochs`` more on the subnets with ``token_mixer`` in stage 0's first block (resumable from
    its own checkpoint in ``out``), then the inherited accuracy of each of ``spec_dicts`` (those
    subnets of the benchmark), kept in ``out`` as they come."""
    from predictors.supernet import TrainConfig, load_checkpoint, train_supernet
    from search_spaces._runtime import retain_freed_memory
    from workers.evaluate import Split

    torch.set_num_threads(1)
    retain_freed_memory()
    frame = SupernetFrame.from_dict(frame_dict)
    d = _data(data_path)
    train, test = Split(d["train_x"], d["train_y"]), Split(d["test_x"], d["test_y"])
    init, _ = load_checkpoint(base)
    t0 = time.perf_counter()
    net = train_supernet(frame, train, epochs, config=TrainConfig.from_dict(cfg_dict), out=out, init=init,
                         meta={"few_shot_from": base}, progress=_progress(epochs, f"sub-supernet {token_mixer}"))
    print(f"  sub-supernet {token_mixer}: trained ({time.perf_counter() - t0:.0f} s this call)", flush=True)
    net.eval()
    return inherited(net, [ArchSpec.from_dict(s) for s in spec_dicts], Path(out) / f"inherited_ft{finetune_steps}.json",
                     train, test, finetune_steps, every=1)


def cmd_fewshot(args: argparse.Namespace) -> None:
    """Few-shot NAS (Zhao et al. 2021, "Few-shot Neural Architecture Search"): split the trained
    one-shot supernet ``--few-shot-from`` on stage 0's first token mixer, one sub-supernet per choice,
    each trained ``--few-shot-epochs`` more on its part of the space only; each benchmark architecture
    is read from the sub-supernet of its own first token mixer. Sub-supernets in ``<variant>/split_<mixer>``,
    the combined inherited accuracies in ``<variant>/inherited_ft<N>.json``; ``--workers`` processes."""
    from predictors._io import atomic_write

    frame, specs, _ = load_archs(Path(args.archs))
    if args.only:
        specs = specs[:args.only]
    cache = Path(args.cache)
    r = recipe_of(args, frame)
    base = supernet_dir(cache, r, args.few_shot_from)
    if not (base / "supernet.pt").is_file():
        raise SystemExit(f"no supernet {args.few_shot_from!r} at {base}; train it first: "
                         f"hybridbench.py supernet --variant {args.few_shot_from}")
    dpath = str(prepare_data(cache, r))
    d = torch.load(dpath, weights_only=False)
    cfg = supernet_recipe(args, len(d["train_y"]), frame.in_chans)
    del d
    out = supernet_dir(cache, r, args.variant)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variant.json").write_text(json.dumps({"config": cfg.__dict__, "few_shot_from": args.few_shot_from,
                                                  "epochs_per_split": args.few_shot_epochs,
                                                  "finetune_steps": args.finetune_steps}, indent=1))
    groups = {t: [s.to_dict() for s in specs if first_token_mixer(s) == t] for t in frame.stages[0].token_mixers}
    groups = {t: g for t, g in groups.items() if g}  # a choice no architecture takes needs no sub-supernet
    print(f"few-shot from {args.few_shot_from}: {len(groups)} sub-supernets of {args.few_shot_epochs} epochs; "
          + ", ".join(f"{t} {len(g)}" for t, g in groups.items()), flush=True)
    jobs_ = {t: (t, frame.to_dict(), {**cfg.__dict__, "split_token_mixer": t}, args.few_shot_epochs, str(base),
                 str(out / f"split_{t}"), dpath, g, args.finetune_steps) for t, g in groups.items()}
    res: dict[str, float] = {}
    if args.workers == 1:
        for job in jobs_.values():
            res.update(fewshot_one(*job))
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            for part in pool.map(fewshot_one, *zip(*jobs_.values())):
                res.update(part)
    atomic_write(out / f"inherited_ft{args.finetune_steps}.json", lambda fh: fh.write(json.dumps(res).encode()),
                 durable=False)
    print(f"few-shot {args.variant}: inherited accuracy of {len(res)} architectures", flush=True)


def _progress(epochs: int, what: str = "supernet"):  # type: ignore[no-untyped-def]
    def show(st: Any, loss: float) -> None:
        if st.step % st.steps_per_epoch == 0:
            print(f"  {what} epoch {st.step // st.steps_per_epoch}/{epochs}: loss {loss:.3f}, "
                  f"{st.seconds:.0f} s", flush=True)
    return show


# --------------------------------------------------------------------------------------------
# the table and a summary
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per architecture with whatever the cache holds (missing values are empty)."""
    from predictors.zero_cost import ALL_PROXIES

    frame, specs, doc = load_archs(Path(args.archs))
    cache = Path(args.cache)
    r = recipe_of(args, frame)
    seeds = [int(s) for s in args.seeds.split(",")]
    tms, cms = frame.stages[0].token_mixers, frame.stages[0].channel_mixers
    sup = _read(supernet_dir(cache, r, args.variant) / f"inherited_ft{args.finetune_steps}.json") or {}
    cols = ["id", "hash", "lead_token_mixer", "lead_channel_mixer", "precision", "blocks",
            *(f"n_{m}" for m in (*tms, *cms)), "params", "flops", "lat_cpu_b1_ms", "lat_cpu_b64_ms",
            *(f"zc_{p}" for p in ALL_PROXIES if p not in ("params", "flops")),
            *(f"test_acc_s{s}" for s in seeds), "test_acc_mean", *(f"test_acc_fp32_s{s}" for s in seeds),
            *(f"train_seconds_s{s}" for s in seeds), "supernet_acc", "short", "spec"]
    out = []
    for a, s in zip(doc["archs"], specs):
        c = mixer_counts(s)
        row: dict[str, Any] = {"id": a["id"], "hash": s.hash, "lead_token_mixer": a["lead_token_mixer"],
                               "lead_channel_mixer": a["lead_channel_mixer"], "precision": s.precision,
                               "blocks": sum(st.depth for st in s.stages), "short": s.short(),
                               "spec": json.dumps(s.to_dict(), sort_keys=True, separators=(",", ":"))}
        row.update({f"n_{m}": c.get(m, 0) for m in (*tms, *cms)})
        p = _read(proxy_file(cache, r, s.hash)) or {}
        row.update({k: v for k, v in p.items() if k in cols})
        lat = _read(latency_file(cache, s.hash)) or {}
        row.update({k: v for k, v in lat.items() if k in cols})
        accs = []
        for sd in seeds:
            t = _read(result_file(cache, r, s.hash, sd))
            if t:
                row[f"test_acc_s{sd}"], row[f"test_acc_fp32_s{sd}"] = t["test_acc"], t["test_acc_fp32"]
                row[f"train_seconds_s{sd}"] = round(t["seconds"], 1)
                row.setdefault("params", t["params"])
                accs.append(t["test_acc"])
        if accs:
            row["test_acc_mean"] = statistics.fmean(accs)
        if s.hash in sup:
            row["supernet_acc"] = sup[s.hash]
        out.append(row)
    return out, cols


def complete(row: dict[str, Any], seeds: Sequence[int], second_n: int) -> bool:
    """Every seed it is due trained, and its proxies computed."""
    due = seeds if row["id"] < second_n else seeds[:1]
    return all(f"test_acc_s{s}" in row for s in due) and "zc_nwot" in row


def cmd_table(args: argparse.Namespace) -> None:
    """The table: the longest prefix of the list whose rows are complete (``--all``: every row)."""
    table, cols = rows(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    n = next((i for i, r in enumerate(table) if not complete(r, seeds, args.second_seed_n)), len(table))
    done = table[:n]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in (done if not args.all else table):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"{len(done if not args.all else table)} rows -> {out}")
    frame, specs, _ = load_archs(Path(args.archs))
    r = recipe_of(args, frame)
    cache = Path(args.cache)
    lines = []
    for i, spec in enumerate(specs):
        for sd in seeds:
            rec = _read(result_file(cache, r, spec.hash, sd))
            if rec:
                lines.append(json.dumps({"id": i, **rec}, sort_keys=True))
    runs = runs_file(out)
    runs.write_text("".join(line + "\n" for line in lines))
    print(f"{len(lines)} finished trainings -> {runs}")
    sup = {f"{d.name}/ft{f.stem.split('_ft')[-1]}": json.loads(f.read_text())
           for d in sorted(cache.glob(f"supernet_{r.digest()}/*")) for f in sorted(d.glob("inherited_ft*.json"))}
    if sup:
        sup_path = out.with_name(out.stem + "_supernet.json")
        sup_path.write_text(json.dumps(sup, indent=0, sort_keys=True) + "\n")
        print(f"inherited accuracies of {len(sup)} supernet variants -> {sup_path}")


def cmd_summary(args: argparse.Namespace) -> None:
    from predictors.metrics import kendall_tau, spearman

    table, _ = rows(args)
    s0 = [r for r in table if "test_acc_s0" in r]
    print(f"trained (seed 0): {len(s0)}/{len(table)}")
    if s0:
        acc = [r["test_acc_s0"] for r in s0]
        secs = [r["train_seconds_s0"] for r in s0]
        print(f"test accuracy (seed 0): min {min(acc):.4f}  median {statistics.median(acc):.4f}  "
              f"max {max(acc):.4f}  std {statistics.pstdev(acc):.4f}")
        print(f"seconds per training: median {statistics.median(secs):.0f}  mean {statistics.fmean(secs):.0f}  "
              f"max {max(secs):.0f}  total {sum(secs) / 3600:.2f} h")
    both = [r for r in table if "test_acc_s0" in r and "test_acc_s1" in r]
    if len(both) >= 3:
        a, b = [r["test_acc_s0"] for r in both], [r["test_acc_s1"] for r in both]
        diff = [abs(x - y) for x, y in zip(a, b)]
        print(f"two seeds on {len(both)}: tau {kendall_tau(a, b):.3f}, rho {spearman(a, b):.3f}, "
              f"mean |diff| {statistics.fmean(diff):.4f}, max {max(diff):.4f}")
    by: dict[str, list[float]] = {}
    for r in s0:
        by.setdefault(r["lead_token_mixer"], []).append(r["test_acc_s0"])
    for m, v in sorted(by.items(), key=lambda kv: -statistics.fmean(kv[1])):
        print(f"  lead {m:>15}: {len(v):>3} trained, mean {statistics.fmean(v):.4f}, "
              f"range {min(v):.4f}-{max(v):.4f}")
    zc = sorted(k for k in (s0[0] if s0 else {}) if k.startswith("zc_") or k in ("params", "flops"))
    for k in zc:
        pairs = [(r[k], r["test_acc_mean"]) for r in s0 if isinstance(r.get(k), (int, float))
                 and math.isfinite(r[k])]
        if len(pairs) >= 5:
            x, y = zip(*pairs)
            print(f"  {k:>20}: tau {kendall_tau(x, y):+.3f} over {len(pairs)}")


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("sample", "train", "proxies", "latency", "supernet", "fewshot", "table",
                                        "summary"))
    ap.add_argument("--archs", default=str(DEFAULT_ARCHS), help="the architecture list (JSON)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="per-architecture results, weights, checkpoints")
    ap.add_argument("--frame", default="small", help="sample: the supernet frame to draw from")
    ap.add_argument("--n", type=int, default=200, help="sample: architectures")
    ap.add_argument("--seed", type=int, default=0, help="sample: the list's seed")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--train-limit", type=int, default=10_000, help="class-balanced training images (0: all)")
    ap.add_argument("--test-limit", type=int, default=0, help="class-balanced test images (0: all)")
    ap.add_argument("--curve-limit", type=int, default=2000, help="test images scored after every epoch")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", default="0,1", help="training seeds (the first for every architecture)")
    ap.add_argument("--second-seed-n", type=int, default=40, help="architectures trained with every seed")
    ap.add_argument("--only", type=int, default=0, help="train, supernet: only the first N architectures")
    ap.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    ap.add_argument("--proxy-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=40, help="latency: timed runs at batch 1")
    ap.add_argument("--variant", default="base", help="supernet: name of the recipe variant")
    ap.add_argument("--supernet-epochs", type=int, default=40)
    ap.add_argument("--supernet-lr", type=float, default=None, help="supernet: learning rate (the search's)")
    ap.add_argument("--n-random", type=int, default=2, help="supernet: random subnets per sandwich step")
    ap.add_argument("--sampling", default="uniform", choices=("uniform", "fair", "single_path"),
                    help="supernet: subnet sampling (single_path: --n-random random subnets a step, no sandwich "
                         "ends; needs --no-distill)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="supernet: fine-tuning steps before evaluation")
    ap.add_argument("--few-shot-from", default="base", help="fewshot: the trained supernet variant to split")
    ap.add_argument("--few-shot-epochs", type=int, default=4, help="fewshot: epochs per sub-supernet")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--supernet-seed", type=int, default=0,
                    help="supernet: seed of its initial weights, data order, augmentation and subnet draws")
    ap.add_argument("--no-augment", action="store_true", help="supernet: no crop or flip, as the standalone recipe")
    ap.add_argument("--threads", type=int, default=2, help="supernet: torch threads")
    ap.add_argument("--out", default=str(DEFAULT_TABLE), help="table: the CSV")
    ap.add_argument("--all", action="store_true", help="table: also rows not trained yet")
    args = ap.parse_args(argv)
    random.seed(0)
    {"sample": cmd_sample, "train": cmd_train, "proxies": cmd_proxies, "latency": cmd_latency,
     "supernet": cmd_supernet, "fewshot": cmd_fewshot, "table": cmd_table, "summary": cmd_summary}[args.command](args)


if __name__ == "__main__":
    main()
