"""Publishing a delivery result exactly once per outbound stream, and remembering final
per-recipient outcomes across retries and crashes.

arq runs a job at least once: after a worker crash the same job runs again. Two records keep
that from sending mail twice:
- `keys.egress_result_published(pk, stream_id)` is set (NX, with a TTL) in the same Lua script
  that XADDs the result, so a result is published once, and a job that finds it set returns
  without touching SMTP.
- `keys.egress_delivered(pk, stream_id)` maps each recipient to its final outcome, written right
  after the remote server's reply, so a retry or re-run only handles recipients still open.
What remains is the gap between the remote `250` and that write: a crash exactly there sends
the message again on the re-run (SMTP is at-least-once; the recipient sees a duplicate).
"""

from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis

from services.egress.outcome import Disposition, Outcome
from shared import keys
from shared.logs import log
from shared.payloads import DeliveryResult
from shared.wakeup import WakeupKind, wake_owner

logger = logging.getLogger("egress.results")

IDEMPOTENCY_TTL_S = 2 * 24 * 3600  # longer than arq keeps a job (1 day + its deferral)
RESULTS_STREAM_MAX_ENTRIES = 10_000  # bounds a persona that never reconnects

_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return 1
end
return 0
"""


class ResultStore:
    def __init__(self, redis: aioredis.Redis, *, retention_s: int) -> None:
        self._redis = redis
        self._retention_s = retention_s
        self._publish_once = redis.register_script(_PUBLISH_ONCE)

    async def already_published(self, persona_key: str, stream_id: str) -> bool:
        return bool(await self._redis.exists(keys.egress_result_published(persona_key, stream_id)))

    async def publish(self, persona_key: str, result: DeliveryResult) -> bool:
        """Append the result and wake the owning tunnel node; False if one was already published."""
        published = await self._publish_once(
            keys=[keys.egress_result_published(persona_key, result.stream_id), keys.results(persona_key)],
            args=[result.status, IDEMPOTENCY_TTL_S, result.pack(), RESULTS_STREAM_MAX_ENTRIES, self._retention_s],
        )
        if not published:
            return False
        try:
            await wake_owner(self._redis, persona_key, WakeupKind.RESULT)
        except Exception as exc:  # the tunnel's periodic sweep delivers it anyway
            log(logger, logging.WARNING, "result wake-up failed", persona=persona_key,
                stream_id=result.stream_id, error=type(exc).__name__)
        return True

    async def final_outcomes(self, persona_key: str, stream_id: str) -> dict[str, Outcome]:
        stored: dict[bytes, bytes] = await self._redis.hgetall(  # type: ignore[misc]
            keys.egress_delivered(persona_key, stream_id)
        )
        return {recipient.decode(): _decode_outcome(value) for recipient, value in stored.items()}

    async def record_final(self, persona_key: str, stream_id: str, outcomes: dict[str, Outcome]) -> None:
        if not outcomes:
            return
        key = keys.egress_delivered(persona_key, stream_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={recipient: _encode_outcome(o) for recipient, o in outcomes.items()})
            pipe.expire(key, IDEMPOTENCY_TTL_S)
            await pipe.execute()


def _encode_outcome(outcome: Outcome) -> str:
    return json.dumps(
        {"d": outcome.disposition.value, "e": outcome.error, "c": outcome.smtp_code,
         "x": outcome.enhanced_code, "m": outcome.message_id},
        separators=(",", ":"),
    )


def _decode_outcome(raw: bytes) -> Outcome:
    fields = json.loads(raw)
    return Outcome(Disposition(fields["d"]), error=fields.get("e"), smtp_code=fields.get("c"),
                   enhanced_code=fields.get("x"), message_id=fields.get("m"))
