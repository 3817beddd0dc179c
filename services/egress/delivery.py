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

An address that is not a public unicast destination (loopback, RFC 1918, link-local, CGNAT,
ULA, multicast, ...; `destinations.py`) is never connected to unless the host comes from
`egress.routes` or `egress.allowPrivateDestinations` is on; when no address is left the
recipients fail permanently with `destination_not_allowed`.

MTA-STS (RFC 8461, `mta_sts*.py`): for a domain whose policy is in `enforce` mode only MX hosts
the policy lists are tried, and only over STARTTLS with a certificate valid for the MX name
(whatever `egress.tls.verify` says); a host that falls short is skipped, and when none is left
the attempt is deferred with `mta_sts_policy_violation: <reason>`. In `testing` mode the same
checks only report (log, `relay_egress_mta_sts_violations_total`, the domain report) and
delivery goes on as without a policy. A routed domain has no policy.

Otherwise STARTTLS is used whenever offered. With `egress.tls.verify` off (the default, as for most
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
from services.egress.destinations import destination_allowed
from services.egress.mta_sts import Mode, Policy
from services.egress.mta_sts_fetch import PolicySource
from services.egress.mx import LookupFailed, MailHost, MxResolver
from services.egress.outcome import Disposition, Outcome
from services.egress.smtp_pool import PooledConnection, PoolKey, SmtpPool
from shared.codes import DeliveryError
from shared.logs import get_logger, log

logger = get_logger(__name__)

MAX_CONNECTIONS_PER_DOMAIN = 5


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    helo_name: str
    timeout_s: float  # connect, greeting and each command
    data_timeout_s: float  # the final "." reply, which may follow content scanning
    verify_tls: bool = False
    allow_private_destinations: bool = False  # egress.allowPrivateDestinations


@dataclass(slots=True)
class DomainReport:
    """Per-recipient outcomes plus what happened on the wire, for logs and metrics."""

    outcomes: dict[str, Outcome]
    host: str | None = None
    tls: bool = False
    connections: int = 0
    skipped: list[str] = field(default_factory=list)
    mta_sts: str | None = None  # the domain's policy mode when it has one (enforce | testing)
    mta_sts_violations: list[str] = field(default_factory=list)  # "<mx host>:<reason>", reported in both modes


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What every connection of one `deliver` call needs to know besides the host."""

    domain: str
    sts_mode: str  # "" (no policy), "testing" or "enforce"
    report: DomainReport


class _SkipHost(Exception):  # control flow inside this module only
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class _NextTlsPlan(Exception):  # STARTTLS failed: reconnect with the next, weaker plan
    pass


def tls_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Deliverer:
    def __init__(
        self,
        resolver: MxResolver,
        settings: SmtpSettings,
        pool: SmtpPool | None = None,
        *,
        mta_sts: PolicySource | None = None,
        sts_tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolver = resolver
        self._settings = settings
        self._tls_context = tls_context(settings.verify_tls)
        self._pool = pool  # None: one connection per transaction
        self._mta_sts = mta_sts  # None: MTA-STS off
        self._sts_tls_context = sts_tls_context or tls_context(True)  # certificate valid for the MX name

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
        policy = await self._policy(domain)
        attempt = _Attempt(domain, policy.mode.value if policy is not None else "", report)
        report.mta_sts = attempt.sts_mode or None
        last_failure: Outcome | None = None
        lookup_failures: list[Outcome] = []
        refused_destinations = 0
        for host in hosts:
            if policy is not None and not policy.allows(host.name):
                violation = self._violation(attempt, host, "mx_not_listed")
                if policy.mode is Mode.ENFORCE:
                    last_failure = violation
                    report.skipped.append(f"{host.name}:{violation.error}")
                    continue
            try:
                addresses = await self._resolver.addresses(host)
            except LookupFailed as failure:
                lookup_failures.append(failure.outcome)
                report.skipped.append(f"{host.name}:{failure.outcome.error}")
                continue
            for address in addresses:
                if not self._may_connect(host, address):
                    refused_destinations += 1
                    report.skipped.append(f"{host.name}[{address}]:{DeliveryError.DESTINATION_NOT_ALLOWED}")
                    metrics.DESTINATIONS_REFUSED.inc()
                    log(
                        logger,
                        logging.WARNING,
                        "mail host address refused: not a public destination",
                        domain=domain,
                        host=host.name,
                        address=address,
                    )
                    continue
                if report.connections >= MAX_CONNECTIONS_PER_DOMAIN:
                    break
                report.connections += 1
                try:
                    outcomes, used_tls = await self._session(attempt, host, address, mail_from, recipients, message)
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
            if any(outcome.temporary for outcome in lookup_failures):
                last_failure = Outcome.failure(DeliveryError.DNS_TEMPORARY)
            elif refused_destinations:  # every address we could have tried is private
                last_failure = Outcome.failure(DeliveryError.DESTINATION_NOT_ALLOWED)
            elif lookup_failures:
                last_failure = Outcome.failure(DeliveryError.NO_MAIL_HOST)
            else:
                last_failure = Outcome.failure(DeliveryError.CONNECTION_FAILED)
        report.outcomes = {recipient: last_failure for recipient in recipients}
        return report

    async def _policy(self, domain: str) -> Policy | None:
        """The domain's MTA-STS policy in `enforce` or `testing` mode, if any (never for a routed domain)."""
        if self._mta_sts is None or self._resolver.routed(domain):
            return None
        policy = await self._mta_sts.policy(domain)
        return None if policy is None or policy.mode is Mode.NONE else policy

    def _violation(self, attempt: _Attempt, host: MailHost, reason: str) -> Outcome:
        """Count, log and report one MTA-STS violation; the outcome an `enforce` policy defers with."""
        attempt.report.mta_sts_violations.append(f"{host.name}:{reason}")
        metrics.MTA_STS_VIOLATIONS.labels(attempt.sts_mode, reason).inc()
        log(
            logger,
            logging.WARNING,
            "mta-sts policy violation"
            + ("; host skipped" if attempt.sts_mode == "enforce" else "; testing mode, sent"),
            domain=attempt.domain,
            host=host.name,
            mode=attempt.sts_mode,
            reason=reason,
        )
        return Outcome.failure(DeliveryError.MTA_STS_POLICY_VIOLATION, reason)

    def _tls_plans(self, sts_mode: str) -> list[ssl.SSLContext | None]:
        """STARTTLS contexts to try in order (None: plain text). `enforce`: a verified one only;
        `testing`: verified first (to report), then the usual; no policy: the usual, which falls
        back to plain text unless `egress.tls.verify`."""
        usual: list[ssl.SSLContext | None] = (
            [self._tls_context] if self._settings.verify_tls else [self._tls_context, None]
        )
        if sts_mode == "enforce":
            return [self._sts_tls_context]
        if sts_mode == "testing":
            return [self._sts_tls_context, *usual]
        return usual

    def _may_connect(self, host: MailHost, address: str) -> bool:
        """The private-destination rule (destinations.py), checked before any connection."""
        return host.routed or self._settings.allow_private_destinations or destination_allowed(address)

    async def _session(
        self, attempt: _Attempt, host: MailHost, address: str, mail_from: str, recipients: Sequence[str], message: bytes
    ) -> tuple[dict[str, Outcome], bool]:
        key = PoolKey(address, host.port, host.name, attempt.sts_mode)
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
        plans = self._tls_plans(attempt.sts_mode)
        for index, context in enumerate(plans):
            try:
                return await self._connect_and_send(
                    attempt, key, host, mail_from, recipients, message, context, index + 1 < len(plans)
                )
            except _NextTlsPlan:
                continue
        raise AssertionError("the last TLS plan never asks for another")

    async def _connect_and_send(
        self,
        attempt: _Attempt,
        key: PoolKey,
        host: MailHost,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        context: ssl.SSLContext | None,
        has_fallback: bool,
    ) -> tuple[dict[str, Outcome], bool]:
        smtp = aiosmtplib.SMTP(
            hostname=key.address,
            port=key.port,
            local_hostname=self._settings.helo_name,
            timeout=self._settings.timeout_s,
            start_tls=False,
        )
        try:
            await self._open(attempt, smtp, host, context, has_fallback)
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

    async def _open(
        self,
        attempt: _Attempt,
        smtp: aiosmtplib.SMTP,
        host: MailHost,
        context: ssl.SSLContext | None,
        has_fallback: bool,
    ) -> None:
        """Connect, greet, EHLO and STARTTLS with `context` (None: plain text); a failure here
        skips the host, or (`_NextTlsPlan`) asks for the next TLS plan."""
        try:
            await smtp.connect()
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await smtp.helo()
            except aiosmtplib.SMTPResponseException as exc:
                raise _SkipHost(Outcome.from_reply(exc.code, exc.message)) from None
            except (aiosmtplib.SMTPException, OSError):
                raise _SkipHost(Outcome.failure(DeliveryError.CONNECTION_FAILED)) from None
        except aiosmtplib.SMTPResponseException as exc:  # greeting other than 220
            raise _SkipHost(Outcome.from_reply(exc.code, exc.message)) from None
        except (aiosmtplib.SMTPException, OSError):
            raise _SkipHost(Outcome.failure(DeliveryError.CONNECTION_FAILED)) from None
        if context is None:
            return
        sts_checked = context is self._sts_tls_context and bool(attempt.sts_mode)
        if not smtp.supports_extension("starttls"):
            if sts_checked:
                violation = self._violation(attempt, host, "starttls_not_offered")
                if attempt.sts_mode == "enforce":
                    raise _SkipHost(violation)
            return
        try:
            await smtp.starttls(server_hostname=host.name, tls_context=context)
            await smtp.ehlo()
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            log(logger, logging.INFO, "starttls failed", host=host.name, error=type(exc).__name__)
            if sts_checked:
                reason = "certificate_invalid" if _certificate_error(exc) else "tls_failed"
                violation = self._violation(attempt, host, reason)
                if not has_fallback:
                    raise _SkipHost(violation) from None
            if has_fallback:
                raise _NextTlsPlan() from None
            raise _SkipHost(Outcome.failure(DeliveryError.TLS_FAILED)) from None

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, mail_from: str, recipients: Sequence[str], message: bytes
    ) -> tuple[dict[str, Outcome], bool]:
        """Outcomes, and whether the session is in a known state for another transaction (no
        transaction open, nothing unanswered); raises `_SkipHost` before anything was handed over."""
        needs_utf8 = not all(address.isascii() for address in (mail_from, *recipients))
        if needs_utf8 and not smtp.supports_extension("smtputf8"):
            unsupported = Outcome.failure(DeliveryError.SMTPUTF8_NOT_SUPPORTED)
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
            raise _SkipHost(Outcome.failure(DeliveryError.CONNECTION_LOST)) from None

        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                outcomes[recipient] = Outcome.from_reply(exc.code, exc.message)
            except (aiosmtplib.SMTPException, OSError):
                raise _SkipHost(Outcome.failure(DeliveryError.CONNECTION_LOST)) from None
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
            final = Outcome.failure(DeliveryError.CONNECTION_LOST)
        outcomes.update({recipient: final for recipient in accepted})
        return outcomes, clean


def _certificate_error(exc: BaseException) -> bool:
    """Whether a STARTTLS failure was the certificate (aiosmtplib may wrap the ssl error)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def split_recipient(address: str) -> tuple[str, str] | None:
    """(local part, lowercased domain) or None when the address has no usable domain."""
    local, at, domain = address.strip().rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not local or not domain:
        return None
    return local, domain


__all__ = ["Deliverer", "Disposition", "DomainReport", "SmtpSettings", "split_recipient"]
