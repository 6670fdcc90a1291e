"""What the request path knows of each model's file, without a system call per request.

``ModelSpec.available()`` and ``size_bytes()`` ask the file system (``stat``,
``access``). The proxy needs both for every request (is the model servable?
how big is it, for placement?), so :class:`ModelFiles` keeps the last answer:

* a file seen **available** is trusted until the next :meth:`refresh` (the
  node's metrics loop, every ``metrics_interval_s``; and every ``/v1/models``
  or inventory read). A file removed meanwhile is still caught before a child
  is started for it: the device slot checks the file itself then;
* a file seen **missing** is looked at again on every ask, so a model copied
  in is served at once.

It also notices a file **replaced on disk** (another inode, size or mtime):
:meth:`version` changes once the new file has stayed the same for
:data:`STABLE_TICKS` refreshes after the change, so a copy still in progress is
not taken for a new model. A child spawned with an older version is stale and
is restarted (:meth:`rolemesh_node.device_slot.DeviceSlot.stale`).
"""

from __future__ import annotations

import os
from typing import Iterable

from .config import ModelSpec

#: refreshes a changed file must stay unchanged before it counts as a new version
STABLE_TICKS = 2

Signature = tuple[int, int, int, int] | None  # (device, inode, size, mtime in ns); None: no file


def signature(spec: ModelSpec) -> Signature:
    try:
        st = os.stat(spec.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Watch:
    """One model file: the signature its version stands for, and a change being watched."""

    __slots__ = ("confirmed", "seen", "ticks", "version")

    def __init__(self, sig: Signature) -> None:
        self.confirmed = sig
        self.seen = sig
        self.ticks = 0
        self.version = 0

    def tick(self, sig: Signature) -> bool:
        """One refresh saw ``sig``; True when that makes a new version."""
        if sig != self.seen:
            self.seen, self.ticks = sig, 0
            return False
        if sig == self.confirmed:
            return False
        self.ticks += 1
        if self.ticks < STABLE_TICKS:
            return False
        self.confirmed, self.ticks = sig, 0
        self.version += 1
        return True


class ModelFiles:
    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: list[ModelSpec] = []
        self._seen: dict[str, tuple[bool, int | None]] = {}
        self._watch: dict[str, _Watch] = {}
        self.set_specs(specs)

    def set_specs(self, specs: Iterable[ModelSpec]) -> None:
        """The models of a (reloaded) config; a model whose path changed is looked at afresh."""
        old = {spec.name: spec for spec in self._specs}
        self._specs = list(specs)
        for spec in self._specs:
            before = old.get(spec.name)
            if before is None or before.path != spec.path:
                self._seen.pop(spec.name, None)
                self._watch[spec.name] = _Watch(signature(spec))
        names = {spec.name for spec in self._specs}
        for name in list(self._watch):
            if name not in names:
                del self._watch[name]
                self._seen.pop(name, None)
        for spec in self._specs:
            self.check(spec)

    def refresh(self) -> list[str]:
        """Look at every model's file again; returns the models whose file became a new version."""
        changed = []
        for spec in self._specs:
            self.check(spec)
            watch = self._watch.get(spec.name)
            if watch is not None and watch.tick(signature(spec)):
                changed.append(spec.name)
        return changed

    def version(self, name: str) -> int:
        """How many times the model's file was replaced since it was configured."""
        watch = self._watch.get(name)
        return 0 if watch is None else watch.version

    def check(self, spec: ModelSpec) -> tuple[bool, int | None]:
        """Look at ``spec``'s file now and remember the answer."""
        seen = (spec.available(), spec.size_bytes())
        self._seen[spec.name] = seen
        return seen

    def _get(self, spec: ModelSpec) -> tuple[bool, int | None]:
        seen = self._seen.get(spec.name)
        if seen is None or not seen[0]:
            return self.check(spec)
        return seen

    def available(self, spec: ModelSpec) -> bool:
        return self._get(spec)[0]

    def size_bytes(self, spec: ModelSpec) -> int | None:
        return self._get(spec)[1]
