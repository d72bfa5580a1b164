"""The exported model file as a person reads it (issue 20): size, comments, names, header, the
per-block templates against the library's layers, preprocess(), and the new `nas export` options.

The figures the issue asks for: <= 600 lines for the seed-5 spec (5 token mixers incl. ssm and
spectral, bf16), <= 300 for deit_tiny, >= 15 comment lines per 100 lines of code.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nas._export.writer import CHANNEL_MIXERS, TOKEN_MIXERS, file_stats
from nas.export import generate
from search_spaces import get_space
from search_spaces.hybrid_vit import PRESETS, build
from search_spaces.registry import channel_mixer_names, get_channel_mixer, get_token_mixer, token_mixer_names
from search_spaces.spec import ArchSpec

ROOT = Path(__file__).resolve().parents[1]
RUFF = ROOT / ".venv" / "bin" / "ruff"
# what `nas sample --space hybrid_vit --seed 5` drew when issue 20 set its figures, before the ssd and
# hydra mixers joined the space (a draw now picks among 12 token mixers, so seed 5 gives another spec)
ISSUE20_TOKEN_MIXERS = ("attention", "cascaded_group", "gated_linear", "identity", "linear", "pool", "sepconv",
                        "single_head", "spectral", "ssm")
SEED5 = get_space("hybrid_vit").with_choices(token_mixers=ISSUE20_TOKEN_MIXERS).random(5)


def _code(spec: ArchSpec, **meta: object) -> str:
    return generate(spec, num_classes=10, img_size=32, in_chans=3, metadata=dict(meta) or None)


def _module(code: str, tmp_path: Path, name: str = "exported_f") -> object:
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    loader = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(loader)
    sys.modules[name] = mod  # the dataclass and timm look the module up
    try:
        loader.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


def test_seed5_spec_is_the_issue_s() -> None:
    used = {t for st in SEED5.stages for t, _ in st.mixers()}
    assert SEED5.hash.startswith("90e359fe677c") and SEED5.precision == "bf16"
    assert {"ssm", "spectral"} <= used and len(used) == 5


@pytest.mark.parametrize(("spec", "limit"), [(SEED5, 600), (PRESETS["deit_tiny"], 300)], ids=["seed5", "deit_tiny"])
def test_line_count_targets(spec: ArchSpec, limit: int) -> None:
    assert file_stats(_code(spec))["lines"] <= limit


_RATIO_SPECS = [*PRESETS.values(), SEED5, *(get_space("hybrid_vit").random(i) for i in range(10))]


@pytest.mark.parametrize("spec", _RATIO_SPECS, ids=[s.hash[:8] for s in _RATIO_SPECS])
def test_comments_per_100_code_lines_and_no_boilerplate(spec: ArchSpec) -> None:
    code = _code(spec)
    st = file_stats(code)
    assert 100 * st["comments"] / st["code"] >= 15, st
    comments = [ln.split("#", 1)[1] for ln in code.splitlines() if "#" in ln and not ln.strip().startswith('"')]
    assert not any(c.strip().startswith(("---", "===")) for c in comments)  # no section bars
    assert not re.search(r"#\s?\[!?\w+\]", code)  # no template markers left
    assert "search_spaces" not in code and "predictors" not in code  # no modules the file does not contain


def test_no_undefined_or_unused_names(tmp_path: Path) -> None:
    """ruff's pyflakes checks on every preset, the seed-5 spec and forced specs covering every mixer
    and precision: every name is defined or imported (F821), every import used (F401)."""
    from test_export import _forced_specs

    for i, spec in enumerate([*PRESETS.values(), SEED5, *_forced_specs()]):
        (tmp_path / f"m{i}.py").write_text(_code(spec))
    r = subprocess.run([str(RUFF), "check", "--no-cache", "--isolated", "--select", "F821,F401,F811,F841",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_header_holds_the_spec_once(tmp_path: Path) -> None:
    code = _code(SEED5)
    mod = _module(code, tmp_path)
    doc = mod.__doc__
    spec_text = doc.split("canonical form", 1)[1].split("\n", 1)[1]
    assert ArchSpec.from_dict(json.loads(spec_text)).hash == mod.SPEC_HASH == SEED5.hash
    assert code.count('"token_mixer"') == sum(1 + len(st.blocks) for st in SEED5.stages)  # nowhere else
    assert "TOKEN_MIXERS" not in code and "set_width" not in code and "paper" not in code  # no registry
    cfg = mod.Config()
    assert cfg.widths == tuple(st.width for st in SEED5.stages) and cfg.num_classes == 10


def test_preprocess_applies_the_recorded_normalization(tmp_path: Path) -> None:
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.125], "source": "the study's training images (x)"}
    mod = _module(_code(PRESETS["deit_tiny"], normalization=norm), tmp_path)
    assert mod.MEAN == (0.1, 0.2, 0.3) and mod.STD == (0.5, 0.25, 0.125)
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    want = (img.float() / 255 - torch.tensor(mod.MEAN).view(1, 3, 1, 1)) / torch.tensor(mod.STD).view(1, 3, 1, 1)
    assert torch.allclose(mod.preprocess(img), want)
    assert mod.preprocess(torch.rand(1, 3, 64, 48)).shape == (1, 3, 32, 32)  # resized to the training size
    defaults = _code(PRESETS["deit_tiny"])
    assert "defaults (ImageNet's; no study data)" in defaults and "MEAN = (0.485, 0.456, 0.406)" in defaults


def _template(kind: str, name: str, dim: int, heads: int, g: int) -> torch.nn.Module:
    from nas._export import blocks

    call = (TOKEN_MIXERS if kind == "token" else CHANNEL_MIXERS)[name][1]
    return eval(call, vars(blocks), {"dim": dim, "heads": heads, "ratio": 3.0, "g": g})


_ALL = [("token", n) for n in token_mixer_names()] + [("channel", n) for n in channel_mixer_names()]


@pytest.mark.parametrize(("kind", "name"), _ALL, ids=[f"{k}:{n}" for k, n in _ALL])
def test_every_registered_mixer_has_an_equivalent_template(kind: str, name: str) -> None:
    """The library's layers stay the source of truth: a mixer registered without a template, or one
    whose template drifts (keys, shapes, initial weights, outputs), fails here."""
    assert name in (TOKEN_MIXERS if kind == "token" else CHANNEL_MIXERS), f"no export template for {name!r}"
    dim, heads, g = 32, 2, 4
    lib_cls = get_token_mixer(name) if kind == "token" else get_channel_mixer(name)
    torch.manual_seed(0)
    lib = lib_cls(dim, heads=heads, grid=(g, g)) if kind == "token" else lib_cls(dim, mlp_ratio=3.0)
    torch.manual_seed(0)
    tpl = _template(kind, name, dim, heads, g)
    a, b = lib.state_dict(), tpl.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        for p in lib.parameters():  # away from the init, so every path matters
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    tpl.load_state_dict(lib.state_dict())
    x = torch.randn(2, dim, g, g, generator=torch.Generator().manual_seed(1))
    if lib_cls.layout == "nlc":
        x = x.flatten(2).transpose(1, 2)
    lib.eval()
    tpl.eval()
    with torch.no_grad():
        assert (lib(x, (g, g)) - tpl(x, (g, g))).abs().max().item() <= 1e-6
    assert getattr(tpl, "layout", lib_cls.layout) == lib_cls.layout


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "COLUMNS": "80"})


def _one_line_error(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("nas: error:"), r.stderr


def test_cli_preset_and_torch_weights(tmp_path: Path) -> None:
    out, w = tmp_path / "m.py", tmp_path / "m.pt"
    r = _cli("export", "--preset", "deit_tiny", "--out", str(out), "--weights", str(w))
    assert r.returncode == 0, r.stderr
    state = torch.load(w, weights_only=True)
    ref = build(PRESETS["deit_tiny"], 10, 32).state_dict()
    assert list(state) == list(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    assert "a torch.save state dict" in out.read_text()
    bad = tmp_path / "bad.py"
    for args in (["--preset", "nope"], ["--preset", "deit_tiny", "--spec", "x.json"],
                 ["--preset", "deit_tiny", "--weights", str(tmp_path / "b.pt"), "--weights-format", "safetensors"],
                 ["--preset", "deit_tiny", "--weights", str(tmp_path / "b.bin")],
                 ["--preset", "deit_tiny", "--weights-format", "torch"],
                 ["--preset", "deit_tiny", "--onnx-compatible"]):
        _one_line_error(_cli("export", *args, "--out", str(bad)))
        assert not bad.exists() and not (tmp_path / "b.pt").exists()


def _spectral_front_store(tmp_path: Path, exportable: bool = True, latency: bool = True) -> tuple[str, list[ArchSpec]]:
    """A study whose most accurate front point uses spectral (no ONNX operator); the others, when
    ``exportable``, use pool."""
    from nas.store import Store

    def spec(tm: str, width: int) -> ArchSpec:
        return ArchSpec.from_dict({"stem": {"kind": "conv", "stride": 4}, "stages": [
            {"depth": 1, "width": width, "token_mixer": tm, "channel_mixer": "mlp", "mlp_ratio": 2.0}]})

    other = "pool" if exportable else "spectral"
    specs = [spec("spectral", 32), spec(other, 48), spec(other, 64)]
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    store = Store(url)
    store.create_study("s", "hybrid_vit", {"frame_json": {"num_classes": 10, "img_size": 32, "in_chans": 3},
                                           "data": "digits"}, {"seconds": 60.0, "trials": None, "device": None})
    points = [(0.97, 3.0), (0.95, 0.6), (0.70, 0.5)]
    for i, (s, (acc, lat)) in enumerate(zip(specs, points)):
        store.add_architecture(s.hash, "hybrid_vit", s.to_json())
        store.record_evaluation("s", stage="train", metrics={"accuracy": acc}, seconds=1.0, arch_hash=s.hash,
                                trial=i, key=f"train:{i}")
        if latency:
            store.record_evaluation("s", stage="latency", metrics={"latency_ms": lat}, seconds=0.1, arch_hash=s.hash,
                                    device={"kind": "cpu", "name": "bench cpu", "key": "00112233aabbccdd"},
                                    key=f"latency:{i}")
    store.set_front("s", [{"arch_hash": s.hash, "rank": 0, "metrics": {"accuracy": a, "latency_ms": t}}
                          for s, (a, t) in zip(specs, points)])
    return url, specs


def test_cli_onnx_compatible_takes_the_best_exportable_point(tmp_path: Path) -> None:
    url, specs = _spectral_front_store(tmp_path)
    out, onnx = tmp_path / "m.py", tmp_path / "m.onnx"
    r = _cli("export", "s", "--pick", "accuracy", "--onnx", str(onnx), "--out", str(out), "--storage", url)
    _one_line_error(r)
    assert "spectral" in r.stderr and "--onnx-compatible" in r.stderr and not out.exists()
    r = _cli("export", "s", "--pick", "accuracy", "--onnx-compatible", "--onnx", str(onnx), "--out", str(out),
             "--storage", url)
    assert r.returncode == 0, r.stderr
    assert specs[1].hash in out.read_text() and onnx.stat().st_size > 1000
    assert "exports to ONNX (2nd of 3" in " ".join(r.stdout.split()) and specs[0].hash[:12] in r.stdout
    assert "Device (latency): bench cpu" in out.read_text()


def test_cli_onnx_compatible_refuses_a_front_without_an_exportable_point(tmp_path: Path) -> None:
    url, _ = _spectral_front_store(tmp_path, exportable=False, latency=False)
    out = tmp_path / "m.py"
    r = _cli("export", "s", "--pick", "knee", "--onnx-compatible", "--out", str(out), "--storage", url)
    _one_line_error(r)
    assert "exports to ONNX" in r.stderr and not out.exists()
    for args in (["--trial", "1", "--onnx-compatible"], ["--arch", "abcd", "--onnx-compatible"]):
        _one_line_error(_cli("export", "s", *args, "--out", str(out), "--storage", url))


def test_no_latency_measured_is_said(tmp_path: Path) -> None:
    """A study without latency evaluations: the header says so instead of null."""
    from nas.export import pick_from_study
    from nas.store import Store

    url, _ = _spectral_front_store(tmp_path, latency=False)
    spec, meta, sizes = pick_from_study(Store(url), "s", pick="accuracy")
    code = generate(spec, metadata=meta, **sizes)
    assert "Device (latency): none (no latency measured)" in code


@pytest.mark.parametrize("name", ["ssd", "hydra"])
@pytest.mark.parametrize("decay", ["weak", "strong"])
def test_scan_templates_agree_across_chunks(name: str, decay: str) -> None:
    """The SSD templates against the library past one chunk (197 tokens: 7 chunks, a padded tail),
    on both in-chunk forms: weak decays take the factorised one, strong decays the per-head one."""
    from nas._export import blocks

    torch.manual_seed(0)
    lib = get_token_mixer(name)(32, heads=1, grid=(1, 197))
    tpl = eval(TOKEN_MIXERS[name][1], vars(blocks), {"dim": 32})
    with torch.no_grad():
        for p in lib.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        for m in lib.modules():  # A up to -e^4: decays of ~50 per step push every head off the factorised form
            if hasattr(m, "A_log") and decay == "strong":
                m.A_log.add_(4.0)
    tpl.load_state_dict(lib.state_dict())
    x = torch.randn(2, 197, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (lib(x, (1, 197)) - tpl(x, (1, 197))).abs().max().item() <= 1e-6


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_long_header_fields_stay_within_the_line_length(fmt: str, tmp_path: Path) -> None:
    """The header's free text (the weights' source, the study, its data, the normalization's source) is
    wrapped: a front member that ASHA stopped early has a long source, and its file once failed the
    line-length check (E501, 141 > 120) in the dashboard's browser test."""
    long = "trained (1.5 of 3 epochs: stopped early)"
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.125],
            "source": "the study's training images " + "(a long description of where they came from) " * 3}
    code = _code(SEED5, weights={"format": fmt, "file": "model_dash_0123456789ab." + fmt, "source": long},
                 study="a-study-name-that-is-rather-long-" * 3, pick="best accuracy at latency <= 5 ms",
                 data="imagefolder:/some/very/long/path/to/the/users/data/archive/cifar10-jpeg.tar.gz",
                 normalization=norm)
    assert max(len(ln) for ln in code.splitlines()) <= 120
    flat = " ".join(code.split())
    assert f"({long})" in flat and ("reading it needs" in flat if fmt == "safetensors" else "torch.load(path)" in flat)
    path = tmp_path / "long_header.py"
    path.write_text(code)
    r = subprocess.run([str(RUFF), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
