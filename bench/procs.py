"""Processes of a bench run: start, wait for, sample, and always kill.

Every server is started in its own session (``start_new_session``) so that it
and whatever it spawns in its process group can be killed as a group. The
node's own ``llama-server`` children live in sessions of their own (the agent
``setsid``s them) but die with the agent (``--pdeathsig KILL``); the router's
children stay in the router's group. As a last resort :func:`reap_strays`
kills, by pid, any process whose command line names the run's temporary
directory — nothing else on the machine is touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def http_post(port: int, path: str, doc: Any, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


class Server:
    """One server process (a target of the bench)."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, cpus: set[int] | None = None) -> None:
        self.name = name
        self.cpus = cpus
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        log = open(self.log_path, "wb")
        try:
            cpus = self.cpus
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                          stdin=subprocess.DEVNULL, start_new_session=True, env=self.env,
                                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        finally:
            log.close()

    def wait_ready(self, check: Callable[["Server"], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log: {self.log_path}\n"
                                   + self.log_tail())
            if check(self):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout:g}s; log: {self.log_path}\n" + self.log_tail())

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_kb(self) -> int | None:
        """VmRSS of this process only (not its children)."""
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        return int(line.split()[1])
        except (OSError, AssertionError):
            pass
        return None

    def cpu_s(self) -> float | None:
        """user+system CPU seconds of this process only."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, AssertionError, IndexError, ValueError):
            return None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the group, SIGKILL after ``grace``; never raises."""
        p = self.popen
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait(5)


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def pin_children(pid: int, cpus: set[int]) -> list[int]:
    """Pin every thread of every child of ``pid`` to ``cpus``; returns the children."""
    kids = children(pid)
    for kid in kids:
        try:
            for tid in os.listdir(f"/proc/{kid}/task"):
                os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass
    return kids


def _jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_pair(pids: list[int]) -> tuple[int, int]:
    """CPU used so far by ``pids`` (each process itself, not its children), two ways:
    nanoseconds summed over each one's *live* threads (``/proc/PID/task/*/schedstat``:
    precise, but a thread that exited is missing) and clock ticks from
    ``/proc/PID/stat`` (utime+stime: every thread, exited ones included, but in
    1/CLK_TCK s steps). :func:`cpu_delta` picks one."""
    ns = ticks = 0
    for pid in pids:
        ticks += _jiffies(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return ns, ticks


def cpu_delta(before: tuple[int, int], after: tuple[int, int], nprocs: int) -> dict[str, Any]:
    """Seconds of CPU between two :func:`cpu_pair` readings: the schedstat figure
    when the tick figure agrees with it (within a tick per process either side and
    10 %), else the tick figure (threads came and went)."""
    ns_s = (after[0] - before[0]) / 1e9
    ticks_s = (after[1] - before[1]) / CLK_TCK
    agree = abs(ns_s - ticks_s) <= (nprocs + 1) / CLK_TCK + 0.1 * ticks_s
    return {"s": ns_s if agree else ticks_s, "schedstat_s": ns_s, "ticks_s": ticks_s,
            "method": "schedstat" if agree else "ticks"}


class CpuAccount:
    """How much CPU *other* processes used while we measured.

    ``start()``/``stop()`` around a measurement: the machine's busy jiffies
    (``/proc/stat``) minus those of our own processes (the given pids and
    their children). Returns the foreign share in % of one core."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._busy0 = 0
        self._ours0: dict[int, int] = {}

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq

    def _ours(self) -> dict[int, int]:
        pids = set(self.pids())
        for pid in list(pids):
            pids.update(children(pid))
        return {pid: _jiffies(pid) for pid in pids}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = self._busy()
        self._ours0 = self._ours()

    def stop(self) -> float:
        elapsed = time.monotonic() - self._t0
        busy = self._busy() - self._busy0
        now = self._ours()
        ours = sum(j - self._ours0.get(pid, 0) for pid, j in now.items())
        return max(0.0, 100.0 * (busy - ours) / CLK_TCK / max(elapsed, 1e-3))


class Sampler:
    """Samples VmRSS of some servers every ``interval`` s in a thread; keeps the max."""

    def __init__(self, servers: list[Server], interval: float = 0.02) -> None:
        self.servers = servers
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for s in self.servers:
                kb = s.rss_kb()
                if kb is not None and kb > self.peak.get(s.name, 0):
                    self.peak[s.name] = kb
            self._stop.wait(self.interval)


def reap_strays(marker: str) -> list[int]:
    """SIGKILL every process whose command line contains ``marker`` (the run's
    temporary directory); returns their pids."""
    killed = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


def run_meta(binary: str, seconds: float, root: Path) -> dict[str, Any]:
    """What a bench run's table header says about the machine, the binary and the checkout."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stderr.strip()
    return {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "llama_server": binary,
        "llama_server_version": version.splitlines()[0] if version else "",
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "rolemesh_node")),
    }
