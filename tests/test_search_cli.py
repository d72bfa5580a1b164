"""`nas search | resume | studies | show | best | stop`: bad input and the behaviour of a real study.

Bad input must be one line on stderr starting with ``nas: error:``, exit code 2, and leave the
store as it was: no file where none existed, the same rows where one did. Those cases run in
process. One real search (Ray, a few seconds) runs once per module, in a subprocess, and the
behaviour tests read its study.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cli import app
from search_spaces import ArchSpec

STUDY = "base"  # the module fixture's study: a trial budget, searched to completion
TIMED = "timed"  # registered with a time budget, never run
SEARCH_BUDGET = 6
CLOSED_PG = "postgresql+psycopg://nas@127.0.0.1:1/nas"  # nothing listens on port 1


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        app(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def nas_exe() -> Path:
    """The installed console script next to this interpreter."""
    exe = Path(sys.executable).with_name("nas")
    if not exe.exists():
        pytest.skip("console script `nas` not installed in this environment")
    return exe


def run_nas(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed `nas` in a fresh process (a real search starts Ray)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(nas_exe()), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def dump(db: Path) -> list[str]:
    """The logical content of a SQLite file (every table's rows), read through a connection (WAL)."""
    con = sqlite3.connect(str(db))
    try:
        return list(con.iterdump())
    finally:
        con.close()


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of one read-only query."""
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` except SQLite's -wal/-shm side files, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not p.name.endswith(("-wal", "-shm", "-journal")))


def assert_one_line_error(code: int, out: str, err: str, pattern: str) -> None:
    """Exit 2, nothing on stdout, one stderr line `nas: error: ...` matching ``pattern``."""
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert out == "", f"stdout should be empty on bad input: {out[:300]!r}"
    assert err.startswith("nas: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert re.search(pattern, err, re.IGNORECASE), f"{pattern!r} not in {err!r}"


def evaluation_rows(db: Path, study: str, *, errors: bool = True, stage: str | None = None) -> int:
    """How many evaluation rows ``study`` has in the store (all, or only the successful ones)."""
    sql = ("SELECT COUNT(*) FROM nas_evaluations e JOIN nas_studies s ON s.id = e.study_id WHERE s.name = ?"
           + ("" if errors else " AND e.error IS NULL") + (" AND e.stage = ?" if stage else ""))
    return int(query(db, sql, study, *([stage] if stage else []))[0][0])


@dataclass(frozen=True)
class Searched:
    """The module's store after one real search: where it is and what `nas search --json` printed."""

    root: Path
    db: Path
    url: str
    output: dict[str, Any]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Searched:
    """One real search (random strategy, 6 trials, 1 epoch on digits), plus a registered time-budget study."""
    root = tmp_path_factory.mktemp("search")
    db = root / "nas.db"
    url = f"sqlite:///{db}"
    res = run_nas(["search", "--space", "hybrid_vit", "--budget", f"{SEARCH_BUDGET}trials", "--strategy", "random",
                   "--train-epochs", "1", "--data", "digits", "--study", STUDY, "--storage", url, "--json"], root)
    assert res.returncode == 0, f"nas search failed ({res.returncode}): {res.stderr[-3000:]}"
    output = json.loads(res.stdout)

    from nas.budget import parse_budget
    from nas.search import SearchConfig
    from nas.store import Store

    with Store(url) as store:  # a second study with a time budget, for resume's unit checks
        store.create_study(TIMED, "hybrid_vit", SearchConfig(strategy="random").to_dict(),
                           parse_budget("1cpu-m").to_dict())
    return Searched(root=root, db=db, url=url, output=output)


@pytest.fixture
def no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must never reach the driver: if it does, fail fast instead of starting Ray in process."""
    import nas.search

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bad input reached the search driver")

    monkeypatch.setattr(nas.search, "run_study", refuse)
    monkeypatch.setattr(nas.search, "install_stop_handlers", lambda *a, **k: None)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --target cuda is valid")

# `nas search` flags (a valid --budget is added unless the case gives one), run against a fresh path
# and against the module's existing store; (flags, regex the one error line must match)
SEARCH_BAD: list[Any] = [
    pytest.param(["--budget", ""], "empty budget", id="budget-empty"),
    pytest.param(["--budget", "abc"], "budget.*abc", id="budget-abc"),
    pytest.param(["--budget", "0s"], "budget.*0s", id="budget-0s"),
    pytest.param(["--budget", "-5m"], "budget.*-5m", id="budget-negative"),
    pytest.param(["--budget", "5x"], "budget.*5x", id="budget-bad-unit"),
    pytest.param(["--budget", "0trials"], "trials", id="budget-0trials"),
    pytest.param(["--budget", "99999999d"], "budget", id="budget-huge"),
    pytest.param(["--budget", "8gpu-h", "--target", "cpu"], "gpu", id="budget-gpu-on-cpu-target"),
    pytest.param(["--budget", "+5m"], r"budget.*\+5m", id="budget-increment-given-to-search"),
    pytest.param(["--space", "nb201"], "--benchmark", id="space-nb201"),
    pytest.param(["--space", "resnet"], "resnet", id="space-unknown"),
    pytest.param(["--data", "cifar10:/nope"], "/nope", id="data-cifar10-missing"),
    pytest.param(["--data", "imagefolder:/nope"], "/nope", id="data-imagefolder-missing"),
    pytest.param(["--data", "npz:/nope.npz"], "nope.npz", id="data-npz-missing"),
    pytest.param(["--data", "foo:bar"], "foo", id="data-unknown-kind"),
    pytest.param(["--data", ""], "data|dataset", id="data-empty"),
    pytest.param(["--objectives", "latency"], "accuracy", id="objectives-without-accuracy"),
    pytest.param(["--objectives", "accuracy,bogus"], "bogus", id="objectives-unknown"),
    pytest.param(["--objectives", "accuracy,accuracy"], "objectives", id="objectives-repeated"),
    pytest.param(["--precision", "fp7"], "fp7", id="precision-unknown"),
    pytest.param(["--precision", "fp8", "--target", "cpu"], "fp8", id="precision-fp8-on-cpu"),
    pytest.param(["--target", "tpu"], "tpu", id="target-tpu"),
    pytest.param(["--target", "cuda"], "cuda", id="target-cuda-without-gpu", marks=_NO_CUDA),
    pytest.param(["--strategy", "grid"], "grid", id="strategy-unknown"),
    pytest.param(["--stages", "screen=abc"], "screen=abc", id="stages-not-a-number"),
    pytest.param(["--stages", "bogus=1"], "bogus", id="stages-unknown-stage"),
    pytest.param(["--stages", "screen=-1"], "share", id="stages-negative"),
    pytest.param(["--workers", "0"], "workers", id="workers-0"),
    pytest.param(["--threads", "0"], "threads", id="threads-0"),
    pytest.param(["--train-workers", "0"], "train-workers", id="train-workers-0"),
    pytest.param(["--train-workers", "two"], "train-workers", id="train-workers-not-int"),
    pytest.param(["--supernet-workers", "0"], "supernet-workers must be auto or", id="supernet-workers-0"),
    pytest.param(["--supernet-workers", "many"], "supernet-workers.*many", id="supernet-workers-not-int"),
    pytest.param(["--gpus-per-trial", "0"], "gpus-per-trial", id="gpus-per-trial-0"),
    pytest.param(["--gpus-per-trial", "2"], "gpus-per-trial.*supernet-workers", id="gpus-per-trial-2"),
    pytest.param(["--gpus-per-trial", "0.5", "--target", "cpu"], "gpus-per-trial.*cpu", id="gpus-per-trial-on-cpu"),
    pytest.param(["--train-epochs", "0"], "epochs", id="train-epochs-0"),
    pytest.param(["--early-stop", "sometimes"], "--early-stop must be one of none, asha, got 'sometimes'",
                 id="early-stop-unknown"),
    pytest.param(["--max-params", "0"], "max-params", id="max-params-0"),
    pytest.param(["--max-params", "lots"], "lots", id="max-params-lots"),
    pytest.param(["--max-params", "10"], "max-params", id="max-params-below-smallest-arch"),
    pytest.param(["--max-latency-ms", "-1"], "max-latency-ms", id="max-latency-negative"),
    pytest.param(["--max-latency-ms", "nan"], "max-latency-ms", id="max-latency-nan"),
    pytest.param(["--img-size", "3"], "img-size", id="img-size-3"),
    pytest.param(["--frame", "nope"], "frame", id="frame-unknown"),
    pytest.param(["--address", "nohost"], "address", id="address-no-port"),
    pytest.param(["--data-limit", "5"], "data-limit", id="data-limit-5"),
    pytest.param(["--screen-batch", "0"], "screen-batch must be between 1 and 32, got 0", id="screen-batch-0"),
    pytest.param(["--screen-batch", "33"], "screen-batch must be between 1 and 32, got 33", id="screen-batch-33"),
    pytest.param(["--parzc", "/missing"], "parzc", id="parzc-missing"),
    pytest.param(["--supernet", "/missing"], "supernet", id="supernet-missing"),
    pytest.param(["--workers", "abc"], "workers", id="workers-not-int"),
    pytest.param(["--bogus"], "bogus", id="unknown-flag"),
    pytest.param(["--study", "a/b"], "study name", id="study-slash"),
    pytest.param(["--study", "x" * 65], "study name", id="study-too-long"),
    pytest.param(["--study", "-x"], "study name|--study", id="study-leading-dash"),
    # an explicit empty name must be refused, not replaced by a generated one (--frame fails later)
    pytest.param(["--study", "", "--frame", "nope"], "study name", id="study-empty"),
]


def _search_args(flags: list[str], url: str, study: str | None = None) -> list[str]:
    """`nas search` argv: a valid budget and ``study`` name unless the case gives its own."""
    budget = [] if "--budget" in flags else ["--budget", "30s"]
    name = [] if study is None or "--study" in flags else ["--study", study]
    return ["search", *budget, *name, *flags, "--storage", url]


@pytest.mark.usefixtures("no_driver")
@pytest.mark.parametrize(("flags", "pattern"), SEARCH_BAD)
def test_search_bad_input_on_a_fresh_path_creates_nothing(flags: list[str], pattern: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """No store existed: after bad input there is still no file (no db, no -wal, no run folder)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(_search_args(flags, f"sqlite:///{tmp_path / 'nas.db'}"), capsys)
    assert_one_line_error(code, out, err, pattern)
    assert list(tmp_path.iterdir()) == [], f"bad input wrote {listing(tmp_path)}"


@pytest.mark.usefixtures("no_driver")
@pytest.mark.parametrize(("flags", "pattern"), SEARCH_BAD)
def test_search_bad_input_leaves_an_existing_store_unchanged(flags: list[str], pattern: str, searched: Searched,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The store existed: after bad input every table holds the same rows and no run folder appeared."""
    monkeypatch.chdir(tmp_path)
    rows, files = dump(searched.db), listing(searched.root)
    # a name of its own: a case that wrongly creates a study must not make the next one fail on the name
    code, out, err = run(_search_args(flags, searched.url, study=f"bad-{tmp_path.name}"[:64]), capsys)
    assert_one_line_error(code, out, err, pattern)
    assert dump(searched.db) == rows
    assert listing(searched.root) == files
    assert list(tmp_path.iterdir()) == []


STORAGE_BAD: list[Any] = [
    pytest.param("ftp://x", "ftp", id="ftp"),
    pytest.param("mysql://nas:pw@localhost/nas", "mysql", id="mysql"),
    pytest.param("sqlite:///{tmp}/missing-dir/nas.db", "missing-dir|does not exist", id="sqlite-missing-dir"),
    pytest.param("sqlite:///:memory:", "memory|database file", id="sqlite-memory"),
    pytest.param("", "store URL", id="empty"),
    pytest.param(CLOSED_PG, "cannot open store|driver missing", id="postgres-closed-port"),
]


@pytest.mark.usefixtures("no_driver")
@pytest.mark.parametrize("command", [["search", "--budget", "30s"], ["studies"], ["show", STUDY]],
                         ids=["search", "studies", "show"])
@pytest.mark.parametrize(("url", "pattern"), STORAGE_BAD)
def test_bad_storage_urls(command: list[str], url: str, pattern: str, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Unsupported schemes, a SQLite file in a missing folder, PostgreSQL nobody listens to: nothing created."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run([*command, "--storage", url.format(tmp=tmp_path)], capsys)
    assert_one_line_error(code, out, err, pattern)
    assert list(tmp_path.iterdir()) == [], f"bad input wrote {listing(tmp_path)}"


# other commands against the module's store; (argv without --storage, regex)
STORE_BAD: list[Any] = [
    pytest.param(["search", "--budget", "30s", "--study", STUDY], "already exists", id="search-existing-name"),
    pytest.param(["resume", STUDY], "complete", id="resume-completed-without-budget"),
    pytest.param(["resume", STUDY, "--budget", "5trials"], r"\+", id="resume-increment-without-plus"),
    pytest.param(["resume", STUDY, "--budget", "abc"], "budget|abc", id="resume-budget-abc"),
    pytest.param(["resume", STUDY, "--budget", "+0trials"], "trials", id="resume-budget-plus-0"),
    pytest.param(["resume", STUDY, "--budget", "+5m"], "add|unit", id="resume-time-increment-on-trial-budget"),
    pytest.param(["resume", TIMED, "--budget", "+5trials"], "add|unit", id="resume-trial-increment-on-time-budget"),
    pytest.param(["resume", TIMED, "--budget", "+1gpu-h"], "add|unit|gpu", id="resume-gpu-increment-on-cpu-budget"),
    pytest.param(["resume", "nope"], "nope", id="resume-unknown"),
    pytest.param(["resume", "nope", "--budget", "+1trials"], "nope", id="resume-unknown-with-budget"),
    pytest.param(["show", "nope"], "nope", id="show-unknown"),
    pytest.param(["best", "nope"], "nope", id="best-unknown"),
    pytest.param(["best", "nope", "--json"], "nope", id="best-unknown-json"),
    pytest.param(["stop", "nope"], "nope", id="stop-unknown"),
    pytest.param(["show", "a/b"], "study name", id="show-bad-name"),
    pytest.param(["best", "a/b"], "study name", id="best-bad-name"),
    pytest.param(["stop", "a/b"], "study name", id="stop-bad-name"),
    pytest.param(["resume", "a/b", "--budget", "+1trials"], "study name", id="resume-bad-name"),
]


@pytest.mark.usefixtures("no_driver")
@pytest.mark.parametrize(("args", "pattern"), STORE_BAD)
def test_bad_input_against_an_existing_store_changes_no_rows(args: list[str], pattern: str, searched: Searched,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown studies, bad names, wrong budget units, a completed study without budget: rows unchanged."""
    monkeypatch.chdir(tmp_path)
    rows, files = dump(searched.db), listing(searched.root)
    code, out, err = run([*args, "--storage", searched.url], capsys)
    assert_one_line_error(code, out, err, pattern)
    assert dump(searched.db) == rows
    assert listing(searched.root) == files


MISSING_FILE: list[Any] = [
    pytest.param(["studies"], id="studies"),
    pytest.param(["studies", "--json"], id="studies-json"),
    pytest.param(["show", STUDY], id="show"),
    pytest.param(["best", STUDY, "--json"], id="best"),
    pytest.param(["stop", STUDY], id="stop"),
    pytest.param(["resume", STUDY], id="resume"),
    pytest.param(["resume", STUDY, "--budget", "+1trials"], id="resume-with-budget"),
]


@pytest.mark.usefixtures("no_driver")
@pytest.mark.parametrize("args", MISSING_FILE)
def test_commands_on_a_missing_sqlite_file_create_nothing(args: list[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Reading commands never create a store: a missing file is an error."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run([*args, "--storage", f"sqlite:///{tmp_path / 'nas.db'}"], capsys)
    assert_one_line_error(code, out, err, "no store|not found|does not exist")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# a real study
# --------------------------------------------------------------------------------------------


def _study_row(searched: Searched, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run(["studies", "--storage", searched.url, "--json"], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert STUDY in rows and TIMED in rows
    return rows[STUDY]


def test_search_json_reports_a_completed_study_with_a_front(searched: Searched) -> None:
    """`nas search --json` prints the finished study and a non-empty front."""
    study = searched.output["study"]
    assert study["name"] == STUDY and study["status"] == "completed"
    assert study["trials_done"] == SEARCH_BUDGET
    assert searched.output["front"]


def test_studies_json_counts_successful_evaluations(searched: Searched, capsys: pytest.CaptureFixture[str]) -> None:
    """`nas studies --json`: the study is completed and trials_done equals its successful evaluation rows."""
    row = _study_row(searched, capsys)
    assert row["status"] == "completed"
    assert row["trials_done"] == evaluation_rows(searched.db, STUDY, errors=False)
    assert row["trials_done"] == row["budget"]["trials"]  # a trial budget is spent exactly, not overshot


def test_show_json_stage_counts_sum_to_the_evaluation_rows(searched: Searched,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`nas show --json`: per-stage done + errors add up to the store's evaluation rows of the study."""
    code, out, err = run(["show", STUDY, "--storage", searched.url, "--json"], capsys)
    assert code == 0, err
    shown = json.loads(out)
    stages = shown["stages"]
    assert stages
    assert sum(v["done"] + v["errors"] for v in stages.values()) == evaluation_rows(searched.db, STUDY)
    assert sum(v["done"] for v in stages.values()) == evaluation_rows(searched.db, STUDY, errors=False)
    for stage, v in stages.items():
        assert v["done"] + v["errors"] == evaluation_rows(searched.db, STUDY, stage=stage), stage
    assert shown["study"]["name"] == STUDY and shown["study"]["status"] == "completed"


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, latency_ms): a is at least as good in both and better in one (accuracy max, latency min)."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def test_best_json_front_rebuilds_and_is_non_dominated(searched: Searched,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`nas best --json`: every row's spec rebuilds with its hash, and no row dominates another."""
    from search_spaces.hybrid_vit import build

    code, out, err = run(["best", STUDY, "--storage", searched.url, "--json"], capsys)
    assert code == 0, err
    front = json.loads(out)
    assert front
    frame = _study_row(searched, capsys)["config"]["frame_json"]
    points = []
    for row in front:
        spec = ArchSpec.from_json(json.dumps(row["spec"]))
        assert spec.hash == row["hash"]
        model = build(spec, num_classes=frame["num_classes"], img_size=frame["img_size"],
                      in_chans=frame["in_chans"])
        with torch.no_grad():
            y = model(torch.zeros(1, frame["in_chans"], frame["img_size"], frame["img_size"]))
        assert tuple(y.shape) == (1, frame["num_classes"])
        m = row["metrics"]
        assert math.isfinite(m["accuracy"]) and math.isfinite(m["latency_ms"])
        points.append((m["accuracy"], m["latency_ms"]))
    assert len({r["hash"] for r in front}) == len(front)
    for i, a in enumerate(points):
        for j, b in enumerate(points):
            assert i == j or not _dominates(a, b), f"front row {i} {a} dominates row {j} {b}"
    accs = [p[0] for p in points]
    assert accs == sorted(accs, reverse=True)  # most accurate first


def test_best_front_is_the_front_of_the_trained_architectures(searched: Searched,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """No trained architecture outside the front dominates a front row, and none left out is non-dominated."""
    code, out, err = run(["best", STUDY, "--storage", searched.url, "--json"], capsys)
    assert code == 0, err
    front = {r["hash"] for r in json.loads(out)}
    rows = query(searched.db, "SELECT e.id, e.arch_hash, e.stage, m.metric, m.value FROM nas_evaluations e "
                              "JOIN nas_studies s ON s.id = e.study_id JOIN nas_metrics m ON m.evaluation_id = e.id "
                              "WHERE s.name = ? AND e.error IS NULL AND e.stage IN ('train', 'latency') "
                              "ORDER BY e.id", STUDY)
    latest: dict[tuple[str, str], dict[str, float]] = {}
    for eid, h, stage, metric, value in rows:  # later evaluations of an architecture replace earlier ones
        cur = latest.setdefault((stage, h), {"id": eid})
        if cur["id"] != eid:
            cur = latest[(stage, h)] = {"id": eid}
        cur[metric] = value
    points: dict[str, tuple[float, float]] = {}
    for (stage, h), m in latest.items():
        if stage == "train" and "accuracy" in m:
            lat = latest.get(("latency", h), m).get("latency_ms", m.get("latency_ms"))
            if lat is not None:
                points[h] = (m["accuracy"], lat)
    assert front <= set(points), "front rows must be trained architectures"
    expected = {h for h, p in points.items() if not any(_dominates(q, p) for q in points.values())}
    assert front == expected


def test_stop_on_a_completed_study_has_nothing_to_stop(searched: Searched,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`nas stop` on a completed study: exit 0, says so, changes nothing."""
    rows = dump(searched.db)
    code, out, err = run(["stop", STUDY, "--storage", searched.url], capsys)
    assert code == 0, err
    assert "nothing to stop" in out
    assert dump(searched.db) == rows


def test_optuna_study_loads_and_trials_carry_their_spec(searched: Searched) -> None:
    """Optuna's study sits in the same database; every COMPLETE trial names its spec and hash."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=searched.url)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert complete
    stored = {h for (h,) in query(searched.db, "SELECT hash FROM nas_architectures")}
    for t in complete:
        assert "spec_hash" in t.user_attrs and "spec" in t.user_attrs, t.number
        assert ArchSpec.from_json(t.user_attrs["spec"]).hash == t.user_attrs["spec_hash"]
        assert t.user_attrs["spec_hash"] in stored


def test_resume_with_two_more_trials_trains_exactly_two_more(searched: Searched,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`nas resume --budget +2trials`: exactly two more successful train evaluations, nothing lost, completed.

    Runs last: it changes the module's study."""
    before = query(searched.db, "SELECT e.id, e.key FROM nas_evaluations e JOIN nas_studies s "
                                "ON s.id = e.study_id WHERE s.name = ? ORDER BY e.id", STUDY)
    trained = evaluation_rows(searched.db, STUDY, errors=False, stage="train")
    res = run_nas(["resume", STUDY, "--budget", "+2trials", "--storage", searched.url, "--json"], searched.root)
    assert res.returncode == 0, f"nas resume failed ({res.returncode}): {res.stderr[-3000:]}"
    assert json.loads(res.stdout)["study"]["status"] == "completed"
    after = query(searched.db, "SELECT e.id, e.key FROM nas_evaluations e JOIN nas_studies s "
                               "ON s.id = e.study_id WHERE s.name = ? ORDER BY e.id", STUDY)
    assert set(before) <= set(after), "resume lost stored evaluations"
    assert evaluation_rows(searched.db, STUDY, errors=False, stage="train") == trained + 2
    row = _study_row(searched, capsys)
    assert row["status"] == "completed"
    assert row["budget"]["trials"] == SEARCH_BUDGET + 2
    assert row["trials_done"] == evaluation_rows(searched.db, STUDY, errors=False)


@pytest.mark.usefixtures("no_driver")
def test_resume_of_the_completed_study_without_budget_still_refused(searched: Searched, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """After the resume above the study is complete again: resuming it without budget is bad input."""
    monkeypatch.chdir(tmp_path)
    rows = dump(searched.db)
    code, out, err = run(["resume", STUDY, "--storage", searched.url], capsys)
    assert_one_line_error(code, out, err, "complete")
    assert dump(searched.db) == rows


def test_trials_ask_ray_for_the_gpu_share_they_were_given() -> None:
    from nas.search.config import SearchConfig, trial_resources

    assert trial_resources(SearchConfig(target="cuda", gpus_per_trial=0.25)) == {"cpu": 1, "gpu": 0.25}
    assert trial_resources(SearchConfig(target="cuda")) == {"cpu": 1, "gpu": 1.0}
    assert trial_resources(SearchConfig(target="cpu")) == {"cpu": 1}


def test_a_cuda_study_needs_the_gpus_its_workers_hold() -> None:
    """GPU pool sizing: the trial actors' shares packed as Ray packs them (measured on a local Ray
    with 2 declared GPUs: at 0.4, 4 actors are placed and a 5th waits; at 0.3, 6 and a 7th waits),
    plus a whole GPU per Ray Train worker; a study that needs more is refused in one line."""
    from nas.search.config import SearchConfig, SearchError, check_gpu_pool, gpus_needed

    def need(**kw: object) -> int:
        return gpus_needed(SearchConfig(target="cuda", **kw))  # type: ignore[arg-type]

    assert [need(workers=w, gpus_per_trial=0.4) for w in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert [need(workers=w, gpus_per_trial=0.3) for w in (3, 4, 6, 7)] == [1, 2, 2, 3]
    assert need(workers=8) == 8 and need(workers=8, gpus_per_trial=0.25) == 2
    assert need(workers=4, gpus_per_trial=1 / 3) == 2
    assert need(workers=4, gpus_per_trial=0.5, supernet_workers=8) == 2 + 8
    assert need(workers=2, gpus_per_trial=0.5, train_workers=4) == 1 + 2 * 4
    assert need(workers=2, gpus_per_trial=0.5, supernet_workers=4, train_workers=3) == 1 + 6
    assert gpus_needed(SearchConfig(target="cpu", workers=8, supernet_workers=4)) == 0
    check_gpu_pool(SearchConfig(target="cuda", workers=8, gpus_per_trial=0.5, supernet_workers=4), 8)
    with pytest.raises(SearchError, match=r"^--workers 8 at --gpus-per-trial 1, --supernet-workers 8 need 16 GPUs "
                                          r"and this machine has 8; use fewer workers") as e:
        check_gpu_pool(SearchConfig(target="cuda", workers=8, supernet_workers=8), 8)
    assert "\n" not in str(e.value)
    # --supernet-workers auto (the command line's default): the GPUs the pool leaves, else one process
    from nas.search.config import auto_supernet_workers

    assert SearchConfig.parse(supernet_workers="auto").supernet_workers == 0
    assert SearchConfig.parse(supernet_workers="3").supernet_workers == 3
    assert auto_supernet_workers(SearchConfig(target="cuda", workers=4, gpus_per_trial=0.25), 8) == 7
    assert auto_supernet_workers(SearchConfig(target="cuda", workers=8), 8) == 1
    assert auto_supernet_workers(SearchConfig(target="cuda", workers=2), 0) == 1  # a cluster: GPUs unknown
    assert auto_supernet_workers(SearchConfig(target="cpu", workers=8), 0) == 1


def test_train_workers_validate_and_reach_the_train_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--train-workers 2` passes the checks and is stored with the study (the driver gives it to the
    train stage's EvalConfig); bad values are refused in one line (SEARCH_BAD)."""
    import nas.search
    from nas.search.config import SearchConfig, SearchError

    seen: dict[str, Any] = {}

    def capture(store: Any, name: str, **kwargs: Any) -> Any:
        seen.update(store.study(name).config)
        raise RuntimeError("captured")  # stop here: no search needed

    monkeypatch.setattr(nas.search, "run_study", capture)
    monkeypatch.setattr(nas.search, "install_stop_handlers", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    run(_search_args(["--train-workers", "2", "--target", "cpu"], f"sqlite:///{tmp_path / 'nas.db'}", "tw"), capsys)
    assert seen.get("train_workers") == 2
    assert SearchConfig(train_workers=3).train_workers == 3 and SearchConfig().train_workers == 1
    with pytest.raises(SearchError, match="--train-workers"):
        SearchConfig(train_workers=0)
