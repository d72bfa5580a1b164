"""Issue 19: a study on a two-node Ray cluster, both nodes on this machine's loopback.

The README's multi-node recipe, run as a test: ``ray start --head`` on 127.0.0.2 and ``ray start
--address`` on 127.0.0.3 (all of 127/8 is loopback on Linux; Ray rewrites 127.0.0.1 itself into
the default route's address, so the nodes take other loopback addresses), one CPU each. ``nas
search --workers 2 --address`` then puts its two one-CPU worker actors one on each node, and Ray's
own records (GCS: node table, actor table, task events) show trials ran on both.

Nothing is shared with other Ray sessions: the nodes have their own temp folder (their
``ray_current_cluster`` file is written there, not in /tmp/ray) and ports from a block found free
outside the ephemeral range and Ray's default worker ports (10002-19999). Clean-up ends only what
this test started: the process groups of its two ``ray start`` calls (each a new session) and the
worker processes their raylets forked (Ray puts each in a group of its own).

The search's budget is a trial count, so nothing here depends on the machine's speed: both actors
are asked for a trial at the first dispatch, before either finishes one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nas.store import Store

BIN = Path(sys.executable).parent
RAY, NAS = str(BIN / "ray"), str(BIN / "nas")
REPO = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
BLOCK = 150  # ports: head 0-7, worker node 10-15, head workers 20-79, worker node's workers 80-139

# run in a subprocess (the test process may hold a local Ray of its own): what the cluster recorded
PLACEMENT = r"""
import collections, json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
actors = collections.Counter(
    ip.get(a["Address"]["NodeID"], "?") for a in ray._private.state.actors().values()
    if a["ActorClassName"].endswith("_Worker"))
runs = collections.Counter(
    ip.get(e.state_updates.node_id.hex(), "?") for e in ray._private.state.state._get_all_task_events()
    if e.task_info.func_or_class_name == "_Worker.run" and e.state_updates.node_id)
print(json.dumps({"nodes": sorted(ip.values()), "actors": actors, "runs": runs}))
"""


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as srv:
            srv.bind((WORKER_IP, 0))
            srv.listen()
            with socket.create_connection((WORKER_IP, srv.getsockname()[1]), timeout=5):
                return True
    except OSError:
        return False


def _free_block(n: int) -> int:
    """The first port of ``n`` consecutive ports nothing is bound to (on any address)."""
    for _ in range(200):
        base = random.randrange(20000, 32768 - n)  # below the ephemeral range, above Ray's worker ports
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in 20000-32767")


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of ``pid``, None when it is gone (or a zombie: dead, waiting for its parent)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[2]))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Cluster:
    root: Path
    port: int
    groups: list[int] = field(default_factory=list)  # pgids of our `ray start` sessions

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def ours(self) -> set[int]:
        """Our processes: those in our groups, those whose command line names our temp folder, and
        everything they forked (a raylet's workers start groups of their own)."""
        procs = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
        found = {pid for pid, st in procs.items() if st and st[1] in self.groups}
        found |= {pid for pid, st in procs.items() if st and pid != os.getpid() and str(self.root) in _cmdline(pid)}
        grew = True
        while grew:
            children = {pid for pid, st in procs.items() if st and st[0] in found} - found
            found |= children
            grew = bool(children)
        return found

    def stop(self) -> set[int]:
        """SIGTERM our processes, SIGKILL what is left after 5 s (gcs_server and the autoscaler's
        monitor were still alive 30 s after a SIGTERM here; ``ray stop`` too ends with SIGKILL).
        Returns any that survive."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 15.0)):
            pids = self.ours()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            t0 = time.monotonic()
            while self.ours() and time.monotonic() - t0 < wait:
                time.sleep(0.5)
        return self.ours()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NAS_CHAOS")}
    # init_ray sets this to 0 in a process that started a local Ray; `ray start --address` refuses then
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")
    return env


def _ray_start(cluster: Cluster, name: str, args: list[str]) -> None:
    log = cluster.root / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([RAY, "start", *args, "--num-cpus", "1", "--disable-usage-stats",
                                 "--temp-dir", str(cluster.root / name)], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), cwd=REPO, start_new_session=True)
        cluster.groups.append(proc.pid)  # a new session: its pgid is its pid, kept by the daemons it starts
        rc = proc.wait(timeout=300)
    text = log.read_text()
    if rc != 0 and "not supported on Windows and OSX" in text:
        pytest.skip(f"Ray refuses a multi-node cluster on this platform: {text.strip().splitlines()[-1]}")
    assert rc == 0, f"ray start ({name}) exited {rc}:\n{text[-3000:]}"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not sys.platform.startswith("linux") or not _loopback_alias_works():
        pytest.skip(f"{WORKER_IP} is not a usable loopback address here (Linux routes all of 127/8 to lo)")
    b = _free_block(BLOCK)
    c = Cluster(Path(tempfile.mkdtemp(prefix="nas-mn-", dir="/tmp")), b)  # short: Ray's socket paths
    try:
        _ray_start(c, "head", [
            "--head", "--node-ip-address", HEAD_IP, "--port", str(b), "--node-manager-port", str(b + 1),
            "--object-manager-port", str(b + 2), "--dashboard-agent-listen-port", str(b + 3),
            "--dashboard-agent-grpc-port", str(b + 4), "--runtime-env-agent-port", str(b + 5),
            "--metrics-export-port", str(b + 6), "--dashboard-port", str(b + 7), "--include-dashboard", "false",
            "--min-worker-port", str(b + 20), "--max-worker-port", str(b + 79), "--resources", '{"node_a": 1}'])
        _ray_start(c, "worker", [
            "--address", c.address, "--node-ip-address", WORKER_IP, "--node-manager-port", str(b + 10),
            "--object-manager-port", str(b + 11), "--dashboard-agent-listen-port", str(b + 12),
            "--dashboard-agent-grpc-port", str(b + 13), "--runtime-env-agent-port", str(b + 14),
            "--metrics-export-port", str(b + 15), "--min-worker-port", str(b + 80),
            "--max-worker-port", str(b + 139), "--resources", '{"node_b": 1}'])
        yield c
    finally:
        left = c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive: {sorted(left)}"


def test_a_study_runs_its_trials_on_both_nodes_of_a_cluster(cluster: Cluster, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    out = subprocess.run([NAS, "search", "--budget", "6trials", "--strategy", "random", "--train-epochs", "1",
                          "--workers", "2", "--address", cluster.address, "--study", "mn", "--storage", url,
                          "--json"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    info = Store(url).study("mn")
    assert info.status == "completed" and info.trials_done == 6
    assert json.loads(out.stdout)["front"]

    where = subprocess.run([sys.executable, "-c", PLACEMENT, cluster.address], env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    seen = json.loads(where.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == [HEAD_IP, WORKER_IP]
    assert seen["actors"] == {HEAD_IP: 1, WORKER_IP: 1}, seen  # one one-CPU worker actor on each node
    assert seen["runs"].get(HEAD_IP, 0) >= 1 and seen["runs"].get(WORKER_IP, 0) >= 1, seen
