"""One redis-server per test process, handed to each test as if it had just been started.

Starting and stopping a redis-server per test cost about 0.2 s of wall time each (the shutdown
waits for Redis's next cron tick), ~600 times per run. Each test process (each pytest-xdist
worker, or the one `make test` process) keeps one server instead.

When a test ends, every other connection is closed (its pools, subscribers, monitors) and the
server moves to a new port (`CONFIG SET port`, which closes the old listener): anything the test
left running can no longer reach Redis at all (its reconnects are refused), and the next test
gets a URL no earlier test had, as with a fresh server, so state a process keeps per Redis URL
(the backlog gauges' scrape cache) starts anew. A server the test stopped, killed or
reconfigured (CONFIG SET, ACL SETUSER) is replaced and the test fails at teardown: such a test
asks for a server of its own with `@pytest.mark.own_redis` (tests of Redis outages, crashes and
persistence do).

Before a test, every database, the Lua script cache and the statistics are emptied (FLUSHALL,
SCRIPT FLUSH, CONFIG RESETSTAT, SLOWLOG RESET) and checked empty; a connection that appeared
since the previous test ended fails the test at setup. xdist workers are separate processes, so
no two workers ever share a server.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import redis

from protege_relay.embedded_redis import EmbeddedRedis, free_port

ADMIN_NAME = "tests-shared-redis-admin"
OWN_SERVER_HINT = "mark it @pytest.mark.own_redis to get a server of its own"
MOVES_WITH_EACH_TEST = {"port"}  # config the fixture itself changes


class SharedRedisError(AssertionError):
    """A test left the shared server in a state the next test must not inherit."""


class SharedRedis:
    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._generation = 0
        self._server: EmbeddedRedis | None = None
        self._admin: redis.Redis | None = None
        self._baseline_config: dict[str, str] = {}
        self._baseline_acl: list[str] = []
        self._last_user = ""  # the test that used the server last, for error messages

    def acquire(self, test_id: str) -> EmbeddedRedis:
        """The server, on a port no earlier test used, empty and with no other client connected."""
        if not self._answers():
            self._replace()
        server, admin = self._running()
        strangers = self._other_clients()
        if strangers and self._last_user:
            self._close_others()
            raise SharedRedisError(
                f"{len(strangers)} connection(s) to the shared Redis were opened after {self._last_user} "
                f"ended, so something it started still runs against Redis: {strangers}"
            )
        self._close_others()
        admin.flushall(asynchronous=False)
        admin.script_flush("SYNC")
        admin.config_resetstat()
        admin.slowlog_reset()
        keyspace = cast(dict[str, object], admin.info("keyspace"))
        if keyspace:
            raise SharedRedisError(f"the shared Redis still holds keys after FLUSHALL: {keyspace}")
        self._last_user = test_id
        return server

    def release(self, test_id: str) -> None:
        """After `test_id`: cut off what it left connected; fail it if it broke or reconfigured Redis."""
        if not self._answers():
            self._discard()
            raise SharedRedisError(f"{test_id} stopped or killed the shared Redis: {OWN_SERVER_HINT}")
        server, admin = self._running()
        admin.client_unpause()  # a CLIENT PAUSE the test started, still running
        self._close_others()
        server.port = free_port()
        admin.config_set("port", server.port)
        self._reconnect_admin()
        changed = self._config_changes()
        if changed or self._acl() != self._baseline_acl:
            self._discard()
            what = f"config {changed}" if changed else "its ACL users"
            raise SharedRedisError(f"{test_id} changed the shared Redis ({what}): {OWN_SERVER_HINT}")

    def stop(self) -> None:
        self._discard()

    # --- internals -------------------------------------------------------------------------------

    def _replace(self) -> None:
        self._discard()
        self._generation += 1
        self._server = EmbeddedRedis(self._data_dir / f"redis-{self._generation}")
        self._server.start()
        self._reconnect_admin()
        self._baseline_config = self._config()
        self._baseline_acl = self._acl()
        self._last_user = ""

    def _discard(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _running(self) -> tuple[EmbeddedRedis, redis.Redis]:
        assert self._server is not None and self._admin is not None
        return self._server, self._admin

    def _reconnect_admin(self) -> None:
        """The admin connection follows the server to its current port (its old one would still
        work, but a reconnect would not)."""
        assert self._server is not None
        if self._admin is not None:
            self._admin.close()
        self._admin = redis.Redis.from_url(
            self._server.url, socket_timeout=10, client_name=ADMIN_NAME, decode_responses=True
        )

    def _answers(self) -> bool:
        if self._server is None or self._server.process is None or self._server.process.poll() is not None:
            return False
        try:
            return bool(self._running()[1].ping())
        except redis.RedisError:
            return False

    def _other_clients(self) -> list[str]:
        return [
            f"{client['addr']} name={client['name'] or '-'} cmd={client['cmd']}"
            for client in cast(list[dict[str, str]], self._running()[1].client_list())
            if client["name"] != ADMIN_NAME
        ]

    def _close_others(self) -> None:
        admin = self._running()[1]
        for kind in ("normal", "pubsub"):
            admin.client_kill_filter(_type=kind, skipme=True)

    def _config(self) -> dict[str, str]:
        config = cast(dict[str, str], self._running()[1].config_get("*"))
        return {name: value for name, value in config.items() if name not in MOVES_WITH_EACH_TEST}

    def _config_changes(self) -> dict[str, tuple[str | None, str | None]]:
        now = self._config()
        names = set(now) | set(self._baseline_config)
        return {
            name: (self._baseline_config.get(name), now.get(name))
            for name in sorted(names)
            if now.get(name) != self._baseline_config.get(name)
        }

    def _acl(self) -> list[str]:
        return cast(list[str], self._running()[1].acl_list())
