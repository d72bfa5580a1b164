"""The `nas` CLI: spaces, sample, describe; bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import app
from search_spaces import ArchSpec, get_space
from search_spaces.nb201 import NB201Spec


def run(args: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as info:
        app(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_spaces_lists_both_spaces_and_every_mixer(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["spaces", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert [s["name"] for s in data["spaces"]] == ["hybrid_vit", "nb201"]
    assert len([m for m in data["mixers"] if m["kind"] == "token"]) == 12
    assert len([m for m in data["mixers"] if m["kind"] == "channel"]) == 4


def test_sample_json_lines_are_valid_specs_matching_random(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["sample", "--space", "hybrid_vit", "--seed", "5", "--n", "3", "--json"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    space = get_space("hybrid_vit")
    for i, line in enumerate(lines):
        assert ArchSpec.from_json(line) == space.random(5 + i)
        assert line == space.random(5 + i).to_json()


def test_sample_table_shows_hash_and_params(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["sample", "--space", "nb201", "--seed", "0", "--n", "2"], capsys)
    assert code == 0
    spec = get_space("nb201").random(0)
    assert spec.hash[:12] in out


def test_describe_preset_and_piped_spec(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(["describe", "--preset", "poolformer_s12", "--img-size", "224", "--num-classes", "1000",
                        "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["params"] == 11_915_176 and len(info["stages"]) == 5
    spec = get_space("hybrid_vit").random(11)
    code, out, _ = run(["describe", "--spec", "-", "--img-size", "32"], capsys, stdin=spec.to_json(),
                       monkeypatch=monkeypatch)
    assert code == 0 and spec.hash in out and "params" in out


def test_describe_nb201_from_arch_string_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
    f = tmp_path / "cell.txt"
    f.write_text(arch + "\n")
    code, out, _ = run(["describe", "--space", "nb201", "--spec", str(f), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["params"] == 1_073_466 and info["hash"] == NB201Spec.from_string(arch).hash


BAD_INPUTS = [
    (["sample", "--space", "resnet"], "unknown search space 'resnet'"),
    (["sample", "--n", "0"], "--n must be at least 1"),
    (["sample", "--seed", "abc"], "Invalid value for '--seed'"),
    (["sample", "--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command"),
    (["describe", "--spec", "/nonexistent/spec.json"], "not found"),
    (["describe"], "exactly one of --spec"),
    (["describe", "--preset", "resnet50"], "unknown preset 'resnet50'"),
    (["describe", "--space", "nb201", "--preset", "deit_tiny"], "unknown preset"),
    (["describe", "--preset", "deit_tiny", "--img-size", "0"], "--img-size must be at least 1"),
    (["describe", "--preset", "deit_tiny", "--img-size", "8"], "too small"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("nas: error: ")
    assert message in err


BAD_SPECS = [
    ("{not json", "not valid JSON"),
    ('{"stem": {"kind": "conv", "stride": 4}, "stages": [{"depth": 0, "width": 8}]}', "depth must be in"),
    ('{"stem": {"kind": "conv", "stride": 4}, "stages": [{"depth": 1, "width": 30, "token_mixer": "attention", '
     '"heads": 4}]}', "not divisible by heads"),
    ('{"stem": {"kind": "conv", "stride": 4}, "stages": [{"depth": 1, "width": 32, "token_mixer": "mamba"}]}',
     "unknown token mixer 'mamba'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_files_are_one_line_exit_2(text: str, message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "spec.json"
    f.write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(["describe", "--spec", str(f)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_installed_console_script_runs_in_a_fresh_process() -> None:
    exe = Path(sys.executable).with_name("nas")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([str(exe), "sample", "--seed", "1", "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ArchSpec.from_json(ok.stdout) == get_space("hybrid_vit").random(1)
    bad = subprocess.run([str(exe), "sample", "--space", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown search space" in bad.stderr


def test_timm_imports_after_search_spaces_in_a_fresh_process() -> None:
    """The one compat module makes `import timm` work even with a torchvision whose ops cannot load."""
    pytest.importorskip("timm")
    code = ("import search_spaces, timm; m = timm.create_model('resnet18'); "
            "print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    assert int(out.stdout.strip()) == 11_689_512


def test_proxies_on_digits_for_nb201_and_hybrid_vit(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    torch.set_num_threads(1)
    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
    code, out, _ = run(["proxies", "--space", "nb201", "--arch", arch, "--names", "synflow,nwot,params",
                        "--batch-size", "16", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert set(res["scores"]) == {"synflow", "nwot", "params"}
    assert res["scores"]["params"] == 802_426 and res["batch_size"] == 16
    assert res["scores"]["synflow"] > 0 and res["scores"]["nwot"] > 0
    code, out, _ = run(["proxies", "--preset", "hybrid_tiny", "--names", "grad_norm,snip", "--batch-size", "8",
                        "--img-size", "16", "--per-layer", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["scores"]["grad_norm"] > 0
    layers = res["per_layer"]["snip"]
    assert len(layers) > 10 and abs(sum(layers.values()) - res["scores"]["snip"]) <= 1e-6 * res["scores"]["snip"]


PROXY_BAD_INPUTS = [
    (["proxies", "--preset", "deit_tiny", "--names", "synflow,magic"], "unknown proxy 'magic'"),
    (["proxies", "--preset", "deit_tiny", "--data", "mnist"], "unknown"),
    (["proxies", "--preset", "deit_tiny", "--data", "cifar10:/nonexistent"], "nonexistent"),
    (["proxies", "--space", "nb201", "--arch", "|bad~0|"], "invalid --arch"),
    (["proxies", "--preset", "deit_tiny", "--arch", "{}"], "exactly one of"),
    (["proxies", "--preset", "deit_tiny", "--batch-size", "0"], "--batch-size must be at least 1"),
]


@pytest.mark.parametrize(("args", "message"), PROXY_BAD_INPUTS, ids=[" ".join(a[1:]) for a, _ in PROXY_BAD_INPUTS])
def test_proxies_bad_input_is_one_line_exit_2(args: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_device_prints_the_cpu_fingerprint(capsys: pytest.CaptureFixture[str]) -> None:
    from predictors.latency import device_fingerprint

    code, out, _ = run(["device", "--target", "cpu", "--threads", "1", "--json"], capsys)
    assert code == 0
    fp = json.loads(out)
    assert fp["kind"] == "cpu" and fp["torch_threads"] == 1
    assert fp["key"] == device_fingerprint("cpu", threads=1)["key"]
    assert "fp32" in fp["precisions"] and "fp8" not in fp["precisions"]
    code, out, _ = run(["device", "--target", "cpu"], capsys)
    assert code == 0 and fp["name"] in out


def test_latency_of_random_archs_and_a_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["latency", "--n", "2", "--seed", "3", "--batch-size", "2", "--repeats", "5", "--warmup", "2",
                        "--threads", "1", "--target", "cpu", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["fingerprint"]["kind"] == "cpu" and data["fingerprint"]["torch_threads"] == 1
    assert len(data["results"]) == 2
    for r in data["results"]:
        assert r["repeats"] == 5 and r["input_shape"] == [2, 3, 32, 32]
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["precision"] in ("fp32", "bf16", "int8")  # drawn from what this CPU runs natively
        assert ArchSpec.from_dict(r["spec"]).hash == r["hash"]
    # JSON lines from `nas sample --json` measure one row per line, at the precision asked for
    code, lines, _ = run(["sample", "--n", "2", "--seed", "9", "--json"], capsys)
    f = tmp_path / "specs.jsonl"
    f.write_text(lines)
    code, out, _ = run(["latency", "--spec", str(f), "--precision", "fp32", "--batch-size", "1", "--repeats", "3",
                        "--warmup", "1", "--target", "cpu"], capsys)
    assert code == 0
    hashes = [ArchSpec.from_json(ln).hash for ln in lines.splitlines()]
    assert all(h[:8] in out for h in hashes) and out.count(" fp32 ") == 2


LATENCY_BAD_INPUTS = [
    (["latency", "--preset", "deit_tiny", "--target", "cuda"], "--target cpu"),
    (["latency", "--preset", "deit_tiny", "--precision", "fp8", "--target", "cpu"], "compute capability >= 8.9"),
    (["latency", "--preset", "deit_tiny", "--precision", "fp4"], "unknown precision 'fp4'"),
    (["latency", "--preset", "deit_tiny", "--n", "2"], "exactly one of"),
    (["latency", "--preset", "deit_tiny", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["latency", "--preset", "deit_tiny", "--img-size", "8"], "too small"),
]


@pytest.mark.parametrize(("args", "message"), LATENCY_BAD_INPUTS, ids=[" ".join(a[3:]) for a, _ in LATENCY_BAD_INPUTS])
def test_latency_bad_input_is_one_line_exit_2(args: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_supernet_train_single_path_records_its_recipe(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--sampling single_path trains the study's recipe from the command line, and the checkpoint says so."""
    from predictors.supernet import load_checkpoint

    out = tmp_path / "sp"
    args = ["supernet", "train", "--frame", "tiny", "--data", "digits", "--epochs", "1", "--data-limit", "128",
            "--batch-size", "64", "--out", str(out), "--no-augment", "--target", "cpu", "--sampling", "single_path",
            "--n-random", "4", "--no-distill", "--json"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 2
    _, ckpt = load_checkpoint(out)
    assert (ckpt["config"]["sampling"], ckpt["config"]["n_random"], ckpt["config"]["distill"]) == \
        ("single_path", 4, False)


def test_supernet_train_resume_and_eval(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "sn"
    args = ["supernet", "train", "--frame", "tiny", "--data", "digits", "--epochs", "1", "--data-limit", "128",
            "--batch-size", "64", "--out", str(out), "--no-augment", "--target", "cpu"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert (out / "supernet.pt").is_file() and json.loads((out / "frame.json").read_text())["in_chans"] == 1
    assert "done: 2 steps" in stdout
    code, stdout, err = run([*args, "--json"], capsys)  # the same command again: already finished, nothing retrained
    assert code == 0, err
    done = json.loads(stdout)
    assert done["steps"] == 2 and done["ckpt"] == str(out / "supernet.pt") and done["frame"]["in_chans"] == 1
    code, stdout, err = run(["supernet", "eval", "--ckpt", str(out), "--n", "2", "--test-limit", "100", "--json"],
                            capsys)
    assert code == 0, err
    res = json.loads(stdout)["results"]
    assert len(res) == 2 and all(0.0 <= r["accuracy"] <= 1.0 and r["seconds"] > 0 for r in res)
    assert res[0]["hash"] != res[1]["hash"]
    spec_file = tmp_path / "spec.json"
    from search_spaces.supernet import get_frame

    spec_file.write_text(get_frame("tiny").largest().to_json())
    code, stdout, err = run(["supernet", "eval", "--ckpt", str(out), "--spec", str(spec_file), "--test-limit", "50",
                             "--precision", "int8", "--target", "cpu"], capsys)
    assert code == 0 and "int8" in stdout, err


@pytest.mark.parametrize("args, message", [
    (["supernet", "train", "--space", "nb201", "--epochs", "1", "--out", "X"], "hybrid_vit only"),
    (["supernet", "train", "--frame", "huge", "--epochs", "1", "--out", "X"], "unknown frame"),
    (["supernet", "train", "--epochs", "0", "--out", "X"], "--epochs must be at least 1"),
    (["supernet", "train", "--epochs", "1", "--out", "X", "--data", "npz:/nope.npz"], "nope.npz"),
    (["supernet", "train", "--frame", "tiny", "--epochs", "1", "--out", "X", "--img-size", "2"], "invalid frame"),
    (["supernet", "eval", "--ckpt", "/nonexistent", "--n", "1"], "no supernet checkpoint"),
    (["supernet", "eval", "--ckpt", "X"], "exactly one of"),
    (["supernet", "train", "--epochs", "1", "--out", "X", "--target", "tpu"], "use cpu or cuda"),
    (["supernet", "train", "--epochs", "1", "--out", "X", "--lr", "0"], "--lr must be positive"),
    (["supernet", "train", "--epochs", "1", "--out", "X", "--sampling", "greedy"], "--sampling must be one of"),
    (["supernet", "train", "--epochs", "1", "--out", "X", "--sampling", "single_path"], "add --no-distill"),
    (["supernet", "train", "--epochs", "1", "--out", "X", "--sampling", "single_path", "--no-distill", "--n-random",
      "0"], "--n-random 1 or more"),
])
def test_supernet_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "X").exists()


def test_supernet_eval_refuses_a_spec_outside_the_frame(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "sn"
    assert run(["supernet", "train", "--frame", "tiny", "--epochs", "1", "--data-limit", "64", "--batch-size", "64",
                "--out", str(out), "--target", "cpu"], capsys)[0] == 0
    spec = tmp_path / "s.json"
    spec.write_text(get_space("hybrid_vit").random(0).to_json())
    code, _, err = run(["supernet", "eval", "--ckpt", str(out), "--spec", str(spec)], capsys)
    assert code == 2 and "not a subnet of the frame" in err
    garbage = tmp_path / "bad"
    garbage.mkdir()
    (garbage / "supernet.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(["supernet", "eval", "--ckpt", str(garbage), "--n", "1"], capsys)
    assert code == 2 and "not a readable supernet checkpoint" in err


def test_output_does_not_wrap_where_it_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """rich would wrap at 80 columns (or $COLUMNS) on a pipe: lines for scripts and logs stay whole."""
    from search_spaces.hybrid_vit import PRESETS

    short = PRESETS["hybrid_tiny"].short()
    assert len(short) > 80
    code, out, _ = run(["describe", "--preset", "hybrid_tiny"], capsys)
    assert code == 0 and short in out.splitlines()
    exe = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py")]
    env = {**os.environ, "COLUMNS": "80", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([*exe, "describe", "--preset", "hybrid_tiny"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and short in r.stdout.splitlines(), r.stdout[:500]


# --------------------------------------------------------------------------------------------
# one CLI a person learns once: version, renamed flags, JSON everywhere, the store from the
# environment, next-step hints that work as printed, tables that never cut a name or a token
# --------------------------------------------------------------------------------------------


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"nas (hybrid-nas) {version('hybrid-nas')}"


def test_old_flag_spellings_still_work_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["device", "--device", "cpu", "--threads", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["kind"] == "cpu"
    assert err.strip() == "nas: note: --device is now --target"
    code, _, err = run(["latency", "--preset", "deit_tiny", "--batch", "0"], capsys)
    assert code == 2 and "--batch-size must be at least 1" in err
    code, _, err = run(["supernet", "eval", "--ckpt", "/nonexistent", "--n", "1", "--limit", "-1"], capsys)
    assert code == 2 and "--limit is now --test-limit" in err and "--test-limit must be at least 0" in err


@pytest.fixture
def study_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A store (not the default path) with one finished study whose name is as long as a name can be."""
    from nas.store import Store
    from search_spaces.supernet import get_frame

    monkeypatch.delenv("NAS_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    url, name = f"sqlite:///{tmp_path / 'runs.db'}", "a-study-with-a-name-as-long-as-the-store-allows-sixty-four-chars"
    assert len(name) == 64
    frame = get_frame("tiny", in_chans=1, num_classes=10)
    with Store(url) as store:
        config = {"frame_json": frame.to_dict(), "data": "digits", "target": "cpu", "strategy": "random"}
        store.create_study(name, "hybrid_vit", config, {"seconds": 60.0, "trials": None, "device": "cpu"})
        specs = [frame.random(i) for i in range(3)] + [get_space("hybrid_vit").random(1)]
        for i, spec in enumerate(specs):
            store.add_architecture(spec.hash, "hybrid_vit", spec.to_json())
            store.record_evaluation(name, stage="train", metrics={"accuracy": 0.9 - i / 10, "latency_ms": 1.0 + i},
                                    seconds=1.0, arch_hash=spec.hash, trial=i, key=f"train:{i}")
        store.set_front(name, [{"arch_hash": s.hash, "rank": i, "metrics": {"accuracy": 0.9 - i / 10,
                                                                            "latency_ms": 1.0 + i, "source": "train"}}
                               for i, s in enumerate(specs)])
        store.set_status(name, "completed")
    return url, name


def test_the_store_comes_from_nas_storage(study_store: tuple[str, str], capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url, name = study_store
    code, _, err = run(["studies"], capsys)
    assert code == 2 and "no store" in err  # the default nas.db is not there
    monkeypatch.setenv("NAS_STORAGE", url)
    code, out, err = run(["studies", "--json"], capsys)
    assert code == 0 and [s["name"] for s in json.loads(out)] == [name], err
    code, out, _ = run(["show", name, "--json"], capsys)
    assert code == 0 and json.loads(out)["study"]["name"] == name
    code, _, err = run(["studies", "--storage", f"sqlite:///{Path.cwd() / 'other.db'}"], capsys)
    assert code == 2 and "no store" in err  # the flag wins over the environment


def test_stop_and_export_print_json(study_store: tuple[str, str], capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    url, name = study_store
    code, out, err = run(["stop", name, "--storage", url, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == {"study": name, "action": "nothing", "status": "completed", "driver_pid": None,
                               "message": f"study {name} is completed; nothing to stop"}
    model = tmp_path / "model.py"
    code, out, err = run(["export", name, "--storage", url, "--pick", "latency", "--out", str(model), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["out"] == str(model) and res["study"] == name and res["hash"] in model.read_text()
    assert res["weights"] is None and res["onnx"] is None


def test_next_hints_work_as_printed(study_store: tuple[str, str], capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After a run every suggested command carries --storage (the store is not the default) and runs."""
    import shlex

    import nas.lifecycle

    url, name = study_store
    monkeypatch.setattr(nas.lifecycle, "run", lambda store, n, **_k: nas.lifecycle.summary(store, n))
    code, out, err = run(["resume", name, "--storage", url, "--budget", "+30cpu-s"], capsys)
    assert code == 0, err
    hint = next(ln for ln in out.splitlines() if ln.startswith("next: "))
    commands = [shlex.split(c) for c in hint[len("next: "):].split(" | ")]
    assert [c[:2] for c in commands] == [["nas", "show"], ["nas", "best"], ["nas", "resume"]]
    assert all(c[-2:] == ["--storage", url] for c in commands), hint
    assert "+1cpu-m" in commands[2]  # in the study's own unit
    for c in commands[:2]:
        code, _, err = run(c[1:], capsys)
        assert code == 0, (c, err)


def _terminal(monkeypatch: pytest.MonkeyPatch, columns: int = 80) -> None:
    """The CLI's console as on a terminal of ``columns`` columns."""
    import cli

    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(cli, "console", cli._Console(highlight=False, markup=False, force_terminal=True,
                                                     color_system=None))
    assert cli.console.width == columns


def _tokens(text: str) -> set[str]:
    return set(text.replace(",", " ").split())


def test_tables_at_80_columns_keep_names_and_tokens_whole(study_store: tuple[str, str],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url, name = study_store
    _terminal(monkeypatch)
    space = get_space("hybrid_vit")
    code, out, _ = run(["sample", "--n", "4", "--seed", "7"], capsys)
    assert code == 0 and max(len(ln) for ln in out.splitlines()) <= 80
    for i in range(4):  # every token of every architecture appears whole (folded only between tokens)
        assert _tokens(space.random(7 + i).short()) <= _tokens(out)
    for args in (["studies"], ["best", name], ["show", name]):
        code, out, err = run([*args, "--storage", url], capsys)
        assert code == 0, err
        lines = out.splitlines()
        assert max(len(ln) for ln in lines) <= 80, [ln for ln in lines if len(ln) > 80]
        assert any(name in ln for ln in lines), out  # the 64-character name, never cut
        assert "…" not in out
    code, out, _ = run(["best", name, "--storage", url, "--json"], capsys)
    shorts = [r["short"] for r in json.loads(out)]
    code, out, _ = run(["best", name, "--storage", url], capsys)
    for short in shorts:
        assert _tokens(short) <= _tokens(out), short


def test_spaces_shows_whole_sentences(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(["spaces", "--json"], capsys)
    docs = {s["name"]: s["doc"] for s in json.loads(out)["spaces"]}
    assert all(d.endswith(".") for d in docs.values()) and docs["hybrid_vit"].endswith("plus precision.")
    _terminal(monkeypatch)
    code, out, _ = run(["spaces"], capsys)
    assert code == 0 and max(len(ln) for ln in out.splitlines()) <= 80
    assert " ".join(docs["hybrid_vit"].split()) in " ".join(out.split())  # all of it, wrapped at words
