"""Predictor-guided training: what to train next, chosen by a model of the trainings so far.

:class:`GuidedTrain` is the train stage of the ``staged`` strategy on a tabular benchmark, where
every screened candidate's latency is known (a table lookup) and only its accuracy is not. Before
each training it fits :class:`predictors.online.OnlineGP` on the trained candidates (at most
``GP_MAX`` of them; features: the cell's one-hot encoding, its zero-cost proxies and FLOPs) and
trains the screened candidate with the largest expected hypervolume improvement
(:func:`predictors.online.expected_hvi`) over the front trained so far (Emmerich et al. 2006;
predictor-guided NAS as in BANANAS, White et al. 2021).
The first few picks, before there is anything to fit, are the best zero-cost score in each
latency quantile of the screened candidates (zero-cost warm-up, Abdelfattah et al. 2021).

:func:`refill_order` does the same for hybrid_vit's staged search, in its refill rounds: once
``GUIDE_AFTER`` candidates are trained, the next ones to measure and train are picked by expected
hypervolume improvement under a GP of trained accuracy on :func:`hybrid_features` (the share of
blocks with each token and channel mixer, log FLOPs and the supernet's inherited accuracy), a
batch at a time with the picks believed at their predicted accuracy (kriging believer, Ginsbourger
et al. 2010). The supernet misplaces whole mixer families (on HybridBench it ranks ssm- and
gated_linear-led architectures 0.17-0.25 of the table above where they train), and a few labels
correct that: ``bench/hybridbench_guided.py`` measures the picks against the supernet's own order.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.search._driver import _Gate
from nas.search.stages import Stage
from search_spaces.nb201 import NB201Spec
from workers.request import Candidate, TrialRequest

if TYPE_CHECKING:
    from nas.search.plan import Plan

__all__ = ["GUIDE_AFTER", "GuidedTrain", "features", "fit_gp", "guided_order", "hybrid_features",
           "mixer_encoding", "refill_order"]

# hybrid_vit: trained candidates before the GP orders the refill rounds. On HybridBench a GP on 25
# labels already ranks better than the supernet alone (tau 0.410 against 0.391), and in the replay
# (bench/hybridbench_guided.py --guide-after 24|32|40|48) 32 lost least in its first guided round.
GUIDE_AFTER = 32
GP_MAX = 300  # trained candidates a GP is fitted on at most (1,000 took 14 s here, beside a study)
WARM = 4  # trainings picked by zero-cost score alone, one per latency quantile, before the GP is fitted
REF_QUANTILES = (10.0, 90.0)  # the reference point: this accuracy percentile of the predictions, latency of the pool


def features(spec: dict[str, Any] | str, metrics: dict[str, float]) -> list[float]:
    """A cell's encoding (one-hot op per edge) and its zero-cost scores (nwot, log synflow, log FLOPs).

    Op counts in place of the one-hot encoding ranked better overall from few labels (Kendall tau
    0.67 against 0.46 with 30 labels, on 3,066 screened cells), but searched worse: they cannot
    tell apart cells with the same ops on different edges, which is what separates the best ones.
    In a simulation of this loop on 1,000-cell pools (4 seeds x 3 devices) the HV ratio at 30
    trainings was 0.93-0.95 with one-hot against 0.87-0.92 with counts."""
    from search_spaces.nb201 import OPS, NB201Spec

    data = json.loads(spec) if isinstance(spec, str) else spec
    cell = NB201Spec.from_dict(data)
    onehot = [1.0 if op == o else 0.0 for op in cell.ops for o in OPS]
    nwot = metrics.get("zc.nwot", math.nan)
    syn = metrics.get("zc.synflow", math.nan)
    flops = metrics.get("flops", math.nan)
    return [*onehot, nwot, math.log1p(max(syn, 0.0)) if math.isfinite(syn) else math.nan,
            math.log(flops) if flops > 0 else math.nan]


class GuidedTrain(Stage):
    """Train the screened candidate of largest expected hypervolume improvement, one at a time
    (a candidate running on another worker counts as trained at its predicted accuracy)."""

    name = share = "train"
    stages = ("train",)

    def open(self, plan: Plan) -> bool:
        d = plan.d
        screened = plan.store.done(d.name, "screen")
        self.pool: dict[str, dict[str, float]] = {h: m for h, m in screened.items() if "latency_ms" in m}
        self.specs: dict[str, Any] = {}
        self.feats: dict[str, list[float]] = {}
        for h in self.pool:
            arch = plan.store.architecture(h)
            if arch is not None:
                self.specs[h] = arch["spec"]
                self.feats[h] = features(arch["spec"], self.pool[h])
                d.note(NB201Spec.from_dict(arch["spec"]))  # its training's cost, known now
        self.pool = {h: m for h, m in self.pool.items() if h in self.feats}
        self.running: dict[str, float] = {}  # hash -> the accuracy it was picked at
        if not self.untrained(plan.store.done(d.name, "train")):
            return False
        self.gate = _Gate(d, self.name, self.limit(plan))
        return True

    def untrained(self, trained: dict[str, dict[str, float]]) -> list[str]:
        """The pool's candidates neither ``trained`` nor running (those trained since leave ``running``)."""
        for h in [h for h in self.running if h in trained]:
            del self.running[h]
        return [h for h in self.pool if h not in trained and h not in self.running]

    def pick(self, plan: Plan, todo: list[str], done: dict[str, dict[str, float]]) -> tuple[str, float]:
        """The next candidate to train (see the module docstring), and its predicted accuracy (NaN
        during the warm-up). ``done``: the trained candidates' metrics."""
        trained = {h: m for h, m in done.items() if "accuracy" in m}
        lat = np.array([self.pool[h]["latency_ms"] for h in todo])
        ref_lat = float(np.percentile([m["latency_ms"] for m in self.pool.values()], REF_QUANTILES[1]))
        cfg = plan.d.cfg
        if cfg.max_latency_ms is not None:  # a latency limit: nothing slower counts
            ref_lat = min(ref_lat, float(cfg.max_latency_ms))
        if len(trained) < WARM:  # zero-cost warm-up: the best score in each latency quantile not yet covered
            edges = np.percentile(lat, np.linspace(0, REF_QUANTILES[1], WARM + 1))
            covered = {int(np.searchsorted(edges[1:-1], self.pool[h]["latency_ms"], side="right"))
                       for h in list(trained) + list(self.running) if h in self.pool}
            score = np.array([self.pool[h].get("score", -math.inf) for h in todo])
            score = np.where(np.isfinite(score), score, -math.inf)
            bins = np.searchsorted(edges[1:-1], lat, side="right")
            for b in range(WARM):
                if b in covered:
                    continue
                idx = np.flatnonzero((bins == b) & (lat <= ref_lat))
                if len(idx):
                    return todo[int(idx[np.argmax(score[idx])])], math.nan
            return todo[int(np.argmax(score))], math.nan
        xs = np.array([self.feats[h] for h in trained] + [self.feats[h] for h in todo], dtype=float)
        col_min = np.nanmin(np.where(np.isfinite(xs), xs, np.nan), axis=0)
        xs = np.where(np.isfinite(xs), xs, np.nan_to_num(col_min, nan=0.0)[None, :])  # a score not finite: the lowest
        n = len(trained)
        acc = np.array([trained[h]["accuracy"] for h in trained], dtype=float)
        from predictors.online import expected_hvi

        gp = fit_gp(xs[:n], acc)
        mean, std = gp.predict(xs[n:])
        believed = {h: a for h, a in self.running.items() if math.isfinite(a)}  # running: at their prediction
        front_acc = list(acc) + list(believed.values())
        front_lat = [trained[h].get("latency_ms", self.pool.get(h, {}).get("latency_ms", math.inf)) for h in trained]
        front_lat += [self.pool[h]["latency_ms"] for h in believed]
        ref_acc = float(np.percentile(np.concatenate([mean, acc]), REF_QUANTILES[0]))
        if "latency" in cfg.objectives:
            gain = expected_hvi(mean, std, lat, np.array(front_acc), np.array(front_lat), ref_acc, ref_lat)
        else:  # accuracy alone: expected improvement over the best (HV of one objective, latencies equal)
            none = np.zeros(len(todo))
            gain = expected_hvi(mean, std, none, np.array(front_acc), np.zeros(len(front_acc)), ref_acc, 1.0)
            if cfg.max_latency_ms is not None:
                gain[lat > cfg.max_latency_ms] = 0.0
        best = int(np.argmax(gain))
        return todo[best], float(mean[best])

    def request(self, plan: Plan) -> TrialRequest | None:
        d = plan.d
        done = plan.store.done(d.name, "train")
        left = self.untrained(done)
        if not left:  # every screened candidate is trained: the strategy may screen more
            plan.memo["pool_used_up"] = True
        room = d.left()
        todo = [h for h in left if d.budget.kind != "seconds" or d.estimate("train", h) <= room]
        if not todo:
            return None
        h, predicted = self.pick(plan, todo, done)
        spec = self.specs[h]
        cand = Candidate(key=f"train:{h}", spec=spec if isinstance(spec, str) else json.dumps(spec), spec_hash=h)
        self.running[h] = predicted
        d.reserve(cand.key, self.name, d.estimate("train", h))
        return plan.request(cand.key, self.name, self.stages, (cand,))


def fit_gp(x: np.ndarray, acc: np.ndarray) -> Any:
    """:class:`OnlineGP` fitted on the rows, or past ``GP_MAX`` rows on a fixed random ``GP_MAX``
    of them: the fit is cubic in its rows."""
    from predictors.online import OnlineGP

    rows = np.arange(len(acc))
    if len(rows) > GP_MAX:
        rows = np.sort(np.random.default_rng(len(rows)).choice(len(rows), GP_MAX, replace=False))
    return OnlineGP().fit(np.asarray(x)[rows], np.asarray(acc)[rows])


def mixer_encoding(specs: list[str | dict[str, Any]], flops: list[float]) -> np.ndarray:
    """Per hybrid_vit architecture: the share of its blocks with each token mixer, then each channel
    mixer (the mixers any of ``specs`` uses, sorted), and log FLOPs."""
    from search_spaces.spec import ArchSpec

    archs = [ArchSpec.from_json(s if isinstance(s, str) else json.dumps(s)) for s in specs]
    tms = sorted({t for a in archs for st in a.stages for t, _ in st.mixers()})
    cms = sorted({c for a in archs for st in a.stages for _, c in st.mixers()})
    return np.array([[*a.mixer_fractions(tms, cms), math.log(max(f, 1.0))] for a, f in zip(archs, flops)],
                    dtype=float).reshape(len(archs), -1)


def hybrid_features(specs: list[str | dict[str, Any]], inherited: list[float], flops: list[float]) -> np.ndarray:
    """:func:`mixer_encoding` and the inherited (supernet) accuracy. On HybridBench a GP on these
    fitted on 100 labels ranks the other 100 at Kendall tau 0.494, against 0.391 for the inherited
    accuracy alone (``bench/hybridbench_ranking.py``)."""
    return np.column_stack([mixer_encoding(specs, flops), np.asarray(inherited, dtype=float)])


def guided_order(x_trained: np.ndarray, acc_trained: np.ndarray, lat_trained: np.ndarray, x_todo: np.ndarray,
                 lat_todo: np.ndarray, ref_lat: float, k: int) -> list[int]:
    """Indices into the ``todo`` rows of the ``k`` to evaluate next, in order: :class:`OnlineGP`
    fitted on the trained rows (accuracy in percent), then greedy expected hypervolume improvement
    over the trained front, each pick joining the front at its predicted accuracy (kriging
    believer) so that a batch spreads along the front. Reference point: the 10th percentile of
    the accuracies (predicted and trained), and ``ref_lat``. Past ``GP_MAX`` trained rows the GP
    is fitted on a fixed random ``GP_MAX`` of them."""
    from predictors.online import expected_hvi

    mean, std = fit_gp(x_trained, acc_trained).predict(x_todo)
    ref_acc = float(np.percentile(np.concatenate([mean, acc_trained]), REF_QUANTILES[0]))
    front_acc, front_lat = list(acc_trained), list(lat_trained)
    left = list(range(len(mean)))
    out: list[int] = []
    while left and len(out) < k:
        gain = expected_hvi(mean[left], std[left], lat_todo[left], np.array(front_acc), np.array(front_lat),
                            ref_acc, ref_lat)
        j = left.pop(int(np.argmax(gain)))  # ties (no gain left anywhere): the earliest in the given order
        out.append(j)
        front_acc.append(float(mean[j]))
        front_lat.append(float(lat_todo[j]))
    return out


def refill_order(d: Any, store: Any, todo: list[tuple[str, str]], sup: dict[str, dict[str, float]],
                 screened: dict[str, dict[str, float]], latency: Any, k: int) -> list[tuple[str, str]] | None:
    """hybrid_vit's refill rounds: the ``k`` of ``todo`` ((hash, spec) the supernet ranked, not yet
    evaluated by the stage) that :func:`guided_order` picks, in order; None (keep the supernet's
    order) before ``GUIDE_AFTER`` trained candidates with an inherited accuracy and FLOPs exist.
    ``sup`` and ``screened``: the study's supernet and screening metrics by hash, as the caller
    read them; ``latency(h)``: the careful latency where measured, else the screening one."""
    def usable(h: str) -> bool:
        return (math.isfinite(sup.get(h, {}).get("accuracy", math.nan))
                and screened.get(h, {}).get("flops", 0.0) > 0 and math.isfinite(latency(h)))

    trained = {h: m["accuracy"] for h, m in store.done(d.name, "train").items()
               if math.isfinite(m.get("accuracy", math.nan)) and usable(h)}
    todo = [(h, spec) for h, spec in todo if usable(h)]
    if len(trained) < GUIDE_AFTER or not todo:
        return None
    specs = []
    for h in trained:
        arch = store.architecture(h)
        if arch is None:
            return None
        specs.append(arch["spec"])
    hashes = list(trained) + [h for h, _ in todo]
    specs += [spec for _, spec in todo]
    x = hybrid_features(specs, [sup[h]["accuracy"] for h in hashes], [screened[h]["flops"] for h in hashes])
    lat = np.array([latency(h) for h in hashes], dtype=float)
    n = len(trained)
    ref_lat = float(np.percentile(lat, REF_QUANTILES[1]))
    if d.cfg.max_latency_ms is not None:  # a latency limit: nothing slower counts
        ref_lat = min(ref_lat, float(d.cfg.max_latency_ms))
    acc = 100.0 * np.array(list(trained.values()), dtype=float)  # the GP models accuracy in percent
    try:
        picks = guided_order(x[:n], acc, lat[:n], x[n:], lat[n:], ref_lat, k)
    except (np.linalg.LinAlgError, ValueError):  # a fit that fails never stops the study: the supernet's order
        return None
    return [todo[i] for i in picks]
