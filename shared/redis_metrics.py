"""Redis memory as Prometheus gauges, so the relay's own `/metrics` warns before Redis reaches
`maxmemory` (every inbox, queue and result lives there: a full Redis refuses writes, and the
ingress then answers 451 to all mail). One INFO call per scrape, on the tunnel's port."""

from __future__ import annotations

from prometheus_client import Gauge

from shared.config import RelayConfig
from shared.redis import connect

MEMORY_USED = Gauge("relay_redis_memory_used_bytes", "Redis used_memory (INFO memory)", multiprocess_mode="mostrecent")
MEMORY_MAX = Gauge("relay_redis_memory_max_bytes", "Redis maxmemory (0: no limit set)", multiprocess_mode="mostrecent")


async def refresh_redis_memory(config: RelayConfig) -> None:
    client = connect(config)
    try:
        info = await client.info("memory")
    finally:
        await client.aclose()
    MEMORY_USED.set(int(info.get("used_memory", 0)))
    MEMORY_MAX.set(int(info.get("maxmemory", 0)))
