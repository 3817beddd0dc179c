"""The Redis ACL users of the relay: one per service, each limited to the commands and keys it
uses (docs/SECURITY.md "Redis access"). The one source of truth for the ACL file that compose
and Kubernetes load (`--aclfile`), built from `shared.keys` and arq's key prefixes so a renamed
key cannot drift away from its permission.

    python -m shared.redis_acl OUT_DIR

writes OUT_DIR/users.acl (password hashes only, `#<sha256>`: the Redis container must read
it) and, readable by their owner only, OUT_DIR/<user>.env (`RELAY_REDIS_USERNAME`,
`RELAY_REDIS_PASSWORD`, for compose's `env_file`) and OUT_DIR/<user>.password (for a
Kubernetes Secret), with fresh random passwords; existing passwords in OUT_DIR are kept.

Written for Redis 6.2 and 7.2+ alike (no selectors), so a key pattern grants every allowed
command on it: what separates the services is mostly the command list. Redis 7.0 and 7.1 refuse
the whole file: they know no `client|setinfo`, which redis-py sends on connect. The ingress may append to an
inbox (XADD inside the enqueue script) and count it (XLEN) but never read one (no XRANGE,
XREAD, XREADGROUP) and has no key of arq or of the egress queue; `status` only reads.
KNOWN GAP: a large body stored apart (`keys.inbox_body`) is written by the ingress with SET, and
its user has GET (for its own keys), so it could read such a body; Redis 7's write-only key
permission (`%W~`) closes that once Redis 6.2 no longer needs to load this file.
Commands a script runs are checked against the caller's user too, so EVALSHA + SCRIPT LOAD
grant nothing beyond the list. Nobody can log in as the `default` user and a client that has not
logged in gets NOAUTH; health checks log in as `health` (no password, PING only). `admin` has
everything, for operators and migrations.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from arq.constants import (
    abort_jobs_ss,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from shared import keys

ANY = "*"
EGRESS_JOB = keys.egress_job_id(ANY, ANY).split(":", 1)[0] + ":*"  # arq job ids `deliver:<pk>:<stream>`


@dataclass(frozen=True)
class AclUser:
    name: str
    commands: tuple[str, ...]
    key_patterns: tuple[str, ...]
    channel_patterns: tuple[str, ...] = ()

    def rule(self, password_sha256: str) -> str:
        parts = ["user", self.name, "reset", "on", f"#{password_sha256}", "resetchannels", "-@all"]
        parts += [f"+{command}" for command in self.commands]
        parts += [f"~{pattern}" for pattern in self.key_patterns]
        parts += [f"&{pattern}" for pattern in self.channel_patterns]
        return " ".join(parts)


CONNECTION = ("ping", "client|setinfo")  # health checks; redis-py names its library on connect
HEARTBEAT = ("hset", "expire", "sadd", "del", "srem")  # shared/nodeinfo.py
HEARTBEAT_KEYS = (keys.node_alive(ANY), keys.NODES_KEY)
SCRIPTS = ("evalsha", "script|load", "script|exists")  # redis-py Script objects: EVALSHA, load on NOSCRIPT
REPLICATION = ("wait",)  # redis.minReplicasToAck: WAIT after a write that is acknowledged (shared/replication.py)
NODE_CHANNELS = (keys.node_channel(ANY),)
RATE_KEYS = (keys.rate_counter(ANY, ANY, 0).rsplit(":", 3)[0] + ":*", keys.deny(ANY, ANY).rsplit(":", 2)[0] + ":*")

INGRESS = AclUser(
    "ingress",
    commands=(
        *CONNECTION,
        "info",  # the memory admission rule (services/ingress/memory.py)
        *HEARTBEAT,
        *SCRIPTS,
        *REPLICATION,
        # RCPT facts and per-IP counters (services/ingress/handler.py, shared/ratelimit.py)
        "exists",
        "get",
        "set",
        "xlen",
        "incr",
        "incrby",
        "pexpire",
        # inside the enqueue script (shared/enqueue.py): append, count, remember, wake
        "xadd",
        "publish",
    ),
    key_patterns=(
        keys.seen(ANY),
        keys.inbox(ANY),
        keys.inbox_bytes(ANY),
        keys.owner(ANY),
        keys.accepted(ANY, ANY),
        keys.inbox_body(ANY, ANY),  # large bodies stored apart (SET in the script); see KNOWN GAP
        *RATE_KEYS,
        *HEARTBEAT_KEYS,
    ),
    channel_patterns=NODE_CHANNELS,
)

TUNNEL = AclUser(
    "tunnel",
    commands=(
        *CONNECTION,
        *HEARTBEAT,
        *SCRIPTS,
        *REPLICATION,
        "info",  # Redis memory gauges on the tunnel's /metrics (shared/redis_metrics.py)
        "exists",
        "get",
        "mget",
        "set",
        "incr",
        "incrby",
        "decrby",
        "pexpire",
        "hgetall",
        "hmget",
        "getrange",
        "xlen",
        "xrange",
        "xreadgroup",
        "xautoclaim",
        "xack",
        "xdel",
        "xgroup|create",
        "xpending",
        "zadd",
        "zrem",
        "zrangebyscore",
        "zremrangebyscore",
        "publish",
        "subscribe",
        "unsubscribe",
        "scan",  # backlog gauges (shared/backlog.py)
        # the egress job as arq writes it, in one script (services/tunnel/outbound.py): EXISTS
        # job/result, PSETEX job, ZADD queue; MULTI/EXEC for the inbox trim
        "watch",
        "unwatch",
        "multi",
        "exec",
        "discard",
        "psetex",
    ),
    key_patterns=(
        keys.seen(ANY),
        keys.inbox(ANY),
        keys.inbox_bytes(ANY),
        keys.inbox_body(ANY, ANY),  # streamed with GETRANGE, deleted with its entry
        keys.accepted(ANY, ANY),  # deleted with the message's last entry (shared/inbox_entries.py)
        keys.owner(ANY),
        keys.socket(ANY),
        keys.results(ANY),
        keys.outbound_rate(ANY, 0).rsplit(":", 1)[0] + ":*",
        keys.outbound_holders(ANY),
        keys.outbound_origin(ANY, ANY),
        keys.challenge(ANY),
        *RATE_KEYS,
        *HEARTBEAT_KEYS,
        keys.EGRESS_QUEUE,
        job_key_prefix + EGRESS_JOB,
        result_key_prefix + EGRESS_JOB,
    ),
    channel_patterns=NODE_CHANNELS,
)

EGRESS = AclUser(
    "egress",
    commands=(
        *CONNECTION,
        *HEARTBEAT,
        *SCRIPTS,
        *REPLICATION,
        "exists",
        "get",
        "set",
        "setex",
        "psetex",
        "incr",
        "incrby",  # the bounce's inbox byte count, inside the enqueue script (services/egress/bounce.py)
        "pexpire",
        "hgetall",
        "xadd",
        "xlen",
        "xrange",
        "xpending",
        "zadd",
        "zrem",
        "zincrby",
        "zscore",
        "zcard",
        "zcount",
        "zrange",
        "zrangebyscore",
        "publish",
        "scan",
        "watch",
        "unwatch",
        "multi",
        "exec",
        "discard",
    ),
    key_patterns=(
        keys.EGRESS_QUEUE,
        keys.EGRESS_QUEUE + health_check_key_suffix,
        job_key_prefix + EGRESS_JOB,
        in_progress_key_prefix + EGRESS_JOB,
        retry_key_prefix + EGRESS_JOB,
        result_key_prefix + EGRESS_JOB,
        abort_jobs_ss,
        keys.results(ANY),
        keys.egress_result_published(ANY, ANY),
        keys.egress_delivered(ANY, ANY),
        keys.egress_last_error(ANY, ANY),
        # a bounce (DSN) is written into the persona's inbox by the one enqueue script (shared/enqueue.py)
        keys.inbox(ANY),
        keys.inbox_bytes(ANY),
        keys.inbox_body(ANY, ANY),
        keys.accepted(ANY, ANY),
        keys.owner(ANY),
        keys.outbound_holders(ANY),
        *HEARTBEAT_KEYS,
    ),
    channel_patterns=NODE_CHANNELS,
)

STATUS = AclUser(
    "status",
    commands=(
        *CONNECTION,
        "info",  # the primary's replicas and their lag (docs/HA.md)
        "scan",
        "smembers",
        "hgetall",
        "get",
        "mget",
        "exists",
        "xlen",
        "xrange",
        "xpending",
        "zcard",
        "zcount",
        "zrange",
    ),
    key_patterns=("relay:*", "arq:*"),
)

SERVICE_USERS = (INGRESS, TUNNEL, EGRESS, STATUS)
ADMIN = "admin"
# Redis replays its AOF as the `default` user and re-checks each command of a MULTI/EXEC block
# against that user's permissions; a denied block is skipped without a word (redis/redis#14541,
# valkey#3983; Redis 7, not 6.2). Script effects are logged as MULTI/EXEC, so a `default` user
# that may only PING lost every enqueued message on a restart. So `default` keeps every
# permission but is off: no one can log in as it, and a client that has not logged in gets NOAUTH.
DEFAULT_RULE = "user default off resetchannels ~* &* +@all"
HEALTH = "health"  # health checks: `redis-cli --user health --pass health ping` (any password)
HEALTH_RULE = f"user {HEALTH} on nopass resetchannels -@all +ping"


def password_sha256(password: str) -> str:
    return hashlib.sha256(password.encode("utf-8")).hexdigest()


def render_acl(passwords: dict[str, str]) -> str:
    """The ACL file for `passwords` (user name -> password; every service user and admin)."""
    lines = [DEFAULT_RULE, HEALTH_RULE]  # Redis ACL files take no comments
    lines += [user.rule(password_sha256(passwords[user.name])) for user in SERVICE_USERS]
    lines.append(f"user {ADMIN} reset on #{password_sha256(passwords[ADMIN])} ~* &* +@all")
    return "\n".join(lines) + "\n"


def user_names() -> list[str]:
    return [user.name for user in SERVICE_USERS] + [ADMIN]


def write_secrets(out_dir: Path) -> dict[str, str]:
    """Create or complete `out_dir`; returns user -> password."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    passwords: dict[str, str] = {}
    for name in user_names():
        password_file = out_dir / f"{name}.password"
        if password_file.exists():
            passwords[name] = password_file.read_text(encoding="utf-8").strip()
        else:
            passwords[name] = secrets.token_urlsafe(32)
            _write_private(password_file, passwords[name] + "\n")
        _write_private(
            out_dir / f"{name}.env", f"RELAY_REDIS_USERNAME={name}\nRELAY_REDIS_PASSWORD={passwords[name]}\n"
        )
    acl_file = out_dir / "users.acl"
    acl_file.write_text(render_acl(passwords), encoding="utf-8")
    acl_file.chmod(0o644)  # hashes only; the Redis container's user must read it
    return passwords


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the relay's Redis ACL file and per-service credentials.")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    write_secrets(args.out_dir)
    print(f"wrote {args.out_dir}/users.acl and {', '.join(f'{name}.env' for name in user_names())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
