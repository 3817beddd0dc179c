"""A slow authoritative DNS server for the sender-auth figure: every answer `--delay-ms` late.

Answers UDP and TCP on 127.0.0.1 from `--record NAME TYPE TEXT` triples; other names are
NXDOMAIN and known names without the type NODATA, both with the zone's SOA (TTL and minimum
`--ttl`) so resolvers may cache the negative answer as they would on the Internet. Every
answer is delayed by a timer, not a sleep, so queries in flight overlap as they do at a
real remote nameserver. Counts queries and prints them as one JSON line on SIGTERM.

    python -m bench.dns_slow --port 5353 --delay-ms 50 --record sender.bench TXT "v=spf1 -all"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys

import dns.rdataclass
import dns.rrset

from bench.dns_answer import NO_SUCH_NAME, Records, authoritative_answer, name_key, parse_query

ZONE_APEX = "bench."


class Zone:
    def __init__(self, records: list[tuple[str, str, str]], ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self.records: dict[tuple[str, str], list[str]] = {}
        for name, rtype, text in records:
            self.records.setdefault((name_key(name), rtype.upper()), []).append(text)
        self.names = {name for name, _ in self.records}
        self.soa = dns.rrset.from_text(
            ZONE_APEX, ttl_s, dns.rdataclass.IN, "SOA", f"ns.{ZONE_APEX} hostmaster.{ZONE_APEX} 1 60 60 60 {ttl_s}"
        )
        self.queries = 0

    def answer(self, wire: bytes) -> bytes | None:
        query = parse_query(wire)
        if query is None:
            return None
        self.queries += 1
        return authoritative_answer(query, self._look_up, self.ttl_s, negative_soa=self.soa)

    def _look_up(self, name: str, rtype: str) -> Records:
        texts = self.records.get((name, rtype))
        if texts:
            return Records(texts)
        return Records() if name in self.names else NO_SUCH_NAME


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone, delay_s: float) -> None:
        self.zone = zone
        self.delay_s = delay_s
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.zone.answer(data)
        if reply is not None and self.transport is not None:
            asyncio.get_running_loop().call_later(self.delay_s, self.transport.sendto, reply, addr)


async def serve(args: argparse.Namespace) -> dict[str, int]:
    zone = Zone([tuple(record) for record in args.record], args.ttl)
    delay_s = args.delay_ms / 1000
    loop = asyncio.get_running_loop()

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = zone.answer(await reader.readexactly(length))
                await asyncio.sleep(delay_s)
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
        except (asyncio.IncompleteReadError, OSError, struct.error):
            writer.close()

    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpServer(zone, delay_s), local_addr=("127.0.0.1", args.port)
    )
    tcp = await asyncio.start_server(tcp_client, "127.0.0.1", args.port)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    tcp.close()
    transport.close()
    return {"queries": zone.queries}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--record", nargs=3, action="append", default=[], metavar=("NAME", "TYPE", "TEXT"))
    args = parser.parse_args()
    sys.stdout.write(json.dumps(asyncio.run(serve(args))) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
