"""Redis used memory for the ingress' admission rule (docs/SECURITY.md "Redis memory"), cheaply.

`INFO memory` is read at most once per `max_age_s` (1 s) per ingress process, whatever the
message rate: every RCPT in between reuses the last sample, and concurrent RCPTs that find it
stale share one refresh. A second-old figure is good enough because the watermark sits well
below `maxmemory`, and the hard stop is Redis itself: with `noeviction` an over-full Redis
refuses the enqueue script's first write (OOM), which the handler answers `452 4.3.1`, never 250.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

MAX_AGE_S = 1.0


@dataclass(frozen=True, slots=True)
class MemorySample:
    used_bytes: int
    max_bytes: int  # Redis `maxmemory`; 0 = unlimited, and then no watermark applies


class MemoryWatch:
    def __init__(self, redis: aioredis.Redis, max_age_s: float = MAX_AGE_S) -> None:
        self._redis = redis
        self._max_age_s = max_age_s
        self._sample: MemorySample | None = None
        self._taken_at = 0.0
        self._refreshing: asyncio.Future[MemorySample] | None = None

    def fresh(self) -> MemorySample | None:
        """The last sample if younger than `max_age_s` (no I/O, so no timeout to arm)."""
        if self._sample is not None and time.monotonic() - self._taken_at < self._max_age_s:
            return self._sample
        return None

    async def sample(self) -> MemorySample:
        """The last sample if younger than `max_age_s`, else a fresh one (one INFO for all
        callers waiting at that moment). Raises redis errors: the caller answers 451."""
        sample = self.fresh()
        if sample is not None:
            return sample
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        refreshing = self._refreshing
        try:
            return await asyncio.shield(refreshing)
        finally:
            if refreshing.done() and self._refreshing is refreshing:
                self._refreshing = None

    async def _refresh(self) -> MemorySample:
        info = await self._redis.info("memory")
        self._sample = MemorySample(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))
        self._taken_at = time.monotonic()
        return self._sample
