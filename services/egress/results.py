"""Publishing a delivery result exactly once per outbound stream, and remembering final
per-recipient outcomes across retries and crashes.

arq runs a job at least once: after a worker crash the same job runs again. Two records keep
that from sending mail twice:
- `keys.egress_result_published(pk, stream_id)` is set (NX, with a TTL) in the same Lua script
  that XADDs the result, so a result is published once, and a job that finds it set returns
  without touching SMTP.
- `keys.egress_delivered(pk, stream_id)` maps each recipient to its final outcome, so a retry or
  re-run only handles recipients still open. It is written before anything else can go wrong
  after a remote reply: before the next domain's SMTP session starts and before a retry is
  scheduled. An attempt that ends the job publishes instead (the marker supersedes the hash,
  which the publish deletes): one round trip, not two.
The worker reads both with the job's claim (`claim_state_keys`, `prior_state_from`), in the
claim's round trip; `prior_state` reads them on their own (a run outside the worker, the CLI).
Without replicas to wait for, the publish goes out with the job's finish, one pipeline, the
finish counting only if the marker is there (`publish_call`, `prompt_worker.EndWrite`): a job
costs the worker two round trips to Redis, the claim and the publish-and-finish.
What remains is the gap between the remote `250` and that write or publish: a crash exactly
there sends the message again on the re-run (SMTP is at-least-once; the recipient sees a
duplicate).

The publish script also wakes the persona's tunnel nodes (the wake-up rule of `shared/lua.py`,
which `shared.wakeup.wake_owner` runs too), so publishing a result is one round trip.

With `redis.minReplicasToAck` (docs/HA.md) the publish is followed by WAIT in the same round
trip; too few replicas raise `NotReplicated`, a RedisError, so the job is retried. The re-run
finds the marker and calls `confirm`: the script refreshes the marker's TTL (a write), and a
replica acknowledging that write holds everything the primary wrote before it, the result too.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.egress.outcome import Disposition, Outcome
from services.egress.prompt_worker import JobState, JobStateKeys
from shared import keys, lua
from shared.payloads import DeliveryResult
from shared.replication import NO_ACK, ReplicaAck, ScriptCall, run_scripts
from shared.wakeup import Wakeup, WakeupKind

IDEMPOTENCY_TTL_S = 2 * 24 * 3600  # longer than arq keeps a job (1 day + its deferral)
RESULTS_STREAM_MAX_ENTRIES = 10_000  # bounds a persona that never reconnects


@dataclass(frozen=True, slots=True)
class PriorState:
    """What earlier runs of the same outbound stream left behind."""

    published: bool
    final_outcomes: dict[str, Outcome]


_PERSONA, _STREAM = "\x00persona\x00", "\x00stream\x00"  # stand-ins, never in a real name
_LUA_PATTERN_MAGIC = re.compile(r"([\^$()%.\[\]*+\-?])")


def claim_state_keys() -> JobStateKeys:
    """The published marker and the per-recipient record of a `deliver` job, named from its job
    id (`keys.egress_job_id`) by the claim script: the names come from `shared.keys`, only
    turned into a Lua pattern (the persona key, which holds no `:`, then the stream id) and
    `string.gsub` replacements."""
    before, rest = keys.egress_job_id(_PERSONA, _STREAM).split(_PERSONA)
    between, after = rest.split(_STREAM)  # ValueError if the layout changed: the tests catch it
    escaped = [_LUA_PATTERN_MAGIC.sub(r"%\1", literal) for literal in (before, between, after)]
    pattern = f"^{escaped[0]}(.-){escaped[1]}(.*){escaped[2]}$"

    def replacement(name: str) -> str:
        return name.replace("%", "%%").replace(_PERSONA, "%1").replace(_STREAM, "%2")

    return JobStateKeys(
        pattern,
        exists=replacement(keys.egress_result_published(_PERSONA, _STREAM)),
        hash=replacement(keys.egress_delivered(_PERSONA, _STREAM)),
    )


def prior_state_from(state: JobState) -> PriorState:
    """`PriorState` from what the claim script read with `claim_state_keys`."""
    return PriorState(
        state.exists, {recipient.decode(): _decode_outcome(value) for recipient, value in state.hash.items()}
    )


class ResultStore:
    def __init__(self, redis: aioredis.Redis, *, retention_s: int, ack: ReplicaAck = NO_ACK) -> None:
        self._redis = redis
        self._retention_s = retention_s
        self._ack = ack

    async def prior_state(self, persona_key: str, stream_id: str) -> PriorState:
        """The published marker and the recorded final outcomes, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.egress_result_published(persona_key, stream_id))
            pipe.hgetall(keys.egress_delivered(persona_key, stream_id))
            published, stored = await pipe.execute()
        return prior_state_from(JobState(bool(published), stored))

    @property
    def needs_replicas(self) -> bool:
        """Whether a publish must be confirmed by replicas (WAIT) before the job may end."""
        return self._ack.replicas > 0

    async def publish(self, persona_key: str, result: DeliveryResult) -> bool:
        """Append the result, drop the per-recipient record (the marker supersedes it) and wake
        the tunnel nodes holding the persona, atomically; False if one was already published."""
        (published,) = await run_scripts(self._redis, [self.publish_call(persona_key, result)], self._ack)
        return bool(published)

    def publish_call(self, persona_key: str, result: DeliveryResult) -> ScriptCall:
        """`publish` as a script call (1 if published, 0 if it was before), for the worker to
        send with the job's finish; it leaves `published_marker` behind either way."""
        return ScriptCall(
            lua.PUBLISH_RESULT,
            [
                keys.egress_result_published(persona_key, result.stream_id),
                keys.results(persona_key),
                keys.egress_delivered(persona_key, result.stream_id),
                keys.owner(persona_key),
                keys.outbound_holders(persona_key),
            ],
            [
                result.status,
                IDEMPOTENCY_TTL_S,
                result.pack(),
                RESULTS_STREAM_MAX_ENTRIES,
                self._retention_s,
                int(time.time() * 1000),
                Wakeup(WakeupKind.RESULT, persona_key).encode(),
            ],
        )

    @staticmethod
    def published_marker(persona_key: str, stream_id: str) -> str:
        return keys.egress_result_published(persona_key, stream_id)

    async def confirm(self, persona_key: str, stream_id: str) -> None:
        """Raise NotReplicated unless the required replicas hold the published result (a re-run
        of a job whose publish was not confirmed); nothing to do when none are required."""
        if self._ack.replicas:
            call = ScriptCall(
                lua.TOUCH_RESULT_MARKER, [keys.egress_result_published(persona_key, stream_id)], [IDEMPOTENCY_TTL_S]
            )
            await run_scripts(self._redis, [call], self._ack)

    async def record_final(
        self, persona_key: str, stream_id: str, outcomes: dict[str, Outcome], last_error: str | None = None
    ) -> None:
        """Remember final outcomes; `last_error` (a deferral's temporary error) is kept for
        operators (`protege-relay queue list`), in the same round trip."""
        if not outcomes and last_error is None:
            return
        key = keys.egress_delivered(persona_key, stream_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            if outcomes:
                pipe.hset(key, mapping={recipient: _encode_outcome(o) for recipient, o in outcomes.items()})
                pipe.expire(key, IDEMPOTENCY_TTL_S)
            if last_error is not None:
                pipe.set(keys.egress_last_error(persona_key, stream_id), last_error, ex=IDEMPOTENCY_TTL_S)
            await pipe.execute()


def _encode_outcome(outcome: Outcome) -> str:
    return json.dumps(
        {
            "d": outcome.disposition.value,
            "e": outcome.error,
            "c": outcome.smtp_code,
            "x": outcome.enhanced_code,
            "m": outcome.message_id,
        },
        separators=(",", ":"),
    )


def _decode_outcome(raw: bytes) -> Outcome:
    fields = json.loads(raw)
    return Outcome(
        Disposition(fields["d"]),
        error=fields.get("e"),
        smtp_code=fields.get("c"),
        enhanced_code=fields.get("x"),
        message_id=fields.get("m"),
    )
