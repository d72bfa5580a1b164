"""JSON views of the store for the dashboard's pages and its polling endpoints (read only)."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any

from nas.budget import Budget, BudgetError
from nas.store import Store, StudyInfo

#: stages in the order their evidence refines an architecture's metrics (as ``nas export`` reads them)
STAGE_ORDER = ("screen", "supernet_train", "supernet", "latency", "train")
#: metrics where less is better; every other metric is maximised (accuracy, score, zero-cost proxies)
MINIMIZE = frozenset({"latency_ms", "latency_p90_ms", "latency_cv", "params", "flops", "peak_mem_mb", "loss",
                      "memory_mb", "seconds"})
HEX64 = re.compile(r"^[0-9a-f]{64}$")
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
    """Used against total, as numbers and as the text ``nas studies`` prints."""
    try:
        b = Budget.from_dict(info.budget)
    except (BudgetError, TypeError):
        return {"kind": "?", "used": 0.0, "total": 0.0, "fraction": 0.0, "unit": "", "text": "?", "budget": "?"}
    if b.kind == "trials":
        used, total, unit = float(info.trials_done), float(b.trials or 0), "trials"
    else:
        used, total, unit = info.used_seconds, float(b.seconds or 0), f"{b.device or 'device'}-s"
    text = b.used_text(info.used_seconds, info.trials_done)
    frac = min(1.0, used / total) if total > 0 else 0.0
    return {"kind": b.kind, "used": used, "total": total, "fraction": frac, "unit": unit, "text": text,
            "budget": str(b), "increment_hint": "+10trials" if b.kind == "trials" else
            f"+30{b.device + '-' if b.device else ''}s"}


def best_metrics(store: Store, name: str) -> dict[str, Any]:
    """Best accuracy (with its latency) and lowest latency: from the stored front, or while a study
    has none yet, from its trained or supernet-ranked architectures."""
    rows = [r["metrics"] for r in store.front(name)]
    source = "front"
    if not rows:
        for stage in ("train", "supernet"):
            rows = list(store.done(name, stage).values())
            source = stage
            if rows:
                break
    accs = [m for m in rows if _finite(m.get("accuracy")) is not None]
    lats = [_finite(m.get("latency_ms")) for m in rows]
    top = max(accs, key=lambda m: float(m["accuracy"]), default=None)
    lat_values = [v for v in lats if v is not None]
    return {"accuracy": None if top is None else float(top["accuracy"]),
            "latency_ms": None if top is None else _finite(top.get("latency_ms")),
            "fastest_ms": min(lat_values) if lat_values else None, "source": source if rows else None}


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
        "resumable": live is None and not (view and view["running"]),
        "stoppable": status in ("running", "created") or bool(view and view["phase"] == "starting"),
        "launch": view,
    }


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
    points = [{k: v for k, v in p.items() if k != "rank"} for p in merged.values()]
    names = sorted({m for p in points for m in p["metrics"]})
    front = [{"hash": r["arch_hash"], "rank": r["rank"],
              "metrics": {k: v for k, v in r["metrics"].items() if _finite(v) is not None},
              "source": r["metrics"].get("source"), "params": r.get("params")} for r in store.front(name)]
    return {"evaluations": rows, "errors": errors, "stages": stages, "points": points, "front": front,
            "metrics": names, "directions": {m: "min" if m in MINIMIZE else "max" for m in names}}


def _device_line(fp: dict[str, Any]) -> str:
    """The identifying fields of a device fingerprint, in a few words."""
    if fp.get("kind") in ("cuda", "gpu"):
        keys = (("memory_mb", "{} MiB"), ("compute_capability", "cc {}"), ("driver", "driver {}"),
                ("power_limit_w", "{} W"))
    else:
        keys = (("usable_cores", "{} cores"), ("torch_threads", "{} torch thread(s)"), ("isa", "{}"),
                ("torch", "torch {}"))
    return ", ".join(fmt.format(fp[k]) for k, fmt in keys if fp.get(k) not in (None, ""))


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


def study_sizes(info: StudyInfo) -> dict[str, int]:
    """The build sizes of the study's frame (what its trials and exports use)."""
    frame = info.config.get("frame_json") or {}
    return {"num_classes": int(frame.get("num_classes", 10)), "img_size": int(frame.get("img_size", 32)),
            "in_chans": int(frame.get("in_chans", 3))}


def architecture_view(store: Store, info: StudyInfo, arch: dict[str, Any]) -> dict[str, Any]:
    """An architecture of a study: its per-stage table and every evaluation with its device."""
    spec = arch["spec"] if isinstance(arch["spec"], dict) else json.loads(arch["spec"])
    spec_json = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    sizes = study_sizes(info)
    table = _arch_table(spec_json, sizes["num_classes"], sizes["img_size"], sizes["in_chans"])
    fingerprints = {d["key"]: d for d in store.devices()}
    evals = []
    for ev in store.evaluations(info.name, arch_hash=arch["hash"]):
        dev = fingerprints.get(ev.device_key or "")
        evals.append({"id": ev.id, "stage": ev.stage, "trial": ev.trial, "attempt": ev.attempt,
                      "metrics": {k: v for k, v in sorted(ev.metrics.items())}, "seconds": ev.seconds,
                      "error": None if ev.error is None else _last_line(ev.error),
                      "device": None if dev is None else {"key": dev["key"], "name": dev["name"], "kind": dev["kind"],
                                                          "summary": _device_line(dev["fingerprint"]),
                                                          "fingerprint": json.dumps(dev["fingerprint"], indent=2,
                                                                                    sort_keys=True)},
                      "created_at": _iso(ev.created_at)})
    return {"table": table, "spec_pretty": json.dumps(spec, indent=2, sort_keys=True), "evaluations": evals}
