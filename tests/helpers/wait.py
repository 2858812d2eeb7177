"""Polling with a deadline."""
from __future__ import annotations

import time


def wait_until(pred, timeout: float = 10.0, interval: float = 0.01):
    """``pred()``'s first truthy value, polled every ``interval`` s; AssertionError after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
