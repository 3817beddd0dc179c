"""The reference gateway against a scripted relay: a real WebSocket server in the test that
plays the relay's side of PROTOCOL.md step by step, so each gateway rule (sign the challenge,
ack only after storing, dedupe, reconnect when replaced, give up on a refused key, send one
stream per recipient) is proved without the rest of the relay. The gateway commands run as real
subprocesses, exactly as an operator starts them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from protege_relay.gateway.assembler import InboundAssembler
from protege_relay.gateway.client import AuthFailed, open_session
from protege_relay.gateway.receive import EXIT_AUTH_REFUSED
from shared.codes import AuthError, CloseCode
from shared.identity import Passport, decode_public_key, decode_signature, verify_signature
from shared.protocol import (
    MAX_CHUNK_BYTES,
    SmtpStart,
    auth_error,
    decode_control,
    decode_frame,
    delivery_result,
    encode_control,
    encode_message_frames,
)
from tests.support.processes import REPO_ROOT
from tests.support.wait import eventually

STEP_TIMEOUT_S = 20.0
Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def scripted_relay(handler: Handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def recv_control(ws: ServerConnection) -> dict[str, Any]:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return decode_control(await ws.recv())


async def authenticate(
    ws: ServerConnection, *, capabilities: list[str] | None = None, replaced: str | None = None
) -> dict[str, Any]:
    """Play the relay's side of A3, checking the signature; returns the challenge request."""
    request = await recv_control(ws)
    assert request["type"] == "auth_challenge_request"
    challenge_id = str(uuid.uuid4())
    text = f"relay-auth:{challenge_id}:{uuid.uuid4()}"
    await ws.send(encode_control({"type": "auth_challenge", "publicKeyBase32": request["publicKeyBase32"],
                                  "challengeId": challenge_id, "challengeText": text,
                                  "expiresAt": "2099-01-01T00:00:00.000Z"}))  # fmt: skip
    response = await recv_control(ws)
    assert response["type"] == "auth_challenge_response"
    assert response["challengeId"] == challenge_id
    assert response["sessionRole"] == request.get("sessionRole", "inbound")
    public_key = decode_public_key(request["publicKeyBase32"])
    assert verify_signature(public_key, text.encode(), decode_signature(response["signatureBase64"]))
    auth_ok: dict[str, Any] = {"type": "auth_ok", "publicKeyBase32": request["publicKeyBase32"],
                               "emailLocalPart": request["publicKeyBase32"],
                               "sessionRole": response["sessionRole"], "replacedSocketId": replaced}  # fmt: skip
    if capabilities is not None:
        auth_ok["capabilities"] = capabilities
    await ws.send(encode_control(auth_ok))
    return request


async def push_message(ws: ServerConnection, stream_id: str, message: bytes) -> None:
    for frame in encode_message_frames(stream_id, SmtpStart("s@example.com", "p@localhost"), message):
        await ws.send(frame)


def new_key(tmp_path: Path) -> tuple[Passport, Path]:
    passport = Passport.generate()
    key_path = tmp_path / f"{passport.persona_key[:8]}.key"
    passport.save(key_path)
    return passport, key_path


def stored(maildir: Path) -> list[bytes]:
    folder = maildir / "new"
    return [(folder / name).read_bytes() for name in sorted(os.listdir(folder))] if folder.exists() else []


Launch = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """launch(*args) starts `protege-relay *args`; anything still running is killed at teardown."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PROTEGE_GATEWAY_"))}
        env.update(PYTHONPATH=str(REPO_ROOT), PROTEGE_GATEWAY_RECONNECT_CAP_S="0.5")
        with (tmp_path / "command.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "protege_relay.cli", *args,
                cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


async def wait_exit(process: asyncio.subprocess.Process) -> int:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await process.wait()


# --- authentication ---------------------------------------------------------------------------


async def test_open_session_signs_the_challenge_and_reports_agreed_capabilities(tmp_path: Path) -> None:
    requests: list[dict[str, Any]] = []

    async def relay(ws: ServerConnection) -> None:
        requests.append(await authenticate(ws, capabilities=["inbound_ack"], replaced="old-socket"))
        await ws.wait_closed()

    passport = Passport.generate()
    async with scripted_relay(relay) as url:
        session = await open_session(url, passport, capabilities=["inbound_ack", "future_thing"])
        await session.connection.close()
    assert requests[0]["capabilities"] == ["inbound_ack", "future_thing"]
    assert requests[0]["sessionRole"] == "inbound"
    assert session.capabilities == {"inbound_ack"}
    assert session.replaced_socket_id == "old-socket"
    assert session.persona_key == passport.persona_key


@pytest.mark.parametrize(("code", "fatal"), [(AuthError.INVALID_SIGNATURE, True), (AuthError.CHALLENGE_EXPIRED, False)])
async def test_auth_error_is_fatal_only_when_retrying_cannot_help(code: AuthError, fatal: bool) -> None:
    async def relay(ws: ServerConnection) -> None:
        await recv_control(ws)
        await ws.send(auth_error(code))
        await ws.close(CloseCode.AUTH_FAILED, code)

    async with scripted_relay(relay) as url:
        with pytest.raises(AuthFailed) as refused:
            await open_session(url, Passport.generate())
    assert (refused.value.code, refused.value.fatal) == (code, fatal)


async def test_gateway_exits_non_zero_when_the_relay_refuses_its_key(tmp_path: Path, launch: Launch) -> None:
    async def relay(ws: ServerConnection) -> None:
        await recv_control(ws)
        await ws.send(auth_error(AuthError.INVALID_SIGNATURE))
        await ws.close(CloseCode.AUTH_FAILED, "invalid_signature")

    _, key_path = new_key(tmp_path)
    async with scripted_relay(relay) as url:
        gateway = await launch("gateway", "--key", str(key_path), "--url", url,
                                      "--maildir", str(tmp_path / "mail"))  # fmt: skip
        assert await wait_exit(gateway) == EXIT_AUTH_REFUSED


async def test_gateway_with_an_unreadable_key_exits_2(tmp_path: Path, launch: Launch) -> None:
    (tmp_path / "bad.key").write_text("not a key")
    gateway = await launch("gateway", "--key", str(tmp_path / "bad.key"),
                                  "--maildir", str(tmp_path / "mail"))  # fmt: skip
    assert await wait_exit(gateway) == 2


# --- receiving ----------------------------------------------------------------------------------


async def test_gateway_acks_only_stored_messages_dedupes_and_with_take_over_reconnects_when_replaced(
    tmp_path: Path, launch: Launch
) -> None:
    maildir = tmp_path / "mail"
    first, second = b"Subject: one\r\n\r\n" + b"1" * (MAX_CHUNK_BYTES + 5), b"Subject: two\r\n\r\nshort\r\n"
    sessions: list[dict[str, Any]] = []
    acked_with_file_present: list[tuple[str, bool]] = []
    all_done = asyncio.Event()
    contents = {"q1.0": first, "q1.1": second}

    async def await_ack(ws: ServerConnection) -> None:
        ack = await recv_control(ws)
        assert ack["type"] == "smtp_ack"
        # The acknowledged message is stored by then (others may be too: the gateway goes on).
        acked_with_file_present.append((ack["streamId"], contents[ack["streamId"]] in stored(maildir)))

    async def relay(ws: ServerConnection) -> None:
        sessions.append(await authenticate(ws, capabilities=["inbound_ack"]))
        if len(sessions) == 1:
            # Two streams interleaved frame by frame, as several deliveries may be.
            left = encode_message_frames("q1.0", SmtpStart("a@x", "p@localhost"), first)
            right = encode_message_frames("q1.1", SmtpStart("b@x", "p@localhost"), second)
            for pair in zip(left, right, strict=False):
                for frame in pair:
                    await ws.send(frame)
            for frame in left[len(right) :]:
                await ws.send(frame)
            await await_ack(ws)
            await await_ack(ws)
            await ws.close(CloseCode.REPLACED, "replaced_by_new_session")
            return
        await push_message(ws, "q1.0", first)  # redelivery after a reconnect: same stream id
        await await_ack(ws)
        all_done.set()
        await ws.wait_closed()

    _, key_path = new_key(tmp_path)
    async with scripted_relay(relay) as url:
        gateway = await launch("gateway", "--key", str(key_path), "--url", url,
                                      "--maildir", str(maildir), "--take-over")  # fmt: skip
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await all_done.wait()
        gateway.send_signal(signal.SIGTERM)
        assert await wait_exit(gateway) == 0
    assert [s["capabilities"] for s in sessions] == [["inbound_ack"], ["inbound_ack"]]
    assert acked_with_file_present == [("q1.1", True), ("q1.0", True), ("q1.0", True)]
    assert sorted(stored(maildir)) == sorted([first, second])
    log = (tmp_path / "command.log").read_text()
    assert "replaced by a newer session" in log and "duplicate message skipped" in log


async def test_gateway_sends_no_acks_unless_the_relay_agreed_to_them(tmp_path: Path, launch: Launch) -> None:
    """Covers --no-ack and an original relay that ignores capabilities: both must never see an
    smtp_ack (the original closes a socket that sends text after auth)."""
    maildir = tmp_path / "mail"
    texts_after_auth: list[str] = []
    requests: list[dict[str, Any]] = []
    all_done = asyncio.Event()

    async def relay(ws: ServerConnection) -> None:
        requests.append(await authenticate(ws))  # auth_ok without capabilities, like the original

        async def read_all() -> None:
            async for message in ws:
                if isinstance(message, str):
                    texts_after_auth.append(message)

        reader = asyncio.create_task(read_all())
        for n in range(2):
            await push_message(ws, f"legacy-{n}", b"Subject: legacy\r\n\r\nbody\r\n")
        await eventually(lambda: len(stored(maildir)) == 2, STEP_TIMEOUT_S)
        await (await ws.ping())  # the pong follows anything the gateway wrote before
        await ws.close()
        await reader
        all_done.set()

    _, key_path = new_key(tmp_path)
    async with scripted_relay(relay) as url:
        gateway = await launch("gateway", "--key", str(key_path), "--url", url,
                                      "--maildir", str(maildir), "--no-ack")  # fmt: skip
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await all_done.wait()
        gateway.send_signal(signal.SIGINT)
        assert await wait_exit(gateway) == 0
    assert "capabilities" not in requests[0]
    assert texts_after_auth == []
    assert len(stored(maildir)) == 2


# --- sending ------------------------------------------------------------------------------------


async def run_send_against(
    tmp_path: Path, launch: Launch, outcomes: dict[str, str | None], message: bytes, *extra: str
) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """Run `protege-relay send` to the recipients in `outcomes` (recipient -> "sent", "failed",
    or None for no answer); returns (exit code, printed lines, streams the relay received)."""
    received: list[dict[str, Any]] = []

    async def relay(ws: ServerConnection) -> None:
        request = await authenticate(ws)
        assert request["sessionRole"] == "outbound"
        assembler = InboundAssembler()
        while len(received) < len(outcomes):
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            frame = decode_frame(raw)
            assert len(frame.body) <= MAX_CHUNK_BYTES
            done = assembler.feed(frame)
            if done is None:
                continue
            received.append({"stream_id": done.stream_id, "mail_from": done.mail_from,
                             "rcpt_to": done.rcpt_to, "data": done.data})  # fmt: skip
            outcome = outcomes[done.rcpt_to]
            if outcome is not None:
                sent = outcome == "sent"
                await ws.send(delivery_result(done.stream_id, sent=sent, message_id="<m@x>" if sent else None,
                                              error=None if sent else "550 5.1.1 no such user"))  # fmt: skip
        await ws.wait_closed()

    _, key_path = new_key(tmp_path)
    (tmp_path / "out.eml").write_bytes(message)
    recipients = [arg for rcpt in outcomes for arg in ("--to", rcpt)]
    async with scripted_relay(relay) as url:
        sender = await launch("send", "--key", str(key_path), "--url", url, "--from",
                                     "me@localhost", *recipients, *extra, str(tmp_path / "out.eml"))  # fmt: skip
        assert sender.stdout is not None
        async with asyncio.timeout(STEP_TIMEOUT_S):
            output = await sender.stdout.read()
        code = await wait_exit(sender)
    return code, [json.loads(line) for line in output.decode().splitlines()], received


async def test_send_uses_one_uuid_stream_per_recipient_with_lf_endings_and_exits_0(
    tmp_path: Path, launch: Launch
) -> None:
    message = b"Subject: out\r\n\r\n" + b"x" * (2 * MAX_CHUNK_BYTES) + b"\r\nend\r\n"
    code, lines, received = await run_send_against(
        tmp_path, launch, {"bob@example.com": "sent", "carol@example.com": "sent"}, message
    )
    assert code == 0
    assert [r["rcpt_to"] for r in received] == ["bob@example.com", "carol@example.com"]
    assert all(r["data"] == message.replace(b"\r\n", b"\n") and r["mail_from"] == "me@localhost" for r in received)
    assert all(uuid.UUID(r["stream_id"]).version == 4 for r in received)
    assert [(line["streamId"], line["status"], line["recipient"]) for line in lines] == [
        (r["stream_id"], "sent", r["rcpt_to"]) for r in received
    ]


async def test_send_exits_1_and_prints_failures_and_timeouts(tmp_path: Path, launch: Launch) -> None:
    code, lines, _ = await run_send_against(
        tmp_path, launch, {"bad@example.com": "failed", "slow@example.com": None}, b"Subject: x\n\nbody\n",
        "--timeout", "1",
    )  # fmt: skip
    assert code == 1
    by_recipient = {line["recipient"]: line for line in lines}
    assert by_recipient["bad@example.com"]["status"] == "failed"
    assert by_recipient["bad@example.com"]["error"] == "550 5.1.1 no such user"
    assert by_recipient["slow@example.com"]["status"] == "timeout"


async def test_a_message_that_cannot_be_stored_is_not_acked_and_comes_again(tmp_path: Path, launch: Launch) -> None:
    maildir = tmp_path / "mail"
    message = b"Subject: retry\r\n\r\nbody\r\n"
    closes: list[int | None] = []
    all_done = asyncio.Event()

    async def relay(ws: ServerConnection) -> None:
        await authenticate(ws, capabilities=["inbound_ack"])
        if not closes:
            (maildir / "tmp").rmdir()
            (maildir / "tmp").write_text("not a directory any more")  # the next write fails
            await push_message(ws, "q9.0", message)
            with contextlib.suppress(ConnectionClosed):
                async for text in ws:
                    raise AssertionError(f"nothing may be acked when storing failed: {text!r}")
            closes.append(ws.close_code)
            (maildir / "tmp").unlink()
            (maildir / "tmp").mkdir()
            return
        await push_message(ws, "q9.0", message)
        assert (await recv_control(ws))["streamId"] == "q9.0"
        all_done.set()
        await ws.wait_closed()

    _, key_path = new_key(tmp_path)
    async with scripted_relay(relay) as url:
        gateway = await launch("gateway", "--key", str(key_path), "--url", url,
                                      "--maildir", str(maildir))  # fmt: skip
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await all_done.wait()
        gateway.terminate()
        assert await wait_exit(gateway) == 0
    assert closes == [1011]
    assert stored(maildir) == [message]
