"""Run ``rolemesh-node-agent`` with prototype changes patched in (a bench variant).

    python -m bench.node_variant --patches nometrics --config node.yaml

The patches (:mod:`bench.patches`) are applied to the imported ``rolemesh_node``
modules before the CLI builds the service, so the variant is the real agent,
started the real way, with only those functions replaced.
"""

from __future__ import annotations

import argparse
import sys

from . import patches


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patches", required=True)
    args, rest = parser.parse_known_args()
    for name in [p for p in args.patches.split(",") if p]:
        patches.PATCHES[name]()
    from rolemesh_node.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
