"""The reference gateway and `send` as an operator meets them: wrong URLs, two gateways with one
key, key file permissions, the default sender. Real tunnel and egress processes, a real MX sink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protege_relay.embedded_redis import EmbeddedRedis
from shared.identity import Passport
from tests.support import launcher
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, poll_until, service_env

MAIL_DOMAIN = "relay.test"
RESULT_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 30
EXIT_BAD_ARGUMENTS, EXIT_REPLACED = 2, 4
Spawn = Callable[..., ServiceProcess]


def new_key(tmp_path: Path, name: str = "passport") -> tuple[Passport, Path]:
    passport = Passport.generate()
    path = tmp_path / f"{name}.key"
    passport.save(path)
    return passport, path


def plain_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("{")]


def log_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return launcher.run(
        [sys.executable, "-m", "protege_relay.cli", *args],
        cwd=REPO_ROOT,
        env=env or service_env(""),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )


def gateway(tmp_path: Path, key_path: Path, url: str, name: str, *extra: str) -> ServiceProcess:
    env = service_env("", PROTEGE_GATEWAY_RECONNECT_CAP_S="0.5")
    return ServiceProcess(
        "gateway",
        env,
        log_path=tmp_path / f"{name}.log",
        extra_args=["--key", str(key_path), "--url", url, "--maildir", str(tmp_path / name), *extra],
    ).start()


def wait_exit(process: ServiceProcess, timeout_s: float = EXIT_TIMEOUT_S) -> int:
    assert process.process is not None
    return process.process.wait(timeout=timeout_s)


@pytest.fixture
def tunnel_url(spawn: Spawn) -> str:
    port = free_port()
    spawn("tunnel", port=port, RELAY_PORT=str(port), RELAY_MAIL_DOMAINS=MAIL_DOMAIN)
    return f"ws://127.0.0.1:{port}/ws"


# --- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:8080/ws", "scheme http:// is not a WebSocket scheme"),
        ("127.0.0.1:8080/ws", "no ws:// scheme"),
        ("localhost:8080/ws", "scheme localhost:// is not a WebSocket scheme"),
        ("ws:///ws", "no host"),
    ],
)
def test_a_url_that_cannot_be_a_relay_fails_at_once_with_the_hint(tmp_path: Path, url: str, problem: str) -> None:
    _, key_path = new_key(tmp_path)
    started = time.monotonic()
    result = cli("gateway", "--key", str(key_path), "--url", url, "--maildir", str(tmp_path / "mail"))
    sent = cli("send", "--key", str(key_path), "--url", url, "--to", "bob@example.test", str(key_path))
    elapsed = time.monotonic() - started
    print(f"{url!r}: both commands refused in {elapsed:.2f} s")
    for outcome in (result, sent):
        assert outcome.returncode == EXIT_BAD_ARGUMENTS, outcome.stderr
        [line] = plain_lines(outcome.stderr)
        assert problem in line and "use ws://HOST:PORT/ws" in line and "Traceback" not in outcome.stderr


def test_a_wrong_path_on_a_real_tunnel_fails_at_once(tmp_path: Path, tunnel_url: str) -> None:
    _, key_path = new_key(tmp_path)
    wrong = tunnel_url.removesuffix("/ws") + "/socket"
    process = gateway(tmp_path, key_path, wrong, "wrong-path")
    assert wait_exit(process) == EXIT_BAD_ARGUMENTS
    [line] = plain_lines(process.logs())
    assert "HTTP 404" in line and "use ws://HOST:PORT/ws" in line


def test_network_errors_are_retried_until_the_relay_is_there(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    _, key_path = new_key(tmp_path)
    port = free_port()
    process = gateway(tmp_path, key_path, f"ws://127.0.0.1:{port}/ws", "retrying")
    try:
        poll_until(
            lambda: sum(r["msg"] == "relay unreachable" for r in log_records(process.logs())) >= 3,
            timeout_s=20,
            message=process.logs(),
        )
        assert process.process is not None and process.process.poll() is None
        tunnel = ServiceProcess(
            "tunnel",
            service_env(redis_server.url, RELAY_PORT=str(port), RELAY_MAIL_DOMAINS=MAIL_DOMAIN),
            port=port,
            log_path=tmp_path / "tunnel.log",
        ).start()
        try:
            poll_until(lambda: "gateway connected" in process.logs(), timeout_s=20, message=process.logs())
        finally:
            tunnel.terminate()
        attempts = sum(r["msg"] == "relay unreachable" for r in log_records(process.logs()))
        print(f"connected after {attempts} failed attempts")
    finally:
        process.terminate()


# --- two gateways, one key -------------------------------------------------------------------------


def test_a_gateway_replaced_by_another_stops_with_one_line_unless_told_to_take_over(
    tmp_path: Path, tunnel_url: str
) -> None:
    passport, key_path = new_key(tmp_path)
    first = gateway(tmp_path, key_path, tunnel_url, "first")
    poll_until(lambda: "gateway connected" in first.logs(), timeout_s=20, message=first.logs())
    second = gateway(tmp_path, key_path, tunnel_url, "second")
    started = time.monotonic()
    try:
        assert wait_exit(first) == EXIT_REPLACED
        print(f"the replaced gateway stopped {time.monotonic() - started:.2f} s after the second started")
        [line] = plain_lines(first.logs())
        assert "another gateway connected with this key" in line and passport.persona_key in line
        assert "--take-over" in line
        assert second.process is not None and second.process.poll() is None
        assert sum(r["msg"] == "gateway connected" for r in log_records(second.logs())) == 1

        # --take-over: the newcomer takes the persona back each time it is replaced
        third = gateway(tmp_path, key_path, tunnel_url, "third", "--take-over")
        assert wait_exit(second) == EXIT_REPLACED
        assert third.process is not None and third.process.poll() is None
        third.terminate()
    finally:
        second.kill()


def test_a_persona_key_readable_by_others_is_refused_like_a_tls_key(tmp_path: Path) -> None:
    _, key_path = new_key(tmp_path)
    os.chmod(key_path, 0o644)
    for command in (
        ["gateway", "--key", str(key_path), "--maildir", str(tmp_path / "mail")],
        ["send", "--key", str(key_path), "--to", "bob@example.test", str(key_path)],
    ):
        result = cli(*command)
        assert result.returncode == EXIT_BAD_ARGUMENTS, result.stderr
        [line] = plain_lines(result.stderr)
        assert "mode 0644" in line and f"chmod 600 {key_path}" in line


# --- send's sender ---------------------------------------------------------------------------------


def test_send_derives_the_sender_and_a_wrong_sender_is_told_the_expected_one(
    tmp_path: Path, spawn: Spawn, redis_server: EmbeddedRedis
) -> None:
    sink_port = free_port()
    with MxSink("127.0.0.1", sink_port) as sink:
        ws_port = free_port()
        common = {"RELAY_MAIL_DOMAINS": MAIL_DOMAIN}
        spawn("tunnel", port=ws_port, RELAY_PORT=str(ws_port), **common)
        spawn("egress", RELAY_EGRESS_ROUTES=json.dumps({"example.test": f"127.0.0.1:{sink_port}"}), **common)
        passport, key_path = new_key(tmp_path)
        own_address = f"{passport.persona_key}@{MAIL_DOMAIN}"
        (tmp_path / "out.eml").write_bytes(f"From: {own_address}\nSubject: out\n\nhello\n".encode())
        env = service_env(redis_server.url, RELAY_PORT=str(ws_port), **common)  # the default --url follows it
        base = ["send", "--key", str(key_path), "--to", "bob@example.test"]
        derived = cli(*base, "--timeout", str(RESULT_TIMEOUT_S), str(tmp_path / "out.eml"), env=env)
        assert derived.returncode == 0, derived.stdout + derived.stderr
        poll_until(sink.received, 20, message="the message never reached the MX sink")
        assert sink.received()[0].mail_from == f"{passport.persona_key}@{MAIL_DOMAIN}"

        wrong = cli(*base, "--from", f"someone@{MAIL_DOMAIN}", str(tmp_path / "out.eml"), env=env)
    assert wrong.returncode == 1
    [result] = [json.loads(line) for line in wrong.stdout.splitlines()]
    expected = f"{passport.persona_key}@{MAIL_DOMAIN}"
    assert (result["status"], result["error"], result["expectedSender"]) == ("failed", "sender_not_allowed", expected)
    [line] = plain_lines(wrong.stderr)
    assert f"refused sender someone@{MAIL_DOMAIN}; it expects {expected}" in line


def test_sigterm_still_stops_a_gateway_with_exit_0(tmp_path: Path, tunnel_url: str) -> None:
    _, key_path = new_key(tmp_path)
    process = gateway(tmp_path, key_path, tunnel_url, "stops")
    poll_until(lambda: "gateway connected" in process.logs(), timeout_s=20, message=process.logs())
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    assert wait_exit(process) == 0
