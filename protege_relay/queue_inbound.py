"""Inbound mail waiting in persona inboxes, as `protege-relay queue` lists, shows and removes it.

An inbox is a Redis stream (`keys.inbox`) of `InboxEntry` payloads; a message for several
personas is one entry in each inbox, each under its own stream id `<queue id>.<n>` (the id the
gateway sees), all under the queue id the sender was given in `250 ... queued as`. Entries are
read in pages so a long inbox is never held twice. An entry is read and removed exactly as the
tunnel does it (`shared.inbox_entries`): a large body stored apart, the idempotency marker and
the byte counter go with the entry in one script call, which counts an entry only if it deleted
it, so the counter stays right when the tunnel acknowledges the same entry at the same moment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, cast

import redis

from shared import keys, lua
from shared.backlog import age_s, as_text, int_or_none, key_tail, scan_keys
from shared.inbox_entries import StoredEntry, UnreadableEntry
from shared.payloads import InboxEntry

PAGE = 200
MAX_HEADER_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class InboundEntry:
    entry_id: str  # the Redis stream entry id (when it entered the inbox)
    stored: StoredEntry | None  # None: unreadable (still listed, so it can be deleted)
    age_s: float
    deliveries: int  # times sent to a gateway without an acknowledgement yet

    @property
    def entry(self) -> InboxEntry | None:
        """The envelope; its `data` is empty when the body is stored apart (see `body_head`)."""
        return self.stored.entry if self.stored else None

    @property
    def size(self) -> int:
        return self.stored.size_bytes if self.stored else 0

    @property
    def stream_id(self) -> str:
        return self.entry.stream_id if self.entry else f"unreadable:{self.entry_id}"

    @property
    def queue_id(self) -> str:
        return self.entry.queue_id if self.entry else ""


@dataclasses.dataclass(frozen=True)
class PersonaInbox:
    persona: str
    messages: int
    counted_bytes: int  # `keys.inbox_bytes`, what the byte cap sees
    oldest_age_s: float | None
    entries: list[InboundEntry]


@dataclasses.dataclass(frozen=True)
class Located:
    persona: str
    item: InboundEntry


def persona_keys(client: redis.Redis, persona: str | None) -> list[str]:
    """The personas whose inbox to read: the one asked for, else every inbox in Redis."""
    if persona is not None:
        return [persona]
    pattern = keys.inbox("*")
    found = {_persona_of(as_text(key)) for key in scan_keys(client, pattern, suffix=key_tail(pattern))}
    return sorted(found)


def list_inbound(client: redis.Redis, persona: str | None, now_ms: int) -> list[PersonaInbox]:
    """Every non-empty inbox (or the named persona's, even if empty), oldest entry first."""
    inboxes = []
    for persona_key in persona_keys(client, persona):
        entries = list(read_entries(client, persona_key, now_ms))
        if not entries and persona is None:
            continue
        counted = int_or_none(cast(bytes | None, client.get(keys.inbox_bytes(persona_key)))) or 0
        oldest = max((item.age_s for item in entries), default=None)
        inboxes.append(PersonaInbox(persona_key, len(entries), counted, oldest, entries))
    return inboxes


def read_entries(client: redis.Redis, persona_key: str, now_ms: int, upto: str = "+") -> Iterator[InboundEntry]:
    """The inbox's entries in order, a page at a time, with their delivery counts."""
    stream = keys.inbox(persona_key)
    start = "-"
    while True:
        page = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream, start, upto, count=PAGE))
        if not page:
            return
        deliveries = _delivery_counts(client, stream, as_text(page[0][0]), as_text(page[-1][0]), len(page))
        for raw_id, fields in page:
            entry_id = as_text(raw_id)
            yield InboundEntry(
                entry_id=entry_id,
                stored=_parse(raw_id, fields),
                age_s=age_s(now_ms, int(entry_id.split("-", 1)[0])) or 0.0,
                deliveries=deliveries.get(entry_id, 0),
            )
        if len(page) < PAGE:
            return
        start = "(" + as_text(page[-1][0])


def _delivery_counts(client: redis.Redis, stream: str, first: str, last: str, count: int) -> dict[str, int]:
    """Entry id -> times delivered, for the entries of one page still pending in the group."""
    try:
        pending = cast(
            list[dict[str, Any]],
            client.xpending_range(stream, keys.INBOX_GROUP, min=first, max=last, count=count),
        )
    except redis.ResponseError as exc:  # NOGROUP: no tunnel has read this inbox yet
        if "NOGROUP" not in str(exc):
            raise
        return {}
    return {as_text(item["message_id"]): int(item["times_delivered"]) for item in pending}


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> StoredEntry | None:
    try:
        return StoredEntry.parse(entry_id, fields)
    except UnreadableEntry:
        return None


def find(client: redis.Redis, wanted: str, persona: str | None, now_ms: int) -> list[Located]:
    """Entries whose stream id, or queue id (every copy of that message), is `wanted`. Stream
    and queue ids are random, not time-ordered, so this reads each inbox once."""
    found = []
    for persona_key in persona_keys(client, persona):
        for item in read_entries(client, persona_key, now_ms):
            if wanted in (item.stream_id, item.queue_id):
                found.append(Located(persona_key, item))
    return found


def remove(client: redis.Redis, persona_key: str, items: list[InboundEntry]) -> tuple[int, int]:
    """Remove entries; returns (entries removed, bytes freed) by this call (the tunnel may have
    acknowledged some of them meanwhile). An unreadable entry counted nothing, so it is only
    acknowledged and deleted, as the tunnel drops one."""
    if not items:
        return 0, 0
    script = lua.INBOX_REMOVE.on(client)
    stream = keys.inbox(persona_key)
    pipe = client.pipeline(transaction=False)
    for item in items:
        if item.stored is None:
            pipe.xack(stream, keys.INBOX_GROUP, item.entry_id)
            pipe.xdel(stream, item.entry_id)
        else:
            script_keys, args = item.stored.remove_call(persona_key)
            script(keys=script_keys, args=args, client=pipe)
    replies = iter(pipe.execute())
    removed = freed = 0
    for item in items:
        if item.stored is None:
            next(replies)
            deleted = int(next(replies))
        else:
            deleted = int(next(replies))
        removed += deleted
        freed += item.size if deleted else 0
    return removed, freed


def purge(client: redis.Redis, persona_key: str, upto: str, now_ms: int) -> tuple[int, int]:
    """Remove every entry up to `upto` (the last id the operator was shown), page by page; mail
    arriving after the confirmation stays."""
    removed = freed = 0
    while True:
        page = []
        for item in read_entries(client, persona_key, now_ms, upto=upto):
            page.append(item)
            if len(page) == PAGE:
                break
        if not page:
            return removed, freed
        page_removed, page_freed = remove(client, persona_key, page)
        removed += page_removed
        freed += page_freed


def last_entry_id(client: redis.Redis, persona_key: str) -> str | None:
    newest = cast(list[tuple[bytes, Any]], client.xrevrange(keys.inbox(persona_key), count=1))
    return as_text(newest[0][0]) if newest else None


def body_head(client: redis.Redis, persona_key: str, item: InboundEntry) -> bytes:
    """The first MAX_HEADER_BYTES (+1, to tell truncation) of the message, wherever it is stored."""
    stored = item.stored
    if stored is None:
        return b""
    if not stored.body_apart:
        return stored.entry.data[: MAX_HEADER_BYTES + 1]
    head = client.getrange(stored.body_key(persona_key), 0, MAX_HEADER_BYTES)
    return cast(bytes, head)


def header_block(data: bytes) -> str:
    """The message's header section (up to the first empty line), at most MAX_HEADER_BYTES, with
    control characters escaped: a hostile sender's bytes must not drive the operator's terminal."""
    end = len(data)
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = data.find(separator)
        if index != -1:
            end = min(end, index)
    head = data[: min(end, MAX_HEADER_BYTES)].decode("utf-8", "replace").replace("\r\n", "\n")
    text = "".join(char if char in "\n\t" or char.isprintable() else f"\\x{ord(char):02x}" for char in head)
    return text + ("\n[... headers truncated]" if end > MAX_HEADER_BYTES else "")


def safe_text(value: str) -> str:
    """An envelope value fit for a terminal line (control characters escaped)."""
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in value)


def _persona_of(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]
