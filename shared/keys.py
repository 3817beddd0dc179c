"""Every Redis key and channel name the relay uses (DESIGN.md "Redis layout").

Per-persona keys carry the hash tag `{persona_key}` so that one persona's keys share a Redis
Cluster slot and can be used together in one MULTI or Lua script.
"""

from __future__ import annotations

INBOX_GROUP = "tunnel"
EGRESS_QUEUE = "relay:egress"
NODES_KEY = "relay:nodes"
NODE_CHANNEL_PREFIX = "relay:node:"  # + node id: `node_channel`; the Lua wake-up builds names from it


def inbox(persona_key: str) -> str:
    """Stream of inbound messages waiting for, or in flight to, the persona's gateway."""
    return f"relay:{{{persona_key}}}:inbox"


def inbox_bytes(persona_key: str) -> str:
    """Integer: total message bytes in the inbox, for the byte cap."""
    return f"relay:{{{persona_key}}}:inbox_bytes"


def inbox_body(persona_key: str, stream_id: str) -> str:
    """A large inbound message body, stored apart from its inbox entry so that the tunnel can
    stream it (shared/inbox_entries.py); removed together with the entry."""
    return f"relay:{{{persona_key}}}:body:{stream_id}"


def owner(persona_key: str) -> str:
    """Node id of the tunnel node holding the persona's inbound socket (TTL, renewed)."""
    return f"relay:{{{persona_key}}}:owner"


def socket(persona_key: str) -> str:
    """Id of the persona's current inbound socket (TTL like `owner`), for `replacedSocketId`."""
    return f"relay:{{{persona_key}}}:socket"


def seen(persona_key: str) -> str:
    """Present while the persona authenticated within the retention window."""
    return f"relay:{{{persona_key}}}:seen"


def results(persona_key: str) -> str:
    """Stream of delivery results not yet handed to the gateway."""
    return f"relay:{{{persona_key}}}:results"


def outbound_rate(persona_key: str, minute: int) -> str:
    return f"relay:{{{persona_key}}}:outrate:{minute}"


def node_channel(node_id: str) -> str:
    """Pub/sub wake-ups for one tunnel node: new inbox entry, new result, evict a socket."""
    return f"{NODE_CHANNEL_PREFIX}{node_id}"


def node_alive(node_id: str) -> str:
    """Heartbeat key of a live node (TTL), with its role and connected count."""
    return f"relay:nodeinfo:{node_id}"


def challenge(challenge_id: str) -> str:
    return f"relay:challenge:{challenge_id}"


def rate_counter(kind: str, subject: str, window: int) -> str:
    """Fixed-window counter, e.g. kind `smtp_conn`, subject a client IP."""
    return f"relay:rate:{kind}:{subject}:{window}"


def deny(kind: str, subject: str) -> str:
    """Set when a subject exceeded a rate; refused until it expires (rateLimits.denyWindowMs)."""
    return f"relay:deny:{kind}:{subject}"


def egress_job_id(persona_key: str, stream_id: str) -> str:
    """arq `_job_id`: the same outbound stream is never queued twice."""
    return f"deliver:{persona_key}:{stream_id}"


def egress_result_published(persona_key: str, stream_id: str) -> str:
    """Set (NX, TTL) when an outbound stream's result is published: a re-run never sends again."""
    return f"relay:{{{persona_key}}}:egress_done:{stream_id}"


def egress_delivered(persona_key: str, stream_id: str) -> str:
    """Hash recipient -> final outcome (sent / refused), written right after the remote reply."""
    return f"relay:{{{persona_key}}}:egress_sent:{stream_id}"


def egress_last_error(persona_key: str, stream_id: str) -> str:
    """The last temporary error of an outbound stream waiting for its next attempt (TTL), shown
    by `protege-relay queue list`; the result carries the final one."""
    return f"relay:{{{persona_key}}}:egress_error:{stream_id}"


def outbound_holders(persona_key: str) -> str:
    """Sorted set: node ids holding an outbound-role socket of the persona, scored by expiry
    (epoch ms, renewed like `owner`), so a result wake-up reaches a `send`-only socket too."""
    return f"relay:{{{persona_key}}}:outbound_holders"


def accepted(persona_key: str, message_digest: str) -> str:
    """Queue id under which the ingress accepted a message (digest of envelope + content, TTL),
    so the sender's retry after a lost EXEC reply is answered with it instead of stored again;
    removed with the persona's last entry of the message, once delivered."""
    return f"relay:{{{persona_key}}}:accepted:{message_digest}"


def outbound_origin(persona_key: str, stream_id: str) -> str:
    """`<node id>/<socket id>` of the socket that sent an outbound stream (TTL), so its delivery
    result goes back to that socket while it is connected; deleted when the socket closes."""
    return f"relay:{{{persona_key}}}:origin:{stream_id}"
