"""Profile the node's proxy path under load.

    .venv/bin/python -m bench.profile                  # cProfile: top functions, per-request costs
    .venv/bin/python -m bench.profile --pyspy          # py-spy sampling (needs `pip install py-spy`)
    .venv/bin/python -m bench.profile --variant serial # the same with a bench/patches.py variant

It starts one node the way the bench does (tiny model, the same child flags,
``max_pending_requests_per_device: 8``, pinned like the bench) — under
``python -m cProfile`` around the real CLI, or plain with py-spy attached
after warm-up — drives it with the bench's load generator (1 client, then 4,
then 16-token streams, ``--seconds`` each), stops it with SIGTERM (so cProfile
writes its file) and prints where the time goes. cProfile makes every Python
call slower (roughly 2× here), so read its figures as proportions; py-spy
samples without that distortion but without call counts. Output files go to
``--out`` (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import pstats
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .patches import VARIANTS
from .procs import http_post
from .run import CHAT, ROOT, Bench, LoadGen, body, node_ready, parse


def _frame(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    short = path.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
    return f"{short}:{name}"


def summarize_collapsed(path: Path, top: int) -> None:
    """Own and inclusive share of busy samples per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        if frames[-1].endswith(("EPollReactor.doPoll", "Condition.wait")):
            idle += n  # waiting in epoll / an idle pool thread: not CPU
            continue
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    print(f"{total} busy samples ({idle} more waiting in epoll or an idle thread, left out)")
    print("own %   function")
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * n / total:5.1f}  {f}")
    print("incl %  function")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top * 2]:
        print(f"{100 * n / total:5.1f}  {f}")


#: functions whose cumulative cost per proxied request is worth watching
WATCH = [
    ("twisted/web/http.py", "requestReceived"), ("rolemesh_node/proxy.py", "render"),
    ("rolemesh_node/proxy.py", "_granted"), ("twisted/web/client.py", "request"),
    ("rolemesh_node/proxy.py", "_response"), ("rolemesh_node/proxy.py", "chunk"),
    ("rolemesh_node/proxy.py", "body_done"), ("twisted/web/http.py", "finish"), ("twisted/web/http.py", "log"),
    ("twisted/web/http.py", "_parseContentType"), ("rolemesh_node/node.py", "choose"),
    ("rolemesh_node/config.py", "available"), ("rolemesh_node/proxy.py", "request_id"),
    ("rolemesh_node/metrics.py", "request_done"), ("rolemesh_node/llama_server.py", "errReceived"),
    ("rolemesh_node/device_slot.py", "acquire"), ("rolemesh_node/device_slot.py", "_release"),
    ("twisted/logger/_logger.py", "emit"),
]


def per_request(prof: Path) -> None:
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    requests = max((nc for (fn, _l, name), (_cc, nc, *_r) in stats.items()
                    if fn.endswith("rolemesh_node/proxy.py") and name == "render"), default=0)
    if not requests:
        return
    print(f"cumulative µs per proxied request (cProfile, {requests} requests; inflated by the profiler):")
    seen = set()
    for (fn, _line, name), (_cc, nc, _tt, ct, _callers) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        for path, fname in WATCH:
            if fn.endswith(path) and name == fname and (path, fname) not in seen:
                seen.add((path, fname))
                print(f"  {ct / requests * 1e6:8.1f} µs  {nc / requests:5.2f} calls/req  {path}:{name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--variant", default="", help=f"one of {sorted(VARIANTS)}")
    p.add_argument("--pyspy", action="store_true", help="py-spy sampling instead of cProfile")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(parse(["--quick", "--threads", str(a.threads)] + (["--no-pin"] if a.no_pin else [])))
    bench.make_models()
    variant = VARIANTS[a.variant] if a.variant else {}
    server = bench.node_server("node", variant)
    tag = a.variant or "default"
    prof = out / f"profile-{tag}.prof"
    raw = out / f"profile-{tag}.collapsed"
    if not a.pyspy:  # the same command line, under cProfile
        module = server.argv.index("-m") + 1 if "-m" in server.argv else None
        target = server.argv[module:] if module else ["-m", "rolemesh_node.cli", *server.argv[1:]]
        server.argv = [sys.executable, "-m", "cProfile", "-o", str(prof),
                       *(["-m"] if module else []), *target]
    bench.servers["node"] = server
    spy_proc = None
    total = 0
    try:
        server.start()
        server.wait_ready(node_ready)
        assert http_post(server.port, CHAT, json.loads(body("tiny-a", 1)), timeout=60)[0] == 200
        bench.pin_model_servers(server)
        loadgen = bench.loadgen = LoadGen()
        loadgen.run(kind="closed", port=server.port, path=CHAT, bodies=[body("tiny-a", 1)], conns=1,
                    max_requests=2000, max_seconds=1)
        if a.pyspy:  # attach after start-up and warm-up: only the load is sampled
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spy_proc = subprocess.Popen([spy, "record", "--pid", str(server.pid), "--rate", "500", "--nonblocking",
                                         "--format", "raw", "-o", str(raw), "--duration",
                                         str(int(3 * a.seconds + 1))], stdout=subprocess.DEVNULL)
            time.sleep(1.0)
        for conns, stream in ((1, False), (4, False), (1, True)):
            res = loadgen.run(kind="closed", port=server.port, path=CHAT,
                              bodies=[body("tiny-a", 16 if stream else 1, stream)],
                              conns=conns, max_requests=50000, max_seconds=a.seconds)
            total += res["n"]
            print(f"{conns} client(s){' stream' if stream else ''}: {res['n']} answers "
                  f"({res['n'] / res['elapsed_s']:.0f}/s), statuses {res['statuses']}")
        if spy_proc is not None:
            spy_proc.wait(60)
    finally:
        if spy_proc is not None and spy_proc.poll() is None:
            spy_proc.kill()
        if server.popen is not None and server.popen.poll() is None:
            server.popen.send_signal(signal.SIGTERM)  # cProfile writes its file on the way out
            try:
                server.popen.wait(30)
            except subprocess.TimeoutExpired:
                pass
        bench.stop_all()
    if a.pyspy:
        summarize_collapsed(raw, a.top)
        print(f"collapsed stacks: {raw} (flamegraph.pl or speedscope.app can draw them)")
    else:
        stats = pstats.Stats(str(prof))
        stats.sort_stats("tottime").print_stats(a.top)
        per_request(prof)
        print(f"profile: {prof}")
    shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
