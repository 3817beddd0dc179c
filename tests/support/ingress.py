"""Helpers for the ingress tests: an in-process ingress on its own event-loop thread, and
small SMTP client conveniences.

The in-process ingress runs the real `serve()` in a background thread so the tests can use
the blocking `smtplib` and the sync Redis client exactly as an outside sender would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import redis

from protege_relay.embedded_redis import EmbeddedRedis
from services.ingress.main import serve
from shared import keys
from shared.config import RelayConfig, load_config
from shared.identity import Passport
from shared.inbox_entries import StoredEntry
from shared.payloads import InboxEntry
from shared.ratelimit import Clock
from tests.support.processes import PROBE_IP, free_port, wait_for_port

MAIL_DOMAIN = "relay.test"


class InProcessIngress:
    def __init__(self, config: RelayConfig, drain_timeout_s: float = 5.0, rate_clock: Clock = time.time) -> None:
        self.config = config
        self._rate_clock = rate_clock
        self.port = config.smtp.port
        self.http_port = config.smtp.httpPort
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> InProcessIngress:
        self._thread = threading.Thread(target=self._run, name="ingress", daemon=True)
        self._thread.start()
        assert self._started.wait(10), "ingress loop did not start"
        if self.config.smtp.enabled:
            wait_for_port(self.port, source_ip=PROBE_IP)
        if self.http_port:
            wait_for_port(self.http_port)
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            self._started.set()
            await serve(self.config, self._stopping, drain_timeout_s=self._drain_timeout_s, rate_clock=self._rate_clock)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def request_stop(self) -> None:
        assert self._loop is not None and self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self.request_stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "ingress did not stop"

    @property
    def stopped(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


def ingress_config(redis_url: str, **env: str) -> RelayConfig:
    environ = {
        "RELAY_REDIS_URL": redis_url,
        "RELAY_SMTP_PORT": str(free_port()),
        "RELAY_SMTP_HTTP_PORT": "0",
        "RELAY_SMTP_HOSTNAME": "mx.relay.test",
        "RELAY_MAIL_DOMAINS": MAIL_DOMAIN,
        "RELAY_SMTP_MAX_RECIPIENTS": "10",
        "RELAY_NODE_ID": "ingress-test",
    }
    environ.update(env)
    return load_config(_empty_config_file(), environ=environ)


def _empty_config_file() -> Path:
    """An explicit `{}` config, so a relay/config.json in the working tree cannot leak in."""
    path = Path(tempfile.gettempdir()) / "protege-relay-ingress-tests-empty.json"
    if not path.exists():
        path.write_text("{}", encoding="utf-8")
    return path


def ingress_starter(
    redis_server: EmbeddedRedis, rate_clock: Clock = time.time
) -> Iterator[Callable[..., InProcessIngress]]:
    """Body of a `start_ingress` fixture: start(**env) -> InProcessIngress, stopped at teardown."""
    started: list[InProcessIngress] = []

    def start(drain_timeout_s: float = 5.0, **env: str) -> InProcessIngress:
        ingress = InProcessIngress(ingress_config(redis_server.url, **env), drain_timeout_s, rate_clock)
        started.append(ingress)
        return ingress.start()

    yield start
    for ingress in started:
        ingress.stop()


def new_persona() -> str:
    return Passport.generate().persona_key


def address(persona_key: str, tag: str = "", domain: str = MAIL_DOMAIN) -> str:
    return f"{persona_key}{'+' + tag if tag else ''}@{domain}"


def mark_seen(client: redis.Redis, persona_key: str) -> None:
    client.set(keys.seen(persona_key), b"1", ex=3600)


def inbox_entries(client: redis.Redis, persona_key: str) -> list[InboxEntry]:
    """The persona's entries as written, with bodies stored apart read back into `data`."""
    entries = []
    for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.inbox(persona_key))):
        stored = StoredEntry.parse(entry_id, fields)
        body = cast(bytes | None, client.get(stored.body_key(persona_key))) if stored.body_apart else None
        entries.append(stored.entry if body is None else dataclasses.replace(stored.entry, data=body))
    return entries


def split_trace_header(data: bytes) -> tuple[bytes, bytes]:
    """(our Received header incl. its final CRLF, the message exactly as the sender sent it)."""
    assert data.startswith(b"Received: from ")
    end = data.index(b"\r\n", data.index(b"\r\n\tfor <") + 2) + 2
    return data[:end], data[end:]


def open_session(port: int, helo: str = "sender.example") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo(helo)
    return client


def send_raw(port: int, mail_from: str, rcpt_to: list[str], message: bytes) -> tuple[int, bytes]:
    """MAIL/RCPT/DATA with `message` already CRLF-terminated; returns the final DATA reply."""
    with open_session(port) as client:
        code, reply = client.mail(mail_from)
        assert code == 250, reply
        for recipient in rcpt_to:
            code, reply = client.rcpt(recipient)
            assert code == 250, reply
        return client.data(message)


__all__ = [
    "MAIL_DOMAIN",
    "InProcessIngress",
    "address",
    "inbox_entries",
    "ingress_config",
    "ingress_starter",
    "mark_seen",
    "new_persona",
    "open_session",
    "send_raw",
    "split_trace_header",
]
