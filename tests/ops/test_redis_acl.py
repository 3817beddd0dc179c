"""Redis access (docs/SECURITY.md "Redis access", issue 9 item 5): the ACL file generated from
shared/redis_acl.py, loaded into a real redis-server; what each user must not do fails with
NOPERM. The real services under their users: tests/system/test_redis_acl_services.py."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from shared.redis_acl import SERVICE_USERS
from tests.support.redis_acl import client_as

DOMAIN = "relay.test"
XRANGE_SCRIPT = "return redis.call('XRANGE', KEYS[1], '-', '+')"


def denied(call: object) -> bool:
    """NOPERM, top level or (wrapped in a script error) from a command a script ran."""
    try:
        call()  # type: ignore[operator]
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        return "user executing the script can't run this command" in str(exc)
    return False


def test_each_user_is_refused_what_it_does_not_need(acl_redis: EmbeddedRedis, acl_dir: Path) -> None:
    admin = client_as(acl_redis, acl_dir, "admin")
    persona = Passport.generate().persona_key
    admin.xadd(keys.inbox(persona), {b"m": b"secret mail"})
    ingress = client_as(acl_redis, acl_dir, "ingress")
    status = client_as(acl_redis, acl_dir, "status")
    tunnel = client_as(acl_redis, acl_dir, "tunnel")
    egress = client_as(acl_redis, acl_dir, "egress")
    anonymous = redis.Redis.from_url(acl_redis.url)
    inbox = keys.inbox(persona)
    xrange_sha = cast(str, ingress.script_load(XRANGE_SCRIPT))  # loading is allowed; what it runs is checked
    forbidden = {
        "ingress XRANGE inbox": lambda: ingress.xrange(inbox),
        "ingress XREAD inbox": lambda: ingress.xread({inbox: "0"}),
        "ingress XREADGROUP inbox": lambda: ingress.xreadgroup(keys.INBOX_GROUP, "c", {inbox: ">"}),
        "ingress XRANGE inside a script": lambda: ingress.evalsha(xrange_sha, 1, inbox),
        "ingress EVAL": lambda: ingress.eval(XRANGE_SCRIPT, 1, inbox),
        "ingress ZADD egress queue": lambda: ingress.zadd(keys.EGRESS_QUEUE, {"deliver:x:y": 1}),
        "ingress LPUSH arq:queue": lambda: ingress.lpush("arq:queue", "job"),
        "ingress SET arq job": lambda: ingress.set("arq:job:deliver:x:y", b"job"),
        "ingress GET results": lambda: ingress.get(keys.results(persona)),
        "ingress KEYS": lambda: ingress.keys("*"),
        "ingress FLUSHALL": lambda: ingress.flushall(),
        "status SET": lambda: status.set(keys.seen(persona), b"1"),
        "status DEL inbox": lambda: status.delete(inbox),
        "status XADD inbox": lambda: status.xadd(inbox, {b"m": b"x"}),
        "status SREM nodes": lambda: status.srem(keys.NODES_KEY, "n"),
        "status EVAL": lambda: status.eval("return 1", 0),
        "status PUBLISH": lambda: status.publish(keys.node_channel("n"), b"x"),
        "tunnel FLUSHALL": lambda: tunnel.flushall(),
        "tunnel CONFIG SET": lambda: tunnel.config_set("maxmemory", "1"),
        "tunnel ACL SETUSER": lambda: tunnel.acl_setuser("x", enabled=True),
        "tunnel SET arq in-progress": lambda: tunnel.set("arq:in-progress:deliver:x:y", b"1"),
        # The egress appends bounces to inboxes (services/egress/bounce.py), so inbox keys are
        # its too; what it must not reach is the tunnel's and the ingress' bookkeeping.
        "egress XREADGROUP inbox": lambda: egress.xreadgroup("tunnel", "x", {inbox: ">"}),
        "egress XDEL inbox": lambda: egress.xdel(inbox, "1-1"),
        "egress SET seen": lambda: egress.set(keys.seen(persona), b"1"),
        "egress FLUSHALL": lambda: egress.flushall(),
        "no password GET": lambda: anonymous.get(keys.seen(persona)),
        "no password XRANGE": lambda: anonymous.xrange(inbox),
    }
    results = {name: denied(call) for name, call in forbidden.items()}
    print("\n" + "\n".join(f"  {'NOPERM' if ok else 'ALLOWED'}  {name}" for name, ok in results.items()))
    assert all(results.values()), [name for name, ok in results.items() if not ok]
    assert anonymous.ping() is True, "health checks need no password"
    assert ingress.xlen(inbox) == 1 and status.xlen(inbox) == 1
    assert [user.name for user in SERVICE_USERS] == ["ingress", "tunnel", "egress", "status"]
    for client in (admin, ingress, status, tunnel, egress, anonymous):
        client.close()
