"""Removing entries from a persona's inbox while keeping its byte counter right: the one way out
of an inbox, for the tunnel (acknowledged, expired) and for an operator (`protege-relay queue
delete` / `purge`).

`keys.inbox_bytes` feeds the inbox byte cap, so it must fall by exactly the size of each entry
that really left. Two parties can remove the same entry: an operator deletes a message that
is in flight to a gateway, then the gateway acknowledges it. A plain XDEL + DECRBY from each
would count it twice and let the persona exceed its cap. The script decrements only for the
entries its own XDEL removed, so whoever comes second changes nothing. It also acknowledges
each id in the consumer group (a removed entry must not stay pending), with PCALL because a
stream the tunnel never read has no group yet.

Sizes are passed by the caller, read from the entry itself (`entry_size`), which never changes
once written.
"""

from __future__ import annotations

from typing import Any

import msgpack

from shared import keys
from shared.enqueue import INBOX_ENTRY_FIELD
from shared.payloads import InboxEntry

# KEYS: inbox, inbox_bytes. ARGV: group, then entry id and its size for each entry.
# Returns {entries removed, bytes freed}.
REMOVE_SCRIPT = """
local removed, freed = 0, 0
for i = 2, #ARGV, 2 do
  redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[i])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    removed = removed + 1
    freed = freed + tonumber(ARGV[i + 1])
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[2], freed) end
return {removed, freed}
"""


def entry_size(fields: dict[bytes, bytes]) -> int:
    """What the enqueue added to the byte counter for this entry (its message bytes); 0 for an
    entry that cannot be read (nothing was counted for it either)."""
    try:
        return len(InboxEntry.unpack(fields[INBOX_ENTRY_FIELD]).data)
    except (KeyError, TypeError, ValueError, msgpack.UnpackException):
        return 0


def removal_call(persona_key: str, removals: list[tuple[bytes | str, int]]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for REMOVE_SCRIPT: remove these (entry id, size) pairs from the inbox."""
    args: list[Any] = [keys.INBOX_GROUP]
    for entry_id, size in removals:
        args += [entry_id, size]
    return [keys.inbox(persona_key), keys.inbox_bytes(persona_key)], args
