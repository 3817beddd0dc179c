"""The gateway's sans-I/O parts: frame reassembly, Maildir storage and dedupe, backoff."""

from __future__ import annotations

import mailbox
import os
from pathlib import Path

import pytest

from protege_relay.gateway.assembler import InboundAssembler
from protege_relay.gateway.maildir import INDEX_FILE_NAME, MaildirStore
from protege_relay.gateway.receive import parse_urls, reconnect_delay_s
from protege_relay.gateway.send import to_lf_line_endings
from shared.protocol import (
    MAX_CHUNK_BYTES,
    FrameError,
    FrameType,
    SmtpStart,
    decode_frame,
    encode_frame,
    encode_message_frames,
)


def frames_of(stream_id: str, message: bytes, rcpt: str = "r@x") -> list[bytes]:
    return encode_message_frames(stream_id, SmtpStart("s@example.com", rcpt), message)


def test_interleaved_streams_are_reassembled_separately() -> None:
    first = b"A" * (MAX_CHUNK_BYTES * 2 + 10)
    second = b"B" * (MAX_CHUNK_BYTES + 1)
    left, right = frames_of("q1.0", first, "a@x"), frames_of("q1.1", second, "b@x")
    interleaved = [frame for pair in zip(left, right, strict=False) for frame in pair] + left[len(right) :]
    assembler = InboundAssembler()
    completed = [m for m in (assembler.feed(decode_frame(f)) for f in interleaved) if m is not None]
    assert [(m.stream_id, m.rcpt_to, m.data) for m in completed] == [
        ("q1.1", "b@x", second),
        ("q1.0", "a@x", first),
    ]
    assert completed[1].chunk_count == 3
    assert completed[1].largest_chunk_bytes == MAX_CHUNK_BYTES
    assert assembler.open_stream_ids == []


def test_chunk_and_end_without_start_are_ignored() -> None:
    assembler = InboundAssembler()
    assert assembler.feed(decode_frame(encode_frame(FrameType.SMTP_CHUNK, "x", b"data"))) is None
    assert assembler.feed(decode_frame(encode_frame(FrameType.SMTP_END, "x"))) is None
    assert assembler.ignored_frames == 2


def test_restarted_stream_discards_its_earlier_chunks() -> None:
    assembler = InboundAssembler()
    start, chunk, _end = frames_of("s", b"old")
    assembler.feed(decode_frame(start))
    assembler.feed(decode_frame(chunk))
    assert assembler.buffered_bytes == 3
    completed = [assembler.feed(decode_frame(f)) for f in frames_of("s", b"new")][-1]
    assert completed is not None and completed.data == b"new"


def test_empty_message_and_attestation_survive() -> None:
    attestation = {"keyId": "k", "payloadBase64": "cA==", "signatureBase64": "cw=="}
    frames = encode_message_frames("e", SmtpStart("", "r@x", attestation), b"")
    assembler = InboundAssembler()
    completed = [assembler.feed(decode_frame(f)) for f in frames][-1]
    assert completed is not None
    assert (completed.mail_from, completed.data, completed.auth_attestation) == ("", b"", attestation)


def test_invalid_start_body_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        InboundAssembler().feed(decode_frame(encode_frame(FrameType.SMTP_START, "s", b"[]")))


def test_maildir_stores_exact_bytes_readable_by_stdlib(tmp_path: Path) -> None:
    message = b"Subject: caf\xc3\xa9\r\nX-Bare: lf\n\r\nbody\r\n.\r\n"
    store = MaildirStore(tmp_path / "mail")
    outcome = store.deliver("qabc.0", message)
    assert outcome.stored and outcome.path is not None
    assert outcome.path.parent == tmp_path / "mail" / "new"
    assert outcome.path.read_bytes() == message
    assert oct(outcome.path.stat().st_mode & 0o777) == "0o600"
    box = mailbox.Maildir(str(tmp_path / "mail"), factory=None, create=False)
    assert [box.get_bytes(key) for key in box.keys()] == [message]
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []


def test_maildir_dedupes_by_stream_id(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path)
    assert store.deliver("qabc.0", b"one").stored
    assert not store.deliver("qabc.0", b"one again").stored
    assert store.deliver("qabc.1", b"other recipient").stored
    assert len(os.listdir(tmp_path / "new")) == 2


def test_dedupe_survives_restart_and_user_deleting_the_message(tmp_path: Path) -> None:
    outcome = MaildirStore(tmp_path).deliver("qabc.0", b"one")
    assert outcome.path is not None
    outcome.path.unlink()
    reopened = MaildirStore(tmp_path)
    assert reopened.contains("qabc.0")
    assert not reopened.deliver("qabc.0", b"one").stored


def test_dedupe_survives_a_lost_index_via_filenames(tmp_path: Path) -> None:
    """A crash after the file is stored but before the index write must not cause a duplicate."""
    MaildirStore(tmp_path).deliver("q/odd:id.0", b"one")
    (tmp_path / INDEX_FILE_NAME).unlink()
    cur = tmp_path / "cur"
    for name in os.listdir(tmp_path / "new"):  # a mail client moved it to cur/ and flagged it
        os.rename(tmp_path / "new" / name, cur / (name + ":2,S"))
    reopened = MaildirStore(tmp_path)
    assert not reopened.deliver("q/odd:id.0", b"one").stored
    assert len(os.listdir(cur)) == 1 and os.listdir(tmp_path / "new") == []


def test_index_is_compacted_but_keeps_recent_ids(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path, index_keep_entries=5)
    for n in range(11):
        store.deliver(f"q.{n}", b"x")
    lines = (tmp_path / INDEX_FILE_NAME).read_text().splitlines()
    assert len(lines) == 5
    assert store.contains("q.10") and not store.contains("q.0")


def test_backoff_is_full_jitter_and_capped() -> None:
    samples = [reconnect_delay_s(attempt, base_s=0.5, cap_s=30.0) for attempt in range(40) for _ in range(5)]
    assert all(0.0 <= delay <= 30.0 for delay in samples)
    assert max(reconnect_delay_s(0, base_s=0.5, cap_s=30.0) for _ in range(200)) <= 0.5
    assert max(reconnect_delay_s(20, base_s=0.5, cap_s=30.0) for _ in range(200)) > 5.0


def test_url_list_and_line_endings() -> None:
    assert parse_urls(" ws://a/ws, ws://b/ws ,") == ["ws://a/ws", "ws://b/ws"]
    assert to_lf_line_endings(b"a\r\nb\nc\r\n") == b"a\nb\nc\n"
