"""Ports are never shared silently, and startup problems are one line, never a traceback.

Real processes throughout: `protege-relay run` / `ingress` / `tunnel` / `egress` started the
way an operator starts them, a port held by another process, a Redis that is not there yet.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from tests.support import launcher
from tests.support.processes import REPO_ROOT, free_port, poll_until, service_env, wait_for_port

PERSONA = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"
MESSAGES = 20
EXIT_TIMEOUT_S = 30


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PROTEGE_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), RELAY_MAIL_DOMAINS="localhost")
    env.update(overrides)
    return env


def plain_lines(text: str) -> list[str]:
    """stderr lines that are not structured log records."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("{")]


def log_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def readyz(port: int) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, None


def cli(*args: str, env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return launcher.run(
        [sys.executable, "-m", "protege_relay.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = plain_lines(result.stderr)
    for fragment in expected:
        assert fragment in line, line
    return line


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some unrelated process listens on (a plain socket, no SO_REUSEPORT)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


# --- the SMTP port belongs to one relay ------------------------------------------------------


class RunningRelay:
    def __init__(self, tmp_path: Path, **ports: int) -> None:
        self.ports = ports
        self.env = clean_env(
            RELAY_DATA_DIR=str(tmp_path / "var"),
            RELAY_SMTP_PORT=str(ports["smtp"]),
            RELAY_PORT=str(ports["tunnel"]),
            RELAY_SMTP_HTTP_PORT=str(ports["ingress_http"]),
            RELAY_EGRESS_HTTP_PORT=str(ports["egress_http"]),
        )
        self.stdout_path, self.stderr_path = tmp_path / "run.out", tmp_path / "run.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = launcher.popen(
                [sys.executable, "-m", "protege_relay.cli", "run", "--ingress-workers", "2"],
                cwd=tmp_path,
                env=self.env,
                stdout=out,
                stderr=err,
            )
        self.tmp_path = tmp_path

    def ready_line(self) -> str:
        return poll_until(
            lambda: next((ln for ln in self.stdout_path.read_text().splitlines() if "ready" in ln), None),
            timeout_s=60,
            message=f"no ready line:\n{self.stderr_path.read_text()}",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def test_a_second_relay_or_stray_ingress_on_the_smtp_port_exits_and_the_first_keeps_all_mail(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    smtp_port = free_port()
    relay = RunningRelay(
        first_dir, smtp=smtp_port, tunnel=free_port(), ingress_http=free_port(), egress_http=free_port()
    )
    try:
        line = relay.ready_line()
        assert f"SMTP 127.0.0.1:{smtp_port}" in line and f"ws://127.0.0.1:{relay.ports['tunnel']}/ws" in line
        assert "keygen --out passport.key --domain localhost" in line
        redis_url = (first_dir / "var" / "redis.url").read_text().strip()
        store = redis.Redis.from_url(redis_url)
        store.set(keys.seen(PERSONA), 1)

        # a second `run` (its own data directory, so its own lock) on the same SMTP port
        second_env = dict(
            relay.env,
            RELAY_DATA_DIR=str(second_dir / "var"),
            RELAY_PORT=str(free_port()),
            RELAY_SMTP_HTTP_PORT=str(free_port()),
            RELAY_EGRESS_HTTP_PORT=str(free_port()),
        )
        second = cli("run", env=second_env, cwd=second_dir)
        message = assert_one_line_failure(
            second, f"cannot listen on 127.0.0.1:{smtp_port}", "smtp.port / RELAY_SMTP_PORT"
        )
        print(f"second run: exit {second.returncode}: {message}")

        # a stray single ingress against the same Redis
        stray = cli(
            "ingress", env=dict(second_env, RELAY_REDIS_URL=redis_url, RELAY_SMTP_HTTP_PORT="0"), cwd=second_dir
        )
        message = assert_one_line_failure(
            stray, f"cannot listen on 127.0.0.1:{smtp_port}", "smtp.port / RELAY_SMTP_PORT"
        )
        print(f"stray ingress: exit {stray.returncode}: {message}")
        assert not any(record.get("msg") == "ready" for record in log_records(stray.stderr))

        replies = []
        for n in range(MESSAGES):
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
                refused = client.sendmail("alice@example.com", [f"{PERSONA}@localhost"], f"Subject: {n}\r\n\r\nx\r\n")
                replies.append(refused)
        assert replies == [{}] * MESSAGES
        assert store.xlen(keys.inbox(PERSONA)) == MESSAGES
        ingress_nodes = {n.decode() for n in cast(set[bytes], store.smembers(keys.NODES_KEY)) if b"ingress" in n}
        print(f"{MESSAGES}/{MESSAGES} accepted by the first relay; its ingress nodes: {sorted(ingress_nodes)}")
        assert len(ingress_nodes) == 2  # both workers of the first relay serve the one socket
        store.close()
    finally:
        relay.stop()
    assert relay.process.returncode == 0
    assert "Traceback" not in relay.stderr_path.read_text()


# --- any port in use: one line naming address, port and setting ------------------------------


@pytest.mark.parametrize(
    ("service", "variable", "field"),
    [
        ("ingress", "RELAY_SMTP_PORT", "smtp.port"),
        ("ingress", "RELAY_SMTP_HTTP_PORT", "smtp.httpPort"),
        ("tunnel", "RELAY_PORT", "port"),
        ("egress", "RELAY_EGRESS_HTTP_PORT", "egress.httpPort"),
    ],
)
def test_a_port_in_use_is_one_line_and_a_non_zero_exit(
    redis_server: EmbeddedRedis, held_port: int, service: str, variable: str, field: str
) -> None:
    ports = {"RELAY_SMTP_PORT": str(free_port()), "RELAY_PORT": str(free_port()), variable: str(held_port)}
    env = service_env(redis_server.url, RELAY_MAIL_DOMAINS="localhost", **ports)
    result = cli(service, env=env)
    message = assert_one_line_failure(
        result, f"cannot listen on 127.0.0.1:{held_port}", f"{field} / {variable}", "Address already in use"
    )
    print(f"{service}: exit {result.returncode}: {message}")


def test_run_with_the_smtp_port_in_use_is_one_line(tmp_path: Path, held_port: int) -> None:
    env = clean_env(RELAY_DATA_DIR=str(tmp_path / "var"), RELAY_SMTP_PORT=str(held_port))
    result = cli("run", env=env, cwd=tmp_path)
    assert_one_line_failure(result, f"127.0.0.1:{held_port}", "RELAY_SMTP_PORT")
    assert not (tmp_path / "var" / "redis.url").exists()  # refused before starting Redis


# --- Redis not there yet -----------------------------------------------------------------------

HEALTH_PORT_VARIABLE = {"ingress": "RELAY_SMTP_HTTP_PORT", "tunnel": "RELAY_PORT", "egress": "RELAY_EGRESS_HTTP_PORT"}


@pytest.mark.parametrize("service", ["ingress", "tunnel", "egress"])
def test_a_service_is_not_ready_while_redis_is_down_and_says_which_redis_it_waits_for(
    tmp_path: Path, service: str
) -> None:
    redis_port, health_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    ports = {"RELAY_SMTP_PORT": str(free_port()), "RELAY_PORT": str(free_port())}
    ports[HEALTH_PORT_VARIABLE[service]] = str(health_port)
    env = service_env(url, RELAY_MAIL_DOMAINS="localhost", **ports)
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log_file:
        process = launcher.popen(
            [sys.executable, "-m", "protege_relay.cli", service],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    late_redis = EmbeddedRedis(tmp_path / "redis", port=redis_port)
    try:
        wait_for_port(health_port, timeout_s=30, process=process)
        waiting = poll_until(
            lambda: next(
                (r for r in log_records(log_path.read_text()) if r["msg"].startswith("waiting for redis")), None
            ),
            timeout_s=20,
            message=log_path.read_text(),
        )
        assert waiting["redis_url"] == url
        assert readyz(health_port) == (503, {"ready": False})
        assert not any(r["msg"] == "ready" for r in log_records(log_path.read_text()))

        late_redis.start()
        poll_until(lambda: readyz(health_port)[0] == 200, timeout_s=30, message=log_path.read_text())
        assert any(r["msg"] == "ready" for r in log_records(log_path.read_text()))
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        late_redis.stop()
    assert "Traceback" not in log_path.read_text()


def test_a_standalone_service_without_relay_redis_url_says_which_redis_it_uses(tmp_path: Path) -> None:
    env = service_env("", RELAY_MAIL_DOMAINS="localhost", RELAY_EGRESS_HTTP_PORT="0")
    del env["RELAY_REDIS_URL"]
    log_path = tmp_path / "egress.log"
    with log_path.open("wb") as log_file:
        process = launcher.popen(
            [sys.executable, "-m", "protege_relay.cli", "egress"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        using = poll_until(
            lambda: next((r for r in log_records(log_path.read_text()) if r["msg"] == "using redis"), None),
            timeout_s=20,
            message=log_path.read_text(),
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert using["redis_url"] == "redis://127.0.0.1:6379/0"
    assert "RELAY_REDIS_URL" in using["source"] and "default" in using["source"]


# --- other operator mistakes -------------------------------------------------------------------


def test_keygen_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    result = cli("keygen", "--out", str(tmp_path / "missing" / "passport.key"), env=clean_env())
    assert_one_line_failure(result, "cannot write", "No such file or directory", "create the directory first")


def test_keygen_prints_the_full_address_with_a_default_domain(tmp_path: Path) -> None:
    result = cli("keygen", "--out", str(tmp_path / "p.key"), env=clean_env(RELAY_MAIL_DOMAINS="relay.example.com"))
    assert result.returncode == 0, result.stderr
    local_part, _, domain = result.stdout.strip().partition("@")
    assert len(local_part) == 52 and domain == "relay.example.com"
    without = cli("keygen", "--out", str(tmp_path / "q.key"), env=clean_env(RELAY_MAIL_DOMAINS=""))
    assert without.stdout.strip().endswith("@localhost")


def test_gateway_with_a_maildir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mail").write_text("not a directory")
    assert cli("keygen", "--out", str(tmp_path / "p.key"), env=clean_env()).returncode == 0
    result = cli("gateway", "--key", str(tmp_path / "p.key"), "--maildir", str(tmp_path / "mail"), env=clean_env())
    assert result.returncode == 2
    assert_one_line_failure(result, f"cannot use {tmp_path / 'mail'} as a Maildir", "Not a directory")


def test_status_with_nothing_running_says_no_relay_was_found_and_how_to_point_at_one(tmp_path: Path) -> None:
    result = cli("status", env=clean_env(RELAY_DATA_DIR=str(tmp_path / "var")), cwd=tmp_path)
    line = assert_one_line_failure(result, "no running relay found", str(tmp_path / "var"))
    assert "RELAY_REDIS_URL" in line and "RELAY_DATA_DIR" in line and "6379" not in line


def test_status_into_a_closed_pipe_ends_quietly(redis_server: EmbeddedRedis) -> None:
    """`protege-relay status | head -1`: the reader leaves early; no traceback."""
    reader, writer = os.pipe()
    os.close(reader)  # gone before anything is written
    try:
        result = launcher.run(
            [sys.executable, "-m", "protege_relay.cli", "status"],
            cwd=REPO_ROOT,
            env=clean_env(RELAY_REDIS_URL=redis_server.url),
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=EXIT_TIMEOUT_S,
        )
    finally:
        os.close(writer)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 141
