"""Token counts read from what a child sends back, without parsing the relayed body.

llama-server reports the tokens of a request at the end of its answer: a
non-streamed answer has ``"usage"`` (and ``"timings"``) near its end; a stream
carries them in its last event before ``data: [DONE]`` (a chat stream only
``"timings"``, a completion stream both). The client's request is never
changed to ask for them.

:class:`TailWindow` keeps references to the last chunks of a relayed body
(at least ``WINDOW`` bytes; nothing is copied per chunk); :func:`read_counts`
looks once, at the end, for the last ``"usage"`` and ``"timings"`` objects in
that window and parses only those two small objects. An answer whose counts
lie further than ``WINDOW`` bytes from its end (none that llama-server sends)
is not counted.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any, Callable

#: bytes kept from the end of a body
WINDOW = 16 * 1024
_DECODER = json.JSONDecoder()


class TailWindow:
    """The last chunks of a body, at least ``WINDOW`` bytes of them.

    A chunk fed with ``framed`` is whole HTTP chunks with their framing (a
    read the proxy passed through as the child framed it): ``text`` takes the
    framing off with ``unframe``, once, at the end."""

    __slots__ = ("chunks", "size", "framed")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes | memoryview] = collections.deque()  # framed ones as memoryviews
        self.size = 0
        self.framed = 0  # how many of the chunks are framed

    def feed(self, data: bytes, framed: bool = False) -> None:
        chunks = self.chunks
        if framed:
            chunks.append(memoryview(data))  # a mark, not a copy
            self.framed += 1
        else:
            chunks.append(data)
        self.size += len(data)
        while self.size - len(chunks[0]) >= WINDOW:
            gone = chunks.popleft()
            self.size -= len(gone)
            if isinstance(gone, memoryview):
                self.framed -= 1

    def text(self, unframe: Callable[[bytes], bytes] | None = None) -> bytes:
        if not self.framed or unframe is None:
            return b"".join(self.chunks)
        return b"".join(unframe(c.obj) if isinstance(c, memoryview) else c for c in self.chunks)


@dataclass(frozen=True, slots=True)
class Counts:
    prompt: int
    completion: int


def read_counts(tail: bytes) -> Counts | None:
    """The tokens of an answer from its last ``usage`` (else ``timings``) object, or None."""
    usage = _last_object(tail, b'"usage"')
    if usage is not None:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
        if _count(prompt) and _count(completion):
            return Counts(prompt, completion)
    timings = _last_object(tail, b'"timings"')
    if timings is not None:
        prompt, cached, predicted = timings.get("prompt_n"), timings.get("cache_n", 0), timings.get("predicted_n")
        if _count(prompt) and _count(cached) and _count(predicted):
            return Counts(prompt + cached, predicted)  # usage.prompt_tokens counts cached tokens too
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _last_object(text: bytes, key: bytes) -> dict[str, Any] | None:
    """The JSON object after the last ``key:`` in ``text`` (numbers and nested objects, as usage holds),
    read by the json module's C scanner (``raw_decode`` stops at the object's end)."""
    at = text.rfind(key)
    if at < 0:
        return None
    start = text.find(b"{", at + len(key))
    if start < 0 or text[at + len(key):start].strip(b" \t\r\n:"):
        return None
    try:
        value, _end = _DECODER.raw_decode(text[start:start + 4096].decode("utf-8", "replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
