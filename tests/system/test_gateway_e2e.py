"""The reference gateway's two commands used together against real tunnel and egress processes:
a persona receiving with `protege-relay gateway` while it sends with `protege-relay send`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from protege_relay.embedded_redis import EmbeddedRedis
from shared.identity import Passport
from tests.support import launcher
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, service_env
from tests.support.wait import poll_until

RESULT_TIMEOUT_S = 5.0


def test_send_gets_its_result_while_a_receiving_gateway_is_connected(
    tmp_path: Path, spawn: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    sink_port = free_port()
    with MxSink("127.0.0.1", sink_port) as sink:
        ws_port = free_port()
        spawn("tunnel", port=ws_port, RELAY_PORT=str(ws_port))
        spawn("egress", RELAY_EGRESS_ROUTES=json.dumps({"example.test": f"127.0.0.1:{sink_port}"}))
        url = f"ws://127.0.0.1:{ws_port}/ws"
        passport = Passport.generate()
        passport.save(tmp_path / "passport.key")
        receiver = ServiceProcess(
            "gateway",
            service_env(redis_server.url),
            log_path=tmp_path / "gateway.log",
            extra_args=["--key", str(tmp_path / "passport.key"), "--url", url, "--maildir", str(tmp_path / "mail")],
        ).start()
        try:
            poll_until(lambda: "gateway connected" in receiver.logs(), 20, message=receiver.logs())
            own = f"{passport.persona_key}@localhost"
            (tmp_path / "out.eml").write_bytes(f"From: {own}\nSubject: out\n\nhello\n".encode())
            done = launcher.run(
                [sys.executable, "-m", "protege_relay.cli", "send", "--key", str(tmp_path / "passport.key"),
                 "--url", url, "--from", f"{passport.persona_key}@localhost", "--to", "bob@example.test",
                 "--timeout", str(RESULT_TIMEOUT_S), str(tmp_path / "out.eml")],
                cwd=REPO_ROOT, env=service_env(redis_server.url), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            poll_until(sink.received, 20, message="the message never reached the MX sink")
        finally:
            receiver.terminate()
    [result] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (done.returncode, result["status"]) == (0, "sent")
