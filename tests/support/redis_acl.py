"""Clients logged in as the users of the ACL file `shared/redis_acl.py` generates (the `acl_dir` and
`acl_redis` fixtures are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import redis

from protege_relay.embedded_redis import EmbeddedRedis


def password(acl_dir: Path, user: str) -> str:
    return (acl_dir / f"{user}.password").read_text().strip()


def client_as(server: EmbeddedRedis, acl_dir: Path, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.url, username=user, password=password(acl_dir, user))
