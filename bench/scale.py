"""Scale: 1,000 concurrent streams and 10,000 idle keep-alive connections through one node.

Run from the repository root (about a minute; also ``python -m bench.run --scale``)::

    .venv/bin/python -m bench.scale
    .venv/bin/python -m bench.scale --streams 200 --idle 2000   # smaller
    .venv/bin/python -m bench.scale --tps 20 --tokens 60 --keep --no-pin

The children are not llama-server but :mod:`bench.fakechild` (``llama_server_bin``
is a wrapper script that runs it): the node's real code relays every byte,
while a "model" costs a few microseconds per token, so the node, not the
model, is what is measured. The client is :mod:`bench.scaleclient`, a separate
process.

1. **Streams.** A node with ``cpu_devices: 4``, ``llama_server_parallel: 250``
   (llama.cpp allows at most 256 sequences per server: ``n_seq_max must be <= 256``,
   so 1,000 streams need at least four children — the shape of a host with four big
   accelerators, each child at 250 slots) and four models, one per device. Its idle
   CPU (timers only) is measured first; then ``--streams`` concurrent streamed chat
   completions of ``--tokens`` tokens at ``--tps`` tokens/s each (connections opened
   over ``--ramp`` s), spread evenly over the four models; then the *same* with
   4 streams (one per model). For each: every stream must be complete (200, all its
   tokens, final event, ``[DONE]``), the node's CPU (``/proc/PID/task/*/schedstat``,
   ns) per token event relayed — raw, and net of its idle rate over the same time —
   and its RSS peak (``VmRSS`` sampled every 50 ms, the agent process only).
2. **Idle connections.** A fresh node (one device, one model, ``--tps 1000``) with
   ``max_client_connections`` = ``--idle`` + 64 and ``client_idle_timeout_s: 600``:
   ``--idle`` connections each send ``GET /health`` and stay open, idle. RSS before
   and after (KB per connection), the node's CPU while they sit idle for
   ``--hold`` s, the latency of ordinary requests (``GET /health`` and a chat
   completion) before and with them open; then, at the cap, ``--cap-probe`` more
   connections one after another, each of which makes the node close the idle
   connection that waited longest (``NodeSite._slowest``, a scan of every open
   connection): the node's CPU per such connection against one below the cap.
3. **fd limit.** ``RLIMIT_NOFILE``'s soft limit is raised to the hard limit before
   anything is started (children inherit it); when the hard limit is too low for
   the asked sizes, they are scaled down and the result says so.

Unless ``--no-pin`` (and with at least two CPUs), the node runs on the first CPU,
everything else (fake children, client, this process) on the others. Results:
a table (stdout, ``scale-latest.md``) and every number in ``scale-latest.json``
and ``scale-<time>.json`` under ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python bench/scale.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.scale import main as _main

    raise SystemExit(_main())

from .procs import (
    CpuAccount,
    Sampler,
    Server,
    children,
    free_port,
    http_get,
    http_post,
    pin_children,
    reap_strays,
    run_meta,
)
from .run import LoadGen, node_ready

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
MODELS = ("scale-a", "scale-b", "scale-c", "scale-d")

#: goals (issue 16)
STREAM_RSS_MB = 150.0
PER_TOKEN_RATIO = 1.5
IDLE_RSS_MB = 200.0
IDLE_CPU_PCT = 1.0

CONFIG = """\
# written by bench/scale.py: children are bench/fakechild.py
listen_host: 127.0.0.1
listen_port: {port}
node_id: scale-{name}
backend: cpu
cpu_devices: {devices}
llama_server_bin: {wrapper}
llama_server_parallel: {parallel}
llama_server_extra_args: ["--fake-tps", "{tps}"]
max_client_connections: {max_connections}
client_idle_timeout_s: {idle_timeout}
models:
{models}"""


def chat_body(model: str, tokens: int, stream: bool = True, tps: float | None = None) -> str:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    if stream:
        doc["stream"] = True
    if tps is not None:
        doc["fake_tps"] = tps  # bench/fakechild.py's own field: this request's rate
    return json.dumps(doc)


def listen_overflows() -> int | None:
    """TcpExt ListenOverflows (this network namespace, every listener): SYNs dropped for a full accept queue."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split()[1:], values.split()[1:]))["ListenOverflows"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of ``pid`` in ns (``/proc/PID/task/*/schedstat``), 0 when gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def raise_nofile() -> dict[str, Any]:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by everything started later)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's ceiling then
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = max(soft, 1 << 20)
    raised = soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        raised = target
    except (ValueError, OSError):
        pass
    return {"soft_before": soft, "hard": None if hard == resource.RLIM_INFINITY else hard, "soft": raised}




def median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


class Scale:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="rolemesh-scale-"))
        self.servers: list[Server] = []
        self.client: LoadGen | None = None
        self.notes: list[str] = []
        cores = self._cores()
        self.pin = len(cores) >= 2 and not args.no_pin
        self.node_cpus = {cores[0]} if self.pin else None
        self.other_cpus = set(cores[1:]) if self.pin else None

    @staticmethod
    def _cores() -> list[int]:
        try:  # bench.run pins itself to all CPUs but the last: this bench places its processes itself
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        except OSError:
            pass
        return sorted(os.sched_getaffinity(0))

    # ------------------------------------------------------------ set-up

    def prepare(self) -> None:
        models = self.tmp / "models"
        models.mkdir()
        for name in MODELS:  # the fake child never reads them; the node wants the files to exist
            (models / f"{name}.gguf").write_bytes(b"GGUF" + bytes(4092))
        self.wrapper = self.tmp / "llama-server"
        self.wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'bench' / 'fakechild.py'} \"$@\"\n")
        self.wrapper.chmod(0o755)
        if self.other_cpus:
            os.sched_setaffinity(0, self.other_cpus)

    def node(self, name: str, *, devices: int, parallel: int, tps: float, models: tuple[str, ...],
             max_connections: int, idle_timeout: float) -> Server:
        port = free_port()
        config = self.tmp / f"{name}.yaml"
        listing = "".join(f"  {m}:\n    path: {self.tmp / 'models' / (m + '.gguf')}\n" for m in models)
        config.write_text(CONFIG.format(port=port, name=name, devices=devices, wrapper=self.wrapper,
                                        parallel=parallel, tps=f"{tps:g}", max_connections=max_connections,
                                        idle_timeout=f"{idle_timeout:g}", models=listing), encoding="utf-8")
        # `-m` from the repository root: this checkout's node (an installed entry point may import another one)
        argv = [sys.executable, "-m", "rolemesh_node.cli", "--config", str(config)]
        server = Server(name, argv, port, self.tmp / f"{name}.log", cpus=self.node_cpus)
        self.servers.append(server)
        server.start()
        server.wait_ready(node_ready)
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        for s in list(self.servers):
            s.stop()
        strays = reap_strays(str(self.tmp))
        if strays:
            self.notes.append(f"killed {len(strays)} stray process(es) at the end: {strays}")

    def our_pids(self) -> list[int]:
        pids = [os.getpid()] + ([self.client.p.pid] if self.client else [])
        return pids + [s.pid for s in self.servers if s.popen is not None]

    def devices(self, server: Server) -> list[tuple[str, str | None, str | None]]:
        """(device, model, child state) per device, from the inventory."""
        status, raw = http_get(server.port, "/v1/node/inventory", timeout=10)
        try:
            return [(d["id"], (d.get("child") or {}).get("model"), (d.get("child") or {}).get("state"))
                    for d in json.loads(raw)["devices"]]
        except (ValueError, KeyError, TypeError):
            return []

    # ------------------------------------------------------------ phases

    def idle_rate(self, server: Server, seconds: float) -> float:
        """The node's CPU while nothing is asked of it, in ns per second."""
        c0, t0 = cpu_ns(server.pid), time.monotonic()
        time.sleep(seconds)
        return (cpu_ns(server.pid) - c0) / (time.monotonic() - t0)

    def stream_run(self, server: Server, n: int, idle_ns_per_s: float, tokens: int,
                   tps: float | None = None) -> dict[str, Any]:
        """``n`` streams of ``tokens`` tokens at once (at ``tps`` tokens/s each, default the fakes' ``--tps``)."""
        a = self.args
        assert self.client is not None
        fakes = children(server.pid)
        account = CpuAccount(self.our_pids)
        account.start()
        f0 = sum(cpu_ns(p) for p in fakes)
        lo0 = listen_overflows()
        c0 = cpu_ns(server.pid)
        with Sampler([server], interval=0.05) as sampler:
            res = self.client.run(kind="streams", port=server.port, path=CHAT, n=n, tokens=tokens,
                                  bodies=[chat_body(m, tokens, tps=tps) for m in MODELS],
                                  ramp_s=a.ramp if n > len(MODELS) else 0.0,
                                  timeout_s=a.ramp + tokens / (tps or a.tps) + 60)
        node_ns = cpu_ns(server.pid) - c0
        lo1 = listen_overflows()
        res["tps_per_stream"] = tps or a.tps
        res["tokens"] = tokens
        res["listen_overflows"] = None if lo0 is None or lo1 is None else lo1 - lo0
        res["fake_cpu_s"] = (sum(cpu_ns(p) for p in fakes) - f0) / 1e9
        res["background_cpu_pct"] = account.stop()
        res["node_cpu_s"] = node_ns / 1e9
        res["node_cpu_pct"] = 100.0 * node_ns / 1e9 / res["elapsed_s"]
        res["node_idle_share_s"] = idle_ns_per_s * res["elapsed_s"] / 1e9
        events = max(1, res["token_events"])
        res["node_us_per_token"] = node_ns / 1e3 / events
        res["node_us_per_token_net"] = max(0.0, node_ns - idle_ns_per_s * res["elapsed_s"]) / 1e3 / events
        res["node_us_per_chunk"] = node_ns / 1e3 / max(1, res["chunks"])
        res["client_us_per_token"] = res["client_cpu_s"] * 1e6 / events
        res["fake_us_per_token"] = res["fake_cpu_s"] * 1e6 / events
        res["token_events_per_s"] = res["token_events"] / res["elapsed_s"]
        buckets = res.pop("tokens_per_bucket")
        per_s = [b / res["bucket_s"] for b in buckets]
        res["token_events_per_s_peak"] = max(per_s) if per_s else 0.0
        # while every stream is under way: after the last one's first byte, before the first one ended
        lo, hi = int(res["last_first_byte_s"] / res["bucket_s"]) + 1, int(res["first_end_s"] / res["bucket_s"])
        res["token_events_per_s_steady"] = median(per_s[lo:hi]) if hi > lo else None
        res["node_rss_peak_kb"] = sampler.peak.get(server.name)
        return res

    def streams_phase(self, n: int) -> dict[str, Any]:
        a = self.args
        server = self.node("streams", devices=len(MODELS), parallel=a.parallel, tps=a.tps, models=MODELS,
                           max_connections=max(1024, n + 256), idle_timeout=120)
        assert self.client is not None
        # one short stream per model, all at once: each model takes a device of its own
        warm = self.client.run(kind="streams", port=server.port, path=CHAT, n=len(MODELS), tokens=2,
                               bodies=[chat_body(m, 2) for m in MODELS], timeout_s=60)
        if warm["complete"] != len(MODELS):
            raise RuntimeError(f"warm-up streams failed: {warm['statuses']} {warm['errors']}; log: {server.log_path}"
                               f"\n{server.log_tail()}")
        placement = self.devices(server)
        if sorted(m for _, m, _ in placement if m) != sorted(MODELS):
            self.notes.append(f"streams: models are not one per device after the warm-up: {placement}")
        if self.other_cpus:
            pin_children(server.pid, self.other_cpus)
        time.sleep(0.5)
        rss_idle = server.rss_kb()
        idle_ns_per_s = self.idle_rate(server, a.idle_measure)
        few = self.stream_run(server, len(MODELS), idle_ns_per_s, a.tokens)
        many = self.stream_run(server, n, idle_ns_per_s, a.tokens)
        # the same total token rate and time as `many`, on four connections
        scale = n / len(MODELS)
        few_fast = self.stream_run(server, len(MODELS), idle_ns_per_s, int(a.tokens * scale),
                                   tps=a.tps * scale) if a.same_rate and n > len(MODELS) else None
        # what a stream costs the node apart from its tokens: the same n streams, one token each
        setup = self.stream_run(server, n, idle_ns_per_s, 1) if a.same_rate else None
        if setup is not None:
            per_request_ns = max(0.0, setup["node_cpu_s"] * 1e9 - idle_ns_per_s * setup["elapsed_s"]) / n
            setup["node_us_per_request"] = per_request_ns / 1e3
            for r in (many, few_fast):
                if r is not None:  # the node's CPU per token once the per-stream cost (and idle) is taken out
                    rest = r["node_cpu_s"] * 1e9 - idle_ns_per_s * r["elapsed_s"] - per_request_ns * r["n"]
                    r["node_us_per_token_relay"] = max(0.0, rest) / 1e3 / max(1, r["token_events"])
        placement_after = self.devices(server)
        rss_end = server.rss_kb()
        self.stop(server)
        return {"streams": n, "placement": placement, "placement_after": placement_after,
                "node_rss_idle_kb": rss_idle, "node_rss_end_kb": rss_end,
                "node_idle_cpu_pct": idle_ns_per_s / 1e7, "few": few, "many": many, "few_fast": few_fast,
                "setup": setup}

    def latencies(self, server: Server, count: int) -> dict[str, Any]:
        health, chat = [], []
        bad = 0
        for _ in range(count):
            t = time.perf_counter()
            status, _ = http_get(server.port, "/health", timeout=10)
            health.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            status2, _ = http_post(server.port, CHAT, json.loads(chat_body(MODELS[0], 1, stream=False)), timeout=10)
            chat.append((time.perf_counter() - t) * 1000)
            bad += (status != 200) + (status2 != 200)
        return {"health_ms_p50": median(health), "health_ms_max": max(health), "chat_ms_p50": median(chat),
                "chat_ms_max": max(chat), "failed": bad, "count": count}

    def idle_phase(self, n: int) -> dict[str, Any]:
        a = self.args
        cap = n + 64
        server = self.node("idle", devices=1, parallel=4, tps=1000, models=MODELS[:1], max_connections=cap,
                           idle_timeout=600)
        assert self.client is not None
        status, raw = http_post(server.port, CHAT, json.loads(chat_body(MODELS[0], 1, stream=False)), timeout=30)
        if status != 200:
            raise RuntimeError(f"idle node: warm-up request answered {status}: {raw[:300]!r}")
        if self.other_cpus:
            pin_children(server.pid, self.other_cpus)
        before = self.latencies(server, a.latency_requests)
        time.sleep(0.5)
        rss0 = server.rss_kb() or 0
        idle_before = self.idle_rate(server, a.idle_measure) / 1e7
        c0 = cpu_ns(server.pid)
        opened = self.client.run(kind="open", port=server.port, n=n, outstanding=32, group="idle", timeout_s=120)
        open_ns = cpu_ns(server.pid) - c0
        rss1 = server.rss_kb() or 0
        time.sleep(0.5)
        account = CpuAccount(self.our_pids)
        account.start()
        c0, t0 = cpu_ns(server.pid), time.monotonic()
        time.sleep(a.hold)
        held_ns, held_s = cpu_ns(server.pid) - c0, time.monotonic() - t0
        background = account.stop()
        rss2 = server.rss_kb() or 0
        with_open = self.latencies(server, a.latency_requests)
        probe: dict[str, Any] | None = None
        if a.cap_probe:
            # fill up to the cap (these are below it), then each new connection closes the longest idle one
            fill = self.client.run(kind="open", port=server.port, n=cap - n, outstanding=32, group="fill")
            c0 = cpu_ns(server.pid)
            at_cap = self.client.run(kind="open", port=server.port, n=a.cap_probe, outstanding=1, group="at_cap")
            cap_ns = cpu_ns(server.pid) - c0
            probe = {"fill": fill, "at_cap": at_cap, "node_us_per_conn_at_cap": cap_ns / 1e3 / max(1, a.cap_probe),
                     "node_us_per_conn_below_cap": open_ns / 1e3 / max(1, opened["opened"])}
        closed = self.client.run(kind="close")
        time.sleep(0.5)
        rss3 = server.rss_kb()
        self.stop(server)
        return {"idle": n, "max_client_connections": cap, "opened": opened, "node_rss_before_kb": rss0,
                "node_rss_open_kb": rss1, "node_rss_held_kb": rss2, "node_rss_after_close_kb": rss3,
                "kb_per_conn": (rss2 - rss0) / max(1, opened["opened"]),
                "node_cpu_open_s": open_ns / 1e9, "hold_s": held_s,
                "node_idle_cpu_pct": 100.0 * held_ns / 1e9 / held_s, "node_idle_cpu_ms": held_ns / 1e6,
                "node_idle_cpu_pct_before": idle_before,
                "background_cpu_pct": background,
                "latency_before": before, "latency_with_open": with_open, "cap_probe": probe, "closed": closed}

    def run(self) -> dict[str, Any]:
        a = self.args
        t_start = time.monotonic()
        limits = raise_nofile()
        soft = limits["soft"]
        streams, idle = a.streams, a.idle
        if streams and 2 * streams + 200 > soft:  # the node holds a client and an upstream socket per stream
            streams = max(len(MODELS), (soft - 200) // 2)
            self.notes.append(f"RLIMIT_NOFILE {soft}: streams scaled down from {a.streams} to {streams}")
        extra = 64 + a.cap_probe + 200  # the fill up to the cap, the probe, the node's own
        if idle and idle + extra > soft:
            idle = max(1, soft - extra)
            self.notes.append(f"RLIMIT_NOFILE {soft}: idle connections scaled down from {a.idle} to {idle}")
        self.prepare()
        # the client process (bench.scaleclient): one JSON job in, one JSON result out
        self.client = LoadGen("bench.scaleclient", "the scale client", self.other_cpus, quit_wait_s=10)
        out: dict[str, Any] = {"nofile": limits}
        if streams:
            out["streams"] = self.streams_phase(streams)
        if idle:
            out["idle"] = self.idle_phase(idle)
        meta = run_meta(str(self.wrapper), time.monotonic() - t_start, ROOT)
        meta["args"] = {k: v for k, v in vars(a).items() if k != "out"}
        meta["pinned"] = {"node": sorted(self.node_cpus), "other": sorted(self.other_cpus)} if self.pin else None
        out["meta"] = meta
        out["notes"] = self.notes
        return out


# ------------------------------------------------------------------- table


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def verdicts(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    rows = []
    s = result.get("streams")
    if s:
        many, few = s["many"], s["few"]
        rows.append((f"{s['streams']:,} streams complete, no errors",
                     f"{many['complete']:,} complete, {many['error_count']} errors", "all, 0",
                     many["complete"] == s["streams"] and not many["error_count"]))
        rss = (many["node_rss_peak_kb"] or 0) / 1024
        rows.append(("node RSS peak under the streams", f"{rss:.1f} MB", f"≤ {STREAM_RSS_MB:g} MB",
                     0 < rss <= STREAM_RSS_MB))
        key = "node_us_per_token_net"
        r = many[key] / few[key] if few[key] else None
        rows.append((f"node CPU per token, {s['streams']:,} streams vs 4 (same tokens and rate each, net of idle)",
                     f"{many[key]:.1f} vs {few[key]:.1f} µs" + (f" ({r:.2f}×)" if r else ""),
                     f"≤ {PER_TOKEN_RATIO:g}×", r is not None and r <= PER_TOKEN_RATIO))
    i = result.get("idle")
    if i:
        rss = i["node_rss_held_kb"] / 1024
        rows.append((f"node RSS with {i['opened']['opened']:,} idle connections", f"{rss:.1f} MB",
                     f"≤ {IDLE_RSS_MB:g} MB", rss <= IDLE_RSS_MB))
        rows.append(("node CPU while they sit idle", f"{i['node_idle_cpu_pct']:.2f} % of a core "
                     f"(without them: {i['node_idle_cpu_pct_before']:.2f} %)",
                     f"≈ 0 (≤ {IDLE_CPU_PCT:g} %)", i["node_idle_cpu_pct"] <= IDLE_CPU_PCT))
        lb, lw = i["latency_before"], i["latency_with_open"]
        rows.append(("ordinary requests with them open (p50: /health, chat)",
                     f"{lw['health_ms_p50']:.2f}, {lw['chat_ms_p50']:.2f} ms "
                     f"(before: {lb['health_ms_p50']:.2f}, {lb['chat_ms_p50']:.2f})", "served, promptly",
                     not lw["failed"] and lw["chat_ms_p50"] <= 2 * lb["chat_ms_p50"] + 5))
    return rows


def render(result: dict[str, Any]) -> str:
    m = result["meta"]
    nf = result["nofile"]
    lines = [f"Scale run {m['when']} · {m['cpu']} ({m['cores']} cores) · commit {m['git_commit']}"
             f"{' + local changes' if m['git_dirty'] else ''} · "
             + (f"node pinned to CPU {m['pinned']['node']}, the rest to {m['pinned']['other']}" if m["pinned"]
                else "not pinned")
             + f" · RLIMIT_NOFILE {nf['soft_before']} → {nf['soft']} (hard {nf['hard']})", ""]
    s = result.get("streams")
    if s:
        a = m["args"]
        lines += [f"Streams: chat completions of {a['tokens']} tokens at {a['tps']:g} tokens/s each from fake "
                  f"children ({len(MODELS)} devices × llama_server_parallel {a['parallel']}, one model each), "
                  f"connections opened over {a['ramp']:g} s. The node idle: {s['node_idle_cpu_pct']:.2f} % of a core, "
                  f"RSS {(s['node_rss_idle_kb'] or 0) / 1024:.1f} MB. \"other\": CPU of other processes on the "
                  "machine meanwhile, in % of a core.", "",
                  "| streams × tokens @ tokens/s | complete | errors | token events/s steady (all) | "
                  "streaming at once | "
                  "node CPU | node µs/token (net of idle) | node µs/chunk | node RSS peak | connect > 0.5 s | "
                  "first byte p50 / p99 | end p99 | client / fake µs/token | other |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in ("few", "many", "few_fast", "setup"):
            r = s.get(key)
            if r is None:
                continue
            lines.append(
                f"| {r['n']:,} × {r['tokens']:,} @ {r['tps_per_stream']:g} | {r['complete']:,} | {r['error_count']} | "
                f"{_f(r['token_events_per_s_steady'], 0)} ({r['token_events_per_s']:,.0f}) | "
                f"{r['peak_streaming']:,} | {r['node_cpu_pct']:.0f} % | "
                f"{r['node_us_per_token']:.1f} ({r['node_us_per_token_net']:.1f}) | {r['node_us_per_chunk']:.1f} | "
                f"{(r['node_rss_peak_kb'] or 0) / 1024:.1f} MB | {r['slow_connects']} | "
                f"{_f(r['first_byte_ms']['p50'])} / {_f(r['first_byte_ms']['p99'])} ms | "
                f"{_f(r['stream_ms']['p99'], 0)} ms | {r['client_us_per_token']:.1f} / {r['fake_us_per_token']:.1f} | "
                f"{r['background_cpu_pct']:.0f} % |")
        if s.get("setup"):
            relay = [f"{s[k]['n']:,} streams {s[k]['node_us_per_token_relay']:.1f} µs" for k in ("many", "few_fast")
                     if s.get(k) and "node_us_per_token_relay" in s[k]]
            lines += ["", f"Rows: 4 streams and {s['streams']:,} streams alike (the comparison the target asks for); "
                      f"4 streams carrying the {s['streams']:,} streams' total token rate (each upstream read "
                      "then brings many tokens: the floor of the per-token cost, not a like-for-like figure); "
                      f"the {s['streams']:,} streams with one token each (what a stream costs apart from its "
                      f"tokens: {s['setup']['node_us_per_request']:,.0f} µs of node CPU — a client connection and "
                      "an upstream one, the request, its end). Taking that and the idle rate out, the node's CPU "
                      f"per token relayed: {', '.join(relay)}."]
        lo = s["many"].get("listen_overflows")
        if lo:
            lines += ["", f"Listen queue overflows (TcpExt ListenOverflows, the whole namespace) during the "
                      f"{s['streams']:,} streams: {lo}."]
        lines.append("")
    i = result.get("idle")
    if i:
        o = i["opened"]
        lines += [f"Idle: {o['opened']:,} of {o['n']:,} connections opened in {o['elapsed_s']:.1f} s "
                  f"({o['failed']} failed, at most 32 unanswered at once), max_client_connections "
                  f"{i['max_client_connections']:,}, client_idle_timeout_s 600.", "",
                  "| node RSS before | with them open | per connection | after closing | node CPU idle: without → "
                  f"with them ({i['hold_s']:.0f} s) | /health p50 before → with | chat p50 before → with | "
                  "still open at the end |",
                  "|---|---|---|---|---|---|---|---|"]
        lb, lw = i["latency_before"], i["latency_with_open"]
        still = i["closed"].get("idle", {})
        lines.append(f"| {i['node_rss_before_kb'] / 1024:.1f} MB | {i['node_rss_held_kb'] / 1024:.1f} MB | "
                     f"{i['kb_per_conn']:.1f} KB | {(i['node_rss_after_close_kb'] or 0) / 1024:.1f} MB | "
                     f"{i['node_idle_cpu_pct_before']:.2f} → {i['node_idle_cpu_pct']:.2f} % | "
                     f"{lb['health_ms_p50']:.2f} → {lw['health_ms_p50']:.2f} ms | "
                     f"{lb['chat_ms_p50']:.2f} → {lw['chat_ms_p50']:.2f} ms | "
                     f"{still.get('still_open', 0):,} (closed by the node: {still.get('closed_by_server', 0)}) |")
        p = i.get("cap_probe")
        if p:
            lines += ["", f"At the cap ({i['max_client_connections']:,} open): {p['at_cap']['opened']} more "
                      "connections, one after another, each making the node close the idle one that waited longest "
                      f"— node CPU {p['node_us_per_conn_at_cap']:,.0f} µs per new connection (below the cap: "
                      f"{p['node_us_per_conn_below_cap']:,.0f} µs); their /health p50 "
                      f"{_f(p['at_cap']['latency_ms']['p50'], 2)} ms, max {_f(p['at_cap']['latency_ms']['max'], 1)} "
                      f"ms; idle connections closed by the node: {still.get('closed_by_server', 0)}."]
        lines.append("")
    lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
    for name, shown, goal, ok in verdicts(result):
        lines.append(f"| {name} | {shown} | {goal} | {'yes' if ok else '**no**'} |")
    if result["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams (default 1000; 0: skip)")
    p.add_argument("--tokens", type=int, default=60, help="tokens per stream (default 60)")
    p.add_argument("--tps", type=float, default=10.0,
                   help="tokens/s per stream from the fake children (default 10: 1,000 streams offer 10,000 token "
                        "events/s, what two cores carry with the node, fakes and client on them)")
    p.add_argument("--ramp", type=float, default=1.5, help="seconds over which the streams' connections open")
    p.add_argument("--parallel", type=int, default=250, help="llama_server_parallel of the stream node (default 250)")
    p.add_argument("--idle", type=int, default=10000, help="idle keep-alive connections (default 10000; 0: skip)")
    p.add_argument("--hold", type=float, default=5.0, help="seconds the idle connections are held while measured")
    p.add_argument("--cap-probe", type=int, default=200,
                   help="connections opened one by one at the cap, each closing an idle one (default 200; 0: skip)")
    p.add_argument("--latency-requests", type=int, default=20, help="ordinary requests timed before/with idle open")
    p.add_argument("--idle-measure", type=float, default=3.0,
                   help="seconds a node's idle CPU is measured (the stream node; the idle node before connections)")
    p.add_argument("--no-same-rate", dest="same_rate", action="store_false",
                   help="skip the third stream run: 4 streams at the 1,000 streams' total token rate")
    p.add_argument("--no-pin", action="store_true", help="do not pin the node to the first CPU and the rest "
                                                         "(fake children, client) to the others")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON and markdown")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, node logs)")
    return p.parse_args(argv)


def run_scale(argv: list[str] | None = None, no_pin: bool = False) -> dict[str, Any]:
    """Run the scale bench (for ``bench.run --scale``); the result, with ``table_md``."""
    args = parse(argv)
    args.no_pin = args.no_pin or no_pin
    scale = Scale(args)
    affinity = os.sched_getaffinity(0)
    try:
        result = scale.run()
    except BaseException:
        print(f"scale bench failed; configs and logs are kept in {scale.tmp}", file=sys.stderr)
        raise
    finally:
        scale.stop_all()
        try:
            os.sched_setaffinity(0, affinity)
        except OSError:
            pass
    result["table_md"] = render(result)
    if not args.keep:
        shutil.rmtree(scale.tmp, ignore_errors=True)
    else:
        result["meta"]["tmp"] = str(scale.tmp)
    return result


def main(argv: list[str] | None = None) -> int:
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    args = parse(argv)
    result = run_scale(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, separators=(",", ":"))
    (out / f"scale-{stamp}.json").write_text(text, encoding="utf-8")
    (out / "scale-latest.json").write_text(text, encoding="utf-8")
    (out / "scale-latest.md").write_text(result["table_md"], encoding="utf-8")
    print(result["table_md"])
    print(f"raw numbers: {out / f'scale-{stamp}.json'}" + (f"; configs and logs: {result['meta']['tmp']}"
                                                             if args.keep else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
