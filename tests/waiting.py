"""Waiting in async tests: poll a condition until it holds, or fail naming what never happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def until(predicate: Callable[[], Any], what: str | Callable[[], str], timeout: float,
                poll: float = 0.02) -> Any:
    """``predicate()``'s first truthy value; AssertionError after ``timeout`` seconds (a wait, not a timing check).

    ``what`` names the awaited event; a callable is asked at failure time (to show what did arrive).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(poll)
    return result
