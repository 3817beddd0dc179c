"""A small authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP, one free port).

Zones are a dict: owner name -> record type -> list of rdata texts, e.g.
`{"example.test": {"MX": ["10 mx1.example.test."]}, "mx1.example.test": {"A": ["127.0.0.2"]}}`.
A name that is not in the dict answers NXDOMAIN; a known name without the asked type answers
NOERROR with no records (NODATA); names in `servfail` answer SERVFAIL; names in `silent` get
no answer at all (a resolver timeout). Records can be changed while the server runs.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import dns.rcode

from bench.dns_answer import NO_SUCH_NAME, Records, authoritative_answer, name_key, parse_query

TTL_S = 60


class DnsServer:
    def __init__(
        self,
        zones: dict[str, dict[str, list[str]]] | None = None,
        *,
        servfail: set[str] | None = None,
        silent: set[str] | None = None,
        ttl_s: int = TTL_S,
    ) -> None:
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        self._zones: dict[str, dict[str, list[str]]] = {}
        for name, records in (zones or {}).items():
            self.set_records(name, records)
        self.servfail = {name_key(name) for name in servfail or ()}
        self.silent = {name_key(name) for name in silent or ()}
        self.queries: list[tuple[str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    def set_records(self, name: str, records: dict[str, list[str]]) -> None:
        with self._lock:
            self._zones[name_key(name)] = {rtype.upper(): list(texts) for rtype, texts in records.items()}

    @property
    def port(self) -> int:
        assert self._udp is not None
        port: int = self._udp.getsockname()[1]
        return port

    @property
    def nameserver(self) -> str:
        """The value for `egress.nameservers` (RELAY_EGRESS_NAMESERVERS='["<this>"]')."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        for _ in range(20):  # UDP and TCP on the same port number
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._udp, self._tcp = udp, tcp
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, daemon=True, name=f"dns-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._wake_listeners()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def _wake_listeners(self) -> None:
        """An empty datagram and a connection that closes at once: both threads return from their
        wait now and see the stop, instead of at their next 0.2 s timeout (a test pays that per server)."""
        with contextlib.suppress(OSError):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"", ("127.0.0.1", self.port))
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query in wire format, or None to stay silent."""
        query = parse_query(wire)
        return None if query is None else authoritative_answer(query, self._look_up, self.ttl_s)

    def _look_up(self, name: str, rtype: str) -> Records | None:
        with self._lock:
            self.queries.append((name, rtype))
            records = self._zones.get(name)
            texts = list(records.get(rtype, [])) if records is not None else []
        if name in self.silent:
            return None
        if name in self.servfail:
            return Records(rcode=dns.rcode.SERVFAIL)
        return NO_SUCH_NAME if records is None else Records(texts)

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stopped.is_set():
            try:
                wire, client = self._udp.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            reply = self.answer(wire)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, client)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stopped.is_set():
            try:
                connection, _ = self._tcp.accept()
            except (TimeoutError, OSError):
                continue
            with connection:
                connection.settimeout(2)
                try:
                    (length,) = struct.unpack("!H", _read_exactly(connection, 2))
                    reply = self.answer(_read_exactly(connection, length))
                    if reply is not None:
                        connection.sendall(struct.pack("!H", len(reply)) + reply)
                except (OSError, struct.error):
                    continue


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = b""
    while len(chunks) < size:
        chunk = connection.recv(size - len(chunks))
        if not chunk:
            raise OSError("closed")
        chunks += chunk
    return chunks


__all__ = ["DnsServer"]
