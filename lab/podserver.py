"""The server every lab pod runs (the lab's agnhost): answers on each declared container port.

TCP: accept, write `<ns>/<pod>\\n`, close; a client that speaks HTTP first gets a minimal
`HTTP/1.1 200` naming the pod instead. UDP: echo each datagram prefixed by `<ns>/<pod>\\n`. DNS pods
serve the cluster DNS on port 53 (lab/dnsserver.py). SCTP ports are skipped with a logged note
when the kernel has no SCTP. It runs inside the pod's network namespace; it never connects out.

`python -m lab.podserver --name ns/pod --tcp 80 --udp 53` runs one by hand (e.g. under
`ip netns exec`); the lab starts them through lab/supervisor.py.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from agent.netns import sctp_supported
from lab import dnsserver

log = logging.getLogger("lab.podserver")

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
SNIFF_SECONDS = 0.05  # how long a plain TCP port waits for an HTTP request before writing its name
HTTP_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class ServerSpec:
    """What one pod server listens on."""

    name: str
    tcp: tuple[int, ...] = ()
    udp: tuple[int, ...] = ()
    sctp: tuple[int, ...] = ()
    http: tuple[int, ...] = ()  # TCP ports that wait for an HTTP request (ports named http*)
    dns_records: str | None = None  # serve the cluster DNS on 53/UDP+TCP from this file
    host: str = "0.0.0.0"
    udp_hosts: tuple[str, ...] = ()  # UDP binds per address (replies then come from it); () = host
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "tcp": list(self.tcp),
            "udp": list(self.udp),
            "sctp": list(self.sctp),
            "http": list(self.http),
            "dns_records": self.dns_records,
            "host": self.host,
            "udp_hosts": list(self.udp_hosts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ServerSpec:
        def ints(key: str) -> tuple[int, ...]:
            value = data.get(key) or []
            assert isinstance(value, list)
            return tuple(int(v) for v in value)

        def strs(key: str) -> tuple[str, ...]:
            value = data.get(key) or []
            assert isinstance(value, list)
            return tuple(str(v) for v in value)

        records = data.get("dns_records")
        return cls(
            name=str(data["name"]),
            tcp=ints("tcp"),
            udp=ints("udp"),
            sctp=ints("sctp"),
            http=ints("http"),
            dns_records=str(records) if records else None,
            host=str(data.get("host") or "0.0.0.0"),
            udp_hosts=strs("udp_hosts"),
        )


def _http_response(name: str, status: int = 200, reason: str = "OK") -> bytes:
    body = f"{name}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Pod: {name}\r\n\r\n"
    )
    return head.encode() + body


async def _tcp_client(
    name: str, wait: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        try:
            first = await asyncio.wait_for(reader.read(4096), wait)
        except TimeoutError:
            first = b""
        if first.startswith(HTTP_METHODS):
            data = first
            while b"\r\n\r\n" not in data and len(data) < 16384:
                chunk = await asyncio.wait_for(reader.read(4096), HTTP_WAIT_SECONDS)
                if not chunk:
                    break
                data += chunk
            writer.write(_http_response(name))
        else:
            writer.write(f"{name}\n".encode())
        await writer.drain()
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.prefix = f"{name}\n".encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.prefix + data, addr)


async def start(spec: ServerSpec) -> list[object]:
    """Open every listener of `spec`; a port that cannot be opened is logged and skipped."""
    loop = asyncio.get_running_loop()
    servers: list[object] = []
    dns_ports = {53} if spec.dns_records else set()
    if spec.dns_records:
        try:
            servers += await dnsserver.start(spec.dns_records, spec.host)
        except OSError as exc:
            log.error("%s: cannot serve DNS on 53: %s", spec.name, exc)
    for port in spec.tcp:
        if port in dns_ports:
            continue
        wait = HTTP_WAIT_SECONDS if port in spec.http else SNIFF_SECONDS
        try:
            servers.append(
                await asyncio.start_server(
                    functools.partial(_tcp_client, spec.name, wait),
                    host=spec.host,
                    port=port,
                    reuse_address=True,
                    backlog=512,
                )
            )
        except OSError as exc:
            log.error("%s: cannot listen on %d/TCP: %s", spec.name, port, exc)
    for port in spec.udp:
        if port in dns_ports:
            continue
        for host in spec.udp_hosts or (spec.host,):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Echo(spec.name), local_addr=(host, port)
                )
                servers.append(transport)
            except OSError as exc:
                log.error("%s: cannot listen on %s:%d/UDP: %s", spec.name, host, port, exc)
    if spec.sctp:
        if not sctp_supported():
            log.info(
                "%s: kernel has no SCTP module: not serving %s",
                spec.name,
                ", ".join(f"{p}/SCTP" for p in spec.sctp),
            )
        else:
            for port in spec.sctp:
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((spec.host, port))
                    servers.append(
                        await asyncio.start_server(
                            lambda r, w: _tcp_client(spec.name, SNIFF_SECONDS, r, w), sock=sock
                        )
                    )
                except OSError as exc:
                    log.error("%s: cannot listen on %d/SCTP: %s", spec.name, port, exc)
    return servers


async def serve(spec: ServerSpec, ready_fd: int | None = None) -> None:
    """Listen, tell `ready_fd` (one line, then closed) and serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = await start(spec)
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    log.info(
        "%s: serving tcp=%s udp=%s dns=%s", spec.name, spec.tcp, spec.udp, bool(spec.dns_records)
    )
    await stop.wait()
    for server in servers:
        close = getattr(server, "close", None)
        if close is not None:
            close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.podserver", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--name", required=True, help="the pod's name as it answers (ns/pod)")
    parser.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--sctp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument(
        "--http",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="a TCP port that waits for an HTTP request",
    )
    parser.add_argument("--dns-records", help="serve the cluster DNS on 53 from this JSON file")
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = ServerSpec(
        name=args.name,
        tcp=tuple(args.tcp) + tuple(p for p in args.http if p not in args.tcp),
        udp=tuple(args.udp),
        sctp=tuple(args.sctp),
        http=tuple(args.http),
        dns_records=args.dns_records,
        host=args.host,
    )
    asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
