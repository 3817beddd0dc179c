"""Logs an operator can read on a terminal, JSON for machines: a real service on a real pty."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from shared import protocol
from shared.codes import CloseCode
from shared.identity import Passport
from tests.support import launcher
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, poll_until, service_env
from tests.support.ws_client import GatewayClient

PRETTY_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING +egress +waiting for redis: not ready until it answers"
    r"  redis_url=(\S+) .*error="
)
READ_TIMEOUT_S = 20.0


def egress_output(on_terminal: bool, **env: str) -> str:
    """Start `protege-relay egress` against a Redis that is not there; return its output up to
    the 'waiting for redis' line (stderr on a pty, or on a pipe)."""
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    environment = service_env(redis_url, RELAY_EGRESS_HTTP_PORT="0", RELAY_LOGGING_LEVEL="info", **env)
    if on_terminal:
        controller, terminal = pty.openpty()
        process = launcher.popen(
            [sys.executable, "-m", "protege_relay.cli", "egress"],
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
    else:
        process = launcher.popen(
            [sys.executable, "-m", "protege_relay.cli", "egress"],
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        controller = process.stderr.fileno()
    output = b""
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while b"waiting for redis" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    output += os.read(controller, 65536)
                except OSError:  # the pty's other side is gone
                    break
    finally:
        process.terminate()
        process.wait(timeout=30)
        if on_terminal:
            os.close(controller)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert "waiting for redis" in text, text
    return text


def test_on_a_terminal_logs_are_one_readable_line_each() -> None:
    text = egress_output(on_terminal=True)
    [line] = [ln for ln in text.splitlines() if "waiting for redis" in ln]
    print(line)
    match = PRETTY_LINE.match(line)
    assert match is not None, line
    assert "{" not in line.split("error=")[0]


@pytest.mark.parametrize(("on_terminal", "configured"), [(False, None), (True, "json")])
def test_json_when_not_on_a_terminal_or_when_configured(on_terminal: bool, configured: str | None) -> None:
    env = {"RELAY_LOGGING_CONSOLE_LOG_FORMAT": configured} if configured else {}
    text = egress_output(on_terminal=on_terminal, **env)
    [line] = [ln for ln in text.splitlines() if "waiting for redis" in ln]
    record = json.loads(line)
    assert (record["level"], record["service"]) == ("warning", "egress")
    assert record["msg"].startswith("waiting for redis") and record["redis_url"].startswith("redis://127.0.0.1:")
    assert record["ts"].endswith("Z")


# --- the tunnel says why every socket ended ---------------------------------------------------


def tunnel_records(process: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.logs().splitlines() if line.startswith("{")]


async def test_the_tunnel_logs_every_close_replacement_and_mid_message_drop_with_the_reason(
    spawn: Callable[..., ServiceProcess],
) -> None:
    port = free_port()
    tunnel = spawn("tunnel", port=port, RELAY_PORT=str(port), RELAY_MAIL_DOMAINS="relay.test")
    url = f"ws://127.0.0.1:{port}/ws"
    passport = Passport.generate()

    sender = await GatewayClient.open(url)
    await sender.authenticate(passport, role="outbound")
    start = protocol.encode_frame(
        protocol.FrameType.SMTP_START,
        "half-sent",
        protocol.encode_start_body(protocol.SmtpStart(f"{passport.persona_key}@relay.test", "bob@example.test")),
    )
    await sender.ws.send(start)
    await sender.ws.send(protocol.encode_frame(protocol.FrameType.SMTP_CHUNK, "half-sent", b"Subject: cut\n\nhal"))
    await sender.close()

    first = await GatewayClient.open(url)
    await first.authenticate(passport)
    second = await GatewayClient.open(url)
    await second.authenticate(passport)
    assert (await first.closed())[0] == CloseCode.REPLACED
    await second.close()

    def closes() -> list[dict[str, Any]]:
        return [r for r in tunnel_records(tunnel) if r["msg"].startswith("socket closed")]

    poll_until(lambda: len(closes()) == 3, timeout_s=10, message=tunnel.logs())
    dropped, replaced, normal = closes()
    for record in (dropped, replaced, normal):
        print({k: record[k] for k in ("msg", "closed_by", "close_code", "close_reason", "outbound_streams_dropped")})
        assert record["level"] == "info" and record["persona"] == passport.persona_key
    assert (dropped["msg"], dropped["closed_by"], dropped["outbound_streams_dropped"]) == (
        "socket closed mid-message",
        "gateway",
        1,
    )
    assert (replaced["closed_by"], replaced["close_code"], replaced["close_reason"]) == (
        "relay",
        CloseCode.REPLACED,
        "replaced_by_new_session",
    )
    assert (normal["msg"], normal["closed_by"], normal["close_code"]) == ("socket closed", "gateway", 1000)
    [replacement] = [r for r in tunnel_records(tunnel) if r["msg"] == "socket replaced by a newer session"]
    assert replacement["level"] == "info" and replacement["socket_id"] == replaced["socket_id"]
