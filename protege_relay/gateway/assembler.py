"""Reassembly of inbound tunnel frames into whole messages, without I/O.

Frames of different streams may interleave on one socket (PROTOCOL.md A4), so all state is
keyed by stream id. Like the original gateway, a chunk or end for a stream that was never
started is ignored, and a second start for the same stream id starts it over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import Frame, FrameType, decode_start_body


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One complete inbound message for this persona, as the relay streamed it."""

    stream_id: str
    mail_from: str
    rcpt_to: str
    data: bytes
    auth_attestation: dict[str, str] | None
    chunk_count: int
    largest_chunk_bytes: int


@dataclass(slots=True)
class _OpenStream:
    mail_from: str
    rcpt_to: str
    auth_attestation: dict[str, str] | None
    chunks: list[bytes] = field(default_factory=list)
    byte_count: int = 0
    largest_chunk_bytes: int = 0


class InboundAssembler:
    """Feed decoded frames in arrival order; `feed` returns a message when its smtp_end arrives."""

    def __init__(self) -> None:
        self._open_streams: dict[str, _OpenStream] = {}
        self.ignored_frames = 0

    @property
    def open_stream_ids(self) -> list[str]:
        return list(self._open_streams)

    @property
    def buffered_bytes(self) -> int:
        return sum(stream.byte_count for stream in self._open_streams.values())

    def feed(self, frame: Frame) -> InboundMessage | None:
        if frame.frame_type is FrameType.SMTP_START:
            start = decode_start_body(frame.body)
            self._open_streams[frame.stream_id] = _OpenStream(start.mail_from, start.rcpt_to, start.auth_attestation)
            return None
        stream = self._open_streams.get(frame.stream_id)
        if stream is None:
            self.ignored_frames += 1
            return None
        if frame.frame_type is FrameType.SMTP_CHUNK:
            stream.chunks.append(frame.body)
            stream.byte_count += len(frame.body)
            stream.largest_chunk_bytes = max(stream.largest_chunk_bytes, len(frame.body))
            return None
        del self._open_streams[frame.stream_id]
        return InboundMessage(
            stream_id=frame.stream_id,
            mail_from=stream.mail_from,
            rcpt_to=stream.rcpt_to,
            data=b"".join(stream.chunks),
            auth_attestation=stream.auth_attestation,
            chunk_count=len(stream.chunks),
            largest_chunk_bytes=stream.largest_chunk_bytes,
        )

    def reset(self) -> None:
        """Forget half-received streams: after a reconnect the relay sends them again from the start."""
        self._open_streams.clear()
