"""Inbound API keys: ``Authorization: Bearer <key>`` on every route but ``/health`` and ``/ready``.

Keys come from ``api_keys`` in the config and/or ``api_key_file`` (one key per
line; blank lines and ``#`` comments ignored), read once at start. A request's
key is compared with every configured key in constant time
(``hmac.compare_digest``, no early exit), so timing does not tell how much of a
guess was right. Keys never appear in logs or in ``repr``.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Sequence

from .config import ConfigError, NodeConfig


class ApiKeys:
    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode("utf-8") for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<ApiKeys: {len(self._keys)} key(s)>"

    def allows(self, authorization: bytes | None) -> bool:
        """True when ``authorization`` is ``Bearer <one of the keys>``."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(key, token)
        return found


def load_api_keys(config: NodeConfig) -> ApiKeys:
    """The configured keys (``api_keys`` plus those in ``api_key_file``)."""
    keys = list(config.api_keys)
    if config.api_key_file is not None:
        keys += _read_key_file(config.source, config.api_key_file)
    return ApiKeys(keys)


def _read_key_file(source: str, path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "api_key_file", f"cannot read {path}: {type(exc).__name__}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    bad = [i for i, k in enumerate(keys) if any(c.isspace() for c in k)]
    if bad:
        raise ConfigError(source, "api_key_file", f"{path}: a key may not contain white space")
    if not keys:
        raise ConfigError(source, "api_key_file", f"{path} holds no key")
    return keys
