"""Memory of a process tree from /proc (Linux): the benchmarks' RSS and PSS sampling."""

from __future__ import annotations

import os


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        out[int(entry.name)] = (int(stat[stat.rfind(")") + 2:].split()[1]), cmd)  # the name may hold spaces
    return out


def tree(root: int, procs: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """``root`` and every process descended from it."""
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in (procs if procs is not None else processes()).items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def kb(path: str, field: str) -> int:
    """The kB value of ``field`` (e.g. "VmRSS:" in /proc/PID/status, "Pss:" in smaps_rollup); 0 if gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_pss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of one process in kB: RSS counts shared pages in full, PSS splits them."""
    return kb(f"/proc/{pid}/status", "VmRSS:"), kb(f"/proc/{pid}/smaps_rollup", "Pss:")
