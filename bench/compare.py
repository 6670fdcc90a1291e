"""Compare two bench runs figure by figure.

    .venv/bin/python -m bench.compare bench/results/OLD.json bench/results/latest.json [--target node]

Prints, for one target (default ``node``; ``direct``, ``router``, ``floor`` or a variant
such as ``node+noaccesslog``), each figure of both runs and new/old. The runs
are only comparable when made on the same machine with the same flags (the
header shows both runs' machine, flags, commit and background load).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python bench/compare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import FIGURES, fmt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--target", default="node")
    a = p.parse_args(argv)
    old, new = (json.loads(Path(x).read_text()) for x in (a.old, a.new))
    for name, run in (("old", old), ("new", new)):
        m = run["meta"]
        bg = m.get("background_cpu_pct", {})
        print(f"{name}: {m['when']} {m['cpu']} ({m['cores']} cores) commit {m['git_commit']}"
              f"{'+local' if m.get('git_dirty') else ''} flags {' '.join(m['flags'])} "
              f"pinned={m['args'].get('pin')} background {fmt(bg.get('median'), 0)}% of a core")
    so, sn = old["summary"].get(a.target), new["summary"].get(a.target)
    if so is None or sn is None:
        print(f"target {a.target!r} is not in both runs: {sorted(old['summary'])} / {sorted(new['summary'])}")
        return 2
    print(f"\n| {a.target} | old | new | new / old |\n|---|---|---|---|")
    for key, label in FIGURES:
        o, n = so.get(key), sn.get(key)
        r = f"{n / o:.2f}×" if o and n is not None else "–"
        print(f"| {label} | {fmt(o)} | {fmt(n)} | {r} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
