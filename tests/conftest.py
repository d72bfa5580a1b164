"""Shared fixtures. ``search_spaces`` is imported first: it makes timm importable on CPU torch."""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# one thread, here and in every subprocess the suite starts (they inherit the environment): on 2
# busy cores, torch's 2 OpenMP threads spin-wait for each other. Measured on the exported-files
# check (a subprocess building 47 models): 167 s with the default threads beside two busy
# processes, 7.7 s with one
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

import search_spaces  # noqa: F401

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real data for tests); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


# --------------------------------------------------------------------------------------------
# PostgreSQL: one throw-away cluster per session, a fresh database per test
# --------------------------------------------------------------------------------------------


def _find_initdb() -> Path | None:
    """``initdb`` on PATH, else the newest /usr/lib/postgresql/*/bin/initdb."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve()
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None

    def version(p: str) -> tuple[int, ...]:
        v = Path(p).parents[1].name
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    return Path(max(candidates, key=version))


class PostgresServer:
    """A PostgreSQL cluster in a temp dir, trust auth on 127.0.0.1:``port``; ``new_database()`` gives a URL."""

    def __init__(self, initdb: Path) -> None:
        self.bindir = initdb.parent
        pg_ctl = self.bindir / "pg_ctl"
        self.pg_ctl = str(pg_ctl if pg_ctl.exists() else (shutil.which("pg_ctl") or "pg_ctl"))
        self.prefix: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="nas-pg-"))
        if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as user postgres
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root and there is no 'postgres' user to own the test cluster")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            runuser = shutil.which("runuser")
            self.prefix = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.data = self.root / "data"
        self._n = 0
        # durability off: a test cluster trades crash safety for speed (commits do not fsync)
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        try:
            self._run([str(initdb), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-sync"])
            self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                       "-o", opts, "start"])
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, cmd: list[str]) -> None:
        if self.prefix and self.prefix[0] == "su":
            full = [*self.prefix, shlex.join(cmd)]
        else:
            full = [*self.prefix, *cmd]
        res = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}\n{tail}")

    def new_database(self) -> str:
        """A fresh empty database; its ``postgresql+psycopg://`` URL."""
        import psycopg  # only here: the rest of the suite does not need it

        self._n += 1
        name = f"nas_test_{self._n}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the whole session (started once, ~2-3 s); skipped without initdb."""
    initdb = _find_initdb()
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                    "run `make pg`")
    server = PostgresServer(initdb)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg://postgres@127.0.0.1:PORT/DB`` of a fresh, empty database for this test."""
    return postgres_server.new_database()
