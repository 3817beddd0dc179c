"""Signed attestations on ingress (PROTOCOL.md part E) and the key-file rules of
`shared.secrets`: each stored InboxEntry carries an attestation that verifies exactly as a
Protege gateway checks it (trusted key id, signature, context equal to the smtp_start)."""

from __future__ import annotations

import json
import os
import smtplib
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from protege_relay.embedded_redis import EmbeddedRedis
from shared import protocol
from shared.attestation import AttestationContext, verify_attestation
from shared.identity import Passport
from shared.payloads import InboxEntry
from shared.secrets import SecretFileError, check_secret_status, load_signing_key, read_secret_file
from tests.support.dns_server import DnsServer
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    ingress_starter,
    mark_seen,
    new_persona,
)
from tests.support.processes import ServiceProcess
from tests.support.sender_auth import (
    FOREIGN_IP,
    HONEST_IP,
    SENDER_DOMAIN,
    dkim_key,
    message_from,
)

KEY_ID = "relay-test-2024"
StartIngress = Callable[..., InProcessIngress]
Spawn = Callable[..., ServiceProcess]
SIGNED = dkim_key().sign(message_from(f"alice@{SENDER_DOMAIN}"))


def write_key(path: Path, passport: Passport, mode: int = 0o600) -> Path:
    passport.save(path)
    path.chmod(mode)
    return path


def fake_status(mode: int, uid: int) -> os.stat_result:
    """A stat result for a file of `mode` owned by `uid` (ownership we cannot create as a test)."""
    return os.stat_result((mode, 0, 0, 1, uid, 0, 100, 0, 0, 0))


# --- shared.secrets ------------------------------------------------------------------------


def test_owner_only_key_file_loads(tmp_path: Path) -> None:
    passport = Passport.generate()
    loaded = load_signing_key(write_key(tmp_path / "k.pem", passport), purpose="test")
    assert loaded.public_key == passport.public_key


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o606])
def test_world_or_group_writable_or_readable_key_is_refused_with_its_mode(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "k.pem", Passport.generate(), mode)
    with pytest.raises(SecretFileError, match=f"mode {mode:04o}") as refused:
        read_secret_file(path, purpose="attestation.signingPrivateKeyPath")
    assert "attestation.signingPrivateKeyPath" in str(refused.value)
    assert "PRIVATE KEY" not in str(refused.value)


@pytest.mark.parametrize(
    ("mode", "uid", "allowed"),
    [
        (0o600, 1000, True),
        (0o400, 1000, True),
        (0o640, 1000, False),
        (0o440, 1000, False),
        (0o440, 0, True),
        (0o640, 0, True),
        (0o660, 0, False),
        (0o444, 0, False),
    ],
)
def test_group_read_is_allowed_only_for_root_owned_files(mode: int, uid: int, allowed: bool) -> None:
    """Kubernetes projects a `defaultMode: 0400` Secret with `fsGroup` as root-owned 0440."""
    status = fake_status(stat.S_IFREG | mode, uid)
    if allowed:
        check_secret_status(status, "k.pem", purpose="test")
    else:
        with pytest.raises(SecretFileError, match="must not be readable"):
            check_secret_status(status, "k.pem", purpose="test")


def test_a_directory_and_a_fifo_are_not_key_files(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path in (directory, fifo):
        with pytest.raises(SecretFileError, match="not a regular file"):
            read_secret_file(path, purpose="test")


def test_a_symlink_to_a_private_key_is_followed(tmp_path: Path) -> None:
    """Kubernetes Secret files are symlinks into `..data/`; the target's mode is what counts."""
    target = write_key(tmp_path / "real.pem", Passport.generate())
    link = tmp_path / "link.pem"
    link.symlink_to(target)
    assert read_secret_file(link, purpose="test") == target.read_bytes()


def test_missing_empty_path_and_wrong_key_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="cannot open"):
        read_secret_file(tmp_path / "absent.pem", purpose="test")
    with pytest.raises(SecretFileError, match="no key file path"):
        read_secret_file("", purpose="test")
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(rsa_pem)
    rsa_path.chmod(0o600)
    with pytest.raises(SecretFileError, match="does not hold an Ed25519"):
        load_signing_key(rsa_path, purpose="test")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(SecretFileError, match="not an unencrypted PEM"):
        load_signing_key(garbage, purpose="test")


# --- attestations over SMTP ----------------------------------------------------------------


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Passport, Path]:
    passport = Passport.generate()
    return passport, write_key(tmp_path / "attestation.pem", passport)


@pytest.fixture
def ingress(
    redis_server: EmbeddedRedis, dns_server: DnsServer, signer: tuple[Passport, Path]
) -> Iterator[InProcessIngress]:
    starter = ingress_starter(redis_server)
    start = next(starter)
    yield start(
        RELAY_ATTESTATION_ENABLED="true",
        RELAY_ATTESTATION_KEY_ID=KEY_ID,
        RELAY_ATTESTATION_SIGNING_PRIVATE_KEY_PATH=str(signer[1]),
        RELAY_SMTP_AUTH_NAMESERVERS=json.dumps([dns_server.nameserver]),
    )
    next(starter, None)


def send(port: int, source_ip: str, mail_from: str, recipients: list[str], message: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source_ip, 0)) as client:
        client.ehlo("mta.sender.test")
        assert client.mail(mail_from)[0] == 250
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, _ = client.data(message)
        return code


def gateway_check(entry: InboxEntry, trusted: dict[str, bytes]) -> tuple[str, dict[str, object] | None]:
    """What a gateway does with the smtp_start it receives for this entry."""
    start_frame = protocol.encode_message_frames(
        entry.stream_id, protocol.SmtpStart(entry.mail_from, entry.rcpt_to, entry.auth_attestation), entry.data
    )[0]
    frame = protocol.decode_frame(start_frame)
    start = protocol.decode_start_body(frame.body)
    expected = AttestationContext(frame.stream_id, start.mail_from, start.rcpt_to)
    return verify_attestation(start.auth_attestation, trusted, expected)


def test_attestation_of_authenticated_mail_verifies_with_pass_signals(
    ingress: InProcessIngress, signer: tuple[Passport, Path], persona: str, redis_client: redis.Redis
) -> None:
    assert send(ingress.port, HONEST_IP, f"bounce@{SENDER_DOMAIN}", [address(persona)], SIGNED) == 250
    [entry] = inbox_entries(redis_client, persona)
    assert entry.auth_attestation is not None
    assert entry.auth_attestation["keyId"] == KEY_ID

    reason, payload = gateway_check(entry, {KEY_ID: signer[0].public_key})

    assert reason == "ok"
    assert payload is not None
    assert payload["signals"] == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert (payload["streamId"], payload["mailFrom"], payload["rcptTo"]) == (
        entry.stream_id,
        f"bounce@{SENDER_DOMAIN}",
        address(persona),
    )
    issued_at = datetime.strptime(str(payload["issuedAt"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(issued_at.timestamp() - time.time()) < 60
    assert b"\tspf=pass smtp.mailfrom=bounce@sender.test;" in entry.data  # header and signals agree


def test_forged_mail_is_attested_with_the_failing_signals(
    ingress: InProcessIngress, signer: tuple[Passport, Path], persona: str, redis_client: redis.Redis
) -> None:
    forged = message_from(f"ceo@{SENDER_DOMAIN}")
    assert send(ingress.port, FOREIGN_IP, f"ceo@{SENDER_DOMAIN}", [address(persona)], forged) == 250
    [entry] = inbox_entries(redis_client, persona)
    reason, payload = gateway_check(entry, {KEY_ID: signer[0].public_key})
    assert reason == "ok"
    assert payload is not None
    assert payload["signals"] == {"spf": "fail", "dkim": "unknown", "dmarc": "fail"}


def test_each_recipient_gets_an_attestation_bound_to_its_own_stream(
    ingress: InProcessIngress, signer: tuple[Passport, Path], redis_client: redis.Redis
) -> None:
    first, second = new_persona(), new_persona()
    mark_seen(redis_client, first)
    mark_seen(redis_client, second)
    assert send(ingress.port, HONEST_IP, f"b@{SENDER_DOMAIN}", [address(first), address(second, "tag")], SIGNED) == 250
    [entry_one] = inbox_entries(redis_client, first)
    [entry_two] = inbox_entries(redis_client, second)
    trusted = {KEY_ID: signer[0].public_key}

    assert gateway_check(entry_one, trusted)[0] == "ok"
    assert gateway_check(entry_two, trusted)[0] == "ok"
    # an attestation replayed onto another stream (or another recipient) does not verify
    other_context = AttestationContext(entry_two.stream_id, entry_two.mail_from, entry_two.rcpt_to)
    assert verify_attestation(entry_one.auth_attestation, trusted, other_context)[0] == "context_mismatch"


def test_null_sender_is_attested_as_an_empty_mail_from(
    ingress: InProcessIngress, signer: tuple[Passport, Path], persona: str, redis_client: redis.Redis
) -> None:
    assert send(ingress.port, HONEST_IP, "<>", [address(persona)], SIGNED) == 250
    [entry] = inbox_entries(redis_client, persona)
    reason, payload = gateway_check(entry, {KEY_ID: signer[0].public_key})
    assert reason == "ok"
    assert payload is not None and payload["mailFrom"] == ""


def test_a_gateway_that_does_not_trust_the_key_rejects_the_attestation(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    assert send(ingress.port, HONEST_IP, f"b@{SENDER_DOMAIN}", [address(persona)], SIGNED) == 250
    [entry] = inbox_entries(redis_client, persona)
    assert gateway_check(entry, {})[0] == "missing_trusted_key"
    assert gateway_check(entry, {KEY_ID: Passport.generate().public_key})[0] == "invalid_signature"


# --- startup refuses unusable keys (real process, exit code and message) -------------------


def refused_start(spawn: Spawn, **env: str) -> tuple[int, str]:
    process = spawn("ingress", RELAY_SMTP_PORT="0", **env)
    assert process.process is not None
    return process.process.wait(timeout=30), process.logs()


def test_attestation_without_a_key_file_exits_non_zero_with_a_clear_message(spawn: Spawn, tmp_path: Path) -> None:
    code, logs = refused_start(
        spawn,
        RELAY_ATTESTATION_ENABLED="true",
        RELAY_ATTESTATION_KEY_ID=KEY_ID,
        RELAY_ATTESTATION_SIGNING_PRIVATE_KEY_PATH=str(tmp_path / "missing.pem"),
    )
    assert code != 0
    assert f"attestation.signingPrivateKeyPath: cannot open {tmp_path / 'missing.pem'}" in logs
    assert '"msg": "ready"' not in logs


def test_a_world_readable_attestation_key_stops_the_start_without_leaking_it(spawn: Spawn, tmp_path: Path) -> None:
    path = write_key(tmp_path / "open.pem", Passport.generate(), 0o644)
    code, logs = refused_start(
        spawn,
        RELAY_ATTESTATION_ENABLED="true",
        RELAY_ATTESTATION_KEY_ID=KEY_ID,
        RELAY_ATTESTATION_SIGNING_PRIVATE_KEY_PATH=str(path),
    )
    assert code != 0
    assert "has mode 0644" in logs
    assert "PRIVATE KEY" not in logs and path.read_text().splitlines()[1] not in logs


def test_a_world_readable_starttls_key_stops_the_start(spawn: Spawn, tmp_path: Path) -> None:
    server_cert = trustme.CA().issue_cert("mx.relay.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_path))
    server_cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o644)
    code, logs = refused_start(spawn, RELAY_SMTP_TLS_CERT_PATH=str(cert_path), RELAY_SMTP_TLS_KEY_PATH=str(key_path))
    assert code != 0
    assert "smtp.tls.keyPath" in logs and "has mode 0644" in logs
