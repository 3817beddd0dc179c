"""`protege-relay queue`: see and manage waiting mail, as `mailq` and `postsuper` do for Postfix.

Works on the same Redis as `protege-relay status` (RELAY_REDIS_URL or the data directory of a
running `protege-relay run`). Inbound mail is addressed by the stream id `queue list` shows
(`<queue id>.<n>`, what the gateway sees) or by the queue id the sender was given (every copy of
that message); outbound mail by its job id.
"""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  protege-relay queue list
  protege-relay queue list --persona KEY --json
  protege-relay queue show qabc...xyz.0
  protege-relay queue delete qabc...xyz.0
  protege-relay queue purge --persona KEY --yes
  protege-relay queue retry deliver:KEY:STREAM
  protege-relay queue cancel deliver:KEY:STREAM
"""


def register(commands: Any) -> None:
    """Add `queue` and its subcommands to the top-level parser's subparsers."""
    queue = commands.add_parser(
        "queue",
        help="list, show, delete, purge, retry or cancel queued mail (mailq/postsuper)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $RELAY_CONFIG, else built-in defaults)")
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="waiting inbound messages and outbound jobs")
    listing.add_argument("--persona", metavar="KEY", help="only this persona's mail (default: all)")
    direction = listing.add_mutually_exclusive_group()
    direction.add_argument("--outbound", action="store_true", help="only outbound jobs (default: both)")
    direction.add_argument("--inbound", action="store_true", help="only inbound messages (default: both)")
    listing.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    listing.set_defaults(queue_action="list")

    show = actions.add_parser(
        "show", parents=[common], help="envelope and headers of an inbound message (never the body)"
    )
    show.add_argument("stream_id", metavar="STREAM_ID", help="stream id from `queue list`, or a queue id")
    show.add_argument("--persona", metavar="KEY", help="look only in this persona's inbox (faster)")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    show.set_defaults(queue_action="show")

    delete = actions.add_parser(
        "delete", parents=[common], help="remove one inbound message (or all copies of a queue id)"
    )
    delete.add_argument("stream_id", metavar="STREAM_ID", help="stream id from `queue list`, or a queue id")
    delete.add_argument("--persona", metavar="KEY", help="look only in this persona's inbox (faster)")
    delete.set_defaults(queue_action="delete")

    purge = actions.add_parser("purge", parents=[common], help="remove every inbound message waiting for one persona")
    purge.add_argument("--persona", metavar="KEY", required=True, help="the persona whose inbox to empty")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")
    purge.set_defaults(queue_action="purge")

    retry = actions.add_parser("retry", parents=[common], help="attempt a deferred outbound job now")
    retry.add_argument("job_id", metavar="JOB_ID", help="job id from `queue list --outbound`")
    retry.set_defaults(queue_action="retry")

    cancel = actions.add_parser(
        "cancel", parents=[common], help="drop an outbound job; the persona gets a `failed` result"
    )
    cancel.add_argument("job_id", metavar="JOB_ID", help="job id from `queue list --outbound`")
    cancel.set_defaults(queue_action="cancel")

    queue.set_defaults(handler=_run, queue_parser=queue)


def _run(args: argparse.Namespace) -> int:
    """Imported only when used: Redis, arq and the egress code stay out of every other command."""
    from protege_relay.queue_commands import run_queue

    return run_queue(args)
