"""`nas dashboard`: pages, JSON, security (token, CSRF, Host, downloads), resume/stop/export, and a
real headless Chromium driving a dashboard served by `nas dashboard` over a real `nas search` store.

One short real search on digits runs once per module; every test works on its own copy of the
store (SQLite backup API), so the tests can mutate it. Processes started here (the dashboard
server, resumes it launches) are killed in teardown, by their own process group only.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NAS = Path(sys.executable).with_name("nas")
RUFF = REPO / ".venv" / "bin" / "ruff"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
STUDY = "dash"
LOOPBACK = "http://127.0.0.1"  # TestClient's base URL: the app answers loopback Host headers only


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    env.pop("NAS_CHAOS", None)
    return env


@dataclass(frozen=True)
class Searched:
    root: Path
    db: Path
    budget: float  # cpu-s the study was given in all


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Searched:
    """One real staged search on digits (20 cpu-s, 1 epoch): screening, a supernet, latency, training."""
    if not NAS.exists():
        pytest.skip("console script `nas` not installed in this environment (make install)")
    root = tmp_path_factory.mktemp("dash")
    db = root / "nas.db"
    res = subprocess.run([str(NAS), "search", "--space", "hybrid_vit", "--budget", "20cpu-s", "--data", "digits",
                          "--workers", "1", "--train-epochs", "1", "--study", STUDY, "--storage", f"sqlite:///{db}",
                          "--json"], cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nas search failed ({res.returncode}): {res.stderr[-3000:]}"
    out, budget = json.loads(res.stdout), 20.0
    assert out["front"], "the search stored no front"
    # How far 20 cpu-s gets depends on the machine: on a loaded one (two busy processes beside the
    # suite) the train stage may not have started. The export tests need a trained front member, so
    # the study is resumed 20 cpu-s at a time until one is there: a bounded count, not a timing
    def trained(out: dict[str, Any]) -> bool:
        return any("accuracy" in r["metrics"] for r in out["front"])

    for _ in range(5):
        if trained(out):
            break
        res = subprocess.run([str(NAS), "resume", STUDY, "--budget", "+20cpu-s", "--storage", f"sqlite:///{db}",
                              "--json"], cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"nas resume failed ({res.returncode}): {res.stderr[-3000:]}"
        out, budget = json.loads(res.stdout), budget + 20.0
    assert trained(out), "no trained candidate after 5 resumes"
    return Searched(root=root, db=db, budget=budget)


def _copy_store(src: Path, dest: Path) -> str:
    """A consistent copy of a SQLite store (WAL included); its URL."""
    s, d = sqlite3.connect(str(src)), sqlite3.connect(str(dest))
    try:
        s.backup(d)
    finally:
        s.close()
        d.close()
    return f"sqlite:///{dest}"


@pytest.fixture
def store_url(searched: Searched, tmp_path: Path) -> str:
    return _copy_store(searched.db, tmp_path / "nas.db")


@pytest.fixture
def client(store_url: str, tmp_path: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from nas.dashboard import create_app

    app = create_app(store_url, export_dir=tmp_path / "exports", log_dir=tmp_path / "logs")
    with TestClient(app, base_url=LOOPBACK, follow_redirects=False) as c:
        yield c
    _kill_launches(app)


def _kill_launches(app: Any) -> None:
    """Kill what this app's launcher started (each resume is its own process group)."""
    for launch in list(app.state.dashboard.launcher._launches.values()):
        if launch.running:
            try:
                os.killpg(launch.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            launch.proc.wait(timeout=30)


def _csrf(c: Any, path: str = f"/studies/{STUDY}") -> str:
    html = c.get(path).text
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert m, "no CSRF token on the page"
    return m.group(1)


def _snapshot(url: str) -> tuple[Any, int, int]:
    from nas.store import Store

    with Store(url) as store:
        info = store.study(STUDY)
        return (info.status, info.stop_requested, info.budget, info.driver_pid, info.trials_done), \
            len(store.evaluations(STUDY)), len(store.exports(STUDY))


# --------------------------------------------------------------------------------------------
# pages and JSON
# --------------------------------------------------------------------------------------------


def test_pages_show_the_study(client: Any, store_url: str, searched: Searched) -> None:
    home = client.get("/")
    assert home.status_code == 200 and f'href="/studies/{STUDY}"' in home.text
    assert "optuna-dashboard sqlite:///" in home.text
    page = client.get(f"/studies/{STUDY}")
    assert page.status_code == 200
    for needle in ('id="plot"', 'id="trials-table"', 'id="budget-fill"', 'id="errors"', 'name="csrf_token"',
                   f"optuna-dashboard {store_url}", 'src="/static/plotly.min.js"'):
        assert needle in page.text, needle
    assert not re.search(r'(src|href)="(https?:)?//', page.text), "something would load from the internet"
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript") and len(js.content) > 1e6
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    data = client.get(f"/api/studies/{STUDY}").json()
    s = data["study"]
    assert s["status"] == "completed" and s["resumable"] and not s["stoppable"]
    # invariants that hold at any machine speed: how far a 20 cpu-s study gets depends on the machine
    assert s["budget"]["total"] == searched.budget and s["budget"]["unit"] == "cpu-s"
    assert s["budget"]["over"] == (s["budget"]["used"] > searched.budget)
    assert s["budget"]["over"] == ("(+" in s["budget"]["text"])
    assert len(data["evaluations"]) == s["trials_done"] and data["front"]
    _assert_consistent_with_store(data, store_url)
    again = client.get(f"/api/studies/{STUDY}", params={"v": data["version"]}).json()
    assert "points" not in again and again["study"]["name"] == STUDY  # unchanged: only the summary

    listing = client.get("/api/studies").json()["studies"]
    assert [r["name"] for r in listing] == [STUDY]

    h = data["front"][0]["hash"]
    arch = client.get(f"/studies/{STUDY}/arch/{h}")
    assert arch.status_code == 200
    ev_rows = [e for e in data["evaluations"] if e["hash"] == h]
    assert len(re.findall(r'<details class="device">', arch.text)) == len(ev_rows)
    for needle in ('id="stage-table"', 'class="diagram"', h, 'name="arch"', "Download exported code",
                   "&#34;kind&#34;: &#34;cpu&#34;", ev_rows[0]["device"]):
        assert needle in arch.text, needle


def _assert_consistent_with_store(data: dict[str, Any], store_url: str) -> None:
    """What the study page shows agrees with the store, whichever stages the study reached."""
    from nas.store import Store

    with Store(store_url) as store:
        evals = store.evaluations(STUDY)
    # the stages shown are exactly those the store holds (some or all of the plan's), with their counts
    held = {e.stage for e in evals}
    assert set(data["stages"]) == held and "screen" in held
    for st, row in data["stages"].items():
        assert row["done"] == sum(1 for e in evals if e.stage == st and e.error is None), st
    assert held <= {"screen", "supernet_train", "supernet", "latency", "train"}
    # the best accuracy is a measured one (train, else supernet), never a screening score
    measured = {e.metrics["accuracy"] for e in evals if e.stage in ("train", "supernet") and e.error is None
                and "accuracy" in e.metrics}
    best = data["study"]["best"]["accuracy"]
    assert (best is None) == (not measured)
    assert best is None or (best in measured and 0 <= best <= 1)
    # an accuracy on a point or in the front is a measured one too
    for p in data["points"]:
        assert "accuracy" not in p["metrics"] or p["metrics"]["accuracy"] in measured, p
    for r in data["front"]:
        assert "accuracy" not in r["metrics"] or r["metrics"]["accuracy"] in measured, r
    # one latency everywhere: the careful measurement when there is one, else the screening one
    careful = {e.arch_hash: e.metrics["latency_ms"] for e in evals if e.stage == "latency" and e.error is None}
    screened = {e.arch_hash: e.metrics["latency_ms"] for e in evals if e.stage == "screen" and e.error is None
                and "latency_ms" in e.metrics}
    for p in [*data["points"], *data["front"]]:
        if p["hash"] in careful or p["hash"] in screened:
            assert p["metrics"]["latency_ms"] == careful.get(p["hash"], screened.get(p["hash"])), p
    # the default axes: accuracy whenever any accuracy exists, else the screening score
    any_acc = any("accuracy" in p["metrics"] for p in data["points"])
    assert data["axes"]["y"] == ("accuracy" if any_acc else "score")
    assert data["axes"]["x"] == "latency_ms"
    assert data["directions"]["latency_ms"] == "min" and data["directions"].get("accuracy", "max") == "max"
    plotted = {p["hash"] for p in data["points"] if data["axes"]["y"] in p["metrics"] and "latency_ms" in p["metrics"]}
    assert {r["hash"] for r in data["front"] if data["axes"]["y"] in r["metrics"]} <= plotted


def test_unknown_and_invalid_names(client: Any) -> None:
    assert client.get("/studies/nope").status_code == 404
    assert client.get("/api/studies/nope").status_code == 404
    assert "no study 'nope'" in client.get("/api/studies/nope").json()["detail"]
    for bad in ("-x", "x" * 65, "a%20b", "%2e%2e", "a%3Cscript%3E"):
        r = client.get(f"/studies/{bad}")
        assert r.status_code in (400, 404), (bad, r.status_code)
        assert "<script>" not in r.text
        assert client.get(f"/api/studies/{bad}").status_code in (400, 404)
    token = _csrf(client)
    assert client.post("/studies/nope/stop", headers={"X-CSRF-Token": token}).status_code == 404
    assert client.post("/studies/-x/resume", headers={"X-CSRF-Token": token}).status_code in (400, 404)
    for h in ("zz", "0" * 64, "A" * 64, "1234"):
        assert client.get(f"/studies/{STUDY}/arch/{h}").status_code == 404, h
    assert client.get("/no/such/page").status_code == 404


# --------------------------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------------------------


def test_post_without_csrf_is_refused(client: Any, store_url: str, tmp_path: Path) -> None:
    # a study that is running with no live driver: a successful stop or resume would change it
    from nas.store import Store

    with Store(store_url) as store:
        store.set_status(STUDY, "running")
    before = _snapshot(store_url)
    forms = {"resume": {"budget": "+10s"}, "stop": {}, "export": {"pick": "accuracy"}}
    for action, form in forms.items():
        url = f"/studies/{STUDY}/{action}"
        for headers, data in (({}, form), ({"X-CSRF-Token": "wrong"}, form), ({}, {**form, "csrf_token": ""}),
                              ({}, {**form, "csrf_token": "x" * 43})):
            r = client.post(url, headers=headers, data=data)
            assert r.status_code == 403, (action, headers, data, r.status_code)
        assert client.get(url).status_code == 405  # state changes are POST only
    # the right token from a foreign origin is refused too
    token = _csrf(client)
    r = client.post(f"/studies/{STUDY}/stop", headers={"X-CSRF-Token": token, "Origin": "http://evil.example"})
    assert r.status_code == 403
    assert _snapshot(store_url) == before
    assert client.app.state.dashboard.launcher.get(STUDY) is None  # no process started
    assert not (tmp_path / "exports").exists()  # created only when an export is written
    assert not (tmp_path / "logs").exists()


def _raw_get(base: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side path normalisation, like curl --path-as-is)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_download_refuses_path_traversal(store_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "notes.txt").write_text("TOPSECRET")
    (exports / "model_dash_0123456789ab.py").symlink_to(secret)  # a whitelisted name, but a link out
    (tmp_path / "model_dash_aaaaaaaaaaaa.py").write_text("TOPSECRET")  # beside, not inside, the export dir
    os.link(secret, exports / "model_dash_dddddddddddd.py")  # a hard link out, with a whitelisted name
    (exports / "model_dash_cccccccccccc.py").write_text("import TOPSECRET\n")  # a file the app did not write
    targets = ["/exports/../secret.txt", "/exports/%2e%2e%2fsecret.txt", "/exports/..%2fsecret.txt",
               "/exports/%2e%2e/secret.txt", "/exports/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
               "/exports/../../../../../etc/passwd", "/exports//etc/passwd", "/exports/%2Fetc%2Fpasswd",
               f"/exports/{secret}", f"/exports/%2F{str(secret)[1:]}", "/exports/notes.txt",
               "/exports/model_dash_0123456789ab.py", "/exports/..%2fmodel_dash_aaaaaaaaaaaa.py",
               "/exports/../model_dash_aaaaaaaaaaaa.py", "/exports/model_dash_bbbbbbbbbbbb.py", "/exports/..",
               "/exports/%2e%2e", "/exports/.%2e/nas.db", "/exports/..%5csecret.txt", "/exports/nas.db",
               "/exports/model_dash_cccccccccccc.py%00.txt", "/static/../../secret.txt", "/static/%2e%2e/_app.py",
               "/exports/model_dash_dddddddddddd.py", "/exports/model_dash_cccccccccccc.py"]
    srv = _start_server(["--storage", store_url, "--export-dir", str(exports)], tmp_path, _free_port())
    try:
        for target in targets:
            code, body = _raw_get(srv.url, target)
            assert code in (400, 404), (target, code)
            assert b"TOPSECRET" not in body and b"root:" not in body and b"SQLite" not in body, target
            assert b"import" not in body, target
        # an export the app writes downloads, as long as it is the very file the app wrote
        with urllib.request.urlopen(f"{srv.url}/studies/{STUDY}", timeout=30) as r:
            token = re.search(r'<meta name="csrf-token" content="([^"]+)">', r.read().decode()).group(1)
        req = urllib.request.Request(f"{srv.url}/studies/{STUDY}/export", data=b"pick=accuracy", method="POST",
                                     headers={"X-CSRF-Token": token, "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            url = json.loads(r.read())["url"]
        name = url.rsplit("/", 1)[1]
        code, body = _raw_get(srv.url, url)
        assert code == 200 and body == (exports / name).read_bytes() and b"def build_model(" in body
        os.link(exports / name, tmp_path / "second-link.py")  # two links: no longer only the app's
        assert _raw_get(srv.url, url)[0] == 404
        os.unlink(tmp_path / "second-link.py")
        assert _raw_get(srv.url, url)[0] == 200
        os.unlink(exports / name)
        os.link(secret, exports / name)  # swapped for a hard link out, under the name the app wrote
        code, body = _raw_get(srv.url, url)
        assert code == 404 and b"TOPSECRET" not in body
    finally:
        _stop_server(srv.proc)


def test_token_is_required_when_set(store_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from nas.dashboard import DashboardError, create_app

    with pytest.raises(DashboardError, match="empty"):
        create_app(store_url, token="", export_dir=tmp_path / "e")
    app = create_app(store_url, token="s3cret-token-for-tests", export_dir=tmp_path / "e")
    with TestClient(app, base_url="http://192.0.2.10:8765", follow_redirects=False) as c:
        for path in ("/", f"/studies/{STUDY}", f"/api/studies/{STUDY}", "/static/dashboard.js", "/exports/x.py"):
            assert c.get(path).status_code == 401, path
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.get("/?token=wrong")
        assert r.status_code == 401 and "sqlite" not in r.text and 'content=""' in r.text  # no store, no CSRF
        assert c.get("/healthz").status_code == 200
        assert c.get("/api/studies", headers={"Authorization": "Bearer s3cret-token-for-tests"}).status_code == 200
        r = c.get(f"/studies/{STUDY}?token=s3cret-token-for-tests&x=1")
        assert r.status_code == 303 and r.headers["location"] == f"/studies/{STUDY}?x=1"  # the token leaves the URL
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get(f"/studies/{STUDY}").status_code == 200  # the cookie now
        r = c.post(f"/studies/{STUDY}/stop")
        assert r.status_code == 403  # authenticated, but still no CSRF token
    # without a token, only loopback Host headers are answered (DNS rebinding)
    app = create_app(store_url, export_dir=tmp_path / "e")
    with TestClient(app, base_url="http://attacker.example:8765") as c:
        assert c.get("/").status_code == 400
    with TestClient(app, base_url="http://localhost:8765") as c:
        assert c.get("/").status_code == 200


def test_postgres_store_and_masked_password(postgres_url: str, tmp_path: Path) -> None:
    """Over PostgreSQL: a study that never ran (empty states) and one evaluated architecture; the
    password in the store URL is never shown (the test cluster trusts, so any password connects)."""
    from fastapi.testclient import TestClient

    from nas.budget import parse_budget
    from nas.dashboard import create_app
    from nas.search import SearchConfig
    from nas.store import Store
    from search_spaces import get_space

    url = postgres_url.replace("postgres@", "postgres:hunter2@")
    spec = get_space("hybrid_vit").random(3)
    with Store(url) as store:
        store.create_study("pg1", "hybrid_vit", SearchConfig(strategy="random").to_dict(),
                           parse_budget("5trials").to_dict())
        store.create_study("pg2", "hybrid_vit", SearchConfig(strategy="random").to_dict(),
                           parse_budget("5trials").to_dict())
        store.add_architecture(spec.hash, "hybrid_vit", spec.to_json())
        store.record_evaluation("pg2", stage="train", metrics={"accuracy": 0.5, "latency_ms": 1.5, "params": 1e4},
                                seconds=1.0, arch_hash=spec.hash, trial=0, key="train:0",
                                device={"kind": "cpu", "name": "test <cpu>", "key": "0123456789abcdef"})
    app = create_app(url, export_dir=tmp_path / "exports")
    with TestClient(app, base_url=LOOPBACK) as c:
        pages = [c.get(p) for p in ("/", "/studies/pg1", "/studies/pg2", f"/studies/pg2/arch/{spec.hash}",
                                    "/api/studies", "/api/studies/pg2")]
        assert [r.status_code for r in pages] == [200] * len(pages)
        for r in pages:
            assert "hunter2" not in r.text
        assert "optuna-dashboard postgresql+psycopg://postgres:***@" in pages[1].text
        assert "no front yet" in pages[1].text and "no errors" in pages[1].text
        assert "test &lt;cpu&gt;" in pages[3].text and "test <cpu>" not in pages[3].text  # escaped
        s = pages[5].json()
        assert s["study"]["budget"]["text"] == "1/5 trials" and s["points"][0]["hash"] == spec.hash
        token = _csrf(c, "/studies/pg1")
        r = c.post("/studies/pg1/stop", headers={"X-CSRF-Token": token, "Accept": "application/json"})
        assert r.status_code == 200 and "marked stopped" in r.json()["message"]  # created, no driver
    with Store(url) as store:
        assert store.study("pg1").status == "stopped"


# --------------------------------------------------------------------------------------------
# actions
# --------------------------------------------------------------------------------------------


def test_resume_of_a_running_study_is_refused(client: Any, store_url: str, tmp_path: Path) -> None:
    from nas.store import Store

    token = _csrf(client)
    store = Store(store_url)
    assert store.acquire_driver(STUDY, os.getpid(), socket.gethostname())  # a live driver: this process
    try:
        store.set_status(STUDY, "running")
        before = _snapshot(store_url)
        page = client.get(f"/api/studies/{STUDY}").json()["study"]
        assert page["shown_status"] == "running" and not page["resumable"] and page["stoppable"]
        r = client.post(f"/studies/{STUDY}/resume", headers={"X-CSRF-Token": token, "Accept": "application/json"},
                        data={"budget": "+10s"})
        assert r.status_code == 409, r.text
        assert "already running" in r.json()["detail"] and str(os.getpid()) in r.json()["detail"]
        r = client.post(f"/studies/{STUDY}/resume", data={"csrf_token": token})  # the plain form: an error page
        assert r.status_code == 409 and "already running" in r.text
        assert _snapshot(store_url) == before
        assert client.app.state.dashboard.launcher.get(STUDY) is None and not (tmp_path / "logs").exists()
        # a graceful stop: the live driver is asked, nothing is marked behind its back
        r = client.post(f"/studies/{STUDY}/stop", headers={"X-CSRF-Token": token, "Accept": "application/json"})
        assert r.status_code == 200 and "stop requested" in r.json()["message"]
        info = store.study(STUDY)
        assert info.stop_requested and info.status == "running"
    finally:
        store.release_driver(STUDY, os.getpid())
        store.close()


def test_resume_is_never_started_twice(client: Any, store_url: str, tmp_path: Path) -> None:
    launcher = client.app.state.dashboard.launcher
    launcher.program = [sys.executable, "-c", "import sys, time; print('resume', sys.argv[1:]); time.sleep(60)"]
    token = _csrf(client)
    hdr = {"X-CSRF-Token": token, "Accept": "application/json"}
    b = client.get(f"/api/studies/{STUDY}").json()["study"]["budget"]
    add = f"+{math.ceil(max(0.0, b['used'] - b['total'])) + 10}s"  # more than the study overran: something to run
    r = client.post(f"/studies/{STUDY}/resume", headers=hdr, data={"budget": add[1:]})
    assert r.status_code == 200, r.text
    pid = r.json()["pid"]
    launch = launcher.get(STUDY)
    assert launch is not None and launch.proc.pid == pid and launch.running
    assert launch.budget == add
    s = client.get(f"/api/studies/{STUDY}").json()["study"]
    assert s["shown_status"] == "starting" and not s["resumable"] and s["launch"]["running"]
    r = client.post(f"/studies/{STUDY}/resume", headers=hdr, data={"budget": add})
    assert r.status_code == 409 and "still running" in r.json()["detail"]
    assert launcher.get(STUDY).proc.pid == pid  # the first one, not a second
    log = tmp_path / "logs" / f"dashboard-resume-{STUDY}.log"
    t0 = time.monotonic()
    while "resume ['resume'" not in log.read_text() and time.monotonic() - t0 < 30:
        time.sleep(0.1)  # the process writes to its own log
    # stopping a resume that has not started its driver yet ends that process
    r = client.post(f"/studies/{STUDY}/stop", headers=hdr)
    assert r.status_code == 200
    assert launcher.wait(STUDY, 30) == -signal.SIGTERM
    text = log.read_text()
    assert f"nas resume {STUDY} --storage" in text and f"--budget {add}" in text
    assert f"resume ['resume', '{STUDY}', '--storage', '{store_url}', '--budget', '{add}']" in text


def test_resume_input_is_checked(client: Any, store_url: str) -> None:
    token = _csrf(client)
    hdr = {"X-CSRF-Token": token, "Accept": "application/json"}
    before = _snapshot(store_url)
    for budget, pattern in (("", "complete; give it more budget"), ("+abc", "abc"), ("+0s", "more than zero"),
                            ("+5trials", "cannot add")):
        r = client.post(f"/studies/{STUDY}/resume", headers=hdr, data={"budget": budget})
        assert r.status_code == 400, (budget, r.text)
        assert re.search(pattern, r.json()["detail"]), (budget, r.json())
    assert _snapshot(store_url) == before and client.app.state.dashboard.launcher.get(STUDY) is None


def test_stop_marks_a_dead_driver_stopped(client: Any, store_url: str) -> None:
    from nas.store import Store

    token = _csrf(client)
    hdr = {"X-CSRF-Token": token, "Accept": "application/json"}
    r = client.post(f"/studies/{STUDY}/stop", headers=hdr)
    assert r.status_code == 200 and "nothing to stop" in r.json()["message"]  # completed
    with Store(store_url) as store:
        store.set_status(STUDY, "running")  # as a crashed driver leaves it
    assert client.get(f"/api/studies/{STUDY}").json()["study"]["shown_status"] == "running (no live driver)"
    r = client.post(f"/studies/{STUDY}/stop", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == f"/studies/{STUDY}"
    with Store(store_url) as store:
        info = store.study(STUDY)
        assert info.status == "stopped" and not info.stop_requested and info.driver_pid is None


def test_export_downloads_the_model_file(client: Any, store_url: str, tmp_path: Path) -> None:
    token = _csrf(client)
    data = client.get(f"/api/studies/{STUDY}").json()
    best = max(data["front"], key=lambda r: r["metrics"]["accuracy"])["hash"]
    r = client.post(f"/studies/{STUDY}/export", data={"csrf_token": token, "pick": "accuracy"})
    assert r.status_code == 303
    url = r.headers["location"]
    assert re.fullmatch(rf"/exports/model_{STUDY}_{best[:12]}\.py", url), url
    got = client.get(url)
    assert got.status_code == 200 and "attachment" in got.headers["content-disposition"]
    assert f'SPEC_HASH = "{best}"' in got.text and "def build_model(" in got.text
    assert (tmp_path / "exports" / url.rsplit("/", 1)[1]).read_text() == got.text
    # the architecture page offers it for download now, and the store records the export
    arch = client.get(f"/studies/{STUDY}/arch/{best}").text
    assert f'href="/exports/model_{STUDY}_{best[:12]}.py"' in arch
    assert _snapshot(store_url)[2] == 1
    r = client.post(f"/studies/{STUDY}/export", headers={"X-CSRF-Token": token, "Accept": "application/json"},
                    data={"pick": "median"})
    assert r.status_code == 400 and "pick must be one of" in r.json()["detail"]
    r = client.post(f"/studies/{STUDY}/export", headers={"X-CSRF-Token": token, "Accept": "application/json"},
                    data={"arch": "../../etc/passwd"})
    assert r.status_code == 400


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from cli import app

    with pytest.raises(SystemExit) as info:
        app(args)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_cli_bad_input(capsys: pytest.CaptureFixture[str], store_url: str, tmp_path: Path) -> None:
    cases = [
        (["--host", "0.0.0.0", "--token", ""], "token is empty"),
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "port"),
        (["--host", "no-such-host.invalid"], "resolve --host"),
        (["--storage", "mysql://u@h/db"], "unsupported store URL"),
        (["--storage", f"sqlite:///{tmp_path / 'missing.db'}"], "no store at"),
    ]
    for args, pattern in cases:
        full = args if any(a == "--storage" for a in args) else [*args, "--storage", store_url]
        code, _out, err = _run_cli(["dashboard", *full], capsys)
        assert code == 2, (args, err)
        assert err.startswith("nas: error: ") and err.count("\n") == 1, err
        assert re.search(pattern, err), (pattern, err)
    assert not (tmp_path / "missing.db").exists()
    with socket.socket() as busy:  # a port in use
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, _out, err = _run_cli(["dashboard", "--port", str(busy.getsockname()[1]), "--storage", store_url,
                                   "--export-dir", str(tmp_path / "e")], capsys)
        assert code == 2 and "cannot listen" in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()  # a dashboard that fails to start writes nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _start_server(args: list[str], cwd: Path, port: int) -> Server:
    """`nas dashboard --port PORT ARGS` in its own process group, once it answers /healthz."""
    log = cwd / f"dashboard-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(NAS), "dashboard", "--port", str(port), *args], cwd=cwd, env=_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(proc=proc, url=f"http://127.0.0.1:{port}", log=log)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            with urllib.request.urlopen(f"{srv.url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return srv
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"nas dashboard exited ({proc.returncode}): {srv.output()}") from None
            time.sleep(0.2)
    _stop_server(proc)
    raise AssertionError(f"nas dashboard did not answer within 60 s: {srv.output()}")


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


def test_cli_non_loopback_bind_generates_and_requires_a_token(store_url: str, tmp_path: Path) -> None:
    srv = _start_server(["--host", "0.0.0.0", "--storage", store_url, "--export-dir", str(tmp_path / "e")],
                        tmp_path, _free_port())
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{srv.url}/api/studies", timeout=10)
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{srv.url}/", timeout=10)
        assert refused.value.code == 401
    finally:
        _stop_server(srv.proc)
    printed = srv.output()
    m = re.search(r"^token \(generated\): (\S+)$", printed, re.M)
    assert m, printed
    token = m.group(1)
    assert len(token) >= 24 and f"?token={token}" in printed
    # a server given that token explicitly takes it, and nothing else
    srv = _start_server(["--host", "0.0.0.0", "--token", token, "--storage", store_url, "--export-dir",
                         str(tmp_path / "e")], tmp_path, _free_port())
    try:
        req = urllib.request.Request(f"{srv.url}/api/studies", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["studies"][0]["name"] == STUDY
        req = urllib.request.Request(f"{srv.url}/api/studies", headers={"Authorization": f"Bearer {token}x"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401
    finally:
        _stop_server(srv.proc)
    assert "(generated)" not in srv.output()


# --------------------------------------------------------------------------------------------
# the browser
# --------------------------------------------------------------------------------------------

def _standalone_check(py: Path, weights: Path, store_url: str, work: Path) -> None:
    """The export issue's check on a downloaded file: ruff-clean; in a fresh interpreter whose
    sys.path holds only the file's folder (and installed torch), build_model() loads the downloaded
    weights with strict=True and gives build(spec)'s output with the same weights to 1e-6
    (tests/test_export.py's CHECK, reused)."""
    from safetensors.torch import load_file
    from test_export import CHECK

    from nas.store import Store
    from search_spaces import ArchSpec
    from search_spaces.hybrid_vit import build

    lint = subprocess.run([str(RUFF), "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), str(py)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    code = py.read_text()
    m = re.search(r'^SPEC_HASH = "([0-9a-f]{64})"$', code, re.M)
    assert m, "no SPEC_HASH in the exported file"
    with Store(store_url) as store:
        spec = ArchSpec.from_dict(store.architecture(m.group(1))["spec"])
        frame = store.study(STUDY).config["frame_json"]
    nc, img, ch = int(frame["num_classes"]), int(frame["img_size"]), int(frame["in_chans"])
    state = load_file(str(weights))
    ref = build(spec, num_classes=nc, img_size=img, in_chans=ch)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    x = torch.randn(2, ch, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = ref(x)
    work.mkdir(parents=True, exist_ok=True)
    module = py.stem
    (work / py.name).write_text(code)
    torch.save({"state": state, "x": x, "y": y}, work / f"{module}.pt")
    (work / "cases.json").write_text(json.dumps([{"module": module, "num_classes": nc, "img_size": img,
                                                  "hash": spec.hash}]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "OMP_NUM_THREADS": "1"}  # see conftest.py
    run = subprocess.run([sys.executable, "-c", CHECK, str(work)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok 1"


@pytest.fixture
def browser_server(store_url: str, tmp_path: Path) -> Iterator[Server]:
    """`nas dashboard` on a free loopback port over a copy of the searched store; cleaned up even on failure."""
    srv = _start_server(["--storage", store_url, "--export-dir", str(tmp_path / "exports")], tmp_path, _free_port())
    try:
        yield srv
    finally:
        launch_pid = None
        try:
            with urllib.request.urlopen(f"{srv.url}/api/studies/{STUDY}", timeout=10) as r:
                launch = json.loads(r.read())["study"]["launch"]
                launch_pid = launch["pid"] if launch and launch["running"] else None
        except OSError:
            pass
        _stop_server(srv.proc)
        if launch_pid is not None:  # a resume still running after a failure: its own process group
            try:
                os.killpg(launch_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_browser_watch_resume_export(browser_server: Server, store_url: str, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs it (apt-get install chromium)")
    artifacts = Path(os.environ.get("NAS_TEST_ARTIFACTS") or REPO / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    base = browser_server.url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
        external: list[str] = []
        errors: list[str] = []
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith((base, "data:", "blob:"))
                else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(base + "/")
            row = page.locator(f'#studies tr[data-study="{STUDY}"]')
            playwright.expect(row).to_be_visible()
            playwright.expect(row.locator(".status")).to_have_text("completed")
            row.locator("a").first.click()
            page.wait_for_url(f"{base}/studies/{STUDY}")
            # the Pareto plot: Plotly's SVG with one marker per architecture that has both metrics
            playwright.expect(page.locator("#plot .main-svg").first).to_be_attached()
            with urllib.request.urlopen(f"{base}/api/studies/{STUDY}", timeout=30) as r:
                data = json.loads(r.read())
            points = data["points"]
            # the default axes: accuracy whenever any architecture has one (else the screening score)
            default_y = "accuracy" if any("accuracy" in q["metrics"] for q in points) else "score"
            assert page.locator("#axis-x").input_value() == "latency_ms"
            assert page.locator("#axis-y").input_value() == default_y
            markers = page.locator("#plot .scatterlayer .point")
            ys = [y for y in ("accuracy", "score") if any(y in q["metrics"] for q in points)]
            for y in ys:  # any objective pair: at least one marker per architecture having both
                page.select_option("#axis-y", y)
                n = sum(1 for q in points if "latency_ms" in q["metrics"] and y in q["metrics"])
                assert n >= 1, (y, points)
                playwright.expect(markers.nth(n - 1)).to_be_attached(timeout=20_000)
            page.select_option("#axis-y", default_y)
            trials_before = int(page.locator("#trials").inner_text())
            rows_before = page.locator("#trials-table tbody tr").count()
            assert rows_before == trials_before
            # sortable: by score (every screened architecture has one), best first
            page.locator('#trials-table th[data-key="score"]').click()
            col = "#trials-table tbody tr td:nth-child(8)"
            first = page.locator(col).first.inner_text()
            assert first and float(first) == max(float(t) for t in page.locator(col).all_inner_texts() if t)
            # resume with a little more budget than the study overran: running, new trials, then completed
            b = data["study"]["budget"]
            add = math.ceil(max(0.0, b["used"] - b["total"])) + 10
            page.fill("#resume-budget", f"+{add}s")
            page.click("#resume-btn")
            status = page.locator("#status")
            playwright.expect(status).to_have_text("running", timeout=180_000)
            playwright.expect(page.locator("#stop-btn")).to_be_enabled()
            playwright.expect(page.locator("#trials")).not_to_have_text(str(trials_before), timeout=180_000)
            playwright.expect(status).to_have_text("completed", timeout=300_000)
            trials_after = int(page.locator("#trials").inner_text())
            assert trials_after > trials_before
            playwright.expect(page.locator("#trials-table tbody tr")).to_have_count(trials_after)
            assert f"/{int(b['total']) + add} cpu-s" in page.locator("#budget-text").inner_text()
            # export the most accurate architecture, with its weights when the study kept some
            weights = page.locator('#export-form input[name="weights"]')
            with_weights = weights.count() == 1
            assert not with_weights or weights.is_checked()
            with page.expect_download(timeout=120_000) as dl:
                page.click("#export-btn")
            download = dl.value
            dest = tmp_path / "download" / download.suggested_filename
            dest.parent.mkdir()
            download.save_as(dest)
            playwright.expect(page.locator("#message")).to_contain_text("exported")
            # a phone-sized window: nothing scrolls sideways
            page.set_viewport_size({"width": 420, "height": 900})
            for path in (f"/studies/{STUDY}", "/"):
                page.goto(base + path)
                page.wait_for_load_state("networkidle")
                sw, cw = page.evaluate("() => [document.scrollingElement.scrollWidth, "
                                       "document.scrollingElement.clientWidth]")
                assert sw <= cw, (path, sw, cw)
        finally:
            page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
            browser.close()
    assert not errors, errors
    assert not external, f"requests left the dashboard: {external}"
    if not with_weights:  # the study stopped before a supernet or training: the model file alone
        assert dest.suffix == ".py" and "def build_model(" in dest.read_text()
        return
    assert dest.suffix == ".zip"
    with zipfile.ZipFile(dest) as z:
        names = sorted(z.namelist())
        stem = dest.stem
        assert names == [f"{stem}.py", f"{stem}.safetensors"], names
        z.extractall(tmp_path / "unzipped")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "unzipped" / f"{stem}.safetensors"), "pt") as f:
        assert f.metadata()["weights"] == "supernet-inherited" or f.metadata()["weights"].startswith("trained")
    _standalone_check(tmp_path / "unzipped" / f"{stem}.py", tmp_path / "unzipped" / f"{stem}.safetensors",
                      store_url, tmp_path / "check")
