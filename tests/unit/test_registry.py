"""The tunnel node's socket registry without sockets, Redis or asyncio: every index changes in one
call, and a detached socket leaves nothing behind."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from services.tunnel.registry import CapLimits, Detached, SocketRegistry, Woken

_ids = itertools.count()


@dataclass(eq=False)
class Socket:
    client_ip: str = "192.0.2.1"
    socket_id: str = field(default_factory=lambda: f"socket-{next(_ids)}")


LIMITS = CapLimits(
    max_unauthenticated_per_ip=3, max_unauthenticated=5, max_outbound_per_persona=2, max_outbound_per_ip=3
)
EMPTY = dict.fromkeys(SocketRegistry[Socket](LIMITS).counts(), 0)


def registry() -> SocketRegistry[Socket]:
    return SocketRegistry[Socket](LIMITS)


def authenticated(reg: SocketRegistry[Socket], persona: str, *, inbound: bool = True, ip: str = "192.0.2.1") -> Socket:
    socket = Socket(ip)
    assert reg.connected(socket)
    if not inbound:
        assert reg.take_outbound_slot(socket, persona)
    reg.claim(socket, persona, inbound=inbound)
    reg.attach(socket)
    return socket


def test_unauthenticated_sockets_are_capped_per_ip_and_per_node_and_freed_by_attach_or_detach() -> None:
    reg = registry()
    first = [Socket("192.0.2.1") for _ in range(3)]
    assert all(reg.connected(s) for s in first)
    assert reg.unauthenticated_full("192.0.2.1") and not reg.connected(Socket("192.0.2.1"))
    assert reg.connected(Socket("192.0.2.2")) and reg.connected(Socket("192.0.2.3"))
    assert reg.unauthenticated_full("192.0.2.9")  # the node's 5
    reg.claim(first[0], "pk", inbound=True)
    reg.attach(first[0])
    assert not reg.unauthenticated_full("192.0.2.9") and not reg.unauthenticated_full("192.0.2.1")
    reg.detach(first[1])
    assert reg.connected(Socket("192.0.2.1"))


def test_outbound_slots_are_capped_per_persona_and_per_ip_and_given_back_on_detach() -> None:
    reg = registry()
    a, b, c = Socket("192.0.2.1"), Socket("192.0.2.2"), Socket("192.0.2.3")
    assert reg.take_outbound_slot(a, "pk") and reg.take_outbound_slot(b, "pk")
    assert not reg.take_outbound_slot(c, "pk")  # 2 per persona
    assert reg.take_outbound_slot(c, "other")
    reg.detach(a)
    assert reg.take_outbound_slot(Socket("192.0.2.4"), "pk")
    same_ip = [Socket("198.51.100.1") for _ in range(4)]
    assert [reg.take_outbound_slot(s, f"p{i}") for i, s in enumerate(same_ip)] == [True, True, True, False]


def test_an_inbound_claim_takes_the_slot_at_once_and_returns_the_socket_to_evict() -> None:
    reg = registry()
    old = authenticated(reg, "pk")
    new = Socket()
    reg.connected(new)
    assert reg.claim(new, "pk", inbound=True) is old
    assert reg.inbound("pk") is None  # between claim and attach, no socket serves inbound
    reg.attach(new)
    assert reg.inbound("pk") is new
    assert reg.detach(old) == Detached("pk", release_owner=True)  # its own claim is released (if still its)
    assert reg.inbound("pk") is new and reg.socket(new.socket_id) is new


def test_wakeups_while_authenticating_are_handed_to_attach() -> None:
    reg = registry()
    socket = Socket()
    reg.connected(socket)
    reg.woken("pk", inbox=True)  # not claimed yet: nobody to tell
    reg.claim(socket, "pk", inbound=True)
    reg.woken("pk", results=True)
    assert reg.attach(socket) == Woken("pk", inbox=False, results=True)
    other = Socket()
    reg.connected(other)
    reg.claim(other, "pk2", inbound=False)
    reg.note_claimed(other, inbox=True, results=False)
    assert reg.attach(other) == Woken("pk2", inbox=True, results=False)


def test_outbound_holder_is_dropped_only_with_the_last_outbound_socket() -> None:
    reg = registry()
    first = authenticated(reg, "pk", inbound=False)
    second = authenticated(reg, "pk", inbound=False, ip="192.0.2.2")
    assert reg.outbound_holders() == ["pk"] and set(reg.outbound_sockets("pk")) == {first, second}
    assert reg.detach(first) == Detached("pk", release_owner=False, drop_outbound_holder=False)
    assert reg.serves("pk")
    assert reg.detach(second) == Detached("pk", release_owner=False, drop_outbound_holder=True)
    assert not reg.serves("pk") and reg.outbound_holders() == []


def test_served_personas_inbound_first_without_duplicates() -> None:
    reg = registry()
    authenticated(reg, "out", inbound=False)
    authenticated(reg, "both")
    authenticated(reg, "both", inbound=False)
    authenticated(reg, "in")
    assert reg.served_personas() == ["both", "in", "out"]


def test_drop_inbound_only_drops_the_named_socket() -> None:
    reg = registry()
    socket = authenticated(reg, "pk")
    assert not reg.drop_inbound("pk", Socket())
    assert reg.drop_inbound("pk", socket) and reg.inbound("pk") is None
    assert not reg.drop_inbound("pk", socket)
    assert reg.inbound_claims() == [("pk", socket)]  # still holds the owner keys until detach
    assert reg.detach(socket).release_owner


def test_a_socket_detached_before_it_claimed_needs_nothing_in_redis() -> None:
    reg = registry()
    socket = Socket()
    reg.connected(socket)
    assert reg.detach(socket) == Detached()
    assert reg.counts() == EMPTY


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["connect", "slot", "claim_in", "claim_out", "attach", "wake", "drop", "detach"]),
            st.integers(0, 5),
            st.sampled_from(["pk1", "pk2"]),
        ),
        max_size=60,
    )
)
def test_any_sequence_then_detaching_every_socket_leaves_every_index_empty(
    steps: list[tuple[str, int, str]],
) -> None:
    """Whatever order sockets connect, claim, attach and close in (as the connection drives it:
    connect first, claim once, attach after its claim), detaching them all empties the registry."""
    reg = registry()
    sockets = [Socket(f"192.0.2.{i % 3}") for i in range(6)]
    taken: set[int] = set()
    claimed: set[int] = set()
    for op, index, persona in steps:
        socket = sockets[index]
        if op == "connect" and index not in taken:
            if reg.connected(socket):
                taken.add(index)
        elif index not in taken:
            continue
        elif op == "slot":
            reg.take_outbound_slot(socket, persona)
        elif op in ("claim_in", "claim_out") and index not in claimed:
            claimed.add(index)
            reg.claim(socket, persona, inbound=op == "claim_in")
        elif op == "attach" and index in claimed:
            reg.attach(socket)
        elif op == "wake":
            reg.woken(persona, inbox=True, results=True)
        elif op == "drop":
            reg.drop_inbound(persona, socket)
        elif op == "detach":
            reg.detach(socket)
            taken.discard(index)
            claimed.discard(index)
            sockets[index] = Socket(socket.client_ip)  # a closed socket never comes back
    for index in list(taken):
        reg.detach(sockets[index])
    assert reg.counts() == EMPTY
