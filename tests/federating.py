"""Running a hub and its edges in one event loop until the hub ends, for system tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from edge_client.runtime import EdgeClient, run_edges
from hub.service import HubService


async def run_until_hub_ends(hub: HubService, edges: Sequence[EdgeClient], timeout: float = 240) -> None:
    """Run ``edges`` while ``hub.run()`` lasts (at most ``timeout`` s), then stop them; fails on any edge error."""
    stop = asyncio.Event()
    running = asyncio.create_task(run_edges(edges, stop))
    try:
        await asyncio.wait_for(hub.run(), timeout)
    finally:
        stop.set()
        errors = await asyncio.wait_for(running, 120)
    assert not errors
