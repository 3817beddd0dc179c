"""Auth challenges (PROTOCOL.md A3): issuing, checking, and consuming them exactly once.

The checks run twice on purpose: `check_response` (pure, in the order the protocol fixes,
including the signature) decides the error code, and the Lua script behind
`ChallengeStore.consume` (`shared.lua.CONSUME_CHALLENGE`) repeats the cheap checks atomically
while marking the record used, so two sockets racing with the same signed response cannot
both win. A failed verification never reaches `consume`, so it does not use the challenge up.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from shared import keys, lua
from shared.codes import AuthError
from shared.identity import decode_public_key, decode_signature, verify_signature
from shared.replication import PipelinedScript

# A used record is kept this long past its expiry, so a replay is told challenge_already_used
# rather than challenge_not_found.
RECORD_MARGIN_S = 60


@dataclass(frozen=True, slots=True)
class ChallengeRecord:
    challenge_id: str
    persona_key: str
    challenge_text: str
    expires_at_ms: int
    used: bool = False


def new_challenge(
    persona_key: str,
    now_ms: int,
    ttl_s: int,
    new_uuid: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> ChallengeRecord:
    challenge_id = new_uuid()
    return ChallengeRecord(
        challenge_id=challenge_id,
        persona_key=persona_key,
        challenge_text=f"relay-auth:{challenge_id}:{new_uuid()}",
        expires_at_ms=now_ms + ttl_s * 1000,
    )


def iso_utc_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and `Z`, as JavaScript's toISOString writes it."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def normalize_key(persona_key: str) -> str:
    return persona_key.strip().lower()


def check_response(
    record: ChallengeRecord | None, persona_key: str, signature_base64: str, now_ms: int
) -> AuthError | None:
    """The first failing check's wire code, or None when the response is valid."""
    if record is None:
        return AuthError.CHALLENGE_NOT_FOUND
    if record.persona_key != normalize_key(persona_key):
        return AuthError.CHALLENGE_MISMATCH
    if record.used:
        return AuthError.CHALLENGE_ALREADY_USED
    if now_ms >= record.expires_at_ms:
        return AuthError.CHALLENGE_EXPIRED
    try:
        signature = decode_signature(signature_base64)
    except ValueError:  # non-ASCII text: shared.identity only maps binascii errors to b""
        signature = b""
    if not signature:
        return AuthError.INVALID_SIGNATURE_ENCODING
    public_key = decode_public_key(record.persona_key)
    if not verify_signature(public_key, record.challenge_text.encode("utf-8"), signature):
        return AuthError.INVALID_SIGNATURE
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


class ChallengeStore:
    """Challenge records in Redis hashes that expire on their own (no GC sweep needed)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._consume = PipelinedScript(redis, lua.CONSUME_CHALLENGE)  # shares writes node-wide

    def queue_save(self, pipe: Pipeline, record: ChallengeRecord) -> None:
        """Queue the record's writes on `pipe` (two replies), to share a round trip."""
        key = keys.challenge(record.challenge_id)
        ttl_ms = max(record.expires_at_ms - now_ms(), 0) + RECORD_MARGIN_S * 1000
        pipe.hset(
            key,
            mapping={
                "pk": record.persona_key,
                "text": record.challenge_text,
                "exp": record.expires_at_ms,
                "used": "0",
            },
        )
        pipe.pexpire(key, ttl_ms)

    async def forget(self, challenge_id: str) -> None:
        await self._redis.delete(keys.challenge(challenge_id))

    async def load(self, challenge_id: str) -> ChallengeRecord | None:
        fields: dict[bytes, bytes] = await self._redis.hgetall(keys.challenge(challenge_id))  # type: ignore[misc]
        if not fields or b"pk" not in fields:
            return None
        return ChallengeRecord(
            challenge_id=challenge_id,
            persona_key=fields[b"pk"].decode(),
            challenge_text=fields.get(b"text", b"").decode(),
            expires_at_ms=int(fields.get(b"exp", b"0")),
            used=fields.get(b"used") == b"1",
        )

    async def consume(self, challenge_id: str, persona_key: str, at_ms: int) -> AuthError | None:
        """Mark the challenge used if it still may be; None on success, else the wire code."""
        outcome = await self._consume(keys=[keys.challenge(challenge_id)], args=[persona_key, at_ms])
        code = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        return None if code == "ok" else AuthError(code)
