"""Wake-ups on a tunnel node's pub/sub channel (DESIGN.md: pub/sub is only a wake-up).

A lost wake-up delays, never loses: tunnel nodes also sweep their personas periodically.
Messages are `<kind> <persona_key> [<detail>]` in ASCII.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from shared import keys


class WakeupKind(StrEnum):
    INBOX = "inbox"  # new inbox entry for the persona
    RESULT = "result"  # new delivery result for the persona
    EVICT = "evict"  # another node took the persona: close the socket named in detail


@dataclass(frozen=True, slots=True)
class Wakeup:
    kind: WakeupKind
    persona_key: str
    detail: str = ""

    def encode(self) -> bytes:
        return f"{self.kind} {self.persona_key} {self.detail}".rstrip().encode("ascii")

    @classmethod
    def decode(cls, message: bytes | str) -> Wakeup | None:
        text = message.decode("ascii", "replace") if isinstance(message, bytes) else message
        parts = text.split(" ", 2)
        if len(parts) < 2 or parts[0] not in WakeupKind.__members__.values():
            return None
        return cls(WakeupKind(parts[0]), parts[1], parts[2] if len(parts) > 2 else "")


async def wake_owner(redis: aioredis.Redis, persona_key: str, kind: WakeupKind) -> bool:
    """Publish a wake-up to the node that owns the persona, if any; True if one was sent.

    A RESULT also goes to the nodes holding an outbound-role socket of the persona
    (`keys.outbound_holders`, e.g. `protege-relay send` with no inbound socket anywhere), read in
    the same round trip; each distinct node is woken once.
    """
    if kind is WakeupKind.RESULT:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.owner(persona_key))
            pipe.zrangebyscore(keys.outbound_holders(persona_key), int(time.time() * 1000), "+inf")
            owner, holders = await pipe.execute()
        nodes = [_text(node) for node in [owner, *holders] if node is not None]
    else:
        owner = await redis.get(keys.owner(persona_key))
        nodes = [_text(owner)] if owner is not None else []
    message = Wakeup(kind, persona_key).encode()
    for node_id in dict.fromkeys(nodes):
        await redis.publish(keys.node_channel(node_id), message)
    return bool(nodes)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
