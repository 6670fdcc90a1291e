"""Hand the memory the start-up freed back to the system, once.

Importing the node's modules and loading its config allocate and free a few
megabytes (compiling the dataclasses' generated methods, reading ``.pyc``
files, parsing the YAML); glibc keeps what was freed in its heap, so it stays
in the process's resident memory for good. One ``malloc_trim(0)`` once the
devices are discovered returns it (≈1.4 MB of RSS on the bench's node); the
requests that follow do not take it back. It runs once, from the CLI and the
twistd plugin (the processes that own the heap) — never on a timer and never in
a library caller's process. Where there is no glibc (musl, macOS) it does
nothing.
"""

from __future__ import annotations

from typing import Any


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: True when it ran (glibc), False where there is none."""
    try:
        import ctypes  # Twisted has imported it already (twisted.python.win32)

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return False
    trim(0)
    return True


def release_once_discovered(service: Any) -> None:
    """Call :func:`release_freed_memory` once ``service`` (a started NodeService) has discovered its devices."""
    service.when_discovered().addCallback(lambda _: release_freed_memory())
