"""`nas dashboard` over small hand-made stores (no search runs here): one latency everywhere, no
screening score shown as an accuracy, visible budget overruns, resumes that cannot run, and the
security of the app (body limit while reading, downloads of files the app wrote only, escaped
Plotly text, token length and lockout, ``Origin: null``, security headers on every answer), plus
a dashboard that fails to start writes nothing. Browser checks use the apt Chromium.
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, NAS, _env, _free_port, _start_server, _stop_server

LOOPBACK = "http://127.0.0.1"
DEVICE = {"kind": "cpu", "name": "test cpu", "key": "0123456789abcdef"}
EVIL = '<a href="http://evil.example/">pwn</a>'
TOKEN = "a-long-enough-token-for-tests"
HEADERS = ("x-content-type-options", "x-frame-options", "referrer-policy", "content-security-policy")


def _specs(n: int) -> list[Any]:
    from search_spaces import get_space

    space = get_space("hybrid_vit")
    out: dict[str, Any] = {}
    seed = 0
    while len(out) < n:
        s = space.random(seed)
        out.setdefault(s.hash, s)
        seed += 1
    return list(out.values())


def _make_store(path: Path, budget: str = "20cpu-s") -> tuple[str, list[str]]:
    """A study ``s1`` as a crash left it: A screened (3.18 ms), measured carefully (8.40 ms) and
    trained; B and C screened only; a front stored before A's careful measurement. ``s2`` was
    stopped after screening with a front ranked by screening score (stored as its accuracy)."""
    from nas.budget import parse_budget
    from nas.search import SearchConfig
    from nas.store import Store

    url = f"sqlite:///{path}"
    a, b, c = _specs(3)
    with Store(url) as store:
        for name in ("s1", "s2"):
            store.create_study(name, "hybrid_vit", SearchConfig().to_dict(), parse_budget(budget).to_dict())
        for s in (a, b, c):
            store.add_architecture(s.hash, "hybrid_vit", s.to_json())

        def rec(study: str, stage: str, spec: Any, metrics: dict[str, float], seconds: float, trial: int) -> None:
            store.record_evaluation(study, stage=stage, metrics=metrics, seconds=seconds, arch_hash=spec.hash,
                                    device=DEVICE, trial=trial, key=f"{stage}:{trial}:{spec.hash[:8]}")

        rec("s1", "screen", a, {"score": 391.56, "latency_ms": 3.18, "params": 5e4}, 1.0, 0)
        rec("s1", "screen", b, {"score": 120.0, "latency_ms": 1.25, "params": 3e4}, 1.0, 1)
        rec("s1", "screen", c, {"score": 80.0, "latency_ms": 0.75, "params": 2e4}, 1.0, 2)
        store.set_front("s1", [{"arch_hash": a.hash, "rank": 0, "metrics": {
            "accuracy": 0.61234567, "latency_ms": 3.18, "params": 5e4, "source": "train"}}])
        rec("s1", "latency", a, {"latency_ms": 8.4, "latency_p90_ms": 8.9}, 2.0, 0)
        rec("s1", "train", a, {"accuracy": 0.61234567, "params": 5e4, "epochs": 1.0}, 5.0, 0)
        rec("s1", "screen", a, {"score": 390.0, "latency_ms": 3.05, "params": 5e4}, 1.0, 3)  # a duplicate sample
        rec("s1", "screen", b, {"score": 100.0, EVIL: 0.123456789, "params": 3e4}, 0.5, 4)
        rec("s2", "screen", a, {"score": 391.56, "latency_ms": 3.18, "params": 5e4}, 1.0, 0)
        rec("s2", "screen", b, {"score": 120.0, "latency_ms": 1.25, "params": 3e4}, 1.0, 1)
        store.set_front("s2", [{"arch_hash": a.hash, "rank": 0, "metrics": {
            "accuracy": 391.56, "latency_ms": 3.18, "params": 5e4, "source": "screen"}}])
        store.set_status("s1", "stopped")
        store.set_status("s2", "stopped")
    return url, [a.hash, b.hash, c.hash]


@pytest.fixture
def made(tmp_path: Path) -> tuple[str, list[str]]:
    return _make_store(tmp_path / "nas.db")


@pytest.fixture
def client(made: tuple[str, list[str]], tmp_path: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from nas.dashboard import create_app

    app = create_app(made[0], export_dir=tmp_path / "exports", log_dir=tmp_path / "logs")
    with TestClient(app, base_url=LOOPBACK, follow_redirects=False, raise_server_exceptions=False) as c:
        yield c
    for launch in list(app.state.dashboard.launcher._launches.values()):
        if launch.running:
            os.killpg(launch.proc.pid, 9)
            launch.proc.wait(timeout=30)


def _csrf(c: Any, path: str = "/studies/s1") -> str:
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', c.get(path).text)
    assert m
    return m.group(1)


# --------------------------------------------------------------------------------------------
# what the pages show
# --------------------------------------------------------------------------------------------


def test_plot_tables_and_front_use_the_best_latency(client: Any, made: tuple[str, list[str]]) -> None:
    a, b, c = made[1]
    d = client.get("/api/studies/s1").json()
    points = {p["hash"]: p["metrics"] for p in d["points"]}
    front = {r["hash"]: r["metrics"] for r in d["front"]}
    # A: the careful measurement everywhere, never the screening one (3.18 or 3.05)
    assert points[a]["latency_ms"] == 8.4 and points[a]["latency_p90_ms"] == 8.9
    assert front[a]["latency_ms"] == 8.4
    assert d["study"]["best"]["latency_ms"] == 8.4 and d["study"]["best"]["accuracy"] == 0.61234567
    # B and C were only screened: their screening latency (B's latest screen has none: its earlier one)
    assert points[b]["latency_ms"] == 1.25 and points[c]["latency_ms"] == 0.75
    assert d["study"]["best"]["fastest_ms"] == 8.4  # of the front
    page = client.get("/studies/s1").text
    front_table = page[page.index('id="front"'):page.index('id="stages"')]
    assert "8.400" in front_table and "3.180" not in front_table
    home = client.get("/api/studies").json()["studies"]
    assert {s["name"]: s["best"]["latency_ms"] for s in home}["s1"] == 8.4


def test_a_screening_score_is_never_an_accuracy(client: Any) -> None:
    d = client.get("/api/studies/s2").json()
    assert d["study"]["best"]["accuracy"] is None
    assert all("accuracy" not in p["metrics"] for p in d["points"])
    assert all("accuracy" not in r["metrics"] and r["metrics"]["score"] == 391.56 for r in d["front"])
    assert d["axes"] == {"x": "latency_ms", "y": "score"}
    assert "391.56" not in client.get("/").text.replace("score", "")
    page = client.get("/studies/s2").text
    assert "391.5600" not in page
    d1 = client.get("/api/studies/s1").json()
    assert d1["axes"]["y"] == "accuracy"  # whenever any accuracy exists


def test_budget_overrun_is_visible(client: Any, made: tuple[str, list[str]]) -> None:
    from nas.budget import parse_budget
    from nas.store import Store

    with Store(made[0]) as store:
        store.set_budget("s1", parse_budget("11cpu-s").to_dict())  # 11.5 cpu-s used
    s = client.get("/api/studies/s1").json()["study"]["budget"]
    assert s["over"] and s["used"] > s["total"] and s["text"] == "11.5/11 cpu-s (+5%)"
    page = client.get("/studies/s1").text
    assert "11.5/11 cpu-s (+5%)" in page and re.search(r'class="bar big over"', page)
    home = client.get("/").text
    assert "11.5/11 cpu-s (+5%)" in home


# --------------------------------------------------------------------------------------------
# resumes that cannot run
# --------------------------------------------------------------------------------------------


def test_a_resume_that_cannot_run_is_refused_with_the_reason(client: Any, made: tuple[str, list[str]]) -> None:
    from nas.budget import parse_budget
    from nas.store import Store

    launcher = client.app.state.dashboard.launcher
    launcher.program = [sys.executable, "-c", "import time; time.sleep(60)"]
    with Store(made[0]) as store:
        store.set_budget("s1", parse_budget("10cpu-s").to_dict())  # 11.5 used: overrun by 1.5
    hdr = {"X-CSRF-Token": _csrf(client), "Accept": "application/json"}
    for budget in ("", "+1s", "+1.5s"):
        r = client.post("/studies/s1/resume", headers=hdr, data={"budget": budget})
        assert r.status_code == 400, (budget, r.text)
        detail = r.json()["detail"]
        assert "11.5/10" in detail and "more than 1.5" in detail and "\n" not in detail, detail
    assert launcher.get("s1") is None
    r = client.post("/studies/s1/resume", headers=hdr, data={"budget": "+10s"})
    assert r.status_code == 200 and "resuming" in r.json()["message"]


def test_resume_and_stop_answer_what_the_lifecycle_decides(client: Any, made: tuple[str, list[str]]) -> None:
    """The page and `nas resume` / `nas stop` share one implementation: the same refusal, word for word."""
    from nas import lifecycle
    from nas.store import Store

    hdr = {"X-CSRF-Token": _csrf(client), "Accept": "application/json"}
    with Store(made[0]) as store:
        assert store.acquire_driver("s1", os.getppid(), socket.gethostname())  # a live driver, not this process
        try:
            with pytest.raises(lifecycle.StudyRunning) as refused:
                lifecycle.check_resume(store, "s1", "+10s", need_budget_left=True)
            r = client.post("/studies/s1/resume", headers=hdr, data={"budget": "10s"})
            assert r.status_code == 409 and r.json()["detail"] == str(refused.value)
            assert client.app.state.dashboard.launcher.get("s1") is None
            store.set_status("s1", "running")
            r = client.post("/studies/s1/stop", headers=hdr)
            assert r.status_code == 200 and f"(pid {os.getppid()})" in r.json()["message"]
            assert store.study("s1").stop_requested and store.study("s1").status == "running"
        finally:
            store.release_driver("s1", os.getppid())


def test_a_resume_that_ran_nothing_says_why(client: Any) -> None:
    launcher = client.app.state.dashboard.launcher
    launcher.program = [sys.executable, "-c", "print('resuming study s1'); print('nothing left to run: reasons')"]
    hdr = {"X-CSRF-Token": _csrf(client), "Accept": "application/json"}
    r = client.post("/studies/s1/resume", headers=hdr, data={"budget": "+30s"})
    assert r.status_code == 200
    assert launcher.wait("s1", 60) == 0
    launch = client.get("/api/studies/s1").json()["study"]["launch"]
    assert launch["phase"] == "exited" and launch["ran_nothing"]
    assert "nothing left to run: reasons" in launch["reason"] and "nothing left" in launch["log_tail"]


# --------------------------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------------------------


def test_short_tokens_are_refused(made: tuple[str, list[str]], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from cli import app as cli_app
    from nas.dashboard import DashboardError, check_bind, create_app

    for bad in ("x", "short-token-15c"):
        with pytest.raises(DashboardError, match="at least 16"):
            check_bind("0.0.0.0", 8765, bad)
        with pytest.raises(DashboardError, match="at least 16"):
            create_app(made[0], token=bad, export_dir=tmp_path / "e")
        with pytest.raises(SystemExit) as info:
            cli_app(["dashboard", "--host", "0.0.0.0", "--token", bad, "--storage", made[0],
                     "--export-dir", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "at least 16" in err, err
    assert check_bind("0.0.0.0", 8765, "x" * 16) == ("x" * 16, False)
    assert not (tmp_path / "e").exists()


def test_wrong_tokens_are_locked_out(made: tuple[str, list[str]], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from nas.dashboard import create_app

    app = create_app(made[0], token=TOKEN, export_dir=tmp_path / "e")
    dash = app.state.dashboard
    now = [1000.0]
    dash.clock = lambda: now[0]
    good = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url="http://192.0.2.10:8765", follow_redirects=False) as c:
        codes = [c.get("/api/studies", headers={"Authorization": f"Bearer guess{i}"}).status_code for i in range(300)]
        assert codes.count(401) <= 10 and codes[-1] == 429, codes[:20]
        r = c.get("/api/studies", headers=good)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0  # locked out, right token or not
        assert c.get("/?token=" + TOKEN).status_code == 429
        for h in HEADERS:
            assert h in r.headers
        now[0] += int(r.headers["retry-after"]) + 1
        assert c.get("/api/studies", headers=good).status_code == 200
        # a second lockout lasts longer
        for i in range(30):
            c.get("/api/studies", headers={"Authorization": f"Bearer again{i}"})
        r2 = c.get("/api/studies", headers=good)
        assert r2.status_code == 429 and int(r2.headers["retry-after"]) > int(r.headers["retry-after"])
        # requests carrying no credentials at all are not guesses: they never lock anyone out
    app = create_app(made[0], token=TOKEN, export_dir=tmp_path / "e")
    with TestClient(app, base_url="http://192.0.2.10:8765", follow_redirects=False) as c:
        assert {c.get("/").status_code for _ in range(50)} == {401}
        assert c.get("/api/studies", headers=good).status_code == 200


def test_origin_null_is_refused(client: Any, made: tuple[str, list[str]]) -> None:
    from nas.store import Store

    token = _csrf(client)
    for origin in ("null", "http://evil.example", "file://"):
        r = client.post("/studies/s1/stop", headers={"X-CSRF-Token": token, "Origin": origin})
        assert r.status_code == 403, origin
    with Store(made[0]) as store:
        assert store.study("s1").status == "stopped" and not store.study("s1").stop_requested
    r = client.post("/studies/s1/stop", headers={"X-CSRF-Token": token, "Origin": "http://127.0.0.1",
                                                 "Accept": "application/json"})
    assert r.status_code == 200  # the page's own origin


def test_every_answer_has_the_security_headers(client: Any, made: tuple[str, list[str]]) -> None:
    token = _csrf(client)
    answers = {
        "404 route": client.get("/no/such/page"),
        "404 study": client.get("/studies/nope"),
        "404 api": client.get("/api/studies/nope"),
        "404 export": client.get("/exports/model_s1_0123456789ab.py"),
        "404 static": client.get("/static/nope.js"),
        "400 name": client.get("/studies/-x"),
        "403 csrf": client.post("/studies/s1/stop"),
        "405": client.get("/studies/s1/stop"),
        "413": client.post("/studies/s1/stop", headers={"X-CSRF-Token": token}, content=b"x" * (65 * 1024)),
        "413 header": client.post("/studies/s1/stop", headers={"X-CSRF-Token": token,
                                                                "Content-Length": str(10 ** 9)}, content=b""),
    }
    store = client.app.state.dashboard.store
    orig = store.studies
    store.studies = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    try:
        answers["500"] = client.get("/")
        answers["500 api"] = client.get("/api/studies")
    finally:
        store.studies = orig  # type: ignore[method-assign]
    for what, r in answers.items():
        assert str(r.status_code) == what.split()[0], (what, r.status_code)
        for h in HEADERS:
            assert h in r.headers, (what, h)
        assert "boom" not in r.text and "Traceback" not in r.text


def _chunked_post(url: str, path: str, cap: int) -> tuple[int | None, int]:
    """POST a chunked body of up to ``cap`` bytes, stopping as soon as the server answers;
    (status or None, bytes sent)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
                     "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode())
        try:
            while sent < cap:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered before the body ended
                sock.sendall(b"10000\r\n" + chunk + b"\r\n")
                sent += len(chunk)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            head = sock.recv(65536)
        except ConnectionResetError:
            return None, sent
    m = re.match(rb"HTTP/1\.1 (\d+)", head)
    return (int(m.group(1)) if m else None), sent


def test_request_bodies_are_limited_while_reading(made: tuple[str, list[str]], tmp_path: Path) -> None:
    srv = _start_server(["--storage", made[0], "--export-dir", str(tmp_path / "e")], tmp_path, _free_port())
    try:
        code, sent = _chunked_post(srv.url, "/studies/s1/resume", 64 * 2 ** 20)
        assert code == 413, code
        assert sent < 24 * 2 ** 20, f"the server read {sent} bytes before refusing a 64 KiB-limited body"
        # a declared length over the limit is refused before any of the body is sent
        host, port = srv.url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /studies/s1/resume HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         "Content-Length: 200000000\r\n\r\n".encode())
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413") and b"x-content-type-options" in head.lower(), head[:200]
        with __import__("urllib.request").request.urlopen(f"{srv.url}/healthz", timeout=10) as r:
            assert r.status == 200  # still serving
    finally:
        _stop_server(srv.proc)


def test_downloads_only_files_the_app_wrote(client: Any, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    secret = tmp_path / "secret.py"
    secret.write_text("TOPSECRET = 1\n")
    exports.mkdir(exist_ok=True)
    os.link(secret, exports / "model_s1_0123456789ab.py")  # a hard link with an allowed name
    (exports / "model_s1_aaaaaaaaaaaa.py").write_text("TOPSECRET = 2\n")  # a plain file nobody exported here
    for name in ("model_s1_0123456789ab.py", "model_s1_aaaaaaaaaaaa.py"):
        r = client.get(f"/exports/{name}")
        assert r.status_code == 404 and "TOPSECRET" not in r.text, name


def test_failed_start_writes_nothing(made: tuple[str, list[str]], tmp_path: Path) -> None:
    exports = tmp_path / "new" / "exports"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        res = subprocess.run([str(NAS), "dashboard", "--port", str(busy.getsockname()[1]), "--storage", made[0],
                              "--export-dir", str(exports)], cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "cannot listen" in res.stderr, res.stderr
    assert not (tmp_path / "new").exists()
    res = subprocess.run([str(NAS), "dashboard", "--host", "0.0.0.0", "--token", "x", "--storage", made[0],
                          "--export-dir", str(exports)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "at least 16" in res.stderr, res.stderr
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------
# the browser: escaped Plotly text, rounded hover values, no sideways scrolling at 420 px
# --------------------------------------------------------------------------------------------


def test_browser_plot_text_is_escaped_and_rounded(made: tuple[str, list[str]], tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs it (apt-get install chromium)")
    srv = _start_server(["--storage", made[0], "--export-dir", str(tmp_path / "e")], tmp_path, _free_port())
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            try:
                page.goto(srv.url + "/studies/s1")
                playwright.expect(page.locator("#plot .main-svg").first).to_be_attached()
                assert page.locator("#axis-y").input_value() == "accuracy"
                assert page.locator("#budget-fill").count() == 1
                page.select_option("#axis-y", EVIL)
                playwright.expect(page.locator("#plot .ytitle")).to_contain_text("<a href")
                assert page.locator("#plot a").count() == 0, "a metric name became a link"
                page.select_option("#axis-y", "score")
                page.select_option("#axis-x", "latency_ms")
                playwright.expect(page.locator("#plot .scatterlayer .point").nth(2)).to_be_attached()
                # what Plotly shows on hover: each trace's hover text (one real hover renders it)
                texts = page.evaluate("""() => {
                    const gd = document.getElementById('plot');
                    Plotly.Fx.hover(gd, [{curveNumber: 0, pointNumber: 0}]);
                    const shown = gd.querySelector('.hoverlayer').textContent;
                    return [shown].concat(...gd.data.map((t) => (t.hovertext || []).map(
                        (h) => h.replace(/<br>/g, ' '))));
                }""")
                assert texts[0] and "screen" in texts[0], texts
                assert any("8.4" in t for t in texts), texts
                for t in texts:
                    for num in re.findall(r"\d+\.\d+", t):
                        assert len(num.replace(".", "").lstrip("0")) <= 4, (num, t)
                for path in ("/studies/s1", "/", f"/studies/s1/arch/{made[1][0]}"):
                    page.set_viewport_size({"width": 420, "height": 900})
                    page.goto(srv.url + path)
                    page.wait_for_load_state("networkidle")
                    sw, cw = page.evaluate("() => [document.scrollingElement.scrollWidth, "
                                           "document.scrollingElement.clientWidth]")
                    assert sw <= cw, (path, sw, cw)
            finally:
                browser.close()
        assert not errors, errors
    finally:
        _stop_server(srv.proc)
