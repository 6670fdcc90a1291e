"""Prototype changes to ``rolemesh_node``, measured before they are made.

A *variant* is a node started by the bench with some config keys set and/or
some functions of ``rolemesh_node`` replaced at start (by
:mod:`bench.node_variant`, before the CLI builds the service). Each patch here
is the smallest stand-in for a proposed change in the code; docs/performance.md
says which were measured and what they gave. The patches target the code as it
was when they were written: if the code they replace has changed, a patch may
no longer apply (it raises at start, and the bench says so).

    python -m bench.run --variants noaccesslog,serial
"""

from __future__ import annotations

from typing import Any, Callable

# ---------------------------------------------------------------- patches
#
# The prototypes measured before (noform, nostat, nossl, accesslog_buffered,
# stderrbatch; docs/performance.md) are in the code now and were removed here.


def nometrics() -> None:
    """No Prometheus counting per request (measures what it costs)."""
    from rolemesh_node import proxy

    proxy.ProxyResource.metrics = property(lambda self: None, lambda self, value: None)


PATCHES: dict[str, Callable[[], None]] = {
    "nometrics": nometrics,
}

# ------------------------------------------------------------- variants

#: name -> {"config": extra top-level config keys, "child_args": extra child flags, "patches": [...]}
VARIANTS: dict[str, dict[str, Any]] = {
    # the operator can turn the access log off: what does it still cost?
    "noaccesslog": {"config": {"access_log": False}},
    # children that log nothing: what the agent's reading of their stderr costs
    # (measurement only — the node needs the log lines)
    "childquiet": {"child_args": ["--log-disable"]},
    # the seed's serialization: no request waits inside the child
    "serial": {"config": {"max_concurrent_requests_per_device": 1}},
    # two requests waiting inside a one-slot child
    "pipeline3": {"config": {"max_concurrent_requests_per_device": 3}},
    # each prototype alone
    **{name: {"patches": [name]} for name in PATCHES},
}
