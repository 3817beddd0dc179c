"""The long-running receiver: keeps one inbound session open and stores every message it gets.

A message is acknowledged (`smtp_ack`, when the relay agreed to `inbound_ack`) only after it is
fsynced into the Maildir; until then the relay keeps it and sends it again after a reconnect,
under the same stream id, which the Maildir store deduplicates. Any disconnect is followed by a
reconnect with exponential backoff and full jitter; `--url` may list several relays separated
by commas, tried in turn (what a load balancer would do for us).

Retrying is for network trouble only. A URL that cannot be a relay endpoint, a key the relay
refuses for good, and being replaced by another gateway with the same key (close 4400) end
the run with one line and a non-zero exit: two gateways with one key would otherwise take the
persona from each other forever. `--take-over` keeps the old behaviour for the last case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed

from protege_relay.gateway.assembler import InboundAssembler, InboundMessage
from protege_relay.gateway.client import (
    AuthFailed,
    BadRelayUrl,
    GatewayError,
    RelaySession,
    check_relay_url,
    open_session,
)
from protege_relay.gateway.keyfile import KeyFileError, load_passport
from protege_relay.gateway.maildir import MaildirStore
from shared.codes import CloseCode
from shared.identity import Passport
from shared.logs import get_logger, log
from shared.protocol import (
    ControlMessageError,
    FrameError,
    decode_control,
    decode_frame,
    encode_control,
)

CAPABILITY_INBOUND_ACK = "inbound_ack"
RECONNECT_BASE_S = 0.25
RECONNECT_CAP_S = 30.0
STABLE_SESSION_S = 10.0
EXIT_OK = 0
EXIT_AUTH_REFUSED = 3
EXIT_BAD_ARGUMENTS = 2
EXIT_REPLACED = 4
EXIT_TEST_CRASH = 86

# Test hooks (never set in production): simulate a gateway that dies after storing a message
# but before acknowledging it, or one whose first acknowledgement gets lost.
ENV_TEST_EXIT_BEFORE_ACK = "PROTEGE_GATEWAY_TEST_EXIT_BEFORE_ACK"
ENV_TEST_SKIP_ACKS = "PROTEGE_GATEWAY_TEST_SKIP_ACKS"
ENV_RECONNECT_CAP_S = "PROTEGE_GATEWAY_RECONNECT_CAP_S"

logger = get_logger(__name__)


def parse_urls(url_list: str) -> list[str]:
    return [url.strip() for url in url_list.split(",") if url.strip()]


def reconnect_delay_s(attempt: int, base_s: float = RECONNECT_BASE_S, cap_s: float = RECONNECT_CAP_S) -> float:
    """Full jitter (AWS architecture blog): uniform over [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 32)))


def fail(message: str, exit_code: int) -> int:
    """The one line a gateway run ends with when retrying cannot help."""
    print(f"protege-relay gateway: {message}", file=sys.stderr, flush=True)
    return exit_code


def run_gateway(key_path: str, url: str, maildir: str, inbound_ack: bool = True, *, take_over: bool = False) -> int:
    """`protege-relay gateway`: 0 on SIGTERM/SIGINT, 2 for a bad key, URL or Maildir, 3 when the
    relay refuses our key for good, 4 when another gateway took the persona (unless `take_over`)."""
    try:
        passport = load_passport(key_path)
    except KeyFileError as exc:
        return fail(str(exc), EXIT_BAD_ARGUMENTS)
    urls = parse_urls(url)
    if not urls:
        return fail("no relay url given (--url ws://HOST:PORT/ws)", EXIT_BAD_ARGUMENTS)
    try:
        for each in urls:
            check_relay_url(each)
    except BadRelayUrl as exc:
        return fail(str(exc), EXIT_BAD_ARGUMENTS)
    try:
        store = MaildirStore(maildir)
    except OSError as exc:
        return fail(f"cannot use {maildir} as a Maildir: {exc.strerror}; give a directory path", EXIT_BAD_ARGUMENTS)
    receiver = InboundReceiver(passport, urls, store, inbound_ack=inbound_ack, take_over=take_over)
    return asyncio.run(receiver.run_until_signal())


@dataclass
class _TestHooks:
    exit_before_ack: bool
    acks_to_skip: int

    @classmethod
    def from_environment(cls) -> _TestHooks:
        return cls(
            exit_before_ack=os.environ.get(ENV_TEST_EXIT_BEFORE_ACK) == "1",
            acks_to_skip=int(os.environ.get(ENV_TEST_SKIP_ACKS) or 0),
        )


class InboundReceiver:
    def __init__(
        self, passport: Passport, urls: list[str], store: MaildirStore, *, inbound_ack: bool, take_over: bool = False
    ) -> None:
        self._passport = passport
        self._take_over = take_over
        self._urls = urls
        self._store = store
        self._inbound_ack = inbound_ack
        self._hooks = _TestHooks.from_environment()
        self._reconnect_cap_s = float(os.environ.get(ENV_RECONNECT_CAP_S) or RECONNECT_CAP_S)
        self.stored_count = 0

    async def run_until_signal(self) -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        receiving = asyncio.create_task(self.run_forever())
        stop_waiter = asyncio.create_task(stopping.wait())
        await asyncio.wait({receiving, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if receiving.done():
            stop_waiter.cancel()
            return receiving.result()
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        log(logger, logging.INFO, "gateway stopped", persona=self._passport.persona_key)
        return EXIT_OK

    async def run_forever(self) -> int:
        """Reconnect until cancelled; returns (an exit code) only when retrying cannot help."""
        attempt = 0
        url_index = 0
        while True:
            url = self._urls[url_index % len(self._urls)]
            try:
                session = await open_session(
                    url,
                    self._passport,
                    capabilities=[CAPABILITY_INBOUND_ACK] if self._inbound_ack else [],
                )
            except BadRelayUrl as exc:
                return fail(str(exc), EXIT_BAD_ARGUMENTS)
            except AuthFailed as exc:
                if exc.fatal:
                    return fail(f"the relay at {url} refused the key for good: {exc.code}", EXIT_AUTH_REFUSED)
                log(logger, logging.WARNING, "authentication refused, will retry", url=url, code=exc.code)
            except GatewayError as exc:
                log(logger, logging.WARNING, "relay unreachable", url=url, error=str(exc))
            else:
                connected_at = time.monotonic()
                replaced = await self._serve(session)
                if replaced and not self._take_over:
                    return fail(
                        f"another gateway connected with this key and took persona {self._passport.persona_key} "
                        "(close 4400 replaced_by_new_session); stop the other one, or run this one with --take-over",
                        EXIT_REPLACED,
                    )
                # Only a session that lasted resets the backoff: a relay that accepts us and
                # drops us at once (or another gateway with our key) must not cause a hot loop.
                if not replaced and time.monotonic() - connected_at >= STABLE_SESSION_S:
                    attempt = 0
            url_index += 1
            delay_s = reconnect_delay_s(attempt, cap_s=self._reconnect_cap_s)
            attempt += 1
            log(logger, logging.INFO, "reconnecting", delay_s=round(delay_s, 3), attempt=attempt)
            await asyncio.sleep(delay_s)

    async def _serve(self, session: RelaySession) -> bool:
        """Receive until the socket closes; True if we were replaced by a newer session (4400)."""
        connection = session.connection
        acking = self._inbound_ack and CAPABILITY_INBOUND_ACK in session.capabilities
        log(
            logger,
            logging.INFO,
            "gateway connected",
            persona=session.persona_key,
            email_local_part=session.email_local_part,
            url=session.url,
            inbound_ack=acking,
            replaced_socket_id=session.replaced_socket_id,
        )
        assembler = InboundAssembler()
        try:
            async for raw in connection:
                if isinstance(raw, str):
                    self._handle_control(raw)
                    continue
                try:
                    message = assembler.feed(decode_frame(raw))
                except FrameError as exc:
                    log(logger, logging.WARNING, "invalid frame from relay", error=str(exc))
                    continue
                if message is not None:
                    await self._accept(session, message, acking)
        except ConnectionClosed:
            pass
        except OSError as exc:  # Maildir not writable: unacknowledged, so the relay keeps it
            log(logger, logging.ERROR, "cannot store message, disconnecting", error=str(exc))
            await connection.close(CloseCode.INTERNAL_ERROR, "gateway_storage_error")
        finally:
            await connection.close()
        code, reason = connection.close_code, connection.close_reason
        replaced = code == CloseCode.REPLACED
        log(
            logger,
            logging.WARNING if replaced else logging.INFO,
            "replaced by a newer session" if replaced else "gateway disconnected",
            persona=session.persona_key,
            url=session.url,
            close_code=code,
            close_reason=reason,
            incomplete_streams=len(assembler.open_stream_ids),
        )
        return replaced

    async def _accept(self, session: RelaySession, message: InboundMessage, acking: bool) -> None:
        outcome = await asyncio.to_thread(self._store.deliver, message.stream_id, message.data)
        if outcome.stored:
            self.stored_count += 1
        log(
            logger,
            logging.INFO,
            "message stored" if outcome.stored else "duplicate message skipped",
            persona=session.persona_key,
            stream_id=message.stream_id,
            bytes=len(message.data),
            chunks=message.chunk_count,
            largest_chunk_bytes=message.largest_chunk_bytes,
            path=str(outcome.path) if outcome.path else None,
        )
        if self._hooks.exit_before_ack:
            log(logger, logging.WARNING, "test hook: exiting before ack", stream_id=message.stream_id)
            logging.shutdown()
            os._exit(EXIT_TEST_CRASH)
        if not acking:
            return
        if self._hooks.acks_to_skip > 0:
            self._hooks.acks_to_skip -= 1
            log(logger, logging.WARNING, "test hook: ack withheld", stream_id=message.stream_id)
            return
        await session.connection.send(encode_control({"type": "smtp_ack", "streamId": message.stream_id}))

    def _handle_control(self, raw: str) -> None:
        try:
            fields = decode_control(raw)
        except ControlMessageError:
            log(logger, logging.WARNING, "unreadable text message from relay")
            return
        if fields["type"] == "relay_delivery_result":
            log(
                logger,
                logging.INFO,
                "delivery result",
                stream_id=fields.get("streamId"),
                status=fields.get("status"),
                error=fields.get("error"),
            )
        elif fields["type"] == "error":
            log(logger, logging.WARNING, "relay reported an error", code=fields.get("code"))
        else:
            log(logger, logging.DEBUG, "control message ignored", message_type=fields["type"])
