"""Bad input to every verb: one line on stderr, exit code 2, and nothing written (README, CLI reference).

Each case runs the CLI in-process in an empty working directory with an empty HOME, next to a
shared folder of inputs (a store with a study, a foreign and an empty SQLite file, bad specs and
frames, a one-class image folder, garbage checkpoints). After the run the working directory and
HOME are still empty, every input file has its bytes, and the store has its rows
(``iterdump``). Anything that would start real work (a study, training, a timing loop, the web
server) is replaced by a guard that fails the test, so a case that is wrongly accepted fails fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import app

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 320  # "nas: error: " + at most ~300 characters
HUGE = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


def _nested(n: int) -> str:
    return '{"stem": ' * n + "{}" + "}" * n


# --------------------------------------------------------------------------------------------
# the inputs, built once
# --------------------------------------------------------------------------------------------


def _spec_json(**stage: Any) -> str:
    st = {"depth": 1, "width": 32, "token_mixer": "pool", "channel_mixer": "mlp", **stage}
    return json.dumps({"stem": {"kind": "conv", "stride": 4}, "stages": [st]})


def _frame_json(**stage: Any) -> str:
    st = {"max_depth": 1, "widths": [16], "token_mixers": ["pool"], "channel_mixers": ["mlp"], **stage}
    return json.dumps({"stem": {"kind": "patch", "stride": 4}, "stages": [st], "img_size": 16, "in_chans": 1})


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    from nas.store import Store
    from search_spaces.supernet import get_frame

    a = tmp_path_factory.mktemp("inputs")
    store = Store(f"sqlite:///{a / 'nas.db'}")
    frame = get_frame("tiny", in_chans=1, num_classes=10)
    store.create_study("s1", "hybrid_vit", {"frame_json": frame.to_dict(), "data": "digits"},
                       {"seconds": 60.0, "trials": None, "device": None})
    specs = [frame.random(i) for i in range(3)]
    for i, spec in enumerate(specs):
        store.add_architecture(spec.hash, "hybrid_vit", spec.to_json())
        store.record_evaluation("s1", stage="train", metrics={"accuracy": 0.9 - i / 10}, seconds=1.0,
                                arch_hash=spec.hash, trial=i, key=f"train:{i}")
        store.record_evaluation("s1", stage="latency", metrics={"latency_ms": 1.0 + i}, seconds=0.1,
                                arch_hash=spec.hash, device={"kind": "cpu", "name": "cpu", "key": "0123456789abcdef"},
                                key=f"latency:{i}")
    store.set_front("s1", [{"arch_hash": s.hash, "rank": i, "metrics": {"accuracy": 0.9 - i / 10,
                                                                        "latency_ms": 1.0 + i}}
                           for i, s in enumerate(specs)])
    store.set_status("s1", "completed")
    store.close()
    (a / "empty.db").write_bytes(b"")
    con = sqlite3.connect(a / "foreign.db")
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('mine')")
    con.commit()
    con.close()
    (a / "garbage.db").write_bytes(b"not a database\n" * 100)
    (a / "garbage.pt").write_bytes(b"\x80\x04garbage" * 50)
    (a / "snet").mkdir()
    (a / "snet" / "supernet.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    files = {
        "ok.json": specs[0].to_json(),
        "deep.json": DEEP,
        "deepobj.json": _nested(5000),
        "list_mixer.json": _spec_json(token_mixer=["pool"]),
        "dict_mixer.json": _spec_json(channel_mixer={"a": 1}),
        "list_blocks.json": _spec_json(depth=2, blocks=[{"token_mixer": ["pool"], "channel_mixer": "mlp"},
                                                        {"token_mixer": "pool", "channel_mixer": "mlp"}]),
        "str_depth.json": _spec_json(depth="2"),
        "big_ratio.json": _spec_json(mlp_ratio=1e400 if False else 10**400),
        "list_norm.json": _spec_json(norm=["layernorm"]),
        "stride_list.json": json.dumps({"stem": {"kind": "conv", "stride": [4]}, "stages": [{"depth": 1,
                                                                                           "width": 8}]}),
        "space_list.json": json.dumps({"space": ["hybrid_vit"], "stem": {}, "stages": []}),
        "long_mixer.json": _spec_json(token_mixer="x" * 100_000),
        "frame_deep.json": DEEP,
        "frame_list_mixer.json": _frame_json(token_mixers=[["pool"]]),
        "frame_heads0.json": _frame_json(token_mixers=["attention"], heads=[0]),
        "frame_norm_list.json": _frame_json(norm=["layernorm"]),
        "frame_stages_str.json": json.dumps({"stem": {"kind": "patch", "stride": 4}, "stages": "abc"}),
        "frame_stem_list.json": json.dumps({"stem": [4], "stages": []}),
        "frame_img_huge.json": json.dumps({**json.loads(_frame_json()), "img_size": 10**9}),
        "frame_perblock_str.json": json.dumps({**json.loads(_frame_json()), "per_block": "yes"}),
        "notjson.json": "{nope",
    }
    for name, text in files.items():
        (a / name).write_text(text)
    one = a / "oneclass"
    for split in ("train", "test"):
        (one / split / "cat").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(one / split / "cat" / f"{i}.png")
    flat = a / "oneflat" / "dog"
    flat.mkdir(parents=True)
    for i in range(6):
        Image.new("L", (8, 8), i * 30).save(flat / f"{i}.png")
    import numpy as np

    np.savez(a / "one.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.zeros(2, np.int64))
    return a


def _snapshot(a: Path) -> dict[str, str]:
    """Every file under ``a`` with its sha256 (a SQLite store: its iterdump; its -wal/-shm are skipped)."""
    out = {}
    for p in sorted(a.rglob("*")):
        if p.is_dir() or p.name.endswith(("-wal", "-shm")):
            out[str(p.relative_to(a))] = "dir" if p.is_dir() else "skip"
            continue
        if p.name == "nas.db":
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                dump = "\n".join(con.iterdump())
                mode = con.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                con.close()
            out[str(p.relative_to(a))] = hashlib.sha256(dump.encode()).hexdigest() + mode
        else:
            out[str(p.relative_to(a))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {k: v for k, v in out.items() if v != "skip"}


class _Ran(AssertionError):
    """Real work started on bad input."""


@pytest.fixture
def cli_env(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """An empty cwd and HOME; guards on everything that would start real work."""
    import nas.dashboard
    import nas.lifecycle
    import predictors.latency
    import predictors.supernet
    from search_spaces import get_space

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("HYBRID_NAS_CACHE", raising=False)
    monkeypatch.delenv("NAS_CHAOS", raising=False)
    monkeypatch.delenv("NAS_STORAGE", raising=False)

    def guard(what: str) -> Any:
        def ran(*_a: Any, **_k: Any) -> Any:
            raise _Ran(f"{what} started on bad input")
        return ran

    monkeypatch.setattr(nas.lifecycle, "run", guard("a study"))
    monkeypatch.setattr(nas.dashboard, "serve", guard("the dashboard"))
    monkeypatch.setattr(predictors.supernet, "train_supernet", guard("supernet training"))
    monkeypatch.setattr(predictors.latency, "measure", guard("a latency measurement"))
    monkeypatch.setattr(predictors.latency, "device_fingerprint", guard("a device fingerprint"))
    calls = [0]
    for cls in {type(get_space(name)) for name in ("hybrid_vit", "nb201")}:

        def limited(self: Any, seed: int, _real: Any = cls.random) -> Any:
            calls[0] += 1
            if calls[0] > 1000:
                raise _Ran("thousands of architectures drawn on bad input")
            return _real(self, seed)

        monkeypatch.setattr(cls, "random", limited)
    import torch

    threads = torch.get_num_threads()
    before = _snapshot(assets)
    yield {"cwd": cwd, "home": home, "assets": assets}
    torch.set_num_threads(threads)  # a wrongly accepted --threads must not slow the next cases down
    assert sorted(os.listdir(cwd)) == [], "files written to the working directory"
    assert sorted(os.listdir(home)) == [], "files written to HOME"
    assert _snapshot(assets) == before, "an input file or the store changed"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
         stdin: str = "") -> tuple[int, str, str]:
    """``nas ARGV`` in this process; ``stdin`` holds surrogate escapes for bytes that are not UTF-8."""
    raw = stdin.encode("utf-8", "surrogateescape")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    with pytest.raises(SystemExit) as info:
        app(argv)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def _assert_one_line(code: int, out: str, err: str, expect: str) -> None:
    assert code == 2, (code, err[-500:])
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err[:2000]
    assert lines[0].startswith("nas: error: ") and len(lines[0]) > len("nas: error: ")
    assert len(lines[0]) <= MAX_LINE, len(lines[0])
    assert expect.lower() in lines[0].lower(), lines[0]


# --------------------------------------------------------------------------------------------
# the cases: (argv with {A} for the inputs folder, a fragment of the message[, stdin])
# --------------------------------------------------------------------------------------------

S = ["--storage", "sqlite:///{A}/nas.db"]
SEARCH = ["search", "--budget", "30s", "--study", "t1"]

CASES: list[tuple[str, list[str], str, str]] = [
    # --- budgets (search and resume) -------------------------------------------------------
    ("budget-fullwidth-digits", ["search", "--budget", "３０s", "--study", "t1"], "non-ascii", ""),
    ("budget-arabic-digits", ["search", "--budget", "٣٠m", "--study", "t1"], "non-ascii", ""),
    ("budget-5000-digits", ["search", "--budget", HUGE + "s", "--study", "t1"], "too long", ""),
    ("budget-5000-digit-trials", ["search", "--budget", HUGE + "trials", "--study", "t1"], "too long", ""),
    ("budget-400-digit-trials", ["search", "--budget", "9" * 30 + "trials", "--study", "t1"], "budget", ""),
    ("budget-empty", ["search", "--budget", "", "--study", "t1"], "budget", ""),
    ("budget-negative", ["search", "--budget", "-5m", "--study", "t1"], "budget", ""),
    ("budget-zero", ["search", "--budget", "0s", "--study", "t1"], "more than zero", ""),
    ("budget-nan", ["search", "--budget", "nans", "--study", "t1"], "budget", ""),
    ("budget-newline", ["search", "--budget", "30s\nrm", "--study", "t1"], "budget", ""),
    ("budget-ten-years", ["search", "--budget", "99999d", "--study", "t1"], "ten device-years", ""),
    ("budget-gpu-on-cpu", ["search", "--budget", "3gpu-m", "--study", "t1"], "gpu", ""),
    ("resume-budget-fullwidth", ["resume", "s1", "--budget", "+３０s", *S], "non-ascii", ""),
    ("resume-budget-no-plus", ["resume", "s1", "--budget", "30s", *S], "starts with '+'", ""),
    ("resume-budget-huge", ["resume", "s1", "--budget", "+" + HUGE + "s", *S], "too long", ""),
    ("resume-budget-trials-to-seconds", ["resume", "s1", "--budget", "+5trials", *S], "cannot add", ""),
    # --- study names -----------------------------------------------------------------------
    ("name-trailing-newline", [*SEARCH[:3], "--study", "t1\n"], "bad study name", ""),
    ("name-leading-dash", [*SEARCH[:3], "--study", "-x"], "bad study name", ""),
    ("name-too-long", [*SEARCH[:3], "--study", "a" * 65], "bad study name", ""),
    ("name-10mb", [*SEARCH[:3], "--study", "b" * 10_000_000], "bad study name", ""),
    ("name-unicode", [*SEARCH[:3], "--study", "étude"], "bad study name", ""),
    ("show-name-newline", ["show", "s1\n", *S], "bad study name", ""),
    ("best-name-newline", ["best", "s1\n", *S], "bad study name", ""),
    ("stop-name-newline", ["stop", "s1\n", *S], "bad study name", ""),
    ("resume-name-newline", ["resume", "s1\n", *S], "bad study name", ""),
    ("show-unknown", ["show", "nope", *S], "no study", ""),
    ("best-unknown", ["best", "nope", *S], "no study", ""),
    ("stop-unknown", ["stop", "nope", *S], "no study", ""),
    ("resume-unknown", ["resume", "nope", *S], "no study", ""),
    ("resume-completed-no-budget", ["resume", "s1", *S], "complete", ""),
    # --- search options --------------------------------------------------------------------
    ("workers-absurd", [*SEARCH, "--workers", "100000"], "--workers", ""),
    ("workers-zero", [*SEARCH, "--workers", "0"], "workers", ""),
    ("threads-absurd", [*SEARCH, "--threads", "1000000"], "--threads", ""),
    ("train-epochs-absurd", [*SEARCH, "--train-epochs", "10000000"], "--train-epochs", ""),
    ("train-epochs-zero", [*SEARCH, "--train-epochs", "0"], "epochs", ""),
    ("seed-negative", [*SEARCH, "--seed", "-1"], "--seed", ""),
    ("img-size-huge", [*SEARCH, "--img-size", "100000"], "img-size", ""),
    ("limit-tiny", [*SEARCH, "--data-limit", "5"], "--data-limit", ""),
    ("max-params-fullwidth", [*SEARCH, "--max-params", "５M"], "non-ascii", ""),
    ("max-params-inf", [*SEARCH, "--max-params", "1e400"], "max-params", ""),
    ("max-params-negative", [*SEARCH, "--max-params", "-1"], "max-params", ""),
    ("max-params-word", [*SEARCH, "--max-params", "lots"], "max-params", ""),
    ("max-latency-nan", [*SEARCH, "--max-latency-ms", "nan"], "latency", ""),
    ("max-latency-inf", [*SEARCH, "--max-latency-ms", "inf"], "latency", ""),
    ("stages-fullwidth", [*SEARCH, "--stages", "screen=１"], "non-ascii", ""),
    ("stages-word", [*SEARCH, "--stages", "screen=abc"], "stage share", ""),
    ("stages-unknown", [*SEARCH, "--stages", "warp=1"], "unknown stage", ""),
    ("stages-nan", [*SEARCH, "--stages", "screen=nan"], "shares", ""),
    ("objectives-no-accuracy", [*SEARCH, "--objectives", "latency"], "accuracy", ""),
    ("objectives-twice", [*SEARCH, "--objectives", "accuracy,accuracy"], "distinct", ""),
    ("objectives-unknown", [*SEARCH, "--objectives", "accuracy,beauty"], "unknown objective", ""),
    ("target-tpu", [*SEARCH, "--target", "tpu"], "target", ""),
    ("precision-fp64", [*SEARCH, "--precision", "fp64"], "precision", ""),
    ("strategy-unknown", [*SEARCH, "--strategy", "genius"], "strategy", ""),
    ("space-nb201", [*SEARCH, "--space", "nb201"], "--benchmark", ""),
    ("benchmark-on-hybrid", [*SEARCH, "--benchmark", "{A}/ok.json"], "--space nb201", ""),
    ("benchmark-no-latency", [*SEARCH, "--space", "nb201", "--benchmark", "{A}/ok.json"], "--benchmark-latency", ""),
    ("benchmark-missing", [*SEARCH, "--space", "nb201", "--benchmark", "/nonexistent.csv", "--benchmark-latency",
                           "/nonexistent2.csv", "--device-column", "x_ms"], "no such file", ""),
    ("benchmark-not-csv", [*SEARCH, "--space", "nb201", "--benchmark", "{A}/ok.json", "--benchmark-latency",
                           "{A}/ok.json", "--device-column", "x_ms"], "no 'arch' column", ""),
    ("benchmark-train-s", [*SEARCH, "--space", "nb201", "--benchmark", "{A}/ok.json", "--benchmark-latency",
                           "{A}/ok.json", "--device-column", "x_ms", "--benchmark-train-seconds", "-1"],
     "--benchmark-train-seconds", ""),
    ("space-unknown", [*SEARCH, "--space", "resnet"], "unknown search space", ""),
    ("address-bad-port", [*SEARCH, "--address", "localhost:abc"], "--address", ""),
    ("address-port-huge", [*SEARCH, "--address", "localhost:99999999"], "--address", ""),
    ("address-no-port", [*SEARCH, "--address", "somewhere"], "--address", ""),
    ("data-unknown", [*SEARCH, "--data", "mnist"], "unknown dataset", ""),
    ("data-missing-npz", [*SEARCH, "--data", "npz:/nonexistent.npz"], "does not exist", ""),
    ("data-one-class-folder", [*SEARCH, "--data", "imagefolder:{A}/oneclass"], "at least 2 classes", ""),
    ("data-one-class-flat", [*SEARCH, "--data", "imagefolder:{A}/oneflat"], "at least 2 classes", ""),
    ("data-one-class-npz", [*SEARCH, "--data", "npz:{A}/one.npz"], "at least 2 classes", ""),
    ("frame-deeply-nested", [*SEARCH, "--frame", "{A}/frame_deep.json"], "nested too deeply", ""),
    ("frame-list-mixer", [*SEARCH, "--frame", "{A}/frame_list_mixer.json"], "frame", ""),
    ("frame-heads-zero", [*SEARCH, "--frame", "{A}/frame_heads0.json"], "heads", ""),
    ("frame-norm-list", [*SEARCH, "--frame", "{A}/frame_norm_list.json"], "norm", ""),
    ("frame-stages-string", [*SEARCH, "--frame", "{A}/frame_stages_str.json"], "stages", ""),
    ("frame-stem-list", [*SEARCH, "--frame", "{A}/frame_stem_list.json"], "stem", ""),
    ("frame-per-block-string", [*SEARCH, "--frame", "{A}/frame_perblock_str.json"], "per_block", ""),
    ("frame-not-json", [*SEARCH, "--frame", "{A}/notjson.json"], "not valid JSON", ""),
    ("frame-missing", [*SEARCH, "--frame", "/nonexistent/frame.json"], "unknown frame", ""),
    ("parzc-garbage", [*SEARCH, "--parzc", "{A}/garbage.pt"], "parzc", ""),
    ("parzc-a-spec", [*SEARCH, "--parzc", "{A}/ok.json"], "parzc", ""),
    ("supernet-garbage-file", [*SEARCH, "--supernet", "{A}/garbage.pt"], "supernet", ""),
    ("supernet-garbage-dir", [*SEARCH, "--supernet", "{A}/snet"], "supernet", ""),
    ("supernet-missing", [*SEARCH, "--supernet", "/nonexistent"], "supernet", ""),
    # --- store URLs ------------------------------------------------------------------------
    ("pg-port-word", [*SEARCH, "--storage", "postgresql://u@localhost:abc/db"], "store url", ""),
    ("pg-port-zero", [*SEARCH, "--storage", "postgresql://u@localhost:0/db"], "port", ""),
    ("pg-port-huge", ["studies", "--storage", "postgresql://u:pw@localhost:99999/db"], "port", ""),
    ("pg-no-db", ["studies", "--storage", "postgresql://u@localhost:5432/"], "names no database", ""),
    ("url-scheme", ["studies", "--storage", "mysql://u@h/db"], "unsupported", ""),
    ("url-memory", ["studies", "--storage", "sqlite://"], "names no database", ""),
    ("url-no-dir", [*SEARCH, "--storage", "sqlite:////nonexistent/dir/nas.db"], "does not exist", ""),
    ("url-100k", ["studies", "--storage", "sqlite:///" + "x" * 100_000], "store url", ""),
    ("url-name-too-long", ["studies", "--storage", "sqlite:///" + "x" * 300], "too long", ""),
    ("url-garbage", ["studies", "--storage", "::::"], "store url", ""),
    # --- read-only verbs on stores that are not ours ---------------------------------------
    ("studies-foreign", ["studies", "--storage", "sqlite:///{A}/foreign.db"], "not a hybrid-nas store", ""),
    ("studies-empty", ["studies", "--storage", "sqlite:///{A}/empty.db"], "not a hybrid-nas store", ""),
    ("studies-garbage", ["studies", "--storage", "sqlite:///{A}/garbage.db"], "not a database", ""),
    ("studies-missing", ["studies", "--storage", "sqlite:///{A}/missing.db"], "no store", ""),
    ("studies-folder", ["studies", "--storage", "sqlite:///{A}/snet"], "no store", ""),
    ("studies-default-missing", ["studies"], "no store", ""),
    ("show-foreign", ["show", "s1", "--storage", "sqlite:///{A}/foreign.db"], "not a hybrid-nas store", ""),
    ("best-empty", ["best", "s1", "--storage", "sqlite:///{A}/empty.db"], "not a hybrid-nas store", ""),
    ("stop-foreign", ["stop", "s1", "--storage", "sqlite:///{A}/foreign.db"], "not a hybrid-nas store", ""),
    ("resume-foreign", ["resume", "s1", "--storage", "sqlite:///{A}/foreign.db"], "not a hybrid-nas store", ""),
    ("export-foreign", ["export", "s1", "--out", "m.py", "--storage", "sqlite:///{A}/foreign.db"],
     "not a hybrid-nas store", ""),
    ("dashboard-foreign", ["dashboard", "--storage", "sqlite:///{A}/foreign.db"], "not a hybrid-nas store", ""),
    ("dashboard-empty", ["dashboard", "--storage", "sqlite:///{A}/empty.db"], "not a hybrid-nas store", ""),
    ("dashboard-missing", ["dashboard", "--storage", "sqlite:///{A}/missing.db"], "no store", ""),
    # --- export ----------------------------------------------------------------------------
    ("export-img-size-3", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--img-size", "3"], "", ""),
    ("export-study-img-size-3", ["export", "s1", "--out", "m.py", "--img-size", "3", *S], "", ""),
    ("export-img-size-huge", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--img-size", "100000"],
     "--img-size", ""),
    ("export-in-chans-huge", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--in-chans", HUGE],
     "--in-chans", ""),
    ("export-classes-huge", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--num-classes", "10" * 9],
     "--num-classes", ""),
    ("export-out-proc", ["export", "--spec", "{A}/ok.json", "--out", "/proc/nas_model.py"], "", ""),
    ("export-weights-proc", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--weights",
                             "/proc/nas_w.safetensors"], "", ""),
    ("export-onnx-proc", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--onnx", "/proc/nas_m.onnx"], "", ""),
    ("export-weights-under-file", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--weights",
                                   "{A}/ok.json/w.safetensors"], "--weights", ""),
    ("export-out-under-file", ["export", "--spec", "{A}/ok.json", "--out", "{A}/ok.json/m.py"], "--out", ""),
    ("export-nested-weights-proc", ["export", "--spec", "{A}/ok.json", "--out", "new/deeper/m.py", "--weights",
                                    "/proc/nas_w.safetensors"], "", ""),
    ("export-out-dir", ["export", "--spec", "{A}/ok.json", "--out", "{A}/snet"], "directory", ""),
    ("export-out-txt", ["export", "--spec", "{A}/ok.json", "--out", "m.txt"], ".py", ""),
    ("export-out-long-name", ["export", "--spec", "{A}/ok.json", "--out", "m" * 400 + ".py"], "--out", ""),
    ("export-weights-ext", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--weights", "w.bin"],
     "safetensors", ""),
    ("export-spec-deep", ["export", "--spec", "{A}/deep.json", "--out", "m.py"], "nested too deeply", ""),
    ("export-spec-list-mixer", ["export", "--spec", "{A}/list_mixer.json", "--out", "m.py"], "token_mixer", ""),
    ("export-pick-unknown", ["export", "s1", "--pick", "cheapest", "--out", "m.py", *S], "--pick", ""),
    ("export-arch-not-hex", ["export", "s1", "--arch", "zzzz", "--out", "m.py", *S], "--arch", ""),
    ("export-trial-negative", ["export", "s1", "--trial", "-1", "--out", "m.py", *S], "--trial", ""),
    ("export-trial-missing", ["export", "s1", "--trial", "99", "--out", "m.py", *S], "no finished trial", ""),
    ("export-study-and-spec", ["export", "s1", "--spec", "{A}/ok.json", "--out", "m.py", *S], "not both", ""),
    # --- specs (describe, latency, proxies) ------------------------------------------------
    ("describe-deep-array", ["describe", "--spec", "{A}/deep.json"], "nested too deeply", ""),
    ("describe-deep-object", ["describe", "--spec", "{A}/deepobj.json"], "nested too deeply", ""),
    ("describe-deep-stdin", ["describe", "--spec", "-"], "nested too deeply", DEEP),
    ("describe-list-mixer", ["describe", "--spec", "{A}/list_mixer.json"], "token_mixer", ""),
    ("describe-dict-mixer", ["describe", "--spec", "{A}/dict_mixer.json"], "channel_mixer", ""),
    ("describe-list-block-mixer", ["describe", "--spec", "{A}/list_blocks.json"], "token_mixer", ""),
    ("describe-string-depth", ["describe", "--spec", "{A}/str_depth.json"], "depth", ""),
    ("describe-huge-ratio", ["describe", "--spec", "{A}/big_ratio.json"], "mlp_ratio", ""),
    ("describe-list-norm", ["describe", "--spec", "{A}/list_norm.json"], "norm", ""),
    ("describe-list-stride", ["describe", "--spec", "{A}/stride_list.json"], "stride", ""),
    ("describe-list-space", ["describe", "--spec", "{A}/space_list.json"], "space", ""),
    ("describe-long-mixer-name", ["describe", "--spec", "{A}/long_mixer.json"], "token mixer", ""),
    ("describe-img-size-huge", ["describe", "--preset", "deit_tiny", "--img-size", "100000"], "--img-size", ""),
    ("describe-classes-huge", ["describe", "--preset", "deit_tiny", "--num-classes", "1" + "0" * 12],
     "--num-classes", ""),
    ("describe-spec-is-folder", ["describe", "--spec", "{A}/snet"], "not found", ""),
    ("describe-nb201-deep", ["describe", "--space", "nb201", "--spec", "{A}/deep.json"], "nested too deeply", ""),
    ("latency-deep", ["latency", "--spec", "{A}/deep.json"], "nested too deeply", ""),
    ("latency-threads-absurd", ["latency", "--preset", "deit_tiny", "--threads", "1000000"], "--threads", ""),
    ("latency-batch-absurd", ["latency", "--preset", "deit_tiny", "--batch-size", "100000000"], "--batch-size", ""),
    ("latency-n-absurd", ["latency", "--n", "100000000"], "--n", ""),
    ("latency-repeats-absurd", ["latency", "--preset", "deit_tiny", "--repeats", HUGE], "--repeats", ""),
    ("latency-device-tpu", ["latency", "--preset", "deit_tiny", "--target", "tpu"], "device", ""),
    ("latency-precision-fp64", ["latency", "--preset", "deit_tiny", "--precision", "fp64"], "fp64", ""),
    ("proxies-batch-over-dataset", ["proxies", "--preset", "deit_tiny", "--batch-size", "5000", "--img-size", "16"],
     "--batch-size", ""),
    ("proxies-batch-absurd", ["proxies", "--preset", "deit_tiny", "--batch-size", HUGE], "--batch-size", ""),
    ("proxies-img-absurd", ["proxies", "--preset", "deit_tiny", "--img-size", "1000000"], "--img-size", ""),
    ("proxies-arch-deep", ["proxies", "--space", "nb201", "--arch", DEEP], "nested too deeply", ""),
    ("proxies-arch-list-mixer", ["proxies", "--arch", _spec_json(token_mixer=[1])], "token_mixer", ""),
    ("proxies-one-class", ["proxies", "--preset", "deit_tiny", "--data", "imagefolder:{A}/oneclass"],
     "at least 2 classes", ""),
    ("proxies-names-huge", ["proxies", "--preset", "deit_tiny", "--names", "x" * 100_000], "unknown proxy", ""),
    # --- sample, device --------------------------------------------------------------------
    ("sample-n-absurd", ["sample", "--n", "1000000000"], "--n", ""),
    ("sample-seed-negative", ["sample", "--seed", "-5"], "--seed", ""),
    ("sample-seed-huge", ["sample", "--seed", HUGE], "--seed", ""),
    ("device-threads-absurd", ["device", "--threads", "10000000"], "--threads", ""),
    ("device-unknown", ["device", "--target", "tpu"], "device", ""),
    # --- supernet train / eval -------------------------------------------------------------
    ("sn-train-epochs-absurd", ["supernet", "train", "--epochs", "100000000", "--out", "ck"], "--epochs", ""),
    ("sn-train-threads-absurd", ["supernet", "train", "--epochs", "1", "--out", "ck", "--threads", "1000000"],
     "--threads", ""),
    ("sn-train-lr-nan", ["supernet", "train", "--epochs", "1", "--out", "ck", "--lr", "nan"], "--lr", ""),
    ("sn-train-lr-inf", ["supernet", "train", "--epochs", "1", "--out", "ck", "--lr", "inf"], "--lr", ""),
    ("sn-train-out-file", ["supernet", "train", "--epochs", "1", "--out", "{A}/ok.json"], "is a file", ""),
    ("sn-train-out-proc", ["supernet", "train", "--epochs", "1", "--out", "/proc/nas_ck/x"], "--out", ""),
    ("sn-train-frame-deep", ["supernet", "train", "--epochs", "1", "--out", "ck", "--frame", "{A}/frame_deep.json"],
     "nested too deeply", ""),
    ("sn-train-frame-list-mixer", ["supernet", "train", "--epochs", "1", "--out", "ck", "--frame",
                                   "{A}/frame_list_mixer.json"], "frame", ""),
    ("sn-train-frame-heads0", ["supernet", "train", "--epochs", "1", "--out", "ck", "--frame",
                               "{A}/frame_heads0.json"], "heads", ""),
    ("sn-train-frame-img-huge", ["supernet", "train", "--epochs", "1", "--out", "ck", "--frame",
                                 "{A}/frame_img_huge.json"], "img_size", ""),
    ("sn-train-one-class", ["supernet", "train", "--epochs", "1", "--out", "ck", "--frame", "tiny", "--data",
                            "imagefolder:{A}/oneclass"], "at least 2 classes", ""),
    ("sn-eval-garbage", ["supernet", "eval", "--ckpt", "{A}/garbage.pt", "--n", "1"], "supernet checkpoint", ""),
    ("sn-eval-garbage-dir", ["supernet", "eval", "--ckpt", "{A}/snet", "--n", "1"], "supernet checkpoint", ""),
    ("sn-eval-n-absurd", ["supernet", "eval", "--ckpt", "{A}/snet", "--n", "100000000"], "--n", ""),
    ("sn-eval-threads-absurd", ["supernet", "eval", "--ckpt", "{A}/snet", "--n", "1", "--threads", "99999999"],
     "--threads", ""),
    ("sn-eval-spec-deep", ["supernet", "eval", "--ckpt", "{A}/snet", "--spec", "{A}/deep.json"],
     "nested too deeply", ""),
    # --- more of each kind -----------------------------------------------------------------
    ("describe-binary-stdin", ["describe", "--spec", "-"], "stdin", "\udcff\udcfe"),
    ("export-binary-stdin", ["export", "--spec", "-", "--out", "m.py"], "stdin", "\udcff\udcfe"),
    ("describe-binary-file", ["describe", "--spec", "{A}/garbage.pt"], "spec", ""),
    ("export-binary-file", ["export", "--spec", "{A}/garbage.pt", "--out", "m.py"], "spec", ""),
    ("search-frame-binary", [*SEARCH, "--frame", "{A}/garbage.pt"], "frame", ""),
    ("search-data-newline", [*SEARCH, "--data", "digits\nnpz:/x"], "", ""),
    ("search-workers-negative", [*SEARCH, "--workers", "-3"], "workers", ""),
    ("latency-img-too-small", ["latency", "--preset", "deit_tiny", "--img-size", "3"], "too small", ""),
    ("latency-device-cuda-word", ["latency", "--preset", "deit_tiny", "--target", "cuda:abc"], "device", ""),
    ("device-cuda-word", ["device", "--target", "cuda:x"], "device", ""),
    ("sample-space-100k", ["sample", "--space", "x" * 100_000], "unknown search space", ""),
    ("resume-empty-store", ["resume", "s1", "--storage", "sqlite:///{A}/empty.db"], "not a hybrid-nas store", ""),
    ("show-garbage-store", ["show", "s1", "--storage", "sqlite:///{A}/garbage.db"], "not a database", ""),
    ("export-garbage-store", ["export", "s1", "--out", "m.py", "--storage", "sqlite:///{A}/garbage.db"],
     "not a database", ""),
    ("dashboard-garbage-store", ["dashboard", "--storage", "sqlite:///{A}/garbage.db"], "not a database", ""),
    ("dashboard-port-huge", ["dashboard", "--port", "70000", *S], "port", ""),
    ("dashboard-port-negative", ["dashboard", "--port", "-1", *S], "port", ""),
    ("proxies-seed-negative", ["proxies", "--preset", "deit_tiny", "--seed", "-1"], "--seed", ""),
    ("proxies-img-too-small", ["proxies", "--preset", "deit_tiny", "--img-size", "3"], "too small", ""),
    ("proxies-npz-is-json", ["proxies", "--preset", "deit_tiny", "--data", "npz:{A}/ok.json"], "npz", ""),
    ("proxies-folder-is-binary", ["proxies", "--preset", "deit_tiny", "--data", "imagefolder:{A}/garbage.pt"], "",
     ""),
    ("proxies-folder-without-images", ["proxies", "--preset", "deit_tiny", "--data", "imagefolder:{A}/snet"],
     "no images", ""),
    ("sn-train-space-nb201", ["supernet", "train", "--epochs", "1", "--out", "ck", "--space", "nb201"],
     "hybrid_vit", ""),
    ("sn-train-device-tpu", ["supernet", "train", "--epochs", "1", "--out", "ck", "--target", "tpu"], "device", ""),
    ("sn-train-img-too-small", ["supernet", "train", "--epochs", "1", "--out", "ck", "--frame", "tiny",
                                "--img-size", "3"], "", ""),
    ("sn-eval-ckpt-missing", ["supernet", "eval", "--ckpt", "/nonexistent", "--n", "1"], "no supernet", ""),
    ("sn-eval-limit-negative", ["supernet", "eval", "--ckpt", "{A}/snet", "--n", "1", "--test-limit", "-1"],
     "--test-limit", ""),
    ("sn-eval-neither", ["supernet", "eval", "--ckpt", "{A}/snet"], "exactly one", ""),
    ("export-onnx-ext", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--onnx", "m.txt"], ".onnx", ""),
    ("export-out-keyword", ["export", "--spec", "{A}/ok.json", "--out", "class.py"], "importable", ""),
    ("export-spec-with-pick", ["export", "--spec", "{A}/ok.json", "--out", "m.py", "--pick", "knee"], "--pick", ""),
    ("export-space-nb201", ["export", "--space", "nb201", "--spec", "{A}/ok.json", "--out", "m.py"], "nb201", ""),
    ("export-neither", ["export", "--out", "m.py"], "study name", ""),
    ("export-arch-long", ["export", "s1", "--arch", "a" * 100, "--out", "m.py", *S], "--arch", ""),
    ("resume-budget-plus-only", ["resume", "s1", "--budget", "+", *S], "empty budget", ""),
    ("resume-budget-double-plus", ["resume", "s1", "--budget", "++5m", *S], "budget", ""),
    ("search-frame-img-huge", [*SEARCH, "--frame", "{A}/frame_img_huge.json"], "img_size", ""),
    ("search-data-1mb", [*SEARCH, "--data", "z" * 1_000_000], "data", ""),
    ("search-target-1mb", [*SEARCH, "--target", "z" * 1_000_000], "target", ""),
    ("search-precision-1mb", [*SEARCH, "--precision", "z" * 1_000_000], "precision", ""),
    ("export-pick-1mb", ["export", "s1", "--pick", "z" * 1_000_000, "--out", "m.py", *S], "--pick", ""),
    ("latency-device-1mb", ["latency", "--preset", "deit_tiny", "--target", "z" * 1_000_000], "device", ""),
    ("describe-preset-1mb", ["describe", "--preset", "z" * 1_000_000], "unknown preset", ""),
]


@pytest.mark.parametrize(("argv", "expect", "stdin"), [pytest.param(a, e, i, id=n) for n, a, e, i in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv: list[str], expect: str, stdin: str,
                                                         cli_env: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a = str(cli_env["assets"])
    args = [x.replace("{A}", a) for x in argv]
    code, out, err = _run(args, capsys, monkeypatch, stdin=stdin)
    _assert_one_line(code, out, err, expect)


def test_the_cases_are_many_and_distinct() -> None:
    names = [n for n, *_ in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 100


# --------------------------------------------------------------------------------------------
# a few real processes: what only a fresh process shows
# --------------------------------------------------------------------------------------------


def _nas(args: list[str], cwd: Path, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRID_NAS_CACHE", "NAS_CHAOS", "COLUMNS")}
    env.update(HOME=str(home), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, input=stdin, timeout=300)


def test_read_only_verbs_leave_a_foreign_sqlite_file_alone(tmp_path: Path) -> None:
    """`nas studies` on someone else's SQLite file: refused, no tables added, no switch to WAL."""
    db = tmp_path / "theirs.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = db.read_bytes()
    home = tmp_path / "home"
    home.mkdir()
    r = _nas(["studies", "--storage", f"sqlite:///{db}"], tmp_path, home)
    _assert_one_line(r.returncode, r.stdout, r.stderr, "not a hybrid-NAS store")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "theirs.db"]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["t"]
    con.close()


def test_a_huge_bad_value_is_echoed_short_from_a_real_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    r = _nas(["search", "--budget", "30s", "--study", "n" * 100_000], tmp_path, home)
    _assert_one_line(r.returncode, r.stdout, r.stderr, "bad study name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


# --------------------------------------------------------------------------------------------
# the pieces behind the promise
# --------------------------------------------------------------------------------------------


def test_opening_without_create_refuses_what_is_not_a_store_and_writes_nothing(tmp_path: Path) -> None:
    from nas.store import Store, StoreError

    (tmp_path / "empty.db").write_bytes(b"")
    con = sqlite3.connect(tmp_path / "theirs.db")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    (tmp_path / "junk.db").write_bytes(b"junk" * 100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name, message in (("empty.db", "not a hybrid-NAS store"), ("theirs.db", "not a hybrid-NAS store"),
                          ("junk.db", "not a database"), ("missing.db", "no store")):
        with pytest.raises(StoreError, match=message):
            Store(f"sqlite:///{tmp_path / name}", create=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    url = f"sqlite:///{tmp_path / 'ours.db'}"
    Store(url).create_study("a", "hybrid_vit", {}, {"seconds": 1.0})
    with Store(url, create=False) as store:  # an existing store opens as before
        assert [s.name for s in store.studies()] == ["a"]


@pytest.mark.parametrize("text", ["３０s", "٣٠m", "1" * 41 + "s", "30s\n5", "+3gpu-h", "1.5trials", "7x"])
def test_budgets_are_ascii_and_short(text: str) -> None:
    from nas.budget import BudgetError, parse_budget

    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_study_names_end_where_they_end() -> None:
    from nas.store import StoreError, validate_study_name

    assert validate_study_name("s-1.a_b") == "s-1.a_b"
    for bad in ("s1\n", "s1\r\n", "s\n1", "é", "٣"):
        with pytest.raises(StoreError):
            validate_study_name(bad)


def test_store_errors_are_one_bounded_line() -> None:
    from nas.store import StoreError

    msg = str(StoreError("a\nb " + "x" * 10_000))
    assert "\n" not in msg and len(msg) <= 300 and msg.endswith("…")


def test_an_export_whose_model_cannot_run_is_refused() -> None:
    from nas.export import ExportError, check_forward

    broken = "def build_model(precision='fp32'):\n    raise RuntimeError('Calculated padded input size is too small')\n"
    with pytest.raises(ExportError, match="cannot run on 3x3x3 images"):
        check_forward(broken, 3, 3)


def test_a_failed_export_write_leaves_nothing_behind(tmp_path: Path) -> None:
    from nas.export import ExportError, _write_all

    out = tmp_path / "new" / "deeper" / "m.py"
    with pytest.raises(ExportError, match="nothing was written"):
        _write_all([(out, b"code"), (Path("/proc/nas_no_such_dir/w.safetensors"), b"w")])
    assert list(tmp_path.iterdir()) == []


def test_every_problem_of_a_search_request_is_in_one_line(cli_env: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the first problem, then the next on the next try: all of them, joined by "; ", nothing written
    (within the line's 300 characters; tests/test_lifecycle.py checks a longer list through the API)."""
    code, out, err = _run(["search", "--budget", "abc", "--study", "t1", "--workers", "0", "--seed", "-1",
                           "--data-limit", "5", "--stages", "warp=1"], capsys, monkeypatch)
    _assert_one_line(code, out, err, "budget 'abc'")
    for part in ("--workers", "--seed", "--data-limit", "unknown stage 'warp'"):
        assert part in err, (part, err)
    assert err.count("; ") >= 4 and "…" not in err
