"""Wake-ups on a tunnel node's pub/sub channel (DESIGN.md: pub/sub is only a wake-up).

A lost wake-up delays, never loses: tunnel nodes also sweep their personas periodically.
Messages are `<kind> <persona_key> [<detail>]` in ASCII.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from shared import keys, lua


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
    """Wake the persona's nodes (who: `shared.lua.WAKE_FUNCTION`, the one home of that rule) in
    one round trip; True if any node was woken.

    A RESULT also goes to the nodes holding an outbound-role socket of the persona
    (`keys.outbound_holders`, e.g. `protege-relay send` with no inbound socket anywhere).
    """
    script_keys = [keys.owner(persona_key)]
    if kind is WakeupKind.RESULT:
        script_keys.append(keys.outbound_holders(persona_key))
    woken = await lua.WAKE.on(redis)(
        keys=script_keys, args=[Wakeup(kind, persona_key).encode(), int(time.time() * 1000)]
    )
    return int(woken) > 0
