"""JSON views of the store for the dashboard's pages and its polling endpoints (read only)."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any

from nas.budget import Budget, BudgetError
from nas.jobs import device_line
from nas.lifecycle import benchmark_source, frame_sizes, simulated
from nas.store import Store, StudyInfo

from ._runner import last_line

#: stages in the order their evidence refines an architecture's metrics (as ``nas export`` reads them)
STAGE_ORDER = ("screen", "supernet_train", "supernet", "latency", "train")
#: metrics where less is better; every other metric is maximised (accuracy, score, zero-cost proxies)
MINIMIZE = frozenset({"latency_ms", "latency_p90_ms", "latency_cv", "params", "flops", "peak_mem_mb", "loss",
                      "memory_mb", "seconds"})
HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: what a latency measurement records; the careful ``latency`` stage's values replace the screening ones
LATENCY_KEYS = ("latency_ms", "latency_p90_ms", "latency_cv", "peak_mem_mb")
#: stages whose ``accuracy`` is a measured accuracy (a screening ``score`` never is one)
ACCURACY_STAGES = ("train", "supernet", "benchmark")  # front sources that hold an accuracy
_ERROR_DETAIL = 4000  # characters of a traceback sent to the page


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _iso(dt: Any) -> str | None:
    return None if dt is None else dt.isoformat()


def budget_view(info: StudyInfo) -> dict[str, Any]:
    """Used against total, as numbers and as the text ``nas studies`` prints; an overrun is shown
    (``181.9/180 cpu-s (+1%)``, ``over`` set), never clipped away."""
    try:
        b = Budget.from_dict(info.budget)
    except (BudgetError, TypeError):
        return {"kind": "?", "used": 0.0, "total": 0.0, "fraction": 0.0, "unit": "", "text": "?", "budget": "?",
                "over": False, "over_pct": 0.0, "exhausted": False, "increment_hint": "+1cpu-m"}
    if b.kind == "trials":
        used, total, unit = float(info.trials_done), float(b.trials or 0), "trials"
    else:
        used, total, unit = info.used_seconds, float(b.seconds or 0), f"{b.device or 'device'}-s"
    text = b.used_text(info.used_seconds, info.trials_done)
    text = simulated(info, text)  # a benchmark study's training seconds are simulated
    over = total > 0 and used > total
    over_pct = 100.0 * (used - total) / total if over else 0.0
    if over:
        text += f" (+{over_pct:.0f}%)" if over_pct >= 1 else " (+<1%)"
    frac = min(1.0, used / total) if total > 0 else 0.0
    return {"kind": b.kind, "used": used, "total": total, "fraction": frac, "unit": unit, "text": text,
            "budget": str(b), "over": over, "over_pct": over_pct,
            "exhausted": b.exhausted(info.used_seconds, info.trials_done),
            "increment_hint": "+10trials" if b.kind == "trials" else f"+30{b.device + '-' if b.device else ''}s"}


def _lat(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in LATENCY_KEYS if _finite(metrics.get(k)) is not None}


def latencies(store: Store, name: str, evals: list[Any] | None = None) -> dict[str, dict[str, float]]:
    """arch_hash -> the best latency measurement the store holds for it: the latest careful ``latency``
    stage measurement when there is one, else the latest screening one (only the LATENCY_KEYS).
    ``evals``: the study's evaluations when the caller has them already."""
    if evals is None:
        by_stage = {st: store.done(name, st) for st in ("screen", "latency")}
    else:
        by_stage = {"screen": {}, "latency": {}}
        for ev in evals:
            if ev.error is None and ev.arch_hash is not None and ev.stage in by_stage and "latency_ms" in ev.metrics:
                by_stage[ev.stage][ev.arch_hash] = ev.metrics
    out: dict[str, dict[str, float]] = {}
    for st in ("screen", "latency"):  # careful measurements last: they win
        for h, m in by_stage[st].items():
            lat = _lat(m)
            if "latency_ms" in lat:
                out[h] = lat
    return out


def _with_latency(metrics: dict[str, Any], lat: dict[str, float] | None) -> dict[str, Any]:
    """``metrics`` with its latency fields replaced by the best measurement (when there is one)."""
    if not lat:
        return metrics
    return {**{k: v for k, v in metrics.items() if k not in LATENCY_KEYS}, **lat}


def front_view(store: Store, name: str, lat: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """The stored front with the best latency of each architecture; a front ranked by screening
    score keeps that score as ``score`` and shows no accuracy (a score is never an accuracy)."""
    if lat is None:
        lat = latencies(store, name)
    out = []
    for r in store.front(name):
        metrics = {k: v for k, v in r["metrics"].items() if _finite(v) is not None}
        source = r["metrics"].get("source")
        if source not in (None, *ACCURACY_STAGES) and "accuracy" in metrics:
            acc = metrics.pop("accuracy")
            metrics.setdefault("score", acc)
        out.append({"hash": r["arch_hash"], "rank": r["rank"], "source": source, "params": r.get("params"),
                    "metrics": _with_latency(metrics, lat.get(r["arch_hash"]))})
    return out


def best_metrics(store: Store, name: str) -> dict[str, Any]:
    """Best accuracy (with its latency) and lowest latency. The accuracy is always a measured one
    (train, else supernet evaluations; None before any), never a screening score; latencies are
    the best measurement of each architecture (as the plot and the front show them)."""
    lat = latencies(store, name)
    front = front_view(store, name, lat)
    accs = {r["hash"]: r["metrics"] for r in front if r["source"] in ACCURACY_STAGES and "accuracy" in r["metrics"]}
    source = "front" if accs else None
    for stage in ACCURACY_STAGES if not accs else ():  # no measured front yet: the measured architectures
        accs = {h: m for h, m in store.done(name, stage).items() if _finite(m.get("accuracy")) is not None}
        if accs:
            source = stage
            break
    top = max(accs.items(), key=lambda kv: float(kv[1]["accuracy"]), default=None)
    pool = {r["hash"] for r in front} or set(accs) or set(lat)
    fastest = [lat[h]["latency_ms"] for h in pool if h in lat]
    return {"accuracy": None if top is None else float(top[1]["accuracy"]),
            "latency_ms": None if top is None else (lat.get(top[0]) or {}).get("latency_ms"),
            "fastest_ms": min(fastest) if fastest else None, "source": source}


def study_summary(store: Store, info: StudyInfo, launch: Any = None) -> dict[str, Any]:
    """What the studies list and a study page's header show; ``launch`` is this dashboard's resume
    of the study (a ``_runner.Launch``), if any."""
    cfg = info.config
    live = store.live_driver(info.name)
    status = info.status
    view = None
    if launch is not None:
        if launch.running and status == "running" and live is not None and live[0] == launch.proc.pid:
            launch.seen_running = True  # its driver took over: the study's own status speaks from now on
        view = launch.view()
        if view["running"]:  # starting, running the study, or finishing (printing the front, stopping Ray)
            view["phase"] = "starting" if not launch.seen_running else "running" if status == "running" else \
                "finishing"
        else:
            view["phase"] = "exited"
            if view["returncode"] == 0 and launch.trials_before is not None and \
                    info.trials_done <= launch.trials_before:  # it ended well, but ran no trial: say why
                tail = launch.tail()
                b = budget_view(info)
                spent = f"the budget is spent ({b['text']})" if b["exhausted"] else ""
                view.update(ran_nothing=True, log_tail=tail,
                            reason="; ".join(x for x in (spent, last_line(tail)) if x) or "it printed nothing")
    starting = bool(view and view["phase"] == "starting")
    if starting:
        shown = "starting"  # a resume launched here, before its driver runs the study
    elif status == "running" and live is None:
        shown = "running (no live driver)"  # crashed or killed: resume continues it
    elif status == "running" and info.stop_requested:
        shown = "stopping"
    else:
        shown = status
    return {
        "name": info.name, "space": info.space, "status": status, "shown_status": shown, "stage": info.stage,
        "stop_requested": info.stop_requested, "trials_done": info.trials_done, "used_seconds": info.used_seconds,
        "budget": budget_view(info),
        "driver": {"pid": info.driver_pid, "host": info.driver_host, "heartbeat_at": _iso(info.heartbeat_at),
                   "alive": live is not None},
        "created_at": _iso(info.created_at), "updated_at": _iso(info.updated_at),
        "best": best_metrics(store, info.name),
        "config": {k: cfg.get(k) for k in ("strategy", "data", "target", "objectives", "workers", "precision",
                                           "train_epochs", "max_params", "max_latency_ms", "seed")},
        "benchmark": benchmark_view(cfg),
        "resumable": live is None and not (view and view["running"]),
        "stoppable": status in ("running", "created") or bool(view and view["phase"] == "starting"),
        "launch": view,
    }


def benchmark_view(cfg: dict[str, Any]) -> str | None:
    """Where a benchmark study's figures come from (None for a study that trains): its accuracies
    are looked up in a table and its training costs are simulated, and the page says so."""
    source = benchmark_source(cfg)
    if source is None:
        return None
    return (f"{source}; training cost simulated ({cfg.get('benchmark_train_s')} device-s for the mean cell), "
            "nothing trained here")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def study_detail(store: Store, name: str) -> dict[str, Any]:
    """The study's evaluations, plot points (one per architecture), errors, stages and stored front."""
    evals = store.evaluations(name)
    devices = {d["key"]: d["name"] for d in store.devices()}
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    stages: dict[str, dict[str, float]] = {}
    merged: dict[str, dict[str, Any]] = {}
    for ev in evals:
        st = stages.setdefault(ev.stage, {"done": 0, "errors": 0, "seconds": 0.0})
        st["seconds"] += ev.seconds
        if ev.error is not None:
            st["errors"] += 1
            errors.append({"id": ev.id, "stage": ev.stage, "trial": ev.trial, "attempt": ev.attempt,
                           "hash": ev.arch_hash, "message": _last_line(ev.error),
                           "detail": ev.error[-_ERROR_DETAIL:], "created_at": _iso(ev.created_at)})
            continue
        st["done"] += 1
        metrics = {k: v for k, v in ev.metrics.items() if _finite(v) is not None}
        rows.append({"id": ev.id, "stage": ev.stage, "trial": ev.trial, "hash": ev.arch_hash, "metrics": metrics,
                     "seconds": ev.seconds, "device": devices.get(ev.device_key or "", ev.device_key),
                     "created_at": _iso(ev.created_at)})
        if ev.arch_hash is None:
            continue
        p = merged.setdefault(ev.arch_hash, {"hash": ev.arch_hash, "metrics": {}, "stage": ev.stage,
                                             "trial": ev.trial, "rank": -1})
        rank = STAGE_ORDER.index(ev.stage) if ev.stage in STAGE_ORDER else len(STAGE_ORDER)
        if rank >= p["rank"]:
            p["metrics"].update(metrics)  # later stages refine earlier ones: screen < supernet < latency < train
            p["stage"], p["rank"] = ev.stage, rank
        else:
            p["metrics"] = {**metrics, **p["metrics"]}
        if p["trial"] is None:
            p["trial"] = ev.trial
    lat = latencies(store, name, evals)
    points = [{**{k: v for k, v in p.items() if k != "rank"}, "metrics": _with_latency(p["metrics"], lat.get(h))}
              for h, p in merged.items()]
    measured = {r["hash"] for r in rows if r["stage"] in ACCURACY_STAGES and "accuracy" in r["metrics"]}
    for p in points:  # an accuracy only where one was measured (a screening score never is one)
        if p["hash"] not in measured:
            p["metrics"].pop("accuracy", None)
    front = front_view(store, name, lat)
    names = sorted({m for p in points for m in p["metrics"]} | {m for r in front for m in r["metrics"]})
    return {"evaluations": rows, "errors": errors, "stages": stages, "points": points, "front": front,
            "metrics": names, "directions": {m: "min" if m in MINIMIZE else "max" for m in names},
            "axes": default_axes(points)}


def default_axes(points: list[dict[str, Any]]) -> dict[str, str | None]:
    """The plot's default pair: accuracy (whenever any point has one, else the screening score)
    against latency (else params, flops)."""
    have = {m for p in points for m, v in p["metrics"].items() if _finite(v) is not None}
    y = next((m for m in ("accuracy", "score") if m in have), None)
    x = next((m for m in ("latency_ms", "params", "flops") if m in have), None)
    return {"x": x, "y": y}


@lru_cache(maxsize=256)
def _arch_table(spec_json: str, num_classes: int, img_size: int, in_chans: int) -> dict[str, Any]:
    from search_spaces import ArchSpec, count_flops, count_params
    from search_spaces.hybrid_vit import build

    spec = ArchSpec.from_json(spec_json)
    model = build(spec, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    stem_grid = model.stem.out_grid(img_size, img_size)
    stages = []
    for i, (st, stage) in enumerate(zip(spec.stages, model.stages)):
        mixers = st.mixers()
        uniq = sorted(set(mixers), key=mixers.index)
        stages.append({"name": f"s{i}", "grid": f"{stage.grid[0]}x{stage.grid[1]}", "depth": st.depth,
                       "width": st.width, "heads": st.heads, "mlp_ratio": st.mlp_ratio,
                       "norm": getattr(st, "norm", ""), "downsample": getattr(st, "downsample", ""),
                       "mixers": [{"token": t, "channel": c, "count": mixers.count((t, c))} for t, c in uniq],
                       "per_block": bool(getattr(st, "blocks", None)), "params": count_params(stage)})
    return {"short": spec.short(), "hash": spec.hash, "precision": spec.precision,
            "stem": {"kind": spec.stem.kind, "stride": spec.stem.stride, "grid": f"{stem_grid[0]}x{stem_grid[1]}",
                     "width": spec.stages[0].width, "params": count_params(model.stem)},
            "head": {"pool": spec.head.pool, "num_classes": num_classes},
            "stages": stages, "params": count_params(model),
            "flops": count_flops(model, (1, in_chans, img_size, img_size)),
            "sizes": {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}}


def architecture_view(store: Store, info: StudyInfo, arch: dict[str, Any]) -> dict[str, Any]:
    """An architecture of a study: its per-stage table and every evaluation with its device."""
    spec = arch["spec"] if isinstance(arch["spec"], dict) else json.loads(arch["spec"])
    spec_json = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    sizes = frame_sizes(info)
    table = _arch_table(spec_json, sizes["num_classes"], sizes["img_size"], sizes["in_chans"])
    fingerprints = {d["key"]: d for d in store.devices()}
    evals = []
    for ev in store.evaluations(info.name, arch_hash=arch["hash"]):
        dev = fingerprints.get(ev.device_key or "")
        evals.append({"id": ev.id, "stage": ev.stage, "trial": ev.trial, "attempt": ev.attempt,
                      "metrics": {k: v for k, v in sorted(ev.metrics.items())}, "seconds": ev.seconds,
                      "error": None if ev.error is None else _last_line(ev.error),
                      "device": None if dev is None else {"key": dev["key"], "name": dev["name"], "kind": dev["kind"],
                                                          "summary": device_line(dev["fingerprint"]),
                                                          "fingerprint": json.dumps(dev["fingerprint"], indent=2,
                                                                                    sort_keys=True)},
                      "created_at": _iso(ev.created_at)})
    return {"table": table, "spec_pretty": json.dumps(spec, indent=2, sort_keys=True), "evaluations": evals}
