"""The relay's configuration: `relay/config.json` (PROTOCOL.md D) plus `RELAY_*` overrides.

One schema, written as dataclasses whose field names are the JSON names, drives parsing,
validation, defaults and the environment variable names, so the three cannot drift apart.
A missing field takes its default, a present field is validated strictly, and an unknown
field is an error naming its path.

Environment variables: `RELAY_` + the field path in upper snake case, e.g. `smtp.port` ->
`RELAY_SMTP_PORT`, `rateLimits.denyWindowMs` -> `RELAY_RATE_LIMITS_DENY_WINDOW_MS`,
`redis.url` -> `RELAY_REDIS_URL`. Lists and objects take JSON (`RELAY_MAIL_DOMAINS='["a.example"]'`);
a list of strings also takes a comma-separated value. `env_variable_names()` lists them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = Path("relay/config.json")
ENV_PREFIX = "RELAY_"


# Fields of the original's schema that are accepted (so its config files load unchanged) but have
# no effect here, with the reason; README.md "Configuration" lists them too.
IGNORED_FIELDS: dict[str, str] = {
    "logging.prettyLogThemePath": "the pretty console format is plain text; there is no theme to load",
    "auth.maxChallengeRecords": "challenge records are Redis hashes that expire on their own, none held in memory",
    "auth.challengeGcIntervalMs": "challenge records expire in Redis; there is no sweep to schedule",
}


class ConfigError(ValueError):
    """A config value that does not fit the schema; the message names the field."""


def _field(
    default: Any, *, minimum: int | None = None, maximum: int | None = None, choices: tuple[str, ...] = ()
) -> Any:
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=type(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    consoleLogFormat: str = _field("auto", choices=("auto", "json", "pretty"))  # auto: pretty on a terminal
    prettyLogThemePath: str = ""  # accepted, ignored: see IGNORED_FIELDS
    level: str = _field("info", choices=("debug", "info", "warning", "error"))


@dataclasses.dataclass(frozen=True)
class TlsFilesConfig:
    certPath: str = ""
    keyPath: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certPath and self.keyPath)


@dataclasses.dataclass(frozen=True)
class SmtpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = _field(2526, minimum=0)
    maxMessageBytes: int = _field(10 * 1024 * 1024, minimum=1)
    maxRecipients: int = _field(1, minimum=1)
    hostname: str = ""
    commandTimeoutSeconds: int = _field(300, minimum=1)
    tls: TlsFilesConfig = _field(TlsFilesConfig())
    httpPort: int = _field(9025, minimum=0)
    evaluateSenderAuth: bool = False  # SPF/DKIM/DMARC + Authentication-Results; implied by attestation.enabled
    authNameservers: list[str] = _field([])  # "ip:port" for sender-auth DNS; empty = system resolver
    senderAuthTimeoutMs: int = _field(4000, minimum=100)  # whole SPF+DKIM+DMARC budget; over it = unknown
    maxFailedRecipients: int = _field(20, minimum=1)  # refused RCPTs per session; the next: 421 4.7.0, close


@dataclasses.dataclass(frozen=True)
class RateLimitsConfig:
    smtpConnectionsPerMinutePerIp: int = _field(60, minimum=1)
    smtpMessagesPerMinutePerIp: int = _field(30, minimum=1)
    smtpConcurrentConnectionsPerIp: int = _field(20, minimum=1)  # open SMTP sessions per client IP, per ingress process
    wsAuthAttemptsPerMinutePerIp: int = _field(20, minimum=1)
    denyWindowMs: int = _field(300_000, minimum=1)
    outboundMessagesPerMinutePerPersona: int = _field(60, minimum=1)
    # bytes one SMTP client IP may add to the inboxes per clock hour (x recipients); over: 452 4.3.1
    smtpQueuedBytesPerHourPerIp: int = _field(256 * 1024 * 1024, minimum=1)


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    challengeTtlSeconds: int = _field(60, minimum=1)
    maxChallengeRecords: int = _field(10_000, minimum=1)  # accepted, ignored: see IGNORED_FIELDS
    challengeGcIntervalMs: int = _field(60_000, minimum=1)  # accepted, ignored: see IGNORED_FIELDS


@dataclasses.dataclass(frozen=True)
class WsConfig:
    heartbeatIntervalMs: int = _field(30_000, minimum=1)
    idleTimeoutMs: int = _field(120_000, minimum=1)
    maxMessageBytes: int = _field(1024 * 1024, minimum=1024)
    handshakeTimeoutMs: int = _field(10_000, minimum=1)
    ackTimeoutMs: int = _field(60_000, minimum=1)
    outboundStreamTimeoutMs: int = _field(60_000, minimum=1)
    trustedProxies: list[str] = _field([])
    tls: TlsFilesConfig = _field(TlsFilesConfig())
    authTimeoutMs: int = _field(10_000, minimum=1)  # upgrade to auth_ok; over it: auth_error auth_timeout, 4401
    maxUnauthenticatedPerIp: int = _field(256, minimum=1)  # open sockets not yet authenticated, per client IP
    resultsSweepIntervalMs: int = _field(5_000, minimum=1)  # periodic results sweep (wake-ups are the fast path)
    # Memory before auth_ok (docs/SECURITY.md "Memory before authentication"): auth messages are
    # under 1 KiB, so a larger one is closed 1009; ws.maxMessageBytes applies from auth_ok on.
    maxUnauthenticatedMessageBytes: int = _field(4096, minimum=1024)
    maxUnauthenticated: int = _field(2048, minimum=1)  # open sockets not yet authenticated, per node
    maxPendingHandshakesPerIp: int = _field(128, minimum=1)  # TCP connections before the upgrade, per peer IP
    maxPendingHandshakes: int = _field(1024, minimum=1)  # TCP connections before the upgrade, per node
    # Outbound memory (docs/SECURITY.md "Memory of outbound streams"): bytes of unfinished
    # outbound streams held by this node, and outbound-role sockets.
    outboundAssemblyBytesPerPersona: int = _field(24 * 1024 * 1024, minimum=1)
    outboundAssemblyBytesPerIp: int = _field(32 * 1024 * 1024, minimum=1)
    outboundAssemblyBytes: int = _field(256 * 1024 * 1024, minimum=1)
    maxOutboundSocketsPerPersona: int = _field(4, minimum=1)
    maxOutboundSocketsPerIp: int = _field(64, minimum=1)
    # Gateways without inbound_ack: a message leaves Redis only when the socket stayed open this
    # long after the pong that followed smtp_end (the WebSocket library pongs before storing).
    legacyAckGraceMs: int = _field(5_000, minimum=0)


@dataclasses.dataclass(frozen=True)
class DkimConfig:
    enabled: bool = False
    domainName: str = ""
    keySelector: str = ""
    privateKeyPath: str = ""
    headerFieldNames: str | list[str] = ""
    skipFields: str | list[str] = ""


@dataclasses.dataclass(frozen=True)
class AttestationConfig:
    enabled: bool = False
    keyId: str = ""
    signingPrivateKeyPath: str = ""


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """Where Redis is and who the service is there (one ACL user per service, docs/SECURITY.md).

    The password never comes from the config file or a command line: `passwordFile` (read
    through `shared.secrets`' permission check) or the environment variable
    `RELAY_REDIS_PASSWORD`; `load_config` puts it in `password` (kept out of `repr`).
    """

    url: str = ""
    username: str = ""
    passwordFile: str = ""
    password: str = dataclasses.field(default="", repr=False)
    # new mail is refused (452 4.3.1) at this share of Redis `maxmemory`, largest backlogs first
    admissionHighWatermarkPercent: int = _field(85, minimum=1, maximum=100)
    # Sentinel (docs/HA.md): "host:port" of each sentinel; when set, the primary of
    # `sentinelMaster` is asked for (and asked again after a failover) instead of using `url`.
    sentinels: list[str] = _field([])
    sentinelMaster: str = "relay"
    sentinelAuth: bool = False  # the sentinels too require username/password (their own ACL)
    # Replicated acknowledgements: a 250 (and an accepted outbound stream, a published result)
    # only once WAIT confirms this many replicas hold the write, else 451 4.3.0.
    minReplicasToAck: int = _field(0, minimum=0)
    replicaAckTimeoutMs: int = _field(1000, minimum=1)
    # How long a write that decides a reply (the ingress' 250, an accepted outbound stream, a
    # delivery result, a job's end) is retried while Redis is unreachable or failing over, before
    # the sender gets 451 (or the job is re-queued). At most 15 s: well inside the gateway's 20 s
    # wait for a result, and a delivered message's marker lingers 60 s past it (shared/enqueue.py).
    failoverWaitMs: int = _field(10_000, minimum=100, maximum=15_000)


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    retentionSeconds: int = _field(7 * 24 * 3600, minimum=1)
    maxMessages: int = _field(1000, minimum=1)
    maxBytes: int = _field(200 * 1024 * 1024, minimum=1)


@dataclasses.dataclass(frozen=True)
class EgressTlsConfig:
    verify: bool = False


@dataclasses.dataclass(frozen=True)
class MtaStsConfig:
    enabled: bool = True  # apply recipient domains' MTA-STS policies (RFC 8461)
    policyPort: int = _field(443, minimum=1)  # port of https://mta-sts.<domain>/ (tests serve policies elsewhere)
    fetchTimeoutSeconds: int = _field(10, minimum=1)  # the whole policy fetch (connect, TLS, GET)


@dataclasses.dataclass(frozen=True)
class EgressConfig:
    nameservers: list[str] = _field([])
    smtpPort: int = _field(25, minimum=1)
    routes: dict[str, str] = _field({})
    heloName: str = ""
    maxAttempts: int = _field(8, minimum=1)
    maxAgeSeconds: int = _field(4 * 3600, minimum=1)
    maxJobs: int = _field(10, minimum=1)
    connectTimeoutSeconds: int = _field(30, minimum=1)
    tls: EgressTlsConfig = _field(EgressTlsConfig())
    httpPort: int = _field(9026, minimum=0)
    retryBaseSeconds: int = _field(30, minimum=0)  # backoff base: full jitter over base * 2**(try-1)
    jobTimeoutSeconds: int = _field(300, minimum=2)  # one delivery attempt; a crashed one re-runs after this
    allowPrivateDestinations: bool = False  # connect to MX addresses in loopback/private/... ranges (SSRF guard off)
    bounces: bool = True  # a DSN in the persona's inbox when a message fails after a deferral
    delayWarningSeconds: int = _field(4 * 3600, minimum=0)  # a `delayed` DSN once deferred this long; 0 = never
    mtaSts: MtaStsConfig = _field(MtaStsConfig())


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = _field(8080, minimum=0)
    nodeId: str = ""
    mailDomains: list[str] = _field([])
    logging: LoggingConfig = _field(LoggingConfig())
    smtp: SmtpConfig = _field(SmtpConfig())
    rateLimits: RateLimitsConfig = _field(RateLimitsConfig())
    auth: AuthConfig = _field(AuthConfig())
    ws: WsConfig = _field(WsConfig())
    dkim: DkimConfig = _field(DkimConfig())
    attestation: AttestationConfig = _field(AttestationConfig())
    redis: RedisConfig = _field(RedisConfig())
    queue: QueueConfig = _field(QueueConfig())
    egress: EgressConfig = _field(EgressConfig())

    @property
    def node_id(self) -> str:
        return self.nodeId or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def primary_mail_domain(self) -> str:
        """The domain the egress's bounces come from (MAILER-DAEMON@ it)."""
        return self.mailDomains[0] if self.mailDomains else ""


# --- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> RelayConfig:
    """`path`, else $RELAY_CONFIG, else relay/config.json if present, else defaults; then env."""
    environ = os.environ if environ is None else environ
    chosen = Path(path) if path else Path(environ["RELAY_CONFIG"]) if environ.get("RELAY_CONFIG") else None
    document: dict[str, Any] = {}
    if chosen is None and DEFAULT_CONFIG_PATH.exists():
        chosen = DEFAULT_CONFIG_PATH
    if chosen is not None:
        try:
            parsed = json.loads(chosen.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {chosen}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"config {chosen} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"config {chosen} must be a JSON object")
        document = parsed
    if isinstance(document.get("redis"), dict) and "password" in document["redis"]:
        raise ConfigError(f"config {chosen}: redis.password does not belong in a file; use {REDIS_PASSWORD_HELP}")
    _apply_env(document, RelayConfig, (), environ)
    config: RelayConfig = _build(RelayConfig, document, ())
    return dataclasses.replace(config, redis=_with_redis_password(config.redis))


REDIS_PASSWORD_HELP = "redis.passwordFile (RELAY_REDIS_PASSWORD_FILE) or RELAY_REDIS_PASSWORD"


def _with_redis_password(redis: RedisConfig) -> RedisConfig:
    """Resolve the Redis password from exactly one source: the file, the env, or the URL."""
    sources = [name for name, value in (("file", redis.passwordFile), ("env", redis.password)) if value]
    if redis.url and urlsplit(redis.url).password is not None:
        sources.append("url")
    if len(sources) > 1:
        raise ConfigError(
            f"the Redis password is set more than once ({', '.join(sources)}); use one of {REDIS_PASSWORD_HELP}"
        )
    if not redis.passwordFile:
        return redis
    from shared.secrets import SecretFileError, read_secret_file

    try:
        secret = read_secret_file(redis.passwordFile, purpose="redis.passwordFile")
    except SecretFileError as exc:
        raise ConfigError(str(exc)) from None
    password = secret.decode("utf-8", "replace").strip()
    if not password:
        raise ConfigError(f"redis.passwordFile: {redis.passwordFile} is empty")
    return dataclasses.replace(redis, password=password)


def env_variable_names() -> list[tuple[str, str]]:
    """(variable, field path) for every configurable field, for docs and `--help`."""
    names: list[tuple[str, str]] = []

    def walk(cls: Any, path: tuple[str, ...]) -> None:
        for name, hint in get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                walk(hint, (*path, name))
            else:
                names.append((_env_name((*path, name)), ".".join((*path, name))))

    walk(RelayConfig, ())
    return names


def env_name(field_path: str) -> str:
    """The environment variable of a dotted field path: `smtp.httpPort` -> `RELAY_SMTP_HTTP_PORT`."""
    return _env_name(tuple(field_path.split(".")))


def _env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(re.sub(r"(?<!^)(?=[A-Z])", "_", part).upper() for part in path)


def _apply_env(document: dict[str, Any], cls: Any, path: tuple[str, ...], environ: Mapping[str, str]) -> None:
    for name, hint in get_type_hints(cls).items():
        field_path = (*path, name)
        if dataclasses.is_dataclass(hint):
            section = document.get(name)
            if section is None:
                section = document[name] = {}
            if isinstance(section, dict):
                _apply_env(section, hint, field_path, environ)
            continue
        raw = environ.get(_env_name(field_path))
        if raw is not None:
            document[name] = _parse_env_value(raw, hint, field_path)


def _parse_env_value(raw: str, hint: Any, path: tuple[str, ...]) -> Any:
    kinds = _kinds(hint)
    if bool in kinds:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{_env_name(path)} must be true or false")
    if int in kinds:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{_env_name(path)} must be an integer") from None
    if list in kinds or dict in kinds:
        stripped = raw.strip()
        if stripped.startswith(("[", "{")):
            try:
                return json.loads(stripped)
            except ValueError:
                raise ConfigError(f"{_env_name(path)} is not valid JSON") from None
        if str in kinds:
            return raw
        if list in kinds:
            return [item.strip() for item in stripped.split(",") if item.strip()]
        raise ConfigError(f"{_env_name(path)} must be a JSON object")
    return raw


def _kinds(hint: Any) -> set[type]:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(arg) for arg in get_args(hint)))
    return {origin or hint}


def _build(cls: Any, document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    hints = get_type_hints(cls)
    unknown = sorted(set(document) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config field {'.'.join((*path, unknown[0]))}")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in document:
            continue
        field_path = (*path, field.name)
        value = document[field.name]
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config field {'.'.join(field_path)} must be an object")
            values[field.name] = _build(hint, value, field_path)
        else:
            values[field.name] = _check(value, hint, field.metadata, field_path)
    return cls(**values)


def _check(value: Any, hint: Any, meta: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    name = ".".join(path)
    kinds = _kinds(hint)
    if isinstance(value, bool):
        if bool not in kinds:
            raise ConfigError(f"config field {name} must not be a boolean")
        return value
    if isinstance(value, int) and int in kinds:
        minimum = meta.get("minimum")
        if minimum is not None and value < minimum:
            raise ConfigError(f"config field {name} must be >= {minimum}")
        maximum = meta.get("maximum")
        if maximum is not None and value > maximum:
            raise ConfigError(f"config field {name} must be <= {maximum}")
        if name.endswith(("port", "Port")) and value > 65535:
            raise ConfigError(f"config field {name} must be a port number (0-65535)")
        return value
    if isinstance(value, str) and str in kinds:
        choices = meta.get("choices") or ()
        if choices and value not in choices:
            raise ConfigError(f"config field {name} must be one of {', '.join(choices)}")
        return value
    if isinstance(value, list) and list in kinds:
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"config field {name} must be a list of strings")
        return list(value)
    if isinstance(value, dict) and dict in kinds:
        if not all(isinstance(item, str) for item in value.values()):
            raise ConfigError(f"config field {name} must map strings to strings")
        return dict(value)
    expected = " or ".join(sorted(kind.__name__ for kind in kinds))
    raise ConfigError(f"config field {name} must be of type {expected}")
