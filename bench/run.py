"""The node's cost, measured against direct llama-server and its router mode.

One command (from the repository root)::

    .venv/bin/python -m bench.run            # about 3½ minutes: 5 repeats of 2-second loops
    .venv/bin/python -m bench.run --quick    # about 75 seconds: 2 repeats of 1-second loops
    .venv/bin/python -m bench.run --out DIR  # where the JSON/markdown go (default bench/results)

In one run, on loopback, it starts

* ``direct``  — a real ``llama-server`` with the tiny model and the flags the node
  gives its own child (``-np 1 --no-webui -c 512 --threads T -ngl 0 --alias tiny-a``);
* ``router``  — the same binary in router mode (``--models-dir D --models-max 1``
  with the same flags, forwarded to its children);
* ``floor``   — :mod:`bench.floor`, a bare twisted.web + ``Agent`` relay (nothing of
  ours: the least a Twisted proxy can cost) in front of a llama-server of its own
  started like direct;
* ``node``    — ``rolemesh-node-agent --config C`` (backend cpu, the default config
  except ``max_pending_requests_per_device: 8`` so four clients are not refused,
  and ``node_id``), a real subprocess in front of a child of its own;
* node *variants* (``--variants``; by default ``noaccesslog,serial``): the same node
  with a config change and/or prototype patches applied at start
  (:mod:`bench.patches`);

and drives all of them with the same load generator (:mod:`bench.loadgen`, a
separate process): latency p50/p90/p99 and requests/s with 1 and 4 clients
(non-streaming, 1 token), first byte and end of a 16-token stream, model swap
latency (requests alternating between two models; not for direct and the floor,
which have one), agent RSS idle and under load, and — on a second node configured
with ``max_pending_requests_per_device: 1`` and a long request in flight — how
fast an overload 429 comes back. Then the relay phase (``--relay-streams`` C,
``--relay-tokens`` M; ``--no-relay`` skips it): direct, router, floor and node in
front of model servers with ``-np C``, started for this phase only, each driven
with C concurrent ``ignore_eos`` streams of M tokens; per target the SSE events
("chunks") the clients received per second and the proxy process's CPU per chunk.

Unless ``--no-pin``, the model servers run on the last CPU and everything else
on the others; every llama-server gets ``--threads 1`` (``--threads``). Repeats
are interleaved (the target order rotates each repeat); every figure in the
table is the median over repeats of that repeat's figure. A measurement during
which other processes used the CPU is run again (bounded). Output: a table
with the ratios node/direct, node/router and node/floor (stdout and ``latest.md``) and a
JSON file with every raw number (``bench-<time>.json`` and ``latest.json``),
and the targets of issue 16 (node against router, with the floor rule) and of
issue 7.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.run import main as _main

    raise SystemExit(_main())

from . import procs
from .procs import CpuAccount, Sampler, Server, free_port, http_get, http_post, pin_children, reap_strays, run_meta

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
#: the four targets the issue-16 figures compare (variants are node+NAME)
BASE_TARGETS = ("direct", "router", "floor", "node")
#: SSE events per relayed stream of M tokens from llama-server (b11434): one per token, one
#: last event (finish_reason, usage, timings) and ``data: [DONE]``
RELAY_EXTRA_EVENTS = 2


def body(model: str, max_tokens: int, stream: bool = False) -> str:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": max_tokens}
    if stream:
        doc["stream"] = True
    return json.dumps(doc)


def relay_body(max_tokens: int) -> str:
    """A streamed completion that yields exactly ``max_tokens`` tokens (no early end-of-sequence)."""
    return json.dumps({"model": "tiny-a", "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True})


# ----------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


class LoadGen:
    """A load-generating process (by default :mod:`bench.loadgen`): one JSON job in, one JSON result out."""

    def __init__(self, module: str = "bench.loadgen", what: str = "the load generator",
                 cpus: set[int] | None = None, quit_wait_s: float = 5) -> None:
        self.what = what
        self.quit_wait_s = quit_wait_s
        self.p = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True,
                                  preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def run(self, **job: Any) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps(job) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.what} died")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{self.what}: {out['error']}")
        return out

    def close(self) -> None:
        try:
            assert self.p.stdin is not None
            self.p.stdin.write('{"kind": "quit"}\n')
            self.p.stdin.close()
            self.p.wait(self.quit_wait_s)
        except Exception:
            self.p.kill()


def llama_server_bin() -> str:
    from rolemesh_node.llama_server import find_llama_server

    return find_llama_server(os.environ.get("LLAMA_SERVER_BIN"))


NODE_CONFIG = """\
# written by bench/run.py: the defaults, except the pending bound (4 clients) and a fixed node id
listen_host: 127.0.0.1
listen_port: {port}
node_id: bench-{node_id}
backend: cpu
cpu_devices: 1
llama_server_probe_interval_s: 0.5
max_pending_requests_per_device: {max_pending}
{extra}models:
  tiny-a:
    path: {models}/tiny-a.gguf
    ctx_size: {ctx}
  tiny-b:
    path: {models}/tiny-b.gguf
    ctx_size: {ctx}
"""


def node_ready(s: Server) -> bool:
    status, raw = http_get(s.port, "/health")
    if status != 200:
        return False
    try:
        return bool(json.loads(raw).get("discovered"))
    except ValueError:
        return False


def health_ok(s: Server) -> bool:
    return http_get(s.port, "/health")[0] == 200


# ------------------------------------------------------------------ the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="rolemesh-bench-"))
        self.models = self.tmp / "models"
        self.servers: dict[str, Server] = {}
        self.extra: list[Server] = []
        self.loadgen: LoadGen | None = None
        self.raw: dict[str, Any] = {}
        self.notes: list[str] = []
        self.retried = 0
        self.retry_time_s = 0.0
        self.budget_noted = False

    # ------------------------------------------------------------- set-up

    def make_models(self) -> None:
        from rolemesh_node.tinymodel import write_tiny_model

        self.models.mkdir()
        for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
            write_tiny_model(self.models / f"{name}.gguf", seed=seed, name=name)

    def child_flags(self, ctx: int = 512, parallel: int = 1) -> list[str]:
        return ["-np", str(parallel), "--no-webui", "-c", str(ctx), "--threads", str(self.args.threads), "-ngl", "0"]

    def direct_server(self, name: str, ctx: int = 512, parallel: int = 1) -> Server:
        """A plain llama-server with tiny-a on the model CPUs (direct, and the floor's upstream)."""
        p = free_port()
        return Server(name, [self.binary, "--host", "127.0.0.1", "--port", str(p), "-m",
                             str(self.models / "tiny-a.gguf"), "--alias", "tiny-a",
                             *self.child_flags(ctx, parallel)], p, self.tmp / f"{name}.log",
                      cpus=self.args.model_cpus)

    def router_server(self, name: str, ctx: int = 512, parallel: int = 1) -> Server:
        """llama-server's router mode: the process is the proxy (the node's peer), on the proxy CPUs; it
        forwards its flags (-np and -c included) to its children, which are pinned after warm-up."""
        p = free_port()
        return Server(name, [self.binary, "--host", "127.0.0.1", "--port", str(p), "--models-dir",
                             str(self.models), "--models-max", "1", *self.child_flags(ctx, parallel)], p,
                      self.tmp / f"{name}.log", cpus=self.args.proxy_cpus)

    def floor_servers(self, name: str, ctx: int = 512, parallel: int = 1) -> tuple[Server, Server]:
        """The floor (bench/floor.py, on the proxy CPUs) and the llama-server it fronts (model CPUs)."""
        upstream = self.direct_server(f"{name}-upstream", ctx, parallel)
        p = free_port()
        floor = Server(name, [sys.executable, "-m", "bench.floor", "--port", str(p), "--upstream-port",
                              str(upstream.port)], p, self.tmp / f"{name}.log", cpus=self.args.proxy_cpus)
        return floor, upstream

    def node_server(self, name: str, variant: dict[str, Any] | None = None, max_pending: int = 8,
                    ctx: int = 512, parallel: int = 1) -> Server:
        variant = variant or {}
        port = free_port()
        child_args: list[str] = []
        node_threads = max(1, os.cpu_count() or 1)  # what the cpu backend passes with cpu_devices: 1
        if self.args.threads != node_threads:
            # the node's child gets the same --threads as direct and router (the last one wins)
            child_args += ["--threads", str(self.args.threads)]
        child_args += variant.get("child_args", [])
        extra = "" if parallel == 1 else f"llama_server_parallel: {parallel}\n"
        if child_args:
            extra += f"llama_server_extra_args: {json.dumps(child_args)}\n"
        for key, value in variant.get("config", {}).items():
            extra += f"{key}: {json.dumps(value)}\n"
        config = self.tmp / f"{name}.yaml"
        config.write_text(NODE_CONFIG.format(port=port, node_id=name.replace("+", "-"), max_pending=max_pending,
                                             extra=extra, models=self.models, ctx=ctx), encoding="utf-8")
        patches = variant.get("patches")
        if patches:
            argv = [sys.executable, "-m", "bench.node_variant", "--patches", ",".join(patches),
                    "--config", str(config)]
        else:
            agent = Path(sys.executable).with_name("rolemesh-node-agent")
            argv = ([str(agent)] if agent.exists() else [sys.executable, "-m", "rolemesh_node.cli"]) + [
                "--config", str(config)]
        return Server(name, argv, port, self.tmp / f"{name}.log", cpus=self.args.proxy_cpus)

    def start_all(self) -> None:
        self.binary = llama_server_bin()
        self.servers["direct"] = self.direct_server("direct")
        self.servers["router"] = self.router_server("router")
        self.servers["floor"], upstream = self.floor_servers("floor")
        self.extra.append(upstream)
        upstream.start()
        self.servers["node"] = self.node_server("node")
        from .patches import VARIANTS

        for variant in self.args.variants:
            self.servers[f"node+{variant}"] = self.node_server(f"node+{variant}", VARIANTS[variant])
        for s in self.servers.values():
            s.start()
        for s in self.servers.values():
            s.wait_ready(node_ready if s.name.startswith("node") else health_ok)
        self.loadgen = LoadGen()
        if self.args.proxy_cpus:
            os.sched_setaffinity(self.loadgen.p.pid, self.args.proxy_cpus)
        self.account = CpuAccount(self.our_pids)

    def our_pids(self) -> list[int]:
        pids = [os.getpid()] + ([self.loadgen.p.pid] if self.loadgen else [])
        return pids + [s.pid for s in list(self.servers.values()) + self.extra if s.popen is not None]

    def pin_model_servers(self, server: Server) -> None:
        """The children of a node or of the router (the model servers) go to the model CPUs."""
        if self.args.model_cpus:
            pin_children(server.pid, self.args.model_cpus)

    def stop_all(self) -> None:
        if self.loadgen is not None:
            self.loadgen.close()
        for s in list(self.servers.values()) + self.extra:
            s.stop()
        strays = reap_strays(str(self.tmp))
        if strays:
            self.notes.append(f"killed {len(strays)} stray process(es) at the end: {strays}")

    # ---------------------------------------------------------- measuring

    def job(self, target: str, **job: Any) -> dict[str, Any]:
        assert self.loadgen is not None
        return self.loadgen.run(kind="closed", port=self.servers[target].port, **job)

    def guarded(self, what: str, run: Any) -> dict[str, Any]:
        """Run one measurement; on a shared machine, run it again (at most
        ``--retries`` times) when other processes used more than
        ``--max-background`` % of a core meanwhile, and keep the least disturbed."""
        best: dict[str, Any] | None = None
        for attempt in range(self.args.retries + 1):
            started = time.monotonic()
            self.account.start()
            res = run()
            res["background_cpu_pct"] = self.account.stop()
            res["attempt"] = attempt
            if best is None or res["background_cpu_pct"] < best["background_cpu_pct"]:
                best = res
            if res["background_cpu_pct"] <= self.args.max_background or attempt == self.args.retries:
                break
            if self.retry_time_s > self.args.retry_budget_s:  # bounded: the run must end in minutes
                if not self.budget_noted:
                    self.budget_noted = True
                    self.notes.append(f"retry budget ({self.args.retry_budget_s:g} s) used up at {what}: "
                                      "later disturbed measurements were kept as they were")
                break
            self.retried += 1
            time.sleep(0.5)
            self.retry_time_s += time.monotonic() - started + 0.5
        assert best is not None
        return best

    def check(self, target: str, what: str, res: dict[str, Any], expect: str = "200") -> None:
        bad = {k: v for k, v in res["statuses"].items() if k != expect}
        if bad or res["errors"]:
            self.notes.append(f"{target} {what}: statuses {res['statuses']}, errors {res['errors']}")

    def warm(self, target: str) -> None:
        a = self.args
        for model in (["tiny-a"] if target in ("direct", "floor") else ["tiny-b", "tiny-a"]):
            status, raw = http_post(self.servers[target].port, CHAT, json.loads(body(model, 1)), timeout=60)
            if status != 200:
                raise RuntimeError(f"{target}: warm-up request for {model} answered {status}: {raw[:300]!r}")
        self.job(target, path=CHAT, bodies=[body("tiny-a", 1)], conns=1, max_requests=2000,
                 max_seconds=a.warmup_s)
        self.job(target, path=CHAT, bodies=[body("tiny-a", 1)], conns=4, max_requests=2000,
                 max_seconds=a.warmup_s / 2)
        self.job(target, path=CHAT, bodies=[body("tiny-a", 16, stream=True)], conns=1, max_requests=5,
                 max_seconds=2)

    def measure_load(self, target: str, rep: int) -> dict[str, Any]:
        a = self.args
        s = self.servers[target]
        out: dict[str, Any] = {}
        jobs = {
            "c1": dict(bodies=[body("tiny-a", 1)], conns=1, max_requests=a.max_requests, max_seconds=a.seconds),
            "c4": dict(bodies=[body("tiny-a", 1)], conns=4, max_requests=a.max_requests, max_seconds=a.seconds),
            "stream": dict(bodies=[body("tiny-a", 16, stream=True)], conns=1, max_requests=a.stream_requests,
                           max_seconds=a.seconds * 2),
        }
        def one(job: dict[str, Any]) -> dict[str, Any]:
            cpu0 = procs.cpu_pair([s.pid])
            res = self.job(target, path=CHAT, **job)
            # ns from schedstat where it agrees with the 10 ms ticks (not for the router: its per-request threads)
            res["own_cpu"] = cpu = procs.cpu_delta(cpu0, procs.cpu_pair([s.pid]), 1)
            res["own_cpu_per_req_us"] = cpu["s"] / res["n"] * 1e6 if res["n"] else None
            return res

        with Sampler([s]) as sampler:
            for key, job in jobs.items():
                res = self.guarded(f"{target} {key}", lambda job=job: one(job))
                self.check(target, key, res)
                out[key] = res
        out["rss_peak_kb"] = sampler.peak.get(s.name)
        return out

    def measure_swap(self, target: str) -> dict[str, Any]:
        a = self.args
        # tiny-a is loaded: alternating B, A, B, ... makes every request a swap
        res = self.guarded(f"{target} swap", lambda: self.job(
            target, path=CHAT, bodies=[body("tiny-b", 1), body("tiny-a", 1)], conns=1,
            max_requests=a.swap_requests, max_seconds=a.seconds * 4))
        self.check(target, "swap", res)
        return res

    def measure_overload(self) -> list[dict[str, Any]]:
        """A node with max_pending 1 and a long request in flight: time the 429s."""
        a = self.args
        s = self.node_server("node-overload", max_pending=1, ctx=4096)
        self.extra.append(s)
        s.start()
        s.wait_ready(node_ready)
        status, raw = http_post(s.port, CHAT, json.loads(body("tiny-a", 1)), timeout=60)
        if status != 200:
            raise RuntimeError(f"node-overload warm-up answered {status}: {raw[:300]!r}")
        self.pin_model_servers(s)
        slow = json.dumps({"model": "tiny-a", "prompt": "hi", "max_tokens": 3500, "ignore_eos": True})
        assert self.loadgen is not None
        runs = []
        loadgen = self.loadgen
        for _ in range(a.repeats):
            res = self.guarded("overload", lambda: loadgen.run(
                kind="closed", port=s.port, path=CHAT, bodies=[body("tiny-a", 1)], conns=1,
                max_requests=a.overload_requests, max_seconds=a.seconds, slow_path="/v1/completions",
                slow_body=slow, settle_s=0.3, expect_status=429))
            self.check("node-overload", "429s", res, expect="429")
            runs.append(res)
        self.raw["node-overload"] = {"runs": runs, "rss_kb": s.rss_kb()}
        s.stop()
        return runs

    # ------------------------------------------------------- relay capacity

    def relay_job(self, port: int, tokens: int) -> dict[str, Any]:
        """C concurrent streams of ``tokens`` tokens each, one per connection, events counted."""
        assert self.loadgen is not None
        c = self.args.relay_streams
        return self.loadgen.run(kind="closed", port=port, path=COMPLETIONS, bodies=[relay_body(tokens)], conns=c,
                                max_requests=c, max_seconds=120, count_events=True)

    def measure_relay(self) -> dict[str, list[dict[str, Any]]]:
        """Relay capacity: C concurrent streams × M tokens through direct, router, floor and node, each in
        front of model servers with C slots (-np C; started for this phase only and stopped after it).
        Per measurement: SSE events received, elapsed, and the CPU of the proxy process itself (none for
        direct) and of the model server(s) behind it."""
        a = self.args
        c, m = a.relay_streams, a.relay_tokens
        ctx = c * (m + 64)  # every slot holds the prompt and m tokens
        servers: dict[str, Server] = {"direct": self.direct_server("relay-direct", ctx, c),
                                      "router": self.router_server("relay-router", ctx, c)}
        servers["floor"], upstream = self.floor_servers("relay-floor", ctx, c)
        servers["node"] = self.node_server("relay-node", max_pending=2 * c + 4, ctx=ctx, parallel=c)
        started = [*servers.values(), upstream]
        self.extra += started
        self.retry_time_s, self.budget_noted = 0.0, False  # this phase has a retry budget of its own
        try:
            for s in started:
                s.start()
            for t, s in servers.items():
                s.wait_ready(node_ready if t == "node" else health_ok)
            for t, s in servers.items():
                status, raw = http_post(s.port, COMPLETIONS, {"model": "tiny-a", "prompt": "hi", "max_tokens": 1},
                                        timeout=60)
                if status != 200:
                    raise RuntimeError(f"relay {t}: warm-up answered {status}: {raw[:300]!r}")
                if t in ("router", "node"):
                    self.pin_model_servers(s)
                self.relay_job(s.port, min(m, 64))  # every slot once
            model_pids = {"direct": lambda: [servers["direct"].pid], "floor": lambda: [upstream.pid],
                          "router": lambda: procs.children(servers["router"].pid),
                          "node": lambda: procs.children(servers["node"].pid)}
            loadgen_pid = self.loadgen.p.pid if self.loadgen else 0

            def argv(pid: int) -> list[str]:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        return fh.read().decode(errors="replace").split("\0")[:-1]
                except OSError:
                    return []

            model_argv = {t: [argv(pid) for pid in pids()] for t, pids in model_pids.items()}

            def one(t: str) -> dict[str, Any]:
                proxy = [] if t == "direct" else [servers[t].pid]
                model = model_pids[t]()
                p0, m0, l0 = procs.cpu_pair(proxy), procs.cpu_pair(model), procs.cpu_pair([loadgen_pid])
                res = self.relay_job(servers[t].port, m)
                p1, m1, l1 = procs.cpu_pair(proxy), procs.cpu_pair(model), procs.cpu_pair([loadgen_pid])
                res["proxy_cpu"] = None if not proxy else procs.cpu_delta(p0, p1, 1)
                res["model_cpu"] = procs.cpu_delta(m0, m1, len(model))
                res["loadgen_cpu"] = procs.cpu_delta(l0, l1, 1)
                res["model_pids"] = model
                return res

            targets = list(servers)
            runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
            for rep in range(a.repeats):
                for t in targets[rep % len(targets):] + targets[:rep % len(targets)]:
                    res = self.guarded(f"relay {t}", lambda t=t: one(t))
                    self.check(f"relay {t}", "streams", res)
                    expected = m + RELAY_EXTRA_EVENTS
                    res["events_expected"] = c * expected
                    if res["n"] != c or any(e != expected for e in res["events"]):
                        self.notes.append(f"relay {t}: {res['n']} of {c} streams complete, SSE events per stream "
                                          f"{res['events']} (expected {expected} each)")
                    runs[t].append(res)
            self.raw["relay"] = {"streams": c, "tokens": m, "ctx": ctx,
                                 "expected_events_per_stream": m + RELAY_EXTRA_EVENTS, "model_server_argv": model_argv,
                                 "idle_rss_kb": {t: s.rss_kb() for t, s in servers.items()}, "runs": runs}
            return runs
        finally:
            for s in started:
                s.stop()

    def run(self) -> dict[str, Any]:
        a = self.args
        t_start = time.monotonic()
        self.make_models()
        self.start_all()
        targets = list(self.servers)
        for t in targets:
            self.warm(t)
            if t not in ("direct", "floor"):  # those two were started on the model CPUs
                self.pin_model_servers(self.servers[t])
        time.sleep(1.0)
        idle = {t: self.servers[t].rss_kb() for t in targets}
        loads: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
        for rep in range(a.repeats):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            for t in order:
                loads[t].append(self.measure_load(t, rep))
        # one model behind direct and the floor: no swap
        swaps: dict[str, list[dict[str, Any]]] = {t: [] for t in targets if t not in ("direct", "floor")}
        for rep in range(a.repeats):
            for t in list(swaps)[rep % len(swaps):] + list(swaps)[:rep % len(swaps)]:
                swaps[t].append(self.measure_swap(t))
        end_rss = {t: self.servers[t].rss_kb() for t in targets}
        switch_log = {t: self.last_switch(t) for t in targets if t.startswith("node")}
        overload = self.measure_overload()
        relay = self.measure_relay() if a.relay_streams > 0 else {}
        self.raw.update({"idle_rss_kb": idle, "end_rss_kb": end_rss, "load": loads, "swap": swaps,
                         "node_last_switch_s": switch_log})
        summary = self.summarize(targets, idle, loads, swaps, overload, relay)
        background = [r[k]["background_cpu_pct"] for t in targets for r in loads[t] for k in ("c1", "c4", "stream")]
        background += [r["background_cpu_pct"] for t in swaps for r in swaps[t]]
        background += [r["background_cpu_pct"] for r in overload]
        background += [r["background_cpu_pct"] for t in relay for r in relay[t]]
        meta = self.meta(time.monotonic() - t_start)
        meta["background_cpu_pct"] = {"median": median(background), "max": max(background),
                                      "retried_jobs": self.retried,
                                      "note": "CPU used by processes other than the bench's own during the "
                                              "measurements (the kept attempts), in % of one core"}
        issue7 = [{"issue": 7, "target": name, "measured": shown, "goal": goal, "met": ok}
                  for name, shown, goal, ok in targets_verdicts(summary)]
        return {
            "meta": meta,
            "summary": summary,
            "targets": {"issue16": issue16_targets(summary), "issue7": issue7},
            "raw": self.raw,
            "notes": self.notes,
        }

    def last_switch(self, target: str) -> Any:
        status, raw = http_get(self.servers[target].port, "/v1/node/inventory")
        try:
            return [d["child"]["last_switch_s"] for d in json.loads(raw)["devices"]]
        except (ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------ results

    def summarize(self, targets: list[str], idle: dict[str, Any], loads: dict[str, Any], swaps: dict[str, Any],
                  overload: list[dict[str, Any]], relay: dict[str, list[dict[str, Any]]] | None = None
                  ) -> dict[str, dict[str, float | None]]:
        ms = 1 / 1000
        out: dict[str, dict[str, float | None]] = {}
        for t in targets:
            reps = loads[t]
            f: dict[str, float | None] = {}
            for c in ("c1", "c4"):
                for q in (50, 90, 99):
                    f[f"{c}_p{q}_ms"] = median([pct(r[c]["lat_us"], q) * ms for r in reps if r[c]["n"]])
                f[f"{c}_rps"] = median([r[c]["n"] / r[c]["elapsed_s"] for r in reps])
            f["stream_first_byte_p50_ms"] = median([pct(r["stream"]["first_byte_us"], 50) * ms for r in reps])
            f["stream_first_byte_p90_ms"] = median([pct(r["stream"]["first_byte_us"], 90) * ms for r in reps])
            f["stream_end_p50_ms"] = median([pct(r["stream"]["lat_us"], 50) * ms for r in reps])
            if t in swaps:
                f["swap_p50_ms"] = median([pct(r["lat_us"], 50) * ms for r in swaps[t]])
                f["swap_p90_ms"] = median([pct(r["lat_us"], 90) * ms for r in swaps[t]])
            else:
                f["swap_p50_ms"] = f["swap_p90_ms"] = None
            f["rss_idle_mb"] = None if idle.get(t) is None else idle[t] / 1024
            peaks = [r["rss_peak_kb"] for r in reps if r["rss_peak_kb"]]
            f["rss_load_mb"] = max(peaks) / 1024 if peaks else None
            f["c1_cpu_per_req_us"] = median([r["c1"]["own_cpu_per_req_us"] for r in reps])
            f["c4_cpu_per_req_us"] = median([r["c4"]["own_cpu_per_req_us"] for r in reps])
            f["stream_failed_pct"] = median([100.0 * (r["stream"]["n"] - r["stream"]["statuses"].get("200", 0))
                                             / max(1, r["stream"]["n"]) for r in reps])
            f["overload_429_p50_ms"] = f["overload_429_p99_ms"] = None
            runs = (relay or {}).get(t, [])
            # chunk = one SSE event received by a client; per measurement, then the median over repeats
            f["relay_chunks_per_s"] = median([r["events_total"] / r["elapsed_s"] for r in runs if r["elapsed_s"]])
            f["relay_proxy_cpu_us_per_chunk"] = median([r["proxy_cpu"]["s"] / r["events_total"] * 1e6 for r in runs
                                                        if r["proxy_cpu"] and r["events_total"]])
            f["relay_model_cpu_us_per_chunk"] = median([r["model_cpu"]["s"] / r["events_total"] * 1e6
                                                        for r in runs if r["events_total"]])
            out[t] = f
        lat429 = [r["lat_us"] for r in overload if r["n"]]
        for t in targets:
            if t == "node":
                out[t]["overload_429_p50_ms"] = median([pct(x, 50) * ms for x in lat429])
                out[t]["overload_429_p99_ms"] = median([pct(x, 99) * ms for x in lat429])
        return out

    def meta(self, seconds: float) -> dict[str, Any]:
        return {
            **run_meta(self.binary, seconds, ROOT),
            "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(self.args).items() if k != "out"},
            "flags": self.child_flags(),
        }


# ------------------------------------------------------------------- table

FIGURES = [
    ("c1_p50_ms", "latency p50, 1 client (ms)"),
    ("c1_p90_ms", "latency p90, 1 client (ms)"),
    ("c1_p99_ms", "latency p99, 1 client (ms)"),
    ("c1_rps", "requests/s, 1 client"),
    ("c4_p50_ms", "latency p50, 4 clients (ms)"),
    ("c4_p90_ms", "latency p90, 4 clients (ms)"),
    ("c4_p99_ms", "latency p99, 4 clients (ms)"),
    ("c4_rps", "requests/s, 4 clients"),
    ("stream_first_byte_p50_ms", "stream first byte p50 (ms)"),
    ("stream_first_byte_p90_ms", "stream first byte p90 (ms)"),
    ("stream_end_p50_ms", "stream end (16 tokens) p50 (ms)"),
    ("swap_p50_ms", "model swap A↔B p50 (ms)"),
    ("swap_p90_ms", "model swap A↔B p90 (ms)"),
    ("rss_idle_mb", "RSS idle (MB, own process)"),
    ("rss_load_mb", "RSS peak under load (MB)"),
    ("stream_failed_pct", "streams answered other than 200 (%)"),
    ("c1_cpu_per_req_us", "own CPU per request, 1 client (µs)"),
    ("c4_cpu_per_req_us", "own CPU per request, 4 clients (µs)"),
    ("overload_429_p50_ms", "overload 429 p50 (ms)"),
    ("overload_429_p99_ms", "overload 429 p99 (ms)"),
    ("relay_chunks_per_s", "relay: chunks (SSE events) received per s, all streams"),
    ("relay_proxy_cpu_us_per_chunk", "relay: proxy process CPU per chunk (µs)"),
    ("relay_model_cpu_us_per_chunk", "relay: model server CPU per chunk (µs)"),
]


def fmt(v: float | None, nd: int = 2) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def _added_p50(f: dict[str, float | None], direct: dict[str, float | None]) -> float | None:
    if f.get("c1_p50_ms") is None or direct.get("c1_p50_ms") is None:
        return None
    return f["c1_p50_ms"] - direct["c1_p50_ms"]  # type: ignore[operator]


def issue16_targets(s: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    """Issue 16's targets: the node against the router, the floor and direct, in the same run.

    The floor rule (from the issue): when the floor — bare twisted.web + Agent, nothing of ours — is
    itself worse than the router on a figure, that figure's target becomes "within 1.1× of the floor"
    (≤ 1.1 × floor where lower is better, ≥ floor ÷ 1.1 where higher is). It applies to the figures
    compared with the router; the stretch row (≤ 0.8× router) and the absolute RSS bound stay as they
    are (the floor's figure is shown beside them)."""
    d, r, f, n = (s.get(t, {}) for t in BASE_TARGETS)
    rows: list[dict[str, Any]] = []

    def add(name: str, key: str, values: tuple[Any, Any, Any], unit: str, lower: bool, *, factor: float = 1.0,
            absolute: float | None = None, floor_rule: bool = True) -> None:
        node, router, floor = values
        show = (lambda v: "–" if v is None else f"{v:+.3f}") if key == "added_p50_ms" else fmt
        applied = (floor_rule and absolute is None and floor is not None and router is not None
                   and (floor > router if lower else floor < router))
        sign = "≤" if lower else "≥"
        if absolute is not None:
            bound, goal = absolute, f"{sign} {absolute:g} {unit}"
        elif applied:
            bound = floor + 0.1 * abs(floor) if lower else floor / 1.1  # (an added latency may be < 0)
            goal = (f"{sign} 1.1× floor" if lower else "≥ floor ÷ 1.1") + (
                f" (floor {show(floor)} is worse than router {show(router)})")
        else:
            bound = None if router is None else router * factor
            goal = f"{sign} {'' if factor == 1 else f'{factor:g}× '}router" + (" (stretch)" if factor != 1 else "")
        # None: not measured (e.g. --no-relay)
        met = None if node is None or bound is None else (node <= bound if lower else node >= bound)
        rows.append({"issue": 16, "target": name, "figure": key, "unit": unit, "lower_is_better": lower,
                     "node": node, "router": router, "floor": floor, "bound": bound, "goal": goal,
                     "floor_rule_applied": applied, "met": met, "show": [show(node), show(router), show(floor)]})

    cpu = (n.get("c1_cpu_per_req_us"), r.get("c1_cpu_per_req_us"), f.get("c1_cpu_per_req_us"))
    add("own CPU per non-streamed request, 1 client", "c1_cpu_per_req_us", cpu, "µs", True)
    add("own CPU per non-streamed request, 1 client", "c1_cpu_per_req_us", cpu, "µs", True, factor=0.8,
        floor_rule=False)
    add("added p50 latency over direct, 1 client", "added_p50_ms",
        (_added_p50(n, d), _added_p50(r, d), _added_p50(f, d)), "ms", True)
    add("requests/s, 4 clients", "c4_rps", (n.get("c4_rps"), r.get("c4_rps"), f.get("c4_rps")), "req/s", False)
    add("relay: proxy CPU per chunk", "relay_proxy_cpu_us_per_chunk",
        tuple(x.get("relay_proxy_cpu_us_per_chunk") for x in (n, r, f)), "µs", True)  # type: ignore[arg-type]
    add("RSS idle, own process", "rss_idle_mb", (n.get("rss_idle_mb"), r.get("rss_idle_mb"), f.get("rss_idle_mb")),
        "MB", True, absolute=40)
    return rows


def targets_verdicts(s: dict[str, dict[str, float | None]], node: str = "node") -> list[tuple[str, str, str, bool]]:
    """Issue 7's targets (the first performance issue), kept for comparison."""
    d, r, n = s["direct"], s["router"], s[node]
    rows = []

    def add(name: str, value: float | None, shown: str, goal: str, ok: bool | None) -> None:
        rows.append((name, shown if value is not None else "–", goal, bool(ok)))

    v = None if n["c1_p50_ms"] is None else n["c1_p50_ms"] - d["c1_p50_ms"]
    add("added p50 latency over direct, 1 client", v, f"{v:+.3f} ms" if v is not None else "", "≤ 0.6 ms",
        v is not None and v <= 0.6)
    v = None if n["c4_rps"] is None else n["c4_rps"] / d["c4_rps"]
    add("4-client throughput vs direct", v, f"{v:.2f}×" if v is not None else "", "≥ 0.8×", v is not None and v >= 0.8)
    v = (None if n["stream_first_byte_p50_ms"] is None
         else n["stream_first_byte_p50_ms"] - d["stream_first_byte_p50_ms"])
    add("stream first byte added over direct (p50)", v, f"{v:+.3f} ms" if v is not None else "", "≤ 0.5 ms",
        v is not None and v <= 0.5)
    v = n["swap_p50_ms"]
    add("swap p50 vs router's", v, f"{v:.1f} ms vs {r['swap_p50_ms']:.1f} ms" if v is not None else "",
        "≤ router", v is not None and r["swap_p50_ms"] is not None and v <= r["swap_p50_ms"])
    v = n["rss_idle_mb"]
    add("agent RSS idle", v, f"{v:.1f} MB" if v is not None else "", "≤ 60 MB", v is not None and v <= 60)
    v = s["node"]["overload_429_p99_ms"]
    add("overload 429 p99", v, f"{v:.3f} ms" if v is not None else "", "≤ 2 ms", v is not None and v <= 2)
    return rows


def render_table(result: dict[str, Any]) -> str:
    s = result["summary"]
    m = result["meta"]
    variants = [t for t in s if t.startswith("node+")]
    lines = [
        f"Run {m['when']} · {m['cpu']} ({m['cores']} cores) · commit {m['git_commit']}"
        f"{' + local changes' if m['git_dirty'] else ''} · {m['args']['repeats']} repeat(s), "
        f"{m['args']['seconds']:g} s per load job · child flags `{' '.join(m['flags'])}` · "
        + (f"model servers pinned to CPU {sorted(m['args']['model_cpus'])}, the rest to "
           f"{sorted(m['args']['proxy_cpus'])}" if m["args"]["pin"] else "not pinned"),
        "",
        f"Other processes used a median {m['background_cpu_pct']['median']:.0f}% "
        f"(max {m['background_cpu_pct']['max']:.0f}%) of a core during the measurements kept "
        f"({m['background_cpu_pct']['retried_jobs']} job(s) were run again because the machine was busy)"
        + (" — **the machine was busy: the numbers are disturbed**" if m["background_cpu_pct"]["median"] > 15
           else "."),
        "",
        "| figure | direct | router | floor | node | node / direct | node / router | node / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    empty: dict[str, float | None] = {}
    for key, label in FIGURES:
        d, r, f, n = (s.get(t, empty).get(key) for t in BASE_TARGETS)
        lines.append(f"| {label} | {fmt(d)} | {fmt(r)} | {fmt(f)} | {fmt(n)} | {ratio(n, d)} | {ratio(n, r)} "
                     f"| {ratio(n, f)} |")
    relay = result["raw"].get("relay")
    if relay:
        lines += ["", f"Relay: {relay['streams']} concurrent streams × {relay['tokens']} tokens "
                      f"(`/v1/completions`, `ignore_eos`), model servers with `-np {relay['streams']} "
                      f"-c {relay['ctx']}` (node: `llama_server_parallel: {relay['streams']}`); a chunk is one SSE "
                      f"event received by a client (`data:` line), {relay['expected_events_per_stream']} per stream "
                      "(one per token, the last event, `[DONE]`); CPU per chunk: the process's own CPU time over "
                      "the measurement ÷ chunks (router: the router process, not its children; direct: none)."]
    lines += ["", "Targets, issue 16 (same run; the floor is bare twisted.web + Agent — where it is worse than the "
                  "router on a figure, the goal is within 1.1× of the floor):", "",
              "| target | node | router | floor | goal | met |", "|---|---|---|---|---|---|"]
    for row in result.get("targets", {}).get("issue16", []):
        nv, rv, fv = row["show"]
        met = "–" if row["met"] is None else "yes" if row["met"] else "**no**"
        lines.append(f"| {row['target']} ({row['unit']}) | {nv} | {rv} | {fv} | {row['goal']} | {met} |")
    lines += ["", "Targets, issue 7 (kept for comparison):", "", "| target | measured | goal | met |",
              "|---|---|---|---|"]
    for name, shown, goal, ok in targets_verdicts(s):
        lines.append(f"| {name} | {shown} | {goal} | {'yes' if ok else '**no**'} |")
    if variants:
        keys = ["c1_p50_ms", "c1_p99_ms", "c4_rps", "stream_first_byte_p50_ms", "stream_failed_pct", "swap_p50_ms",
                "rss_idle_mb", "c1_cpu_per_req_us"]
        lines += ["", "Node variants (a config change and/or prototype patches applied at start; "
                      "bench/patches.py):", "",
                  "| variant | " + " | ".join(dict(FIGURES)[key] for key in keys)
                  + " | added p50 vs direct | 4-client vs direct |",
                  "|---|" + "---|" * (len(keys) + 2)]
        for t in ["node", *variants]:
            f = s[t]
            added = None if f["c1_p50_ms"] is None else f["c1_p50_ms"] - s["direct"]["c1_p50_ms"]
            lines.append(f"| {t} | " + " | ".join(fmt(f.get(k)) for k in keys)
                         + f" | {added:+.3f} ms | {ratio(f['c4_rps'], s['direct']['c4_rps'])} |")
    if result["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two repeats of 1-second loops (about 75 seconds)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON and markdown")
    p.add_argument("--repeats", type=int, help="repeats per figure (default 5, --quick 2)")
    p.add_argument("--seconds", type=float, help="time bound of each load job (default 2, --quick 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="--threads for every llama-server (direct, router's and node's children; default 1, "
                        "see docs/performance.md)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin: by default the model servers (direct llama-server, the node's and the router's "
                        "children) run on the last CPU, everything else (node, router process, load generator) "
                        "on the others")
    p.add_argument("--max-background", type=float, default=25.0,
                   help="a measurement during which other processes used more than this %% of a core is run "
                        "again (default 25)")
    p.add_argument("--retries", type=int, default=2, help="at most this many times (default 2)")
    p.add_argument("--retry-budget", dest="retry_budget_s", type=float,
                   help="at most this many seconds in all for such repeats (default 90, --quick 25; the relay "
                        "phase has as much again)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, server logs)")
    p.add_argument("--variants", default="noaccesslog,serial",
                   help="comma-separated node variants (bench/patches.py VARIANTS) to run as extra targets, "
                        "or 'none'; default: noaccesslog,serial (the node with access_log: false, and with "
                        "max_concurrent_requests_per_device: 1, so the table says what each costs or gives)")
    p.add_argument("--scale", action="store_true", help="then the scale bench (bench/scale.py, its defaults: 1,000 "
                   "streams, 10,000 idle connections; about a minute more)")
    p.add_argument("--relay-streams", type=int, default=4,
                   help="relay phase: concurrent streams C (model servers get -np C; default 4)")
    p.add_argument("--relay-tokens", type=int, default=1000,
                   help="relay phase: tokens M per stream (ignore_eos; default 1000, also with --quick: the "
                        "router's CPU is read in 10 ms ticks, see docs/performance.md)")
    p.add_argument("--no-relay", action="store_true", help="skip the relay phase")
    a = p.parse_args(argv)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.seconds = a.seconds or (1.0 if a.quick else 2.0)
    a.retry_budget_s = a.retry_budget_s if a.retry_budget_s is not None else (25.0 if a.quick else 90.0)
    a.variants = [v for v in a.variants.split(",") if v and v != "none"]
    cores = sorted(os.sched_getaffinity(0))
    a.pin = len(cores) >= 2 and not a.no_pin
    a.model_cpus = {cores[-1]} if a.pin else None
    a.proxy_cpus = set(cores[:-1]) if a.pin else None
    a.max_requests = 20000
    a.warmup_s = 0.5 if a.quick else 1.0
    a.stream_requests = 20 if a.quick else 40
    a.swap_requests = 6 if a.quick else 10  # even: the last one brings tiny-a back
    a.overload_requests = 200 if a.quick else 400
    if a.no_relay:
        a.relay_streams = 0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.variants:
        from .patches import VARIANTS

        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown:
            print(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}", file=sys.stderr)
            return 2
    bench = Bench(args)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if args.proxy_cpus:
        os.sched_setaffinity(0, args.proxy_cpus)
    try:
        result = bench.run()
    except BaseException:
        print(f"bench failed; configs and server logs are kept in {bench.tmp}", file=sys.stderr)
        raise
    finally:
        bench.stop_all()
    if args.scale:  # after the other phases, their processes gone
        from .scale import run_scale

        result["scale"] = run_scale([], no_pin=args.no_pin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    table = render_table(result) + ("\n" + result["scale"]["table_md"] if "scale" in result else "")
    result["table_md"] = table
    text = json.dumps(result, separators=(",", ":"))
    (out / f"bench-{stamp}.json").write_text(text, encoding="utf-8")
    (out / "latest.json").write_text(text, encoding="utf-8")
    (out / "latest.md").write_text(table, encoding="utf-8")
    print(table)
    if args.keep:
        print(f"raw numbers: {out / f'bench-{stamp}.json'}; configs and logs: {bench.tmp}")
    else:
        print(f"raw numbers: {out / f'bench-{stamp}.json'}")
        shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
