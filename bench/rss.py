"""The agent's idle RSS, measured as ``bench.run`` does, and where it goes.

    .venv/bin/python -m bench.rss                   # 3 nodes one after another: idle RSS, median; breakdown
    .venv/bin/python -m bench.rss --runs 5 --no-breakdown
    .venv/bin/python -m bench.rss --agent-root DIR  # another checkout's agent (before/after)

Each run starts one node exactly like :meth:`bench.run.Bench.node_server`
(the tiny models, ``NODE_CONFIG``, pinned like the bench), waits for
:func:`bench.run.node_ready`, warms it with :meth:`bench.run.Bench.warm`
(``tiny-b`` and ``tiny-a``, 1 and 4 clients, streams), waits 1 s and reads the
node process's ``VmRSS`` (:meth:`bench.procs.Server.rss_kb`: the agent only,
not its ``llama-server`` children). Then it drives the node for a couple of
seconds (4 clients, then streams) and samples the peak RSS under load.

The agent runs as the console script does (``from rolemesh_node.cli import
main``), from this checkout or ``--agent-root``.

The breakdown (unless ``--no-breakdown``):

* the running node's memory: anonymous vs file-backed RSS (``smaps_rollup``),
  threads, and its largest mappings;
* the modules the agent imports — one more node under ``python -X importtime``,
  warmed the same way: per top-level package, how many modules at start and how
  many more by the end of the warm-up (imported lazily);
* what they cost: in a fresh interpreter (with the TLS modules blocked, as the
  node blocks them without an ``https`` dispatcher), the same modules imported in the
  same order, with ``VmRSS`` read after each; each package is charged the growth
  during its own modules' imports (``incremental``: what it adds on top of what
  came before), and a few heavy candidates also alone (``python -c "import X"``
  minus a bare interpreter).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .procs import Sampler, Server
from .run import CHAT, ROOT, Bench, LoadGen, body, node_ready, parse

#: candidates measured alone (python -c "import X" minus a bare interpreter)
#: (the TLS modules blocked, as in the node, but for OpenSSL and ssl themselves)
ALONE = ["twisted.internet.reactor", "twisted.web.server", "twisted.web.client", "treq", "klein", "werkzeug",
         "prometheus_client", "yaml", "email.message", "http.cookiejar", "asyncio", "ssl", "json", "uuid",
         "OpenSSL", "rolemesh_node.service"]

_RSS = ("def _rss():\n"
        "    with open('/proc/self/status', 'rb') as f:\n"
        "        for line in f:\n"
        "            if line.startswith(b'VmRSS:'):\n"
        "                return int(line.split()[1])\n")


def tls_block(root: Path) -> str:
    """Code that blocks what ``root``'s rolemesh_node/tls.py blocks without an https dispatcher
    (read from the file: importing it would import the config module and yaml before the measurement)."""
    try:
        text = (root / "rolemesh_node" / "tls.py").read_text(encoding="utf-8")
    except OSError:
        return ""
    found = re.search(r"^TLS_MODULES = (\(.*?\))", text, re.MULTILINE)
    names = ast.literal_eval(found[1]) if found else (("OpenSSL",) if "OpenSSL" in text else ())
    return f"for _name in {tuple(names)!r}:\n    sys.modules.setdefault(_name, None)\n"


def agent_argv(root: Path, config: Path, python_flags: list[str] | None = None) -> list[str]:
    """The agent as its console script runs it, importing ``rolemesh_node`` from ``root``."""
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); "
            "from rolemesh_node.cli import main; raise SystemExit(main())")
    return [sys.executable, *(python_flags or []), "-c", code, "--config", str(config)]


def start_node(bench: Bench, name: str, root: Path, python_flags: list[str] | None = None) -> Server:
    server = bench.node_server(name)  # writes the config as bench.run does
    server.argv = agent_argv(root, bench.tmp / f"{name}.yaml", python_flags)
    bench.servers[name] = server
    server.start()
    server.wait_ready(node_ready)
    if bench.loadgen is None:
        bench.loadgen = LoadGen()
        if bench.args.proxy_cpus:
            os.sched_setaffinity(bench.loadgen.p.pid, bench.args.proxy_cpus)
    return server


def smaps(pid: int, top: int) -> dict[str, Any]:
    """RSS by kind (smaps_rollup) and the largest mappings (smaps), in kB."""
    out: dict[str, Any] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Anonymous", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"):
                out[key] = int(rest.split()[0])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("Threads:", "RssAnon:", "RssFile:", "VmData:")):
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0])
    maps: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
                name = name.split("site-packages/")[-1].split("/lib/")[-1]
            elif first == "Rss:":
                maps[name] = maps.get(name, 0) + int(line.split()[1])
    out["top_mappings"] = sorted(maps.items(), key=lambda kv: -kv[1])[:top]
    return out


def measure(bench: Bench, root: Path, n: int, load: bool) -> dict[str, Any]:
    name = f"node{n}"
    server = start_node(bench, name, root)
    try:
        started = server.rss_kb()
        bench.warm(name)
        bench.pin_model_servers(server)
        time.sleep(1.0)
        res: dict[str, Any] = {"start_kb": started, "idle_kb": server.rss_kb(), "memory": smaps(server.pid, 12)}
        if load:
            assert bench.loadgen is not None
            with Sampler([server]) as sampler:
                for job in (dict(bodies=[body("tiny-a", 1)], conns=4, max_requests=20000, max_seconds=2.0),
                            dict(bodies=[body("tiny-a", 16, stream=True)], conns=1, max_requests=40,
                                 max_seconds=4.0)):
                    bench.loadgen.run(kind="closed", port=server.port, path=CHAT, **job)
            res["load_peak_kb"] = sampler.peak.get(server.name)
            time.sleep(1.0)
            res["after_load_kb"] = server.rss_kb()
        return res
    finally:
        server.stop()
        del bench.servers[name]


# --------------------------------------------------------------- the imports


def imported_modules(bench: Bench, root: Path) -> tuple[list[str], int]:
    """The modules a warmed node imported (in ``-X importtime`` order) and how many by readiness."""
    server = start_node(bench, "importtime", root, ["-X", "importtime"])
    try:
        at_ready = _importtime(server.log_path)
        bench.warm("importtime")
        time.sleep(0.5)
        return _importtime(server.log_path), len(at_ready)
    finally:
        server.stop()
        del bench.servers["importtime"]


def _importtime(log: Path) -> list[str]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            mod = line.rsplit("|", 1)[1].strip()
            if mod != "imported package":
                out.append(mod)
    return out


def import_costs(modules: list[str], root: Path) -> list[tuple[str, int, int]]:
    """Import ``modules`` in order in a fresh interpreter; (top-level package, modules, kB) in first-seen order."""
    code = (_RSS + "import sys, json\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            + tls_block(root) +
            "mods = json.loads(sys.stdin.read())\n"
            "out = []\n"
            "for m in mods:\n"
            "    before = _rss()\n"
            "    if m not in sys.modules:\n"
            "        try:\n"
            "            __import__(m)\n"
            "        except Exception:\n"
            "            pass\n"
            "    out.append(_rss() - before)\n"
            "print(json.dumps([_rss(), out]))\n")
    p = subprocess.run([sys.executable, "-c", code], input=json.dumps(modules), capture_output=True, text=True,
                       cwd=ROOT, check=True)
    _total, deltas = json.loads(p.stdout)
    per: dict[str, list[int]] = {}
    for mod, kb in zip(modules, deltas):
        top = mod.split(".")[0]
        row = per.setdefault(top, [0, 0])
        row[0] += 1
        row[1] += kb
    return [(top, n, kb) for top, (n, kb) in per.items()]


def alone(what: str, root: Path) -> int | None:
    block = "" if what in ("OpenSSL", "ssl") else tls_block(root)
    code = (_RSS + f"import sys\nsys.path.insert(0, {str(root)!r})\n{block}b = _rss()\n"
            f"import {what}\nprint(_rss() - b)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return int(p.stdout) if p.returncode == 0 else None


def bare_kb() -> int:
    p = subprocess.run([sys.executable, "-c", _RSS + "print(_rss())"], capture_output=True, text=True, check=True)
    return int(p.stdout)


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="nodes started one after another (default 3); the median")
    p.add_argument("--agent-root", default=str(ROOT),
                   help="the checkout whose rolemesh_node/ the agent imports (default: this one)")
    p.add_argument("--no-breakdown", action="store_true", help="only the RSS figures")
    p.add_argument("--no-load", action="store_true", help="skip the RSS under load")
    p.add_argument("--no-pin", action="store_true", help="do not pin (as bench.run --no-pin)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    a = p.parse_args(argv)
    root = Path(a.agent_root).resolve()
    bench = Bench(parse(["--variants", "none"] + (["--no-pin"] if a.no_pin else [])))
    if bench.args.proxy_cpus:
        os.sched_setaffinity(0, bench.args.proxy_cpus)
    result: dict[str, Any] = {"agent_root": str(root), "runs": []}
    try:
        bench.make_models()
        for n in range(a.runs):
            res = measure(bench, root, n, load=not a.no_load)
            result["runs"].append(res)
            print(f"run {n + 1}: start {res['start_kb'] / 1024:.1f} MB, idle {res['idle_kb'] / 1024:.1f} MB"
                  + (f", peak under load {res['load_peak_kb'] / 1024:.1f} MB, 1 s after "
                     f"{res['after_load_kb'] / 1024:.1f} MB" if "load_peak_kb" in res else ""), flush=True)
        if not a.no_breakdown:
            modules, at_ready = imported_modules(bench, root)
            result["modules"] = modules
            result["modules_at_ready"] = at_ready
    finally:
        bench.stop_all()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    runs = result["runs"]
    idle = statistics.median(r["idle_kb"] for r in runs)
    result["idle_median_kb"] = idle
    print(f"\nidle RSS, median of {len(runs)}: {idle / 1024:.1f} MB  (runs: "
          + ", ".join(f"{r['idle_kb'] / 1024:.1f}" for r in runs) + ")")
    if not a.no_load:
        peak = statistics.median(r["load_peak_kb"] for r in runs if r.get("load_peak_kb"))
        result["load_peak_median_kb"] = peak
        print(f"peak RSS under load (4 clients, then streams), median: {peak / 1024:.1f} MB")
    mem = runs[len(runs) // 2]["memory"]
    print(f"the node's memory (run {len(runs) // 2 + 1}): anonymous {mem['RssAnon'] / 1024:.1f} MB, "
          f"file-backed {mem['RssFile'] / 1024:.1f} MB, {mem['Threads']} thread(s); largest mappings:")
    for name, kb in mem["top_mappings"]:
        print(f"  {kb / 1024:6.1f} MB  {name}")
    if not a.no_breakdown:
        modules, at_ready = result["modules"], result["modules_at_ready"]
        costs = import_costs(modules, root)
        tops_ready = {m.split(".")[0] for m in modules[:at_ready]}
        later: dict[str, int] = {}
        for m in modules[at_ready:]:
            later[m.split(".")[0]] = later.get(m.split(".")[0], 0) + 1
        base = bare_kb()
        total = sum(kb for _t, _n, kb in costs)
        result["imports"] = {"bare_kb": base, "costs": costs, "later": later}
        print(f"\n{len(modules)} modules imported ({at_ready} by readiness, {len(modules) - at_ready} during the "
              f"warm-up); a bare interpreter is {base / 1024:.1f} MB, the imports add {total / 1024:.1f} MB "
              "(incremental, in the agent's order):")
        print("      kB  modules  package")
        for top, n, kb in sorted(costs, key=lambda row: -row[2]):
            if kb >= 64 or top in later:
                note = "" if top in tops_ready else "  (first imported after readiness)"
                more = f" (+{later[top]} later)" if top in later and top in tops_ready else ""
                print(f"  {kb:6d}  {n:7d}  {top}{more}{note}")
        print("\nalone (python -c 'import X' minus a bare interpreter):")
        result["alone_kb"] = {}
        for what in ALONE:
            kb = alone(what, root)
            result["alone_kb"][what] = kb
            print(f"  {'     – ' if kb is None else f'{kb:6d} kB'}  {what}"
                  + ("  (does not import with the TLS modules blocked)" if kb is None else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
