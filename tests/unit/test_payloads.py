"""shared/payloads.py: `pack` writes exactly what msgpack of `dataclasses.asdict` wrote before
(the tunnel, egress and `protege-relay queue` read entries written by older processes too)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from shared.payloads import DeliveryResult, InboxEntry, OutboundJob

PAYLOADS = [
    InboxEntry("qabc", 0, "", "pk@relay.test", b"Subject: x\r\n\r\nbody\r\n", 1_700_000_000_000, "192.0.2.1"),
    InboxEntry("qabc", 2, "s@example.org", "pk+tag@relay.test", b"\x00\xff" * 10, 1, "::1", {"v": "1", "spf": "pass"}),
    OutboundJob("pk", "s1", "pk@relay.test", ["a@example.org", "b@example.org"], b"data", 5),
    DeliveryResult("s1", "sent", message_id="<m@x>"),
    DeliveryResult("s1", "failed", error="550", recipient="a@x", smtp_code=550, permanent=True, attempts=3),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda payload: type(payload).__name__)
def test_pack_is_msgpack_of_asdict_and_round_trips(payload: InboxEntry | OutboundJob | DeliveryResult) -> None:
    packed = payload.pack()
    assert packed == msgpack.packb(dataclasses.asdict(payload), use_bin_type=True)
    assert type(payload).unpack(packed) == payload
