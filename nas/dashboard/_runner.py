"""Resumes launched from the dashboard: ``nas resume NAME`` in a detached background process.

One launch per study at a time. The process runs in its own session (a Ctrl-C or the end of the
dashboard does not stop it: the study's driver lives on its own, like one started from a shell),
writes to its own log file, and is reaped by a waiter thread so it never lingers as a zombie.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nas.store import mask_url

_LOG_TAIL = 4000


class LaunchError(RuntimeError):
    """A resume that could not be started (one line)."""


@dataclass
class Launch:
    """One resume process started by this dashboard."""

    study: str
    proc: subprocess.Popen[bytes]
    log: Path
    budget: str | None
    started_at: datetime
    returncode: int | None = None
    trials_before: int | None = None  # the study's evaluations when it started (to tell that it ran nothing)
    seen_running: bool = False  # the study was seen running under this process's driver
    waiter: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        if self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode is None

    def tail(self) -> str:
        """The end of the process's log."""
        return _tail(self.log)

    def view(self) -> dict[str, Any]:
        running = self.running
        out: dict[str, Any] = {"pid": self.proc.pid, "running": running, "returncode": self.returncode,
                               "budget": self.budget, "started_at": self.started_at.isoformat(),
                               "log": str(self.log)}
        if not running and self.returncode != 0:  # a failed resume: show why
            out["log_tail"] = _tail(self.log)
            out["reason"] = last_line(out["log_tail"])
        return out


def last_line(log: str) -> str:
    """The last line a process printed (not this dashboard's ``#`` header), at most 300 characters."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith("# ")]
    return lines[-1][:300] if lines else ""


def _tail(path: Path, n: int = _LOG_TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def cli_script() -> Path:
    """The ``cli.py`` of this installation (the module behind the ``nas`` command)."""
    spec = importlib.util.find_spec("cli")
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        raise LaunchError("cannot find the nas command's module (cli.py): reinstall hybrid-nas")
    return Path(spec.origin)


class Launcher:
    """Starts and tracks ``nas resume`` processes for the studies of one store."""

    def __init__(self, url: str, log_dir: Path | None = None) -> None:
        self.url = url
        self.log_dir = log_dir
        self.program: list[str] | None = None  # the command before "resume ..." (default: this Python + cli.py)
        self._launches: dict[str, Launch] = {}
        self._lock = threading.Lock()

    def get(self, study: str) -> Launch | None:
        return self._launches.get(study)

    def view(self, study: str) -> dict[str, Any] | None:
        launch = self._launches.get(study)
        return None if launch is None else launch.view()

    def running(self, study: str) -> bool:
        launch = self._launches.get(study)
        return launch is not None and launch.running

    def _log_path(self, study: str, workdir: str | None) -> Path:
        """``log_dir`` if given, else the study's work directory (beside its supernet and Tune logs)."""
        if self.log_dir is not None:
            base = self.log_dir
        elif workdir:
            base = Path(workdir)
        else:
            base = Path(tempfile.gettempdir()) / "nas-dashboard"
        base.mkdir(parents=True, exist_ok=True)
        return base / f"dashboard-resume-{study}.log"

    def start(self, study: str, budget: str | None, workdir: str | None, check: Any,
              trials_before: int | None = None) -> Launch:
        """Start ``nas resume study [--budget budget]`` unless one is running.

        ``check()`` runs under the launch lock just before starting (the caller's live-driver test);
        it raises to refuse. Raises LaunchError when the process cannot be started."""
        with self._lock:
            if self.running(study):
                raise LaunchError(f"a resume of {study!r} started here is still running "
                                  f"(pid {self._launches[study].proc.pid})")
            check()
            cmd = [*(self.program or [sys.executable, str(cli_script())]), "resume", study, "--storage", self.url]
            if budget:
                cmd += ["--budget", budget]
            log = self._log_path(study, workdir)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
            shown = ["nas", "resume", study, "--storage", mask_url(self.url)] + (["--budget", budget] if budget else [])
            started = datetime.now(timezone.utc)
            try:
                with log.open("ab") as out:
                    out.write(f"\n# {started:%Y-%m-%d %H:%M:%S} UTC, from the dashboard: {' '.join(shown)}\n".encode())
                    out.flush()
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=str(log.parent), env=env, start_new_session=True)
            except OSError as e:
                raise LaunchError(f"cannot start `nas resume {study}`: {e}") from None
            launch = Launch(study=study, proc=proc, log=log, budget=budget, started_at=started,
                            trials_before=trials_before)
            launch.waiter = threading.Thread(target=self._reap, args=(launch,), daemon=True,
                                             name=f"nas-resume-{study}")
            launch.waiter.start()
            self._launches[study] = launch
            return launch

    @staticmethod
    def _reap(launch: Launch) -> None:
        launch.returncode = launch.proc.wait()

    def terminate(self, study: str) -> bool:
        """SIGTERM this dashboard's resume of ``study`` (its stop handler asks the driver to stop
        gracefully; before the handler is installed the process just ends); whether one ran."""
        launch = self._launches.get(study)
        if launch is None or not launch.running:
            return False
        try:
            os.kill(launch.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def wait(self, study: str, timeout: float) -> int | None:
        """Wait for this dashboard's resume of ``study`` to end; its exit code (None if still running)."""
        launch = self._launches.get(study)
        if launch is None:
            return None
        t0 = time.monotonic()
        while launch.running and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
        return launch.returncode
