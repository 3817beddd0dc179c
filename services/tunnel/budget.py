"""Memory of outbound streams being assembled on this node (issue 9, item 3).

An outbound stream is held in memory from `smtp_start` to `smtp_end` (then queued for the
egress). Each socket already has at most 8 open streams of at most `smtp.maxMessageBytes`,
but a persona may open several sockets and an address may hold many personas (they cost
nothing to create). So the bytes of unfinished streams are budgeted for the whole node per
persona (`ws.outboundAssemblyBytesPerPersona`), per client IP
(`ws.outboundAssemblyBytesPerIp`) and in all (`ws.outboundAssemblyBytes`); a chunk that would
go over any of them fails its stream with `outbound_busy` (services/tunnel/outbound.py).

`Allowance` is one socket's share: everything it took is given back when the socket ends,
whatever path the stream took, so a lost `give` cannot leak budget beyond the socket's life.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    per_persona: int
    per_ip: int
    per_node: int


class OutboundBudget:
    """Bytes held by unfinished outbound streams on this node, by persona, by IP and in all."""

    def __init__(self, limits: BudgetLimits) -> None:
        self.limits = limits
        self.by_persona: Counter[str] = Counter()
        self.by_ip: Counter[str] = Counter()
        self.total = 0

    def take(self, persona_key: str, client_ip: str, size: int) -> bool:
        if (
            self.by_persona[persona_key] + size > self.limits.per_persona
            or self.by_ip[client_ip] + size > self.limits.per_ip
            or self.total + size > self.limits.per_node
        ):
            _drop_zero(self.by_persona, persona_key)
            _drop_zero(self.by_ip, client_ip)
            return False
        self.by_persona[persona_key] += size
        self.by_ip[client_ip] += size
        self.total += size
        return True

    def give(self, persona_key: str, client_ip: str, size: int) -> None:
        self.by_persona[persona_key] -= size
        self.by_ip[client_ip] -= size
        self.total -= size
        _drop_zero(self.by_persona, persona_key)
        _drop_zero(self.by_ip, client_ip)

    def allowance(self, persona_key: str, client_ip: str) -> Allowance:
        return Allowance(self, persona_key, client_ip)


class Allowance:
    """One authenticated socket's part of the node budget (`ByteAllowance` of the session)."""

    def __init__(self, budget: OutboundBudget, persona_key: str, client_ip: str) -> None:
        self._budget = budget
        self._persona_key = persona_key
        self._client_ip = client_ip
        self.held = 0

    def take(self, size: int) -> bool:
        if not self._budget.take(self._persona_key, self._client_ip, size):
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        size = min(size, self.held)
        if size > 0:
            self.held -= size
            self._budget.give(self._persona_key, self._client_ip, size)

    def give_all(self) -> None:
        self.give(self.held)


def _drop_zero(counter: Counter[str], key: str) -> None:
    if counter.get(key, 1) <= 0:
        del counter[key]
