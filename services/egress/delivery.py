"""One delivery attempt of one message to the recipients of one domain, over SMTP.

Hosts are tried in MX order, each address in turn (at most `MAX_CONNECTIONS_PER_DOMAIN`). A
host that cannot be reached, does not greet, fails EHLO or defers MAIL FROM is skipped for the
next one: nothing was handed over yet, so that is safe. Once a host accepted MAIL FROM, its
answers are final for this attempt: each recipient gets its RCPT reply, and the accepted ones
share one DATA on the same connection. A connection lost after the message was sent is
temporary (the message may or may not have arrived: SMTP is at-least-once).

With a `SmtpPool`, a connection whose transaction ended cleanly is kept for the next message to
the same host; if a cached connection fails before anything was handed over (it went stale),
the host is tried once more on a new connection.

STARTTLS is used whenever offered. With `egress.tls.verify` off (the default, as for most
MTAs) the certificate is not checked and a failed handshake falls back to plain text; with it
on, the certificate must match the MX host name, and a failed handshake skips the host.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from services.egress import metrics
from services.egress.mx import LookupFailed, MailHost, MxResolver
from services.egress.outcome import Disposition, Outcome
from services.egress.smtp_pool import PooledConnection, PoolKey, SmtpPool
from shared.logs import get_logger, log

logger = get_logger(__name__)

MAX_CONNECTIONS_PER_DOMAIN = 5


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    helo_name: str
    timeout_s: float  # connect, greeting and each command
    data_timeout_s: float  # the final "." reply, which may follow content scanning
    verify_tls: bool = False


@dataclass(slots=True)
class DomainReport:
    """Per-recipient outcomes plus what happened on the wire, for logs and metrics."""

    outcomes: dict[str, Outcome]
    host: str | None = None
    tls: bool = False
    connections: int = 0
    skipped: list[str] = field(default_factory=list)


class _SkipHost(Exception):  # control flow inside this module only
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class _RetryWithoutTls(Exception):
    pass


def tls_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Deliverer:
    def __init__(self, resolver: MxResolver, settings: SmtpSettings, pool: SmtpPool | None = None) -> None:
        self._resolver = resolver
        self._settings = settings
        self._tls_context = tls_context(settings.verify_tls)
        self._pool = pool  # None: one connection per transaction

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], message: bytes) -> DomainReport:
        """Outcome for every recipient (all in `domain`); never raises for remote problems."""
        try:
            hosts = await self._resolver.mail_hosts(domain)
        except LookupFailed as failure:
            return DomainReport({recipient: failure.outcome for recipient in recipients})
        report = DomainReport({})
        last_failure: Outcome | None = None
        lookup_failures: list[Outcome] = []
        for host in hosts:
            try:
                addresses = await self._resolver.addresses(host)
            except LookupFailed as failure:
                lookup_failures.append(failure.outcome)
                report.skipped.append(f"{host.name}:{failure.outcome.error}")
                continue
            for address in addresses:
                if report.connections >= MAX_CONNECTIONS_PER_DOMAIN:
                    break
                report.connections += 1
                try:
                    outcomes, used_tls = await self._session(host, address, mail_from, recipients, message)
                except _SkipHost as skip:
                    last_failure = skip.outcome
                    report.skipped.append(f"{host.name}[{address}]:{skip.outcome.error}")
                    log(
                        logger,
                        logging.INFO,
                        "mail host skipped",
                        host=host.name,
                        address=address,
                        error=skip.outcome.error,
                    )
                    continue
                report.outcomes, report.host, report.tls = outcomes, host.name, used_tls
                return report
        if last_failure is None:
            if lookup_failures and all(not outcome.temporary for outcome in lookup_failures):
                last_failure = Outcome.failure("no_mail_host", permanent=True)
            elif lookup_failures:
                last_failure = Outcome.failure("dns_temporary", permanent=False)
            else:
                last_failure = Outcome.failure("connection_failed", permanent=False)
        report.outcomes = {recipient: last_failure for recipient in recipients}
        return report

    async def _session(
        self, host: MailHost, address: str, mail_from: str, recipients: Sequence[str], message: bytes
    ) -> tuple[dict[str, Outcome], bool]:
        key = PoolKey(address, host.port, host.name)
        pooled = self._pool.take(key) if self._pool is not None else None
        if pooled is not None:
            try:
                outcomes = await self._send_and_release(key, pooled, mail_from, recipients, message)
            except _SkipHost as skip:  # nothing handed over; the cached connection may have gone stale
                log(
                    logger,
                    logging.INFO,
                    "cached connection failed; reconnecting",
                    host=host.name,
                    address=address,
                    error=skip.outcome.error,
                )
            else:
                metrics.SMTP_CONNECTIONS.labels("reused").inc()
                return outcomes, pooled.tls
        try:
            return await self._connect_and_send(key, host, mail_from, recipients, message, True)
        except _RetryWithoutTls:
            return await self._connect_and_send(key, host, mail_from, recipients, message, False)

    async def _connect_and_send(
        self,
        key: PoolKey,
        host: MailHost,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        try_tls: bool,
    ) -> tuple[dict[str, Outcome], bool]:
        smtp = aiosmtplib.SMTP(
            hostname=key.address,
            port=key.port,
            local_hostname=self._settings.helo_name,
            timeout=self._settings.timeout_s,
            start_tls=False,
        )
        try:
            await self._open(smtp, host, try_tls)
        except BaseException:
            smtp.close()
            raise
        metrics.SMTP_CONNECTIONS.labels("new").inc()
        connection = PooledConnection(smtp, tls=smtp.get_transport_info("sslcontext") is not None)
        return await self._send_and_release(key, connection, mail_from, recipients, message), connection.tls

    async def _send_and_release(
        self, key: PoolKey, connection: PooledConnection, mail_from: str, recipients: Sequence[str], message: bytes
    ) -> dict[str, Outcome]:
        """One transaction; then the connection goes back to the pool if it ended cleanly,
        else it is closed (with QUIT when the transaction got that far)."""
        smtp = connection.smtp
        try:
            outcomes, clean = await self._transaction(smtp, mail_from, recipients, message)
        except BaseException:
            smtp.close()
            raise
        if clean and self._pool is not None and smtp.is_connected:
            self._pool.give_back(key, connection)
            return outcomes
        try:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit(timeout=self._settings.timeout_s)
        finally:
            smtp.close()
        return outcomes

    async def _open(self, smtp: aiosmtplib.SMTP, host: MailHost, try_tls: bool) -> None:
        """Connect, greet, EHLO and STARTTLS; any failure here skips the host."""
        try:
            await smtp.connect()
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await smtp.helo()
            except aiosmtplib.SMTPResponseException as exc:
                raise _SkipHost(Outcome.from_reply(exc.code, exc.message)) from None
            except (aiosmtplib.SMTPException, OSError):
                raise _SkipHost(Outcome.failure("connection_failed", permanent=False)) from None
        except aiosmtplib.SMTPResponseException as exc:  # greeting other than 220
            raise _SkipHost(Outcome.from_reply(exc.code, exc.message)) from None
        except (aiosmtplib.SMTPException, OSError):
            raise _SkipHost(Outcome.failure("connection_failed", permanent=False)) from None
        if not (try_tls and smtp.supports_extension("starttls")):
            return
        try:
            await smtp.starttls(server_hostname=host.name, tls_context=self._tls_context)
            await smtp.ehlo()
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            log(logger, logging.INFO, "starttls failed", host=host.name, error=type(exc).__name__)
            if self._settings.verify_tls:
                raise _SkipHost(Outcome.failure("tls_failed", permanent=False)) from None
            raise _RetryWithoutTls() from None

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, mail_from: str, recipients: Sequence[str], message: bytes
    ) -> tuple[dict[str, Outcome], bool]:
        """Outcomes, and whether the session is in a known state for another transaction (no
        transaction open, nothing unanswered); raises `_SkipHost` before anything was handed over."""
        needs_utf8 = not all(address.isascii() for address in (mail_from, *recipients))
        if needs_utf8 and not smtp.supports_extension("smtputf8"):
            unsupported = Outcome.failure("smtputf8_not_supported", permanent=True)
            return {recipient: unsupported for recipient in recipients}, True
        encoding = "utf-8" if needs_utf8 else "ascii"
        mail_options = ["SMTPUTF8"] if needs_utf8 else []
        if smtp.supports_extension("size"):
            mail_options.append(f"SIZE={len(message)}")
        if smtp.supports_extension("8bitmime") and not message.isascii():
            mail_options.append("BODY=8BITMIME")

        try:
            await smtp.mail(mail_from, options=mail_options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            refused = Outcome.from_reply(exc.code, exc.message)
            if refused.temporary:
                raise _SkipHost(refused) from None
            return {recipient: refused for recipient in recipients}, False
        except (aiosmtplib.SMTPException, OSError):
            raise _SkipHost(Outcome.failure("connection_lost", permanent=False)) from None

        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                outcomes[recipient] = Outcome.from_reply(exc.code, exc.message)
            except (aiosmtplib.SMTPException, OSError):
                raise _SkipHost(Outcome.failure("connection_lost", permanent=False)) from None
            else:
                accepted.append(recipient)
        if not accepted:
            try:
                await smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                return outcomes, False
            return outcomes, True

        clean = False
        try:
            reply = await smtp.data(message, timeout=self._settings.data_timeout_s)
            final = Outcome.from_reply(reply.code, reply.message)
            clean = True
        except aiosmtplib.SMTPResponseException as exc:
            final = Outcome.from_reply(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError):
            final = Outcome.failure("connection_lost", permanent=False)
        outcomes.update({recipient: final for recipient in accepted})
        return outcomes, clean


def split_recipient(address: str) -> tuple[str, str] | None:
    """(local part, lowercased domain) or None when the address has no usable domain."""
    local, at, domain = address.strip().rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not local or not domain:
        return None
    return local, domain


__all__ = ["Deliverer", "Disposition", "DomainReport", "SmtpSettings", "split_recipient"]
