"""The edge's readiness per service on its admin listener (what GeoDNS checks per name)."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client import CollectorRegistry

from edge.admin import AdminServer
from meridian.ports import free_port


def test_readyz_per_service_says_whether_a_region_of_the_service_is_up() -> None:
    ready = {"market": True, "eu-only": False}
    draining = False

    async def scenario() -> list[tuple[int, str]]:
        admin = AdminServer(
            CollectorRegistry(),
            status=dict,
            ready=lambda: True,
            draining=lambda: draining,
            service_ready=ready.get,
        )
        port = free_port()
        await admin.start("127.0.0.1", port)
        seen = []
        try:
            async with aiohttp.ClientSession() as session:

                async def get(path: str) -> tuple[int, str]:
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        return response.status, (await response.text()).strip()

                for path in ("/readyz/market", "/readyz/eu-only", "/readyz/nope", "/readyz"):
                    seen.append(await get(path))
                nonlocal draining
                draining = True
                seen.append(await get("/readyz/market"))
        finally:
            await admin.stop()
        return seen

    assert asyncio.run(scenario()) == [
        (200, "ready"),
        (503, "no region up for the service"),
        (404, "no such service"),
        (200, "ready"),
        (503, "draining"),
    ]
