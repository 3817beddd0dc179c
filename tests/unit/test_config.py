"""Config loading: PROTOCOL.md part D — the original's schema unchanged, strict, env overrides."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shared.config import ConfigError, RelayConfig, env_variable_names, load_config
from shared.redis import sentinel_addresses
from shared.replication import ReplicaAck
from tests.support import launcher

ORIGINAL_FULL_CONFIG = {
    "host": "127.0.0.1",
    "port": 8080,
    "logging": {"consoleLogFormat": "pretty", "prettyLogThemePath": "relay/theme.json"},
    "smtp": {"enabled": True, "host": "0.0.0.0", "port": 25, "maxMessageBytes": 10485760, "maxRecipients": 10},
    "rateLimits": {
        "denyWindowMs": 300000,
        "smtpMessagesPerMinutePerIp": 30,
        "wsAuthAttemptsPerMinutePerIp": 20,
        "smtpConnectionsPerMinutePerIp": 60,
    },
    "auth": {"challengeTtlSeconds": 60, "maxChallengeRecords": 10000, "challengeGcIntervalMs": 60000},
    "ws": {"idleTimeoutMs": 120000, "heartbeatIntervalMs": 30000},
    "dkim": {
        "enabled": False,
        "domainName": "mail.protege.bot",
        "keySelector": "default",
        "privateKeyPath": "keys/dkim.private.key",
        "headerFieldNames": "from:sender:reply-to:subject:date:message-id:to:cc:mime-version:content-type",
        "skipFields": "message-id:date",
    },
}
SEED_SHORT_CONFIG = {"host": "127.0.0.1", "port": 8080, "smtp": {"enabled": True, "host": "127.0.0.1", "port": 2526}}


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    return path


def test_defaults_are_the_protocol_defaults_and_bind_loopback() -> None:
    config = load_config(environ={})
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert (config.smtp.host, config.smtp.port, config.smtp.maxRecipients) == ("127.0.0.1", 2526, 1)
    assert config.smtp.maxMessageBytes == 10 * 1024 * 1024
    assert config.rateLimits.smtpConnectionsPerMinutePerIp == 60
    assert config.auth.challengeTtlSeconds == 60
    assert (config.ws.heartbeatIntervalMs, config.ws.idleTimeoutMs) == (30_000, 120_000)
    assert config.queue.retentionSeconds == 7 * 24 * 3600 and config.queue.maxMessages == 1000
    assert config.dkim.enabled is False and config.attestation.enabled is False


def test_the_originals_full_file_loads_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ORIGINAL_FULL_CONFIG), environ={})
    assert config.smtp.port == 25 and config.smtp.maxRecipients == 10
    assert config.logging.consoleLogFormat == "pretty"
    assert config.dkim.skipFields == "message-id:date"


def test_the_seeds_short_example_loads_with_defaults_for_the_rest(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SEED_SHORT_CONFIG), environ={})
    assert config.smtp.port == 2526 and config.smtp.maxMessageBytes == 10 * 1024 * 1024
    assert config.auth == RelayConfig().auth


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"port": "8080"}, "port"),
        ({"port": 70000}, "port"),
        ({"smtp": {"maxRecipients": 0}}, "smtp.maxRecipients"),
        ({"smtp": {"enabled": "yes"}}, "smtp.enabled"),
        ({"smtp": {"port": True}}, "smtp.port"),
        ({"smtp": []}, "smtp"),
        ({"logging": {"consoleLogFormat": "xml"}}, "logging.consoleLogFormat"),
        ({"smtp": {"colour": 1}}, "smtp.colour"),
        ({"unknownTopLevel": 1}, "unknownTopLevel"),
        ({"mailDomains": [1]}, "mailDomains"),
        ({"egress": {"routes": {"a.test": 5}}}, "egress.routes"),
        ({"redis": {"admissionHighWatermarkPercent": 101}}, "redis.admissionHighWatermarkPercent"),
    ],
)
def test_bad_fields_are_errors_naming_the_field(tmp_path: Path, document: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, document), environ={})


def test_not_json_and_not_an_object_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(write(tmp_path, [1]), environ={})


def test_every_field_has_an_environment_override() -> None:
    names = dict(env_variable_names())
    assert names["RELAY_REDIS_URL"] == "redis.url"
    assert names["RELAY_SMTP_PORT"] == "smtp.port"
    assert names["RELAY_RATE_LIMITS_DENY_WINDOW_MS"] == "rateLimits.denyWindowMs"
    assert names["RELAY_NODE_ID"] == "nodeId"
    assert names["RELAY_EGRESS_TLS_VERIFY"] == "egress.tls.verify"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    environ = {
        "RELAY_SMTP_PORT": "2600",
        "RELAY_REDIS_URL": "redis://10.0.0.1:6379/0",
        "RELAY_MAIL_DOMAINS": "relay.test, other.test",
        "RELAY_EGRESS_ROUTES": '{"sink.test":"127.0.0.1:2525"}',
        "RELAY_EGRESS_TLS_VERIFY": "true",
        "RELAY_SMTP_ENABLED": "0",
        "RELAY_DKIM_HEADER_FIELD_NAMES": "from:to:subject",
    }
    config = load_config(write(tmp_path, ORIGINAL_FULL_CONFIG), environ=environ)
    assert config.smtp.port == 2600 and config.smtp.enabled is False
    assert config.redis.url == "redis://10.0.0.1:6379/0"
    assert config.mailDomains == ["relay.test", "other.test"]
    assert config.egress.routes == {"sink.test": "127.0.0.1:2525"}
    assert config.egress.tls.verify is True
    assert config.dkim.headerFieldNames == "from:to:subject"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RELAY_SMTP_PORT", "abc"), ("RELAY_SMTP_ENABLED", "maybe"), ("RELAY_SMTP_PORT", "-5")],
)
def test_bad_environment_values_are_errors_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=r"RELAY_SMTP_|smtp\."):
        load_config(environ={variable: value})


def test_relay_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"port": 9999})
    assert load_config(environ={"RELAY_CONFIG": str(path)}).port == 9999


def test_cli_exits_non_zero_with_the_field_named(tmp_path: Path) -> None:
    path = write(tmp_path, {"smtp": {"maxMessageBytes": -1}})
    result = launcher.run(
        [sys.executable, "-m", "protege_relay.cli", "ingress", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "smtp.maxMessageBytes" in result.stderr


# --- Redis credentials: a file or the environment, never the config file ------------------------


def test_redis_password_comes_from_a_private_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret-from-file\n")
    secret.chmod(0o600)
    config = load_config(write(tmp_path, {"redis": {"username": "ingress", "passwordFile": str(secret)}}), environ={})
    assert (config.redis.username, config.redis.password) == ("ingress", "s3cret-from-file")
    assert "s3cret" not in repr(config), "the password must never reach a log through repr"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"redis\.passwordFile.*0644"):
        load_config(environ={"RELAY_REDIS_PASSWORD_FILE": str(secret)})


def test_redis_password_from_the_environment() -> None:
    config = load_config(environ={"RELAY_REDIS_USERNAME": "tunnel", "RELAY_REDIS_PASSWORD": "from-env"})
    assert (config.redis.username, config.redis.password) == ("tunnel", "from-env")


def test_redis_password_in_the_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.password does not belong in a file"):
        load_config(write(tmp_path, {"redis": {"password": "oops"}}), environ={})


def test_redis_password_from_two_sources_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("a")
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match=r"more than once \(file, env\)"):
        load_config(environ={"RELAY_REDIS_PASSWORD_FILE": str(secret), "RELAY_REDIS_PASSWORD": "b"})
    with pytest.raises(ConfigError, match=r"more than once \(env, url\)"):
        load_config(environ={"RELAY_REDIS_URL": "redis://:pw@redis:6379/0", "RELAY_REDIS_PASSWORD": "b"})


def test_sentinel_and_replicated_ack_settings_from_the_environment() -> None:
    config = load_config(
        environ={
            "RELAY_REDIS_SENTINELS": "s1:26379, s2:26380,[::1]:26381",
            "RELAY_REDIS_SENTINEL_MASTER": "mail",
            "RELAY_REDIS_MIN_REPLICAS_TO_ACK": "1",
            "RELAY_REDIS_REPLICA_ACK_TIMEOUT_MS": "250",
        }
    )
    assert config.redis.sentinels == ["s1:26379", "s2:26380", "[::1]:26381"]
    assert sentinel_addresses(config) == [("s1", 26379), ("s2", 26380), ("::1", 26381)]
    assert (config.redis.sentinelMaster, config.redis.minReplicasToAck, config.redis.replicaAckTimeoutMs) == (
        "mail",
        1,
        250,
    )
    defaults = RelayConfig().redis
    assert (defaults.sentinels, defaults.minReplicasToAck) == ([], 0)  # one Redis, no WAIT, unless asked


@pytest.mark.parametrize("entry", ["s1:port", "s1:70000", ":26379"])
def test_a_malformed_sentinel_address_is_an_error_naming_it(entry: str) -> None:
    config = load_config(environ={"RELAY_REDIS_SENTINELS": entry})
    with pytest.raises(ConfigError, match=r"redis\.sentinels"):
        sentinel_addresses(config)


def test_negative_min_replicas_to_ack_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"redis\.minReplicasToAck"):
        load_config(environ={"RELAY_REDIS_MIN_REPLICAS_TO_ACK": "-1"})


def test_failover_wait_reaches_every_replicated_write_and_stays_inside_the_gateways_wait(tmp_path: Path) -> None:
    """`redis.failoverWaitMs` is how long a write that decides a reply keeps retrying; the one
    value (shared.replication.ReplicaAck) the enqueue, the outbound stream, the result and a job's
    end all read. Over 15 s it would outlast the gateway's 20 s wait for a result: refused."""
    config = load_config(write(tmp_path, {}), environ={"RELAY_REDIS_FAILOVER_WAIT_MS": "2500"})
    assert ReplicaAck.from_config(config).failover_wait_s == 2.5
    assert ReplicaAck.from_config(load_config(write(tmp_path, {}), environ={})).failover_wait_s == 10.0
    with pytest.raises(ConfigError, match="failoverWaitMs"):
        load_config(write(tmp_path, {}), environ={"RELAY_REDIS_FAILOVER_WAIT_MS": "20000"})
