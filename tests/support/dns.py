"""A real DNS server on a loopback UDP port whose answers a test changes as it goes.

gRPC clients can ask a named server instead of the system's resolver
(`dns://127.0.0.1:<port>/<name>:<port>`), so a test can make a peer's name point
elsewhere (a replica moved, as a container recreated with a new address) and watch
how soon a channel follows. Answers A queries for the names it was given, with a TTL of
0; AAAA and other types of a known name get an empty answer, unknown names NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from typing import cast

_RESPONSE_FLAGS = 0x8180  # response, recursion desired and available, NOERROR
_NXDOMAIN = 3
_TYPE_A = 1
_CLASS_IN = 1


class LoopbackDns(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.records: dict[str, str] = {}  # lower-case name without the final dot -> IPv4
        self.queries = 0
        self.asked_at: list[float] = []  # when each A query came (time.monotonic())
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def start(cls) -> LoopbackDns:
        server = cls()
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
        return server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.port = int(transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def answer(self, name: str, address: str) -> None:
        self.records[name.lower().rstrip(".")] = str(ipaddress.IPv4Address(address))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self._reply(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def _reply(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        (query_id,) = struct.unpack("!H", query[:2])
        labels, offset = [], 12
        while offset < len(query) and query[offset] != 0:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
            offset += 1 + length
        offset += 1
        if offset + 4 > len(query):
            return None
        qtype, qclass = struct.unpack("!HH", query[offset : offset + 4])
        question = query[12 : offset + 4]
        self.queries += 1
        if qtype == _TYPE_A:
            self.asked_at.append(time.monotonic())
        address = self.records.get(".".join(labels).lower())
        if address is None:
            return struct.pack("!6H", query_id, _RESPONSE_FLAGS | _NXDOMAIN, 1, 0, 0, 0) + question
        if qtype != _TYPE_A or qclass != _CLASS_IN:
            return struct.pack("!6H", query_id, _RESPONSE_FLAGS, 1, 0, 0, 0) + question
        record = struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, 0, 4)
        record += ipaddress.IPv4Address(address).packed
        return struct.pack("!6H", query_id, _RESPONSE_FLAGS, 1, 1, 0, 0) + question + record
