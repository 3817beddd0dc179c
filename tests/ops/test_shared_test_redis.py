"""The suite's shared redis-server (tests/support/shared_redis.py): a test never sees what an
earlier test left in Redis, and a test that breaks or reconfigures the server is told to take
one of its own. Driven directly, on a server of this test's own, as two tests in a row would be."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from tests.support.shared_redis import SharedRedis, SharedRedisError


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedRedis]:
    server = SharedRedis(tmp_path / "shared")
    yield server
    server.stop()


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_next_test_gets_no_keys_scripts_stats_or_connections_and_a_new_port(shared: SharedRedis) -> None:
    first = shared.acquire("first")
    first_port = first.port
    client = redis.Redis.from_url(first.url)
    other_db = redis.Redis(port=first_port, db=3)
    client.set("left", "over")
    other_db.xadd("stream", {"f": "v"})
    sha = cast(str, client.script_load("return 1"))
    subscriber = socket.create_connection(("127.0.0.1", first_port), timeout=5)
    subscriber.sendall(b"SUBSCRIBE channel\r\n")
    assert subscriber.recv(100).startswith(b"*3\r\n$9\r\nsubscribe")
    assert cast(int, client.publish("channel", "x")) == 1
    shared.release("first")

    second = shared.acquire("second")
    assert second.port != first_port and refuses(first_port)
    fresh = redis.Redis.from_url(second.url)
    assert cast(dict[str, Any], fresh.info("keyspace")) == {}
    assert fresh.script_exists(sha) == [False]
    assert cast(int, fresh.publish("channel", "x")) == 0
    assert subscriber.recv(100).startswith(b"*3\r\n$7\r\nmessage")  # what it got before the next test...
    assert subscriber.recv(100) == b""  # ...which it never reaches: it was disconnected
    assert "cmdstat_xadd" not in cast(dict[str, Any], fresh.info("commandstats"))
    with pytest.raises(redis.ConnectionError):
        client.get("left")  # closed, and its reconnect to the old port is refused
    shared.release("second")
    for connection in (client, other_db, fresh):
        connection.close()
    subscriber.close()


def test_what_a_test_left_running_cannot_reach_redis_and_a_new_connection_fails_the_next_test(
    shared: SharedRedis,
) -> None:
    server = shared.acquire("leaky")
    url_of_the_test = server.url
    shared.release("leaky")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url_of_the_test).ping()  # a reconnect of something "leaky" started
    straggler = redis.Redis.from_url(server.url)  # only a client told the new port gets in
    straggler.ping()
    with pytest.raises(SharedRedisError, match="after leaky ended"):
        shared.acquire("next")
    straggler.close()
    client = redis.Redis.from_url(shared.acquire("next").url)
    assert cast(dict[str, Any], client.info("keyspace")) == {}
    client.close()
    shared.release("next")


def test_a_test_that_reconfigures_or_stops_the_server_fails_and_the_next_gets_a_fresh_one(shared: SharedRedis) -> None:
    server = shared.acquire("reconfigures")
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory", 1024 * 1024)
    client.close()
    with pytest.raises(SharedRedisError, match=r"reconfigures changed the shared Redis .*maxmemory.*own_redis"):
        shared.release("reconfigures")

    server = shared.acquire("kills")
    client = redis.Redis.from_url(server.url)
    assert cast(dict[str, str], client.config_get("maxmemory")) == {"maxmemory": "0"}
    client.close()
    server.kill()
    with pytest.raises(SharedRedisError, match=r"kills stopped or killed the shared Redis.*own_redis"):
        shared.release("kills")

    server = shared.acquire("after")
    assert redis.Redis.from_url(server.url).ping()
    shared.release("after")
