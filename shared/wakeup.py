"""Wake-ups on a tunnel node's pub/sub channel (DESIGN.md: pub/sub is only a wake-up).

A lost wake-up delays, never loses: tunnel nodes also sweep their personas periodically.
Messages are `<kind> <persona_key> [<detail>]` in ASCII.
"""

from __future__ import annotations

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
    """Publish a wake-up to the node that owns the persona, if any; True if one was sent."""
    owner = await redis.get(keys.owner(persona_key))
    if owner is None:
        return False
    node_id = owner.decode() if isinstance(owner, bytes) else str(owner)
    await redis.publish(keys.node_channel(node_id), Wakeup(kind, persona_key).encode())
    return True
