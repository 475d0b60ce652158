"""A small prober for lab tests and the lab conformance suite: real traffic from inside pods.

Owns creating sockets inside a source pod's network namespace (a helper thread enters it with
setns, creates non-blocking sockets and comes back) and driving them from asyncio: TCP connected
means allowed; UDP uses a connected socket, sends, and a reply means allowed. Outcomes follow
DESIGN.md (CONNECTED, REFUSED, TIMEOUT, UNREACHABLE, ERROR) and are results, never exceptions.
It only sends to addresses the lab hands out (pods, outside, cluster DNS). The node agent has its
own prober; this one exists so the lab can be tested without it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.message
import dns.rcode
import dns.rdatatype

from agent.netns import sctp_supported
from lab.system import setns

Outcome = Literal["CONNECTED", "REFUSED", "TIMEOUT", "UNREACHABLE", "ERROR"]
Pair = tuple[str, str]
DEFAULT_TIMEOUT_SECONDS = 0.5
DEFAULT_CONCURRENCY = 256
PAYLOAD = b"flowproof-probe\n"
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM}

__all__ = [
    "LabView",
    "Outcome",
    "fetch",
    "probe_matrix",
    "probe_outcomes",
    "resolve",
    "sctp_supported",
]


class LabView(Protocol):
    """What probing needs from a lab (lab.lifecycle.Lab is one)."""

    def netns_path(self, key: str) -> str: ...

    def address(self, key: str) -> str: ...


_KINDS = {
    "TCP": (socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "UDP": (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
    "SCTP": (socket.SOCK_STREAM, socket.IPPROTO_SCTP),
}


def sockets_in(netns: str, count: int, protocol: str) -> list[socket.socket]:
    """`count` non-blocking sockets created inside the network namespace at path `netns`.

    Call from a worker thread: the thread enters the namespace and returns to its own before
    this returns (a socket keeps the namespace it was created in).
    """
    kind, proto = _KINDS[protocol]
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target)
            socks: list[socket.socket] = []
            try:
                for _ in range(count):
                    sock = socket.socket(socket.AF_INET, kind, proto)
                    sock.setblocking(False)
                    socks.append(sock)
            except BaseException:
                for sock in socks:
                    sock.close()
                raise
            finally:
                setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)
    return socks


def _classify(exc: BaseException) -> Outcome:
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    if isinstance(exc, ConnectionRefusedError):
        return "REFUSED"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "UNREACHABLE"  # ICMP admin-prohibited / host unreachable, or a local egress drop
    return "ERROR"


async def _exchange(
    sock: socket.socket,
    address: tuple[str, int],
    protocol: str,
    timeout: float,  # noqa: ASYNC109 (a per-probe bound, not a deadline of the call)
    send: bytes,
    read: bool,
) -> tuple[Outcome, bytes]:
    loop = asyncio.get_running_loop()
    try:
        if protocol == "UDP":
            sock.connect(address)  # a connected UDP socket sees ICMP errors
            await loop.sock_sendall(sock, send or PAYLOAD)
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
            return "CONNECTED", data
        await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        if not read:
            return "CONNECTED", b""
        if send:
            await loop.sock_sendall(sock, send)
        data = b""
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            data += chunk
        return "CONNECTED", data
    except (TimeoutError, OSError) as exc:
        return _classify(exc), b""
    finally:
        sock.close()


def _chunks(items: Sequence[Pair], size: int) -> Iterable[Sequence[Pair]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def probe_outcomes(
    lab: LabView,
    pairs: Iterable[Pair],
    port: int,
    protocol: str,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[Pair, Outcome]:
    """The outcome of one probe per (source key, destination key) on `port`/`protocol`.

    Sources are pod keys (or `outside`); destinations pod keys, `outside`, `dns` or an address.
    At most `concurrency` probes are in flight; a dropped probe costs `timeout` seconds.
    """
    unique = list(dict.fromkeys(pairs))
    results: dict[Pair, Outcome] = {}
    if protocol == "SCTP" and not sctp_supported():
        return dict.fromkeys(unique, "ERROR")
    loop = asyncio.get_running_loop()
    paths = {src: lab.netns_path(src) for src, _ in unique}
    addresses = {dst: lab.address(dst) for _, dst in unique}
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lab-netns") as pool:
        for chunk in _chunks(unique, concurrency):
            by_source: dict[str, list[Pair]] = {}
            for pair in chunk:
                by_source.setdefault(pair[0], []).append(pair)
            made = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, sockets_in, paths[src], len(items), protocol)
                    for src, items in by_source.items()
                )
            )
            jobs = []
            for (_, items), socks in zip(by_source.items(), made, strict=True):
                for pair, sock in zip(items, socks, strict=True):
                    address = (addresses[pair[1]], port)
                    jobs.append((pair, _exchange(sock, address, protocol, timeout, b"", False)))
            outcomes = await asyncio.gather(*(job for _, job in jobs))
            for (pair, _), (outcome, _) in zip(jobs, outcomes, strict=True):
                results[pair] = outcome
    return results


async def probe_matrix(
    lab: LabView,
    pairs: Iterable[Pair],
    port: int,
    protocol: str,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109
) -> dict[Pair, bool]:
    """Allowed (True) or denied per pair: CONNECTED is allowed, any other outcome is a deny."""
    outcomes = await probe_outcomes(lab, pairs, port, protocol, timeout)
    return {pair: outcome == "CONNECTED" for pair, outcome in outcomes.items()}


async def fetch(
    lab: LabView,
    source: str,
    destination: str,
    port: int,
    protocol: str = "TCP",
    *,
    send: bytes = b"",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109
) -> tuple[Outcome, bytes]:
    """One exchange from `source`: what the destination answered (TCP: until it closes)."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lab-netns") as pool:
        (sock,) = await loop.run_in_executor(pool, sockets_in, lab.netns_path(source), 1, protocol)
    address = (lab.address(destination), port)
    return await _exchange(sock, address, protocol, timeout, send, True)


@dataclass(frozen=True)
class DnsAnswer:
    """A DNS probe: the outcome, and for an answer its rcode name and A records."""

    outcome: Outcome
    rcode: str = ""
    addresses: tuple[str, ...] = ()


async def resolve(
    lab: LabView,
    source: str,
    name: str,
    *,
    server: str = "dns",
    protocol: str = "UDP",
    timeout: float = 1.0,  # noqa: ASYNC109
) -> DnsAnswer:
    """Ask the cluster DNS (or `server`) for `name`'s A records from inside `source`."""
    query = dns.message.make_query(name, dns.rdatatype.A)
    wire = query.to_wire()
    if protocol == "TCP":
        wire = len(wire).to_bytes(2, "big") + wire
    outcome, data = await fetch(lab, source, server, 53, protocol, send=wire, timeout=timeout)
    if outcome != "CONNECTED":
        return DnsAnswer(outcome)
    if protocol == "TCP":
        data = data[2:]
    try:
        reply = dns.message.from_wire(data)
    except Exception:  # a garbled answer is still an answer: the path is open
        return DnsAnswer("CONNECTED", rcode="FORMERR")
    addresses = tuple(
        item.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for item in rrset
    )
    return DnsAnswer("CONNECTED", rcode=dns.rcode.to_text(reply.rcode()), addresses=addresses)
