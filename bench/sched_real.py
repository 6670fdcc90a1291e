"""The scheduler with the real binary: one cpu device, two tiny models, four closed-loop clients.

Run from the repository root (after ``scripts/dev-setup``)::

    .venv/bin/python -m bench.sched_real                 # about 40 s: three 10-second scenarios
    .venv/bin/python -m bench.sched_real --seconds 5 --json
    .venv/bin/python -m bench.sched_real --keep          # keep the config and the node's log

It starts ``rolemesh-node-agent`` (a real subprocess; ``backend: cpu``,
``cpu_devices: 1``, the default config except ``max_pending_requests_per_device``
— 16, so that four clients on one model are never refused — a fixed
``node_id`` and a ``state_dir`` in the run's temporary directory) with two
generated tiny models, ``tiny-a`` and ``tiny-b`` (:mod:`rolemesh_node.tinymodel`),
and drives it with four clients, each a closed loop on one keep-alive
connection in a load generator process of its own (:mod:`bench.loadgen`, so
every client's completions are counted), non-streamed chat completions of
``--max-tokens`` tokens, for ``--seconds`` each:

1. ``one-model`` — all four on ``tiny-a`` (the baseline throughput);
2. ``split`` — two clients only on ``tiny-a``, two only on ``tiny-b``;
3. ``alternate`` — each client alternates ``tiny-a`` and ``tiny-b`` (two start
   with each).

Switches and starts come from the device's ``child.switches`` / ``child.starts``
in ``GET /v1/node/inventory``, read before and after each scenario. Targets
(issue 12): split ≤ 0.1 switches per request, throughput ≥ 0.5× one-model's in
the same run, every client ≥ 50 % of total ÷ 4; alternate ≤ 0.3 switches per
request. Every process is killed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python bench/sched_real.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.sched_real import main as _main

    raise SystemExit(_main())

from .procs import CpuAccount, Server, free_port, http_get, http_post, reap_strays, run_meta
from .run import CHAT, LoadGen, body, llama_server_bin, node_ready, pct

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
# written by bench/sched_real.py: the defaults, except the pending bound (four clients on one model),
# a fixed node id and a state directory in the run's temporary directory
listen_host: 127.0.0.1
listen_port: {port}
node_id: bench-sched
state_dir: {state}
backend: cpu
cpu_devices: 1
max_pending_requests_per_device: {max_pending}
models:
  tiny-a:
    path: {models}/tiny-a.gguf
    ctx_size: 512
  tiny-b:
    path: {models}/tiny-b.gguf
    ctx_size: 512
"""

A, B = "tiny-a", "tiny-b"

#: scenario -> the models each of the four clients cycles through
SCENARIOS: dict[str, list[list[str]]] = {
    "one-model": [[A], [A], [A], [A]],
    "split": [[A], [A], [B], [B]],
    "alternate": [[A, B], [B, A], [A, B], [B, A]],
}


class Account(CpuAccount):
    """:class:`bench.procs.CpuAccount` that also counts the children the node started and reaped
    meanwhile (every switch replaces the child: their CPU is in the node's ``cutime``/``cstime``)."""

    def __init__(self, pids: Any, reaper: Any) -> None:
        super().__init__(pids)
        self.reaper = reaper

    def _ours(self) -> dict[int, int]:
        out = super()._ours()
        pid = self.reaper()
        if pid is not None:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                out[-pid] = int(fields[13]) + int(fields[14])  # cutime + cstime: reaped children
            except (OSError, IndexError, ValueError):
                pass
        return out


def switch_reasons(metrics: bytes) -> dict[str, float]:
    """``rolemesh_scheduler_switches_total`` per reason, from ``/metrics``."""
    out: dict[str, float] = {}
    for line in metrics.decode("utf-8", "replace").splitlines():
        if line.startswith("rolemesh_scheduler_switches_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in labels else "?"
            out[reason] = out.get(reason, 0.0) + float(value)
    return out


class SchedBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="rolemesh-sched-"))
        self.node: Server | None = None
        self.gens: list[LoadGen] = []
        self.notes: list[str] = []

    # ----------------------------------------------------------------- set-up

    def start(self) -> None:
        from rolemesh_node.tinymodel import write_tiny_model

        self.binary = llama_server_bin()
        models = self.tmp / "models"
        models.mkdir()
        for name, seed in ((A, 1), (B, 2)):
            write_tiny_model(models / f"{name}.gguf", seed=seed, name=name)
        port = free_port()
        config = self.tmp / "node.yaml"
        config.write_text(CONFIG.format(port=port, state=self.tmp / "state", models=models,
                                        max_pending=self.args.max_pending), encoding="utf-8")
        agent = Path(sys.executable).with_name("rolemesh-node-agent")
        if self.args.agent_root:
            # another checkout's agent (e.g. the first wave, for a before/after)
            code = (f"import sys; sys.path.insert(0, {str(Path(self.args.agent_root).resolve())!r}); "
                    "from rolemesh_node.cli import main; raise SystemExit(main())")
            argv = [sys.executable, "-c", code, "--config", str(config)]
        elif agent.exists():
            argv = [str(agent), "--config", str(config)]
        else:
            argv = [sys.executable, "-m", "rolemesh_node.cli", "--config", str(config)]
        self.node = Server("node", argv, port, self.tmp / "node.log")
        self.node.start()
        self.node.wait_ready(node_ready)
        self.gens = [LoadGen() for _ in range(4)]
        self.account = Account(lambda: [os.getpid()] + [g.p.pid for g in self.gens]
                               + ([self.node.pid] if self.node else []),
                               lambda: self.node.pid if self.node else None)

    def stop(self) -> None:
        for gen in self.gens:
            gen.close()
        if self.node is not None:
            self.node.stop()
        strays = reap_strays(str(self.tmp))
        if strays:
            self.notes.append(f"killed {len(strays)} stray process(es) at the end: {strays}")

    # ---------------------------------------------------------------- helpers

    def child(self) -> dict[str, Any]:
        assert self.node is not None
        status, raw = http_get(self.node.port, "/v1/node/inventory", timeout=10)
        if status != 200:
            raise RuntimeError(f"inventory answered {status}: {raw[:200]!r}")
        devices = json.loads(raw)["devices"]
        if len(devices) != 1 or devices[0]["child"] is None:
            raise RuntimeError(f"expected one cpu device with a child record, got {devices}")
        return devices[0]["child"]

    def warm(self, models: tuple[str, ...] = (B, A)) -> None:
        """One request per model, in order (the last one stays loaded)."""
        assert self.node is not None
        for model in models:
            status, raw = http_post(self.node.port, CHAT, json.loads(body(model, self.args.max_tokens)), timeout=60)
            if status != 200:
                raise RuntimeError(f"warm-up request for {model} answered {status}: {raw[:300]!r}")

    def reasons(self) -> dict[str, float]:
        assert self.node is not None
        status, raw = http_get(self.node.port, "/metrics", timeout=10)
        return switch_reasons(raw) if status == 200 else {}

    def clients(self, cycles: list[list[str]], seconds: float) -> list[dict[str, Any]]:
        """Four closed-loop clients at once, one per load generator process."""
        assert self.node is not None
        for gen, models in zip(self.gens, cycles):
            job = {"kind": "closed", "port": self.node.port, "path": CHAT, "conns": 1,
                   "bodies": [body(m, self.args.max_tokens) for m in models],
                   "max_requests": 10**7, "max_seconds": seconds}
            assert gen.p.stdin is not None
            gen.p.stdin.write(json.dumps(job) + "\n")
            gen.p.stdin.flush()
        out = []
        for gen in self.gens:
            assert gen.p.stdout is not None
            line = gen.p.stdout.readline()
            if not line:
                raise RuntimeError("a load generator died")
            res = json.loads(line)
            if "error" in res:
                raise RuntimeError(f"load generator: {res['error']}")
            out.append(res)
        return out

    # ---------------------------------------------------------------- measure

    def scenario(self, name: str) -> dict[str, Any]:
        cycles = SCENARIOS[name]
        self.warm((A,))  # every scenario starts with tiny-a loaded
        before = self.child()
        reasons0 = self.reasons()
        self.account.start()
        results = self.clients(cycles, self.args.seconds)
        background = self.account.stop()
        after = self.child()
        reasons1 = self.reasons()
        per_client = [r["statuses"].get("200", 0) for r in results]
        other = {}
        for r in results:
            for code, count in r["statuses"].items():
                if code != "200":
                    other[code] = other.get(code, 0) + count
        total = sum(per_client)
        elapsed = max(r["elapsed_s"] for r in results)
        lat = [x / 1000.0 for r in results for x in r["lat_us"]]
        # an agent without a switch count (the first wave): every start after the first is a switch here
        switches = after.get("switches", after["starts"]) - before.get("switches", before["starts"])
        starts = after["starts"] - before["starts"]
        return {
            "scenario": name, "clients": [" → ".join(c) for c in cycles], "completed": total,
            "per_client": per_client, "elapsed_s": elapsed, "rps": total / elapsed if elapsed else 0.0,
            "switches": switches, "starts": starts,
            "switches_per_request": switches / total if total else None,
            "switch_reasons": {k: int(v - reasons0.get(k, 0.0)) for k, v in reasons1.items()
                               if v - reasons0.get(k, 0.0)},
            "errors": sum(r["errors"] for r in results), "other_statuses": other,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat) if lat else None,
            "background_cpu_pct": background,
            "last_switch_s": after.get("last_switch_s"), "crashes": after["crashes"] - before["crashes"],
        }

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.start()
        self.warm()
        runs = []
        for rep in range(self.args.repeats):
            for name in self.args.scenarios:
                res = self.scenario(name)
                res["repeat"] = rep
                runs.append(res)
        return {"meta": self.meta(time.monotonic() - started), "runs": runs, "verdicts": verdicts(runs),
                "notes": self.notes}

    def meta(self, seconds: float) -> dict[str, Any]:
        return {
            **run_meta(self.binary, seconds, ROOT),
            "args": vars(self.args),
        }


def verdicts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rep in sorted({r["repeat"] for r in runs}):
        by = {r["scenario"]: r for r in runs if r["repeat"] == rep}
        base, split, alt = by.get("one-model"), by.get("split"), by.get("alternate")
        if split is not None:
            spr = split["switches_per_request"]
            out.append({"repeat": rep, "target": "split: ≤ 0.1 switches per request",
                        "measured": "–" if spr is None else f"{spr:.4f} ({split['switches']} / {split['completed']})",
                        "met": spr is not None and spr <= 0.1})
            if base is not None:
                ratio = split["rps"] / base["rps"] if base["rps"] else 0.0
                out.append({"repeat": rep, "target": "split: throughput ≥ 0.5× one-model",
                            "measured": f"{ratio:.2f}× ({split['rps']:.0f} vs {base['rps']:.0f} req/s)",
                            "met": ratio >= 0.5})
            floor = 0.5 * split["completed"] / 4
            out.append({"repeat": rep, "target": "split: every client ≥ 50 % of total ÷ 4",
                        "measured": f"min {min(split['per_client'])} vs {floor:.0f} "
                                    f"({', '.join(map(str, split['per_client']))})",
                        "met": min(split["per_client"]) >= floor})
        if alt is not None:
            spr = alt["switches_per_request"]
            out.append({"repeat": rep, "target": "alternate: ≤ 0.3 switches per request",
                        "measured": "–" if spr is None else f"{spr:.3f} ({alt['switches']} / {alt['completed']})",
                        "met": spr is not None and spr <= 0.3})
        bad = [r for r in (base, split, alt) if r is not None and (r["errors"] or r["other_statuses"])]
        out.append({"repeat": rep, "target": "every answer 200, no errors",
                    "measured": "; ".join(f"{r['scenario']}: {r['other_statuses']}, {r['errors']} errors"
                                          for r in bad) or "yes",
                    "met": not bad})
    return out


def fmt(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def render(result: dict[str, Any]) -> str:
    m = result["meta"]
    a = m["args"]
    lines = [f"Run {m['when']} · {m['cpu']} ({m['cores']} cores) · commit {m['git_commit']}"
             f"{' + local changes' if m['git_dirty'] else ''} · {m['llama_server_version']} · "
             f"{a['seconds']:g} s per scenario, max_tokens {a['max_tokens']}, "
             f"max_pending_requests_per_device {a['max_pending']}, otherwise the default config"
             + (f" · agent from {a['agent_root']}" if a.get("agent_root") else ""),
             "",
             "| repeat | scenario | clients | completed | req/s | per client | switches | starts | switches/req | "
             "switch reasons | p50 ms | p99 ms | max ms | non-200 / errors | other CPU % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        spr = r["switches_per_request"]
        lines.append(
            f"| {r['repeat']} | {r['scenario']} | {'; '.join(r['clients'])} | {r['completed']} | {r['rps']:.0f} | "
            f"{', '.join(map(str, r['per_client']))} | {r['switches']} | {r['starts']} | "
            f"{'–' if spr is None else f'{spr:.4f}'} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['switch_reasons'].items())) or '–'} | "
            f"{fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 1)} | "
            f"{fmt(r['max_ms'], 0)} | {r['other_statuses'] or 0} / {r['errors']} | {r['background_cpu_pct']:.0f} |")
    lines += ["", "| repeat | target | measured | met |", "|---|---|---|---|"]
    for v in result["verdicts"]:
        lines.append(f"| {v['repeat']} | {v['target']} | {v['measured']} | {'yes' if v['met'] else '**no**'} |")
    if result["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sched_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each scenario (default 10)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every request (default 8)")
    p.add_argument("--max-pending", type=int, default=16,
                   help="max_pending_requests_per_device (default 16: no 429 with four clients)")
    p.add_argument("--repeats", type=int, default=1, help="run the three scenarios this many times (default 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios to run (default: all, {','.join(SCENARIOS)})")
    p.add_argument("--agent-root", default=None,
                   help="run the agent of another checkout (a directory holding its rolemesh_node/, e.g. "
                        "`git archive e3a1a3b rolemesh_node | tar -x -C DIR`) instead of this one")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (config, node log)")
    a = p.parse_args(argv)
    a.scenarios = [x for x in a.scenarios.split(",") if x]
    unknown = [x for x in a.scenarios if x not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bench = SchedBench(args)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = bench.run()
    except BaseException:
        print(f"bench failed; the config and the node's log are kept in {bench.tmp}", file=sys.stderr)
        if bench.node is not None:
            print(bench.node.log_tail(30), file=sys.stderr)
        raise
    finally:
        bench.stop()
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(render(result))
    if args.keep:
        print(f"config and node log: {bench.tmp}", file=sys.stderr)
    else:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0 if all(v["met"] for v in result["verdicts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
