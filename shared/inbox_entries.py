"""How one inbox entry is stored in Redis, in one place for the writer (shared/enqueue.py) and
the reader (services/tunnel/inbox.py).

An entry of `keys.inbox(pk)` has these fields:
- `m`: the msgpack `InboxEntry`; its `data` is empty when the body is stored apart.
- `s`: only when the body is stored apart, in `keys.inbox_body(pk, stream_id)`: its length.
- `d`: the ingress digest of the message, on the persona's last entry of that message: removing
  that entry also removes `keys.accepted(pk, d)`, so the idempotency marker protects a message
  only while it is still undelivered (a deliberate resend after delivery is a new message),
  unless the sender was told 451 for it (shared/enqueue.py `keep_markers`).

A body larger than `BODY_INLINE_MAX_BYTES` is stored apart so that the tunnel can stream it to
the gateway with GETRANGE, a few chunks at a time, instead of loading whole messages before
the first frame: with several entries in flight per socket, a slow gateway would otherwise pin
up to 8 whole messages in the tunnel's memory. Small bodies stay inline (one key, one read).

An entry, its body and its marker leave Redis together, in one script call (`shared.lua.INBOX_REMOVE`),
and the byte counter `keys.inbox_bytes` is decremented only by the call that actually deleted
the entry, so two nodes removing the same entry (a replaced socket racing its successor) do
not count it twice. Entries written before bodies were stored apart (field `m` only) are read
and removed the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from shared import keys, protocol
from shared.payloads import InboxEntry

ENTRY_FIELD = b"m"
BODY_SIZE_FIELD = b"s"
DIGEST_FIELD = b"d"
BODY_INLINE_MAX_BYTES = protocol.MAX_CHUNK_BYTES  # one smtp_chunk: anything longer is streamed


class UnreadableEntry(ValueError):
    """An inbox entry that cannot be decoded (written by something else, or corrupted)."""


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One inbox entry as read back: `entry.data` is empty when `body_apart`."""

    entry_id: bytes
    entry: InboxEntry
    size_bytes: int
    body_apart: bool
    digest: str | None

    @classmethod
    def parse(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> StoredEntry:
        try:
            entry = InboxEntry.unpack(fields[ENTRY_FIELD])
            body_size = fields.get(BODY_SIZE_FIELD)
            digest = fields.get(DIGEST_FIELD)
            size_bytes = int(body_size) if body_size is not None else len(entry.data)
            if size_bytes < 0 or len(entry.stream_id.encode("utf-8")) > protocol.MAX_STREAM_ID_BYTES:
                raise ValueError("size or stream id out of range")
            return cls(
                entry_id=entry_id,
                entry=entry,
                size_bytes=size_bytes,
                body_apart=body_size is not None,
                digest=digest.decode("ascii") if digest is not None else None,
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError, msgpack.UnpackException) as exc:
            raise UnreadableEntry(str(exc)) from exc

    def body_key(self, persona_key: str) -> str:
        return keys.inbox_body(persona_key, self.entry.stream_id)

    def remove_call(self, persona_key: str, delivered_marker_ttl_s: int = 0) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of `shared.lua.INBOX_REMOVE` for this entry. `delivered_marker_ttl_s`:
        keep the marker that long, marked delivered, instead of deleting it (a delivery with
        `redis.minReplicasToAck`, see `shared.enqueue.DELIVERED_MARKER_TTL_S`)."""
        script_keys = [
            keys.inbox(persona_key),
            keys.inbox_bytes(persona_key),
            self.body_key(persona_key),
            keys.accepted(persona_key, self.digest or ""),
        ]
        args: list[Any] = [
            keys.INBOX_GROUP,
            self.entry_id,
            self.size_bytes,
            self.entry.queue_id,
            "1" if self.body_apart else "0",
            "1" if self.digest else "0",
            delivered_marker_ttl_s,
        ]
        return script_keys, args


def stored_form(entry: InboxEntry) -> tuple[bytes, bytes]:
    """(field `m`, body to store apart or b"" to keep it inline) for writing `entry`."""
    if len(entry.data) <= BODY_INLINE_MAX_BYTES:
        return entry.pack(), b""
    return dataclasses.replace(entry, data=b"").pack(), entry.data
