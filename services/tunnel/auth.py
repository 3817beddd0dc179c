"""The Redis steps of authentication, as the session asks for them (services/tunnel/session.py):
the per-IP attempt rate (services/tunnel/ratelimit.py) and the challenge records
(services/tunnel/challenges.py) behind one object, so a connection holds this and not the node.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from services.tunnel.challenges import ChallengeRecord, ChallengeStore
from services.tunnel.ratelimit import AuthRateLimiter
from shared.codes import AuthError
from shared.ratelimit import Clock


class AuthStore:
    """One method per Redis step of auth; each answers what the session's next event needs."""

    def __init__(
        self, redis: aioredis.Redis, attempts_per_minute: int, deny_window_ms: int, rate_clock: Clock = time.time
    ) -> None:
        self._redis = redis
        self.challenges = ChallengeStore(redis)
        self.rate = AuthRateLimiter(redis, attempts_per_minute, deny_window_ms, rate_clock)

    async def store_challenge(self, client_ip: str, challenge: ChallengeRecord) -> bool:
        """Count the attempt and store the challenge in one round trip, shared with the other
        sockets' Redis steps of this loop turn (shared/redis_batch.py); True within the rate."""

        def queue(pipe: Pipeline) -> None:
            self.rate.count(pipe, client_ip)
            self.challenges.queue_save(pipe, challenge)

        async with self._redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            replies = await pipe.execute()
        return await self.rate.judge(client_ip, replies)

    async def discard_challenge(self, challenge_id: str) -> None:
        await self.challenges.forget(challenge_id)

    async def within_rate(self, client_ip: str) -> bool:
        """Count one attempt from `client_ip`; False when it is over the limit or denied."""
        return await self.rate.allow(client_ip)

    async def load_challenge(self, challenge_id: str) -> ChallengeRecord | None:
        return await self.challenges.load(challenge_id)

    async def consume_challenge(self, challenge_id: str, persona_key: str, at_ms: int) -> AuthError | None:
        """Mark it used if it still may be: None on success, else the wire code."""
        return await self.challenges.consume(challenge_id, persona_key, at_ms)
