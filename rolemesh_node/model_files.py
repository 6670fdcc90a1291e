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
"""

from __future__ import annotations

from typing import Iterable

from .config import ModelSpec


class ModelFiles:
    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs = list(specs)
        self._seen: dict[str, tuple[bool, int | None]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Look at every model's file again."""
        for spec in self._specs:
            self.check(spec)

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
