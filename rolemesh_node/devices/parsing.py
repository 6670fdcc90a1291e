"""Pure helpers shared by the vendor-tool parsers: text, numbers, units, JSON.

Everything here takes ``bytes``/``str``/plain data and returns plain data; no
I/O, no reactor. Vendor tools disagree on how they say "not known"
(``[N/A]``, ``N/A``, ``[Not Supported]``…), on units (``MB`` from amd-smi is
really MiB) and on whether a value is a number, a string with a unit or a
``{"value": …, "unit": …}`` object; these helpers absorb that once.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Hashable, Mapping, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MIB = 1024 * 1024

#: spellings of "no value" seen in nvidia-smi, amd-smi, rocm-smi and xpu-smi output
_MISSING = frozenset({
    "", "n/a", "[n/a]", "na", "none", "null", "-", "unknown", "[unknown error]",
    "not supported", "[not supported]", "not available", "[not available]",
    "insufficient permissions", "[insufficient permissions]", "[gpu is lost]",
    "[requires pro]", "requires pro", "unsupported",
})

#: byte multipliers; vendor "MB"/"GB" are binary units (amd-smi divides by 1024²)
_UNIT_BYTES = {
    "b": 1, "bytes": 1, "byte": 1,
    "kb": 1024, "kib": 1024, "k": 1024,
    "mb": MIB, "mib": MIB, "m": MIB,
    "gb": 1024 ** 3, "gib": 1024 ** 3, "g": 1024 ** 3,
    "tb": 1024 ** 4, "tib": 1024 ** 4,
}

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def text(data: bytes | str) -> str:
    """Tool output as text (UTF-8, undecodable bytes replaced)."""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def is_missing(value: Any) -> bool:
    """True for ``None`` and the tools' "no value" spellings."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in _MISSING
    return False


def unwrap(value: Any) -> tuple[Any, str | None]:
    """``{"value": v, "unit": u}`` → ``(v, u)``; anything else → ``(value, None)``."""
    if isinstance(value, Mapping) and "value" in value:
        unit = value.get("unit")
        return value.get("value"), unit if isinstance(unit, str) else None
    return value, None


def to_float(value: Any) -> float | None:
    """A number from ``41``, ``"28.52"``, ``"0 %"``, ``"38 °C"``, ``{"value": 7}``; else None."""
    value, _ = unwrap(value)
    if isinstance(value, bool) or is_missing(value):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = _NUMBER.search(value.replace(",", ""))
        if match is None:
            return None
        number = float(match.group(0))
    else:
        return None
    return None if math.isnan(number) or math.isinf(number) else number


def to_int(value: Any) -> int | None:
    """Like :func:`to_float`, truncated to an int (accepts ``"0x1f"`` hex too)."""
    raw, _ = unwrap(value)
    if isinstance(raw, str) and raw.strip().lower().startswith("0x"):
        try:
            return int(raw.strip(), 16)
        except ValueError:
            return None
    number = to_float(raw)
    return None if number is None else int(number)


def to_bytes(value: Any, unit: str | None = None) -> int | None:
    """Bytes from ``24576`` (+ ``unit``), ``"16368 MB"``, ``{"value": 16368, "unit": "MB"}``.

    The unit inside the value wins over ``unit``; no unit at all means bytes.
    """
    raw, inner_unit = unwrap(value)
    number = to_float(raw)
    if number is None or number < 0:
        return None
    if inner_unit is None and isinstance(raw, str):
        match = re.search(r"([KMGT]i?B|bytes?|B)\s*$", raw.strip(), re.IGNORECASE)
        inner_unit = match.group(1) if match else None
    factor = _UNIT_BYTES.get((inner_unit or unit or "b").strip().lower())
    if factor is None:
        return None
    return int(number * factor)


def load_json(data: bytes | str) -> Any | None:
    """The first JSON document in ``data``, skipping warning lines printed before it.

    rocm-smi prints ``WARNING: …`` lines and Python warnings ahead of its JSON;
    garbage gives None, never an exception.
    """
    body = text(data)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", body):
        try:
            value, _ = decoder.raw_decode(body, match.start())
        except ValueError:
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def get_ci(mapping: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` in ``mapping`` (keys compared case-insensitively)
    that holds a value — ``"N/A"`` and the like are passed over."""
    lowered = {str(k).lower(): v for k, v in mapping.items()}
    for name in names:
        value = lowered.get(name.lower())
        if not is_missing(unwrap(value)[0]):
            return value
    return None


def normalize_name(name: str) -> str:
    """A device name for comparisons: lower case, single spaces, no (R)/(TM)."""
    name = re.sub(r"\((?:r|tm|c)\)", "", name, flags=re.IGNORECASE)
    return " ".join(name.lower().split())


def match_by_name(
    wanted: Sequence[tuple[K, str]], available: Sequence[tuple[V, str]], *, by_position: bool = False,
) -> dict[K, V]:
    """Pair ``wanted`` items with ``available`` ones, in order, by device name.

    Both lists are in their tools' enumeration order. Equal names (two identical
    cards) pair up in that order. With ``by_position``, when no name matches at
    all but both lists are the same length, they pair by position (for tools
    that spell names differently but enumerate the same devices).
    """
    pairs: dict[K, V] = {}
    used: set[int] = set()
    for key, name in wanted:
        norm = normalize_name(name)
        for i, (value, other) in enumerate(available):
            if i not in used and normalize_name(other) == norm:
                pairs[key] = value
                used.add(i)
                break
    if by_position and not pairs and wanted and len(wanted) == len(available):
        return {key: available[i][0] for i, (key, _) in enumerate(wanted)}
    return pairs


__all__ = [
    "MIB", "get_ci", "is_missing", "load_json", "match_by_name", "normalize_name",
    "text", "to_bytes", "to_float", "to_int", "unwrap",
]
