"""Waiting in async tests: poll a condition until it holds, or fail naming what never happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    """Return once ``predicate()`` is true; AssertionError after ``timeout`` seconds (a wait, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
