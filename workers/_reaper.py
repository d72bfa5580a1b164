"""The local Ray's undertaker: a tiny process that outlives a killed driver by a moment.

``init_ray`` starts it beside a private local Ray. It watches the driver's pid and notes, every
half second, the driver's descendants that belong to this Ray (their command line names its temp
folder). When the driver is gone, however it went (SIGKILL included), it kills exactly those
processes (checked by start time, so a reused pid is never touched) and whatever they started,
then removes the temp folder. Without it Ray's agents lingered for 60-70 s after a killed driver,
and every run left a ``nas-ray-*`` folder behind. It exits at once when the folder disappears
(``shutdown_ray`` removed it after a normal shutdown).

Run as ``python _reaper.py DRIVER_PID TEMP_DIR``; it imports only the standard library.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (``Z``: exited, waiting to be reaped), or "" when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                out[int(entry)] = st
    return out


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _names(cmdline: str, tmp: str) -> bool:
    """``cmdline`` names the folder ``tmp`` itself (or a path inside it), not a longer name."""
    i = cmdline.find(tmp)
    while i >= 0:
        end = i + len(tmp)
        if end == len(cmdline) or cmdline[end] in "/ \"'=,":
            return True
        i = cmdline.find(tmp, i + 1)
    return False


def main(driver: int, tmp: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only the driver's end ends us
        signal.signal(sig, signal.SIG_IGN)
    me = os.getpid()
    ray: dict[int, int] = {}  # pid -> start time of the driver's Ray processes
    driver_start = (_stat(driver) or (0, -1))[1]
    while True:
        st = _stat(driver)
        if st is None or st[1] != driver_start:
            break
        if not os.path.isdir(tmp):
            return  # a normal shutdown removed the folder: nothing left to do
        table = _table()
        for pid in _descendants({driver}, table) - {me}:
            if pid not in ray and _names(_cmdline(pid), tmp):
                ray[pid] = table[pid][1]
        time.sleep(0.5)
    killed: dict[int, int] = {}  # pid -> start time of every process sent SIGKILL
    for _ in range(3):  # their children may still be starting: sweep a few times
        table = _table()
        alive = {p for p, t in ray.items() if p in table and table[p][1] == t}
        # one started within the last poll, before the driver died, was not noted: its command
        # line names this driver's own temp folder (unique to it), wherever it was reparented
        alive |= {p for p in table if p != me and _names(_cmdline(p), tmp)}
        for pid in alive | _descendants(alive, table):
            killed.setdefault(pid, table[pid][1])
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)
    # the folder goes last, once every process sent SIGKILL has exited (a worker holding a few GB
    # takes a moment to): its removal tells a waiting caller that nothing of this Ray is left
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [p for p, t in killed.items() if _stat(p) is not None and _stat(p)[1] == t  # type: ignore[index]
                and _state(p) not in ("Z", "X", "")]
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
