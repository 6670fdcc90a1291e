"""Helpers for tests that run the agent or twistd as real processes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    """The environment of a child process: this checkout first, so the console scripts run the code under
    test wherever the package is installed from."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return clean | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy (and return it); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_clean_log(text: str) -> None:
    assert "Traceback" not in text, text
    assert "Unhandled" not in text, text
