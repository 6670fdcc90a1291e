"""Load the TLS stack only when the node needs it.

Twisted imports pyOpenSSL and ``cryptography`` (≈12 MB of resident memory)
as soon as the reactor is imported, whenever they are installed — and they
always are (treq depends on ``twisted[tls]``). The node itself needs TLS only
to reach an ``https://`` dispatcher: its children are plain HTTP on
127.0.0.1, and it serves plain HTTP (put a TLS proxy in front for more).

:func:`skip_tls_unless_needed` runs in the CLI and the twistd plugin before
the node's modules import the reactor's TLS support; without TLS, Twisted's
HTTP client refuses ``https`` URLs, which the config never leads to.
"""

from __future__ import annotations

import sys

from .config import NodeConfig


def needs_tls(config: NodeConfig) -> bool:
    url = config.dispatcher_base_url or ""
    return url.lower().startswith("https:")


def skip_tls_unless_needed(config: NodeConfig) -> bool:
    """Block the import of pyOpenSSL unless ``config`` needs TLS or it is
    loaded already; True when it was blocked."""
    if needs_tls(config) or "OpenSSL" in sys.modules:
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # "import OpenSSL" raises ImportError
    return True
