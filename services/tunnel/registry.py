"""Which sockets this tunnel node holds, and for which persona: the one in-memory home of that.

Every index over the node's sockets lives here and changes only in one synchronous call
(`connected`, `claim`, `attach`, `detach`, ...), so no `await` can interleave with a half-done
update and no index can outlive a socket: a detached socket is gone from all of them at once.
Redis is not touched here; the calls say what the caller still has to do there (`Detached`).
The per-socket bookkeeping (counted as unauthenticated, holding an outbound slot, claimed as
inbound owner, woken while authenticating) is kept here too, not on the socket object.

It also counts what the node caps: unauthenticated sockets (`ws.maxUnauthenticatedPerIp`,
`ws.maxUnauthenticated`) and outbound-role sockets (`ws.maxOutboundSocketsPerPersona`,
`ws.maxOutboundSocketsPerIp`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class RegisteredSocket(Hashable, Protocol):
    """What the registry needs of a socket: who it is and where it comes from."""

    socket_id: str
    client_ip: str


class NodeSocket(RegisteredSocket, Protocol):
    """The node's view of one socket (services/tunnel/connection.py provides it): what the
    background duties, the result router and shutdown call on it."""

    async def send_text(self, text: str) -> None: ...

    async def ping(self) -> Awaitable[Any]: ...

    async def close(self, code: int, reason: str) -> None: ...

    def evict(self) -> None: ...

    def heartbeat(self, now: float, heartbeat_s: float, idle_s: float) -> None: ...

    def wake_inbox(self) -> None: ...

    def inbox_behind(self, length: int) -> bool: ...


S = TypeVar("S", bound=RegisteredSocket)


@dataclass(frozen=True, slots=True)
class CapLimits:
    max_unauthenticated_per_ip: int
    max_unauthenticated: int
    max_outbound_per_persona: int
    max_outbound_per_ip: int


@dataclass(slots=True)
class _Claim:
    """A socket's claim on a persona, from `claim` (before auth_ok) to `detach`."""

    persona_key: str
    inbound: bool
    inbox_woken: bool = False  # a wake-up (or the claim's own look) saw inbox entries
    results_woken: bool = False


@dataclass(frozen=True, slots=True)
class Woken:
    """What arrived for the persona while its socket was authenticating: look at once."""

    persona_key: str
    inbox: bool
    results: bool


@dataclass(frozen=True, slots=True)
class Detached:
    """What `detach` leaves to the caller in Redis for the socket's persona (None: never claimed)."""

    persona_key: str | None = None
    release_owner: bool = False  # it claimed the persona's inbound ownership
    drop_outbound_holder: bool = False  # it was the node's last outbound-role socket of the persona


class SocketRegistry(Generic[S]):
    """The node's sockets by persona and role, and the node's socket caps (see the module)."""

    def __init__(self, limits: CapLimits) -> None:
        self.limits = limits
        self.connections: set[S] = set()  # every socket taken, authenticated or not
        self._sockets: dict[str, S] = {}  # attached ones, by socket id
        self._claims: dict[S, _Claim] = {}
        self._claiming: dict[str, S] = {}  # persona -> socket between claim and attach
        self._inbound: dict[str, S] = {}
        self._outbound_only: dict[str, set[S]] = {}  # attached outbound-role sockets
        # Outbound-role sockets registered in Redis as holders of the persona, from claim (before
        # auth_ok) to detach: a superset of `_outbound_only`, which they join only at attach.
        self._outbound_registered: dict[str, set[S]] = {}
        self._unauthenticated: set[S] = set()
        self._unauthenticated_by_ip: Counter[str] = Counter()
        self._outbound_slots: dict[S, str] = {}  # socket -> persona it holds a slot for
        self._outbound_by_persona: Counter[str] = Counter()
        self._outbound_by_ip: Counter[str] = Counter()

    # --- caps ----------------------------------------------------------------------------------

    def unauthenticated_full(self, client_ip: str) -> bool:
        """True when `client_ip` already has its share of sockets not yet authenticated here, or
        the node has: a new one would only hold a file descriptor and memory."""
        return (
            self._unauthenticated_by_ip[client_ip] >= self.limits.max_unauthenticated_per_ip
            or len(self._unauthenticated) >= self.limits.max_unauthenticated
        )

    def connected(self, socket: S) -> bool:
        """Take a new socket, counted as unauthenticated; False (not taken) over a cap."""
        if self.unauthenticated_full(socket.client_ip):
            return False
        self.connections.add(socket)
        self._unauthenticated.add(socket)
        self._unauthenticated_by_ip[socket.client_ip] += 1
        return True

    def take_outbound_slot(self, socket: S, persona_key: str) -> bool:
        """Count an outbound-role socket about to authenticate; False over the per-persona or
        per-IP cap on this node (each such socket may hold streams being assembled)."""
        if socket in self._outbound_slots:  # one slot per socket, however often it is asked
            return True
        if (
            self._outbound_by_persona[persona_key] >= self.limits.max_outbound_per_persona
            or self._outbound_by_ip[socket.client_ip] >= self.limits.max_outbound_per_ip
        ):
            return False
        self._outbound_by_persona[persona_key] += 1
        self._outbound_by_ip[socket.client_ip] += 1
        self._outbound_slots[socket] = persona_key
        return True

    # --- a socket's life -----------------------------------------------------------------------

    def claim(self, socket: S, persona_key: str, *, inbound: bool) -> S | None:
        """The socket authenticates as `persona_key`: until `attach`, wake-ups for the persona are
        noted for it. An inbound claim takes the persona's inbound slot here at once; the socket
        that held it is returned, to be evicted."""
        self._claims[socket] = _Claim(persona_key, inbound)
        self._claiming[persona_key] = socket
        if not inbound:
            self._outbound_registered.setdefault(persona_key, set()).add(socket)
            return None
        previous = self._inbound.pop(persona_key, None)
        return previous if previous is not socket else None

    def woken(self, persona_key: str, *, inbox: bool = False, results: bool = False) -> None:
        """Note a wake-up for a persona whose socket is authenticating (attach looks at it)."""
        claimant = self._claiming.get(persona_key)
        if claimant is not None:
            self.note_claimed(claimant, inbox=inbox, results=results)

    def note_claimed(self, socket: S, *, inbox: bool, results: bool) -> None:
        """What the claim itself saw in the persona's streams."""
        claim = self._claims.get(socket)
        if claim is not None:
            claim.inbox_woken |= inbox
            claim.results_woken |= results

    def attach(self, socket: S) -> Woken:
        """After auth_ok was sent: the socket serves its claimed persona from now on."""
        claim = self._claims[socket]
        self._uncount_unauthenticated(socket)
        self._sockets[socket.socket_id] = socket
        if self._claiming.get(claim.persona_key) is socket:
            del self._claiming[claim.persona_key]
        if claim.inbound:
            self._inbound[claim.persona_key] = socket
        else:
            self._outbound_only.setdefault(claim.persona_key, set()).add(socket)
        return Woken(claim.persona_key, inbox=claim.inbox_woken, results=claim.results_woken)

    def detach(self, socket: S) -> Detached:
        """The socket closed: gone from every index and count, at once."""
        self.connections.discard(socket)
        self._uncount_unauthenticated(socket)
        self._uncount_outbound(socket)
        claim = self._claims.pop(socket, None)
        if claim is None:
            return Detached()
        persona_key = claim.persona_key
        if self._claiming.get(persona_key) is socket:
            del self._claiming[persona_key]
        if self._sockets.get(socket.socket_id) is socket:
            del self._sockets[socket.socket_id]
        if self._inbound.get(persona_key) is socket:
            del self._inbound[persona_key]
        _discard(self._outbound_only, persona_key, socket)
        was_registered = socket in self._outbound_registered.get(persona_key, ())
        _discard(self._outbound_registered, persona_key, socket)
        return Detached(
            persona_key=persona_key,
            release_owner=claim.inbound,
            drop_outbound_holder=was_registered and persona_key not in self._outbound_registered,
        )

    def drop_inbound(self, persona_key: str, socket: S) -> bool:
        """The persona's ownership moved elsewhere: True if `socket` held its inbound slot here
        (the caller evicts it)."""
        if self._inbound.get(persona_key) is not socket:
            return False
        del self._inbound[persona_key]
        return True

    # --- lookups -------------------------------------------------------------------------------

    def socket(self, socket_id: str) -> S | None:
        """An attached socket by id."""
        return self._sockets.get(socket_id)

    def inbound(self, persona_key: str) -> S | None:
        return self._inbound.get(persona_key)

    def inbound_sockets(self) -> list[tuple[str, S]]:
        return list(self._inbound.items())

    def outbound_sockets(self, persona_key: str) -> list[S]:
        """Attached outbound-role sockets of the persona."""
        return list(self._outbound_only.get(persona_key, ()))

    def outbound_holders(self) -> list[str]:
        """Personas with an outbound-role socket registered here (claimed, not yet detached)."""
        return list(self._outbound_registered)

    def served_personas(self) -> list[str]:
        """Personas with an attached socket here, inbound ones first."""
        return list({**dict.fromkeys(self._inbound), **dict.fromkeys(self._outbound_only)})

    def serves(self, persona_key: str) -> bool:
        return persona_key in self._inbound or persona_key in self._outbound_only

    def inbound_claims(self) -> list[tuple[str, S]]:
        """(persona, socket) of every socket that claimed inbound ownership, attached or not."""
        return [(claim.persona_key, socket) for socket, claim in self._claims.items() if claim.inbound]

    # --- internals -----------------------------------------------------------------------------

    def _uncount_unauthenticated(self, socket: S) -> None:
        if socket in self._unauthenticated:
            self._unauthenticated.discard(socket)
            _decrement(self._unauthenticated_by_ip, socket.client_ip)

    def _uncount_outbound(self, socket: S) -> None:
        persona_key = self._outbound_slots.pop(socket, None)
        if persona_key is not None:
            _decrement(self._outbound_by_persona, persona_key)
            _decrement(self._outbound_by_ip, socket.client_ip)

    def counts(self) -> dict[str, int]:
        """Sizes of every index (all zero once every socket is detached)."""
        return {
            "connections": len(self.connections),
            "sockets": len(self._sockets),
            "claims": len(self._claims),
            "claiming": len(self._claiming),
            "inbound": len(self._inbound),
            "outbound_only": len(self._outbound_only),
            "outbound_registered": len(self._outbound_registered),
            "unauthenticated": len(self._unauthenticated),
            "unauthenticated_ips": len(self._unauthenticated_by_ip),
            "outbound_slots": len(self._outbound_slots),
            "outbound_personas": len(self._outbound_by_persona),
            "outbound_ips": len(self._outbound_by_ip),
        }


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _discard(index: dict[str, set[S]], persona_key: str, socket: S) -> None:
    members = index.get(persona_key)
    if members is not None:
        members.discard(socket)
        if not members:
            del index[persona_key]
