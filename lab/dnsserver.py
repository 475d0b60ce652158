"""The lab's cluster DNS: A records for pods, services and a few outside names, over UDP and TCP.

Owns answering DNS queries from a records file (`{"name": ["ip", …]}`, re-read when it changes) so
the lab can rewrite the zone on every change without restarting the DNS pods. Runs inside the DNS
pods' network namespaces (started by lab/podserver.py). Never forwards a query anywhere: a name
it does not hold is NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections.abc import Mapping
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger(__name__)

TTL_SECONDS = 5


class Records:
    """The zone, re-read from its file whenever the file's mtime or size changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, list[str]] = {}

    def get(self) -> Mapping[str, list[str]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._records
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path) as handle:
                    data = json.load(handle)
                self._records = {str(k).lower().rstrip("."): list(v) for k, v in data.items()}
                self._stamp = stamp
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s: %s; keeping the previous zone", self.path, exc)
        return self._records


def answer(wire: bytes, records: Mapping[str, list[str]]) -> bytes | None:
    """The response to one query; FORMERR for a datagram that is no query (so a plain UDP probe
    of a DNS pod still gets an answer); None for a response or a runt (dropped)."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # malformed: answer with its id and FORMERR, as DNS servers do
        return wire[:2] + bytes([0x80, dns.rcode.FORMERR]) + bytes(8)
    if query.flags & dns.flags.QR:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    response.flags &= ~dns.flags.RA
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    ips = records.get(name)
    if ips is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and question.rdclass in (
        dns.rdataclass.IN,
        dns.rdataclass.ANY,
    ):
        response.answer.append(
            dns.rrset.from_text_list(question.name, TTL_SECONDS, "IN", "A", list(ips))
        )
    return response.to_wire()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, records: Records) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data, self.records.get())
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _tcp_client(
    records: Records, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
            wire = await asyncio.wait_for(reader.readexactly(size), 5)
            reply = answer(wire, records.get())
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def start(records_path: str, host: str = "0.0.0.0", port: int = 53) -> list[object]:
    """Serve DNS on UDP and TCP `port`; the servers/transports (kept open by the caller)."""
    records = Records(records_path)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpProtocol(records), local_addr=(host, port)
    )
    server = await asyncio.start_server(
        lambda r, w: _tcp_client(records, r, w), host=host, port=port, reuse_address=True
    )
    return [transport, server]
