"""The actions of `protege-relay queue` (parser in protege_relay/queue.py): Redis access, output
and confirmations; the reading and changing of queues is in queue_inbound and queue_outbound."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

from protege_relay import queue_inbound as inbound
from protege_relay import queue_outbound as outbound
from protege_relay.status import (  # one look for both commands
    REDIS_TIMEOUT_S,
    NoRelayFound,
    _duration,
    _size,
    _table,
    relay_redis_url,
)
from shared.config import RelayConfig, load_config
from shared.redis import connect_sync, redis_label

PROG = "protege-relay queue"


class QueueError(Exception):
    """A user-facing failure: one line, exit status 1."""


def run_queue(args: argparse.Namespace) -> int:
    action: str | None = getattr(args, "queue_action", None)
    if action is None:
        args.queue_parser.print_help()
        return 2
    handler = ACTIONS[action]
    config = load_config(getattr(args, "config", None))
    try:
        url = relay_redis_url(config)
    except NoRelayFound as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    client = connect_sync(config, url, timeout_s=REDIS_TIMEOUT_S)
    try:
        return handler(Context(config, url, client), args)
    except QueueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (redis.RedisError, OSError) as exc:
        print(f"{PROG}: cannot use Redis at {redis_label(config, url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


class Context:
    def __init__(self, config: RelayConfig, url: str | None, client: redis.Redis) -> None:
        self.config, self.url, self.client = config, url, client

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)


# --- list ------------------------------------------------------------------------------------


def _list(ctx: Context, args: argparse.Namespace) -> int:
    now_ms = ctx.now_ms()
    inboxes = [] if args.outbound else inbound.list_inbound(ctx.client, args.persona, now_ms)
    jobs = [] if args.inbound else outbound.list_outbound(ctx.client, args.persona, now_ms)
    if args.json:
        print(json.dumps(list_document(inboxes, jobs), indent=2))
    else:
        print(render_list(inboxes, jobs, show_inbound=not args.outbound, show_outbound=not args.inbound))
    return 0


def list_document(inboxes: list[inbound.PersonaInbox], jobs: list[outbound.OutboundItem]) -> dict[str, Any]:
    return {
        "inbound": [
            {
                "persona": inbox.persona,
                "messages": inbox.messages,
                "bytes": inbox.counted_bytes,
                "oldestAgeSeconds": inbox.oldest_age_s,
                "entries": [
                    {
                        "streamId": item.stream_id,
                        "queueId": item.queue_id,
                        "mailFrom": item.entry.mail_from if item.entry else None,
                        "bytes": item.size,
                        "ageSeconds": item.age_s,
                        "deliveries": item.deliveries,
                    }
                    for item in inbox.entries
                ],
            }
            for inbox in inboxes
        ],
        "outbound": [
            {
                "jobId": job.job_id,
                "persona": job.persona,
                "recipient": job.recipient,
                "attempts": job.attempts,
                "nextAttemptSeconds": job.next_attempt_s,
                "lastError": job.last_error,
            }
            for job in jobs
        ],
    }


def render_list(
    inboxes: list[inbound.PersonaInbox],
    jobs: list[outbound.OutboundItem],
    *,
    show_inbound: bool,
    show_outbound: bool,
) -> str:
    lines: list[str] = []
    if show_inbound:
        total = sum(inbox.messages for inbox in inboxes)
        lines.append(f"Inbound: {total} message{'s' * (total != 1)} for {len(inboxes)} persona(s)")
        for inbox in inboxes:
            lines += [
                "",
                f"persona {inbox.persona}: {inbox.messages} message(s), {_size(inbox.counted_bytes)}, "
                f"oldest {_duration(inbox.oldest_age_s)}",
            ]
            rows = [
                [
                    item.stream_id,
                    inbound.safe_text(item.entry.mail_from or "<>") if item.entry else "?",
                    str(item.size),
                    _duration(item.age_s),
                    str(item.deliveries),
                ]
                for item in inbox.entries
            ]
            if rows:
                lines += _table(["STREAM ID", "FROM", "BYTES", "AGE", "TRIES"], rows, numeric={2, 4})
    if show_outbound:
        if lines:
            lines.append("")
        lines.append(f"Outbound: {len(jobs)} job{'s' * (len(jobs) != 1)}")
        rows = [
            [
                job.job_id,
                inbound.safe_text(job.recipient),
                str(job.attempts),
                "running"
                if job.running
                else ("now" if job.next_attempt_s == 0 else "in " + _duration(job.next_attempt_s)),
                inbound.safe_text(job.last_error or "-"),
            ]
            for job in jobs
        ]
        if rows:
            lines += ["", *_table(["JOB ID", "RECIPIENT", "ATTEMPTS", "NEXT", "LAST ERROR"], rows, numeric={2})]
    return "\n".join(lines)


# --- inbound actions -------------------------------------------------------------------------


def _found(ctx: Context, args: argparse.Namespace) -> list[inbound.Located]:
    found = inbound.find(ctx.client, args.stream_id, args.persona, ctx.now_ms())
    if not found:
        raise QueueError(f"no queued inbound message with id {args.stream_id!r}; see `{PROG} list`")
    return found


def _show(ctx: Context, args: argparse.Namespace) -> int:
    found = _found(ctx, args)
    documents = [_show_document(ctx.client, located) for located in found]
    if args.json:
        print(json.dumps(documents if len(documents) > 1 else documents[0], indent=2))
        return 0
    blocks = []
    for document in documents:
        fields = [f"{name}: {inbound.safe_text(str(value))}" for name, value in document.items() if name != "headers"]
        blocks.append("\n".join([*fields, "", document["headers"]]))
    print("\n\n".join(blocks))
    return 0


def _show_document(client: redis.Redis, located: inbound.Located) -> dict[str, Any]:
    item, entry = located.item, located.item.entry
    document: dict[str, Any] = {
        "streamId": item.stream_id,
        "queueId": item.queue_id,
        "persona": located.persona,
        "entryId": item.entry_id,
        "bytes": item.size,
        "ageSeconds": item.age_s,
        "deliveries": item.deliveries,
    }
    if entry is None:
        return {**document, "headers": "[unreadable entry]"}
    received = datetime.datetime.fromtimestamp(entry.received_at_ms / 1000, datetime.UTC)
    document.update(
        mailFrom=entry.mail_from,
        rcptTo=entry.rcpt_to,
        clientIp=entry.client_ip,
        receivedAt=received.isoformat(timespec="seconds"),
    )
    if entry.auth_attestation:
        document["authAttestation"] = entry.auth_attestation
    document["headers"] = inbound.header_block(inbound.body_head(client, located.persona, item))
    return document


def _delete(ctx: Context, args: argparse.Namespace) -> int:
    removed = freed = 0
    for located in _found(ctx, args):
        entries, size = inbound.remove(ctx.client, located.persona, [located.item])
        removed, freed = removed + entries, freed + size
        if entries:
            print(f"deleted {located.item.stream_id} (persona {located.persona}, {_size(located.item.size)})")
    if not removed:
        print(f"{args.stream_id} left the queue meanwhile (delivered to its gateway); nothing deleted")
    return 0


def _purge(ctx: Context, args: argparse.Namespace) -> int:
    persona = args.persona
    upto = inbound.last_entry_id(ctx.client, persona)
    if upto is None:
        print(f"persona {persona} has no queued inbound mail")
        return 0
    inbox = inbound.list_inbound(ctx.client, persona, ctx.now_ms())[0]
    question = (
        f"Delete {inbox.messages} inbound message(s) ({_size(inbox.counted_bytes)}) queued for persona {persona}?"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise QueueError(f"{question} Not a terminal: add --yes to confirm")
        if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    removed, freed = inbound.purge(ctx.client, persona, upto, ctx.now_ms())
    print(f"purged {removed} message(s), {_size(freed)}, for persona {persona}")
    return 0


# --- outbound actions ------------------------------------------------------------------------


def _retry(ctx: Context, args: argparse.Namespace) -> int:
    try:
        outbound.retry_now(ctx.client, args.job_id)
    except outbound.JobNotQueued:
        raise QueueError(_not_queued(args.job_id)) from None
    except outbound.JobRunning:
        raise QueueError(f"{args.job_id} is being delivered right now; nothing to retry") from None
    print(f"{args.job_id} will be attempted now")
    return 0


def _cancel(ctx: Context, args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(outbound.cancel(ctx.config, ctx.url, args.job_id))
    except outbound.JobNotQueued:
        raise QueueError(_not_queued(args.job_id)) from None
    except outbound.JobRunning:
        raise QueueError(f"{args.job_id} is being delivered right now; try again when the attempt ends") from None
    if result is None:
        print(f"cancelled {args.job_id}; its payload was unreadable, so no result could be sent")
    else:
        print(f"cancelled {args.job_id}; the persona gets a failed result ({result.error})")
    return 0


def _not_queued(job_id: str) -> str:
    return f"no queued outbound job {job_id!r} (finished or cancelled?); see `{PROG} list --outbound`"


ACTIONS: dict[str, Callable[[Context, argparse.Namespace], int]] = {
    "list": _list,
    "show": _show,
    "delete": _delete,
    "purge": _purge,
    "retry": _retry,
    "cancel": _cancel,
}
