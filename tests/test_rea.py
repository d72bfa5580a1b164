"""Regularized Evolution sampler (nas.search.rea): the algorithm's rules on constructed studies,
define-by-run conditional spaces (including the real hybrid_vit space), SQLite storage and resume,
and search quality against random sampling on NAS-Bench-201 ground truth."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nas.search.rea import (
    MUTATE_KEY,
    PARENT_KEY,
    RegularizedEvolutionSampler,
    crowding_distance,
    fast_non_dominated_sort,
)
from predictors.metrics import hypervolume, pareto_front

optuna.logging.set_verbosity(optuna.logging.WARNING)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ACC_CSV = DATA / "nb201_cifar10.csv"
LATENCY_CSV = DATA / "nb201_latency_help.csv"


# ------------------------------------------------------------------------------------ helpers


def _completed(value: float | list[float], params: dict[str, Any] | None = None, *,
               user_attrs: dict[str, Any] | None = None, system_attrs: dict[str, Any] | None = None,
               state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
    params = {"x": 0} if params is None else params
    dists = {k: CategoricalDistribution(list(range(10))) for k in params}
    values = value if isinstance(value, list) else [value]
    return create_trial(state=state, params=params, distributions=dists,
                        values=values if state == TrialState.COMPLETE else None,
                        user_attrs=user_attrs or {}, system_attrs=system_attrs or {})


def _parents(study: optuna.Study, asks: int) -> list[int | None]:
    """Ask ``asks`` trials (never told: they stay RUNNING, outside the population); their parents."""
    out = []
    for _ in range(asks):
        trial = study.ask()
        out.append(study._storage.get_trial(trial._trial_id).system_attrs[PARENT_KEY])
    return out


def _by_number(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.number: t for t in study.get_trials(deepcopy=False)}


FLAT = {
    "cat": CategoricalDistribution(["a", "b", "c", "d"]),
    "int": IntDistribution(0, 9),
    "int_step": IntDistribution(0, 20, step=4),
    "int_log": IntDistribution(1, 64, log=True),
    "flt": FloatDistribution(-1.0, 1.0),
    "flt_step": FloatDistribution(0.0, 1.0, step=0.25),
    "flt_log": FloatDistribution(1e-4, 1e-1, log=True),
    "single": IntDistribution(3, 3),
}


def _flat_objective(trial: optuna.Trial) -> float:
    p = {
        "cat": trial.suggest_categorical("cat", ["a", "b", "c", "d"]),
        "int": trial.suggest_int("int", 0, 9),
        "int_step": trial.suggest_int("int_step", 0, 20, step=4),
        "int_log": trial.suggest_int("int_log", 1, 64, log=True),
        "flt": trial.suggest_float("flt", -1.0, 1.0),
        "flt_step": trial.suggest_float("flt_step", 0.0, 1.0, step=0.25),
        "flt_log": trial.suggest_float("flt_log", 1e-4, 1e-1, log=True),
        "single": trial.suggest_int("single", 3, 3),
    }
    return "abcd".index(p["cat"]) + p["int"] + p["int_step"] / 4 + math.log2(p["int_log"]) - p["flt"] ** 2 \
        + p["flt_step"] + math.log10(p["flt_log"])


def _check_one_mutation(study: optuna.Study) -> dict[str, int]:
    """Every child equals its parent except in exactly the mutated parameter; counts per name."""
    trials = _by_number(study)
    counts: dict[str, int] = {}
    for t in trials.values():
        parent = t.system_attrs[PARENT_KEY]
        if parent is None:
            continue
        mutate = t.system_attrs[MUTATE_KEY]
        differ = {k for k in t.params if t.params[k] != trials[parent].params[k]}
        assert differ == {mutate}, (t.number, parent, mutate, differ)
        counts[mutate] = counts.get(mutate, 0) + 1
    return counts


# -------------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"population_size": 0}, "population_size"),
    ({"population_size": -3, "sample_size": 1}, "population_size"),
    ({"population_size": 8, "sample_size": 0}, "sample_size"),
    ({"population_size": 4, "sample_size": 5}, "must not exceed"),
    ({"population_size": 2.5, "sample_size": 1}, "population_size"),
    ({"population_size": True, "sample_size": 1}, "population_size"),
    ({"constraints_func": 3}, "callable"),
])
def test_bad_constructor_arguments_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RegularizedEvolutionSampler(**kwargs)


def test_defaults() -> None:
    s = RegularizedEvolutionSampler()
    assert (s.population_size, s.sample_size) == (32, 8)
    assert isinstance(s, optuna.samplers.BaseSampler)
    RegularizedEvolutionSampler(population_size=1, sample_size=1)  # the smallest valid


# ----------------------------------------------------------------------- population and aging


def test_random_until_the_population_is_full() -> None:
    study = optuna.create_study(sampler=RegularizedEvolutionSampler(population_size=5, sample_size=2, seed=0))
    study.optimize(_flat_objective, n_trials=12)
    parents = [t.system_attrs[PARENT_KEY] for t in study.trials]
    assert parents[:5] == [None] * 5
    assert all(p is not None and p < t for t, p in enumerate(parents) if t >= 5)


def test_aging_population_is_the_last_completed_trials_not_the_best() -> None:
    sampler = RegularizedEvolutionSampler(population_size=3, sample_size=3, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for v in (100.0, 1.0, 2.0, 3.0):  # trial 0 is by far the best, but the oldest
        study.add_trial(_completed(v))
    study.add_trial(_completed(0.0, state=TrialState.FAIL))  # neither failed nor pruned trials count
    study.add_trial(_completed(0.0, state=TrialState.PRUNED))
    assert [t.number for t in sampler.population(study)] == [1, 2, 3]
    assert set(_parents(study, 10)) == {3}  # whole population sampled: always its best

    sampler.sample_size = 1  # tournaments of one: any member, and only members, can be a parent
    assert set(_parents(study, 60)) == {1, 2, 3}

    for _ in range(3):  # three newer, worse trials push out 1, 2, 3 (and trial 0 stays out)
        study.add_trial(_completed(0.5))
    newest = [t.number for t in study.trials if t.state == TrialState.COMPLETE][-3:]
    assert [t.number for t in sampler.population(study)] == newest
    assert set(_parents(study, 60)) == set(newest)


def test_tournament_picks_best_of_a_random_sample() -> None:
    """Sample size 2 of 4 (values 0 < 1 < 2 < 3, maximised): the worst member never wins,
    the best wins whenever drawn (half the time)."""
    study = optuna.create_study(direction="maximize",
                                sampler=RegularizedEvolutionSampler(population_size=4, sample_size=2, seed=3))
    for v in (0.0, 1.0, 2.0, 3.0):
        study.add_trial(_completed(v))
    parents = _parents(study, 300)
    share = {n: parents.count(n) / len(parents) for n in range(4)}
    assert share[0] == 0.0
    assert 0.4 < share[3] < 0.6  # P(best drawn) = 1/2
    assert share[2] > share[1] > 0.0  # 1/3 and 1/6


# ----------------------------------------------------------------------------- mutation rules


def test_child_differs_from_parent_in_exactly_one_parameter() -> None:
    study = optuna.create_study(direction="maximize",
                                sampler=RegularizedEvolutionSampler(population_size=10, sample_size=3, seed=0))
    study.optimize(_flat_objective, n_trials=250)
    counts = _check_one_mutation(study)
    # every kind of distribution gets mutated; a single-valued one is never chosen (it cannot change)
    assert set(counts) == set(FLAT) - {"single"}, counts
    for t in study.trials:
        for name, value in t.params.items():
            assert FLAT[name]._contains(FLAT[name].to_internal_repr(value)), (name, value)
    assert study.best_value > 20.0  # selection climbs: random trials average about 8


def _conditional_objective(trial: optuna.Trial) -> float:
    """A define-by-run space with a branch, a nested conditional and a range set by another param."""
    kind = trial.suggest_categorical("kind", ["conv", "attn"])
    if kind == "conv":
        n = trial.suggest_int("conv.layers", 1, 4)
        score = float(n)
        for i in range(n):  # conv.k{i} exists only if layer i does
            score += trial.suggest_categorical(f"conv.k{i}", [1, 3, 5]) / 5
    else:
        heads = trial.suggest_int("attn.heads", 1, 8)
        # the range depends on heads: a parent's value may not be valid in the child
        score = heads / 2 + trial.suggest_int("attn.kv", 1, heads) / 4
        score += math.log10(trial.suggest_float("attn.lr", 1e-4, 1e-2, log=True)) + 4
    return score


def test_conditional_parameters() -> None:
    study = optuna.create_study(direction="maximize",
                                sampler=RegularizedEvolutionSampler(population_size=8, sample_size=3, seed=1))
    study.optimize(_conditional_objective, n_trials=300)
    trials = _by_number(study)
    opened = out_of_range = switched = 0
    for t in trials.values():
        parent_n = t.system_attrs[PARENT_KEY]
        if parent_n is None:
            continue
        parent, mutate = trials[parent_n], t.system_attrs[MUTATE_KEY]
        assert mutate in parent.params
        assert mutate in t.params  # everything asked before it was copied, so the child asks it too
        assert t.params[mutate] != parent.params[mutate]
        for name, value in t.params.items():
            assert t.distributions[name]._contains(t.distributions[name].to_internal_repr(value))
            if name == mutate:
                continue
            if name not in parent.params:
                opened += 1  # a branch the mutation opened: sampled at random, valid (checked above)
            elif value != parent.params[name]:
                # only where the parent's value is outside the child's range (attn.kv > heads)
                assert name == "attn.kv" and parent.params[name] > t.params["attn.heads"], (t.number, name)
                out_of_range += 1
        switched += mutate == "kind"
    assert switched > 0 and opened > 0 and out_of_range > 0, (switched, opened, out_of_range)


def test_real_hybrid_vit_space() -> None:
    """The real define-by-run space (hierarchical, conditional names): children are valid
    ArchSpecs and differ from their parent by one mutation."""
    from search_spaces.hybrid_vit import HybridViTSpace

    space = HybridViTSpace()

    def objective(trial: optuna.Trial) -> float:  # a cheap stand-in score from the spec alone
        spec = space.sample(trial)
        return float(sum(s.depth * s.width * s.mlp_ratio for s in spec.stages))

    study = optuna.create_study(direction="maximize",
                                sampler=RegularizedEvolutionSampler(population_size=10, sample_size=4, seed=0))
    study.optimize(objective, n_trials=80)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    trials = _by_number(study)
    children = [t for t in trials.values() if t.system_attrs[PARENT_KEY] is not None]
    assert len(children) == 70
    opened = same = 0
    for t in children:
        parent, mutate = trials[t.system_attrs[PARENT_KEY]], t.system_attrs[MUTATE_KEY]
        assert t.params[mutate] != parent.params[mutate]
        shared = set(t.params) & set(parent.params) - {mutate}
        assert all(t.params[k] == parent.params[k] for k in shared), t.number
        opened += bool(set(t.params) - set(parent.params))
        spec = space.sample(optuna.trial.FixedTrial(t.params))  # the child rebuilds as a valid spec
        # a mutation can be silent (e.g. a width growth capped at the maximum width): rarely
        same += spec.hash == space.sample(optuna.trial.FixedTrial(parent.params)).hash
    assert opened > 0 and same <= len(children) // 10, (opened, same)


# ------------------------------------------------------------------ multi-objective, constraints


def test_fast_non_dominated_sort_and_crowding_distance() -> None:
    v = np.array([[1, 3], [2, 2], [3, 1], [3, 3], [2.5, 2.5], [4, 4], [2, 2]], dtype=float)
    assert fast_non_dominated_sort(v).tolist() == [0, 0, 0, 2, 1, 3, 0]  # (3, 3) is behind (2.5, 2.5)
    front = np.array([[0.0, 4.0], [1.0, 2.0], [3.0, 1.0], [4.0, 0.0]])
    d = crowding_distance(front)
    assert np.isinf(d[0]) and np.isinf(d[3])
    assert d[1] == pytest.approx(3 / 4 + 3 / 4) and d[2] == pytest.approx(3 / 4 + 2 / 4)
    assert np.isinf(crowding_distance(front[:2])).all()


def test_multi_objective_tournament_first_front_then_crowding() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=RegularizedEvolutionSampler(population_size=5, sample_size=5, seed=0))
    # (accuracy, latency): 0, 1, 2 form the front (1 in its middle); 3 and 4 are dominated
    for v in ([90.0, 3.0], [80.0, 2.0], [70.0, 1.0], [70.0, 3.0], [75.0, 2.5]):
        study.add_trial(_completed(v))
    parents = _parents(study, 60)
    assert set(parents) == {0, 2}  # the front's extremes: infinite crowding distance, ties at random

    study2 = optuna.create_study(directions=["maximize", "minimize"],
                                 sampler=RegularizedEvolutionSampler(population_size=5, sample_size=2, seed=0))
    for v in ([90.0, 3.0], [80.0, 2.0], [70.0, 1.0], [70.0, 3.0], [75.0, 2.5]):
        study2.add_trial(_completed(v))
    parents = _parents(study2, 200)
    # member 3 is dominated by every other member: it never wins a tournament; member 4 is
    # dominated only by member 1, so it wins some pairs; each front member can win
    assert 3 not in parents and {0, 1, 2, 4} <= set(parents)


def test_feasible_beats_infeasible_and_smaller_violation_wins() -> None:
    sampler = RegularizedEvolutionSampler(population_size=3, sample_size=3, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.add_trial(_completed(10.0, user_attrs={"constraints": [1.0]}))  # best, infeasible
    study.add_trial(_completed(5.0, user_attrs={"constraints": [-1.0, 0.0]}))  # feasible (<= 0)
    study.add_trial(_completed(1.0, user_attrs={"constraints": [0.0]}))
    assert set(_parents(study, 20)) == {1}

    study = optuna.create_study(direction="maximize", sampler=sampler)  # nobody feasible
    study.add_trial(_completed(10.0, user_attrs={"constraints": [3.0]}))
    study.add_trial(_completed(1.0, user_attrs={"constraints": [0.25, 0.25, -5.0]}))  # violation 0.5
    study.add_trial(_completed(5.0, user_attrs={"constraints": [2.0]}))
    assert set(_parents(study, 20)) == {1}

    # Optuna's own constraint attribute (NSGA-II, Trial.set_constraint) takes precedence
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.add_trial(_completed(0.0, system_attrs={"constraints": [2.0]}, user_attrs={"constraints": [-1.0]}))
    study.add_trial(_completed(5.0, system_attrs={"constraints": [0.0]}))
    study.add_trial(_completed(1.0, system_attrs={"constraints:max_params": 1.0}))
    assert set(_parents(study, 20)) == {1}


def test_constraints_func_in_a_search() -> None:
    """x in 0..30, maximise x subject to x <= 12: parents are feasible once the population has a
    feasible member, the best feasible value is found, and the values are stored like NSGA-II's."""
    sampler = RegularizedEvolutionSampler(population_size=6, sample_size=6, seed=0,
                                          constraints_func=lambda t: [t.params["x"] - 12.0])

    def objective(trial: optuna.Trial) -> float:
        return float(trial.suggest_int("x", 0, 30)) + trial.suggest_float("noise", 0.0, 0.1)

    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=80)
    trials = _by_number(study)
    for t in trials.values():
        assert t.system_attrs["constraints"] == [t.params["x"] - 12.0]
        parent = t.system_attrs[PARENT_KEY]
        if parent is None:
            continue
        population = [u for u in trials.values() if u.number < t.number][-6:]
        if any(u.params["x"] <= 12 for u in population):
            assert trials[parent].params["x"] <= 12, (t.number, parent)
    assert max(t.params["x"] for t in trials.values() if t.params["x"] <= 12) == 12


# ------------------------------------------------------------------ determinism and storage


def test_deterministic_given_seed() -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=RegularizedEvolutionSampler(population_size=6, sample_size=2, seed=seed))
        study.optimize(_conditional_objective, n_trials=40)
        return [t.params for t in study.trials]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sqlite_storage_and_resume_with_a_fresh_sampler(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rea.db'}"
    study = optuna.create_study(study_name="rea", storage=url, direction="maximize",
                                sampler=RegularizedEvolutionSampler(population_size=6, sample_size=3, seed=0))
    study.optimize(_flat_objective, n_trials=10)
    del study

    # "another process": the population comes from the stored trials, so the first new trial evolves
    sampler = RegularizedEvolutionSampler(population_size=6, sample_size=3, seed=1)
    study = optuna.load_study(study_name="rea", storage=url, sampler=sampler)
    assert [t.number for t in sampler.population(study)] == list(range(4, 10))
    study.optimize(_flat_objective, n_trials=6)
    trials = _by_number(study)
    assert len(trials) == 16
    for n in range(10, 16):
        parent = trials[n].system_attrs[PARENT_KEY]
        assert n - 6 <= parent < n
    _check_one_mutation(study)

    # a trial planned by one sampler and sampled by another (a fresh process) follows the stored plan
    asked = study.ask()
    attrs = study._storage.get_trial(asked._trial_id).system_attrs
    plan = (attrs[PARENT_KEY], attrs[MUTATE_KEY])
    assert plan[0] is not None
    other = optuna.load_study(study_name="rea", storage=url,
                              sampler=RegularizedEvolutionSampler(population_size=6, sample_size=3, seed=99))
    trial = optuna.trial.Trial(other, asked._trial_id)
    other.tell(trial, _flat_objective(trial))
    done = _by_number(other)[asked.number]
    assert (done.system_attrs[PARENT_KEY], done.system_attrs[MUTATE_KEY]) == plan
    _check_one_mutation(other)


# ------------------------------------------------------- search quality on NAS-Bench-201 ground truth


@pytest.fixture(scope="module")
def nb201() -> dict[str, Any]:
    if not ACC_CSV.is_file() or not LATENCY_CSV.is_file():
        pytest.skip(f"NAS-Bench-201 tables not present under {DATA} (shared data folder absent)")
    from search_spaces.nb201 import NB201Space, load_labels

    acc = load_labels(ACC_CSV)
    latency = load_labels(LATENCY_CSV, column="2080ti_1_ms")
    assert len(acc) == len(latency) == 15_625
    points = np.array([[acc[a], latency[a]] for a in acc])
    ref = [float(points[:, 0].min()), float(points[:, 1].max())]  # the table's nadir point
    true_front = points[pareto_front(points, [False, True])]
    return {"space": NB201Space(), "acc": acc, "latency": latency, "ref": ref,
            "hv_true": hypervolume(true_front, ref, [False, True]), "best": float(points[:, 0].max())}


SEEDS = range(20)
TRIALS = 200


def _search(nb201: dict[str, Any], sampler: optuna.samplers.BaseSampler, objectives: int) -> optuna.Study:
    space, acc, latency = nb201["space"], nb201["acc"], nb201["latency"]

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        arch = space.sample(trial).to_string()  # the 6 edges, cell.e{to}_{from}, 5 ops each
        return acc[arch] if objectives == 1 else (acc[arch], latency[arch])

    directions = ["maximize"] if objectives == 1 else ["maximize", "minimize"]
    study = optuna.create_study(directions=directions, sampler=sampler)
    study.optimize(objective, n_trials=TRIALS)
    return study


def test_nb201_rea_beats_random_on_best_accuracy(nb201: dict[str, Any]) -> None:
    """CIFAR-10 test accuracy (NAS-Bench-201), 200 trials per seed, 20 seeds, REA(32, 8).

    Measured: REA mean best 94.350 % (s.e. 0.022), random 93.971 % (s.e. 0.039); REA better on
    18 of 20 seeds, and it reaches the table's best (94.373 %) on 16 of them."""
    rea = [_search(nb201, RegularizedEvolutionSampler(32, 8, seed=s), 1).best_value for s in SEEDS]
    rnd = [_search(nb201, optuna.samplers.RandomSampler(seed=s), 1).best_value for s in SEEDS]
    assert max(rea) <= nb201["best"]
    assert np.mean(rea) > np.mean(rnd) + 0.15, (np.mean(rea), np.mean(rnd))
    assert sum(a > b for a, b in zip(rea, rnd)) >= 14


def test_nb201_rea_beats_random_on_hypervolume(nb201: dict[str, Any]) -> None:
    """Accuracy (max) vs. measured RTX 2080 Ti batch-1 latency (min, HELP), 200 trials per seed,
    20 seeds, REA(32, 8); hypervolume from the table's nadir point, as a fraction of the true
    front's (the whole table's).

    Measured: REA mean 0.9713 (s.e. 0.0040), random 0.9517 (s.e. 0.0032); REA better on 17 of 20."""

    def hv(study: optuna.Study) -> float:
        return hypervolume([t.values for t in study.trials], nb201["ref"], [False, True]) / nb201["hv_true"]

    rea = [hv(_search(nb201, RegularizedEvolutionSampler(32, 8, seed=s), 2)) for s in SEEDS]
    rnd = [hv(_search(nb201, optuna.samplers.RandomSampler(seed=s), 2)) for s in SEEDS]
    assert max(rea) <= 1.0 + 1e-9
    assert np.mean(rea) > np.mean(rnd) + 0.008, (np.mean(rea), np.mean(rnd))
    assert sum(a > b for a, b in zip(rea, rnd)) >= 13
