"""Load the TLS stack only when the node needs it.

Twisted imports pyOpenSSL and ``cryptography`` (≈12 MB of resident memory)
as soon as the reactor is imported, whenever they are installed — and they
always are (treq depends on ``twisted[tls]``). The standard library's own
OpenSSL bindings come in the same way: ``twisted.python.compat`` imports
``http.cookiejar``, which imports ``urllib.request``, ``http.client`` and so
``ssl`` (libssl, libcrypto) and ``hashlib``, whose ``_hashlib`` backend
initializes OpenSSL's digests — ≈5 MB more. The node itself needs TLS only
to reach an ``https://`` dispatcher: its children are plain HTTP on
127.0.0.1, and it serves plain HTTP (put a TLS proxy in front for more).

:func:`skip_tls_unless_needed` runs in the CLI and the twistd plugin before
the node's modules import the reactor's TLS support; without TLS, Twisted's
HTTP client refuses ``https`` URLs, which the config never leads to. The
standard library copes with the missing modules by design (``ssl`` is
optional for ``http.client``, ``urllib.request`` and ``asyncio``;
``hashlib`` and ``hmac`` fall back to their built-in digests and
``compare_digest``). Under twistd, ``ssl`` and ``_hashlib`` are loaded before
the plugin runs; only pyOpenSSL is kept out there.
"""

from __future__ import annotations

import sys

from .config import NodeConfig

#: pyOpenSSL (Twisted's TLS), and the standard library's OpenSSL bindings
TLS_MODULES = ("OpenSSL", "ssl", "_ssl", "_hashlib")


def needs_tls(config: NodeConfig) -> bool:
    url = config.dispatcher_base_url or ""
    return url.lower().startswith("https:")


def skip_tls_unless_needed(config: NodeConfig) -> list[str]:
    """Block the import of each of :data:`TLS_MODULES` that is not loaded yet, unless ``config`` needs
    TLS; the names blocked (none: nothing changed)."""
    if needs_tls(config):
        return []
    blocked = [name for name in TLS_MODULES if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
    return blocked
