"""Responders: short-lived listeners inside destination pods, for ports that nothing listens on.

So that a refusal can be read as a deny and a UDP probe gets an answer, the agent on the
destination's node binds the assignment's port inside the destination pod's namespace. A bind that
fails with EADDRINUSE means something already listens there: reported as LISTENER_PRESENT, and the
port is left alone. A responder closes when every assignment using it is released, or after its
time to live, whichever comes first. A TCP responder answers an HTTP request with 204 and closes
any connection; a UDP responder echoes only probe datagrams (never a reflector for other traffic).
This module never connects anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import cast

from agent.errors import NamespaceError, PodNotFound
from agent.netns import NetnsSockets, NetnsTarget, SocketSpec
from agent.probing import NO_SCTP, UDP_NONCE_PREFIX
from agent.resolving import PodResolver
from flowproof.probes import Protocol, ResponderReport, ResponderRequest, ResponderState

log = logging.getLogger(__name__)

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_HTTP_REPLY = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not registered as a DatagramTransport subclass in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None and data.startswith(UDP_NONCE_PREFIX):
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP responder: %s", exc)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Whatever came in: an HTTP request gets a 204, then the connection closes."""
    try:
        async with asyncio.timeout(2.0):
            head = await reader.read(1024)
        if head.startswith(_HTTP_METHODS):
            writer.write(_HTTP_REPLY)
            await writer.drain()
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class _Listener:
    key: tuple[str, int, Protocol]
    server: asyncio.Server | None = None
    transport: asyncio.DatagramTransport | None = None
    holders: dict[str, asyncio.TimerHandle] = field(default_factory=dict)

    def close(self) -> None:
        for timer in self.holders.values():
            timer.cancel()
        self.holders.clear()
        if self.server is not None:
            self.server.close()
        if self.transport is not None:
            self.transport.close()


class Responders:
    """Opens, shares and closes responders in pods on this node."""

    def __init__(
        self,
        *,
        resolver: PodResolver,
        sockets: NetnsSockets,
        max_open: int,
        max_lifetime_seconds: float,
        sctp_supported: bool,
    ) -> None:
        self._resolver = resolver
        self._sockets = sockets
        self._max_open = max_open
        self._max_lifetime = max_lifetime_seconds
        self._sctp = sctp_supported
        self._listeners: dict[tuple[str, int, Protocol], _Listener] = {}
        self._by_assignment: dict[str, tuple[str, int, Protocol]] = {}
        self._opening: dict[tuple[str, int, Protocol], asyncio.Future[ResponderReport | None]] = {}

    @property
    def open_count(self) -> int:
        return len(self._listeners)

    async def open(self, request: ResponderRequest) -> ResponderReport:
        """Listen on the request's port in its pod, or say why not; never raises for a failure."""
        key = (request.pod.uid.lower(), request.port, request.protocol)
        while key in self._opening:  # another assignment is opening the same port right now
            await asyncio.shield(self._opening[key])
        listener = self._listeners.get(key)
        if listener is None:
            if len(self._listeners) >= self._max_open:
                return self._report(
                    request, ResponderState.FAILED, f"{self._max_open} responders already open"
                )
            fut: asyncio.Future[ResponderReport | None] = asyncio.get_running_loop().create_future()
            self._opening[key] = fut
            try:
                listener, failure = await self._listen(key, request)
            finally:
                del self._opening[key]
                fut.set_result(None)
            if listener is None:
                assert failure is not None
                return failure
            self._listeners[key] = listener
        self._hold(listener, request)
        return self._report(
            request,
            ResponderState.OPENED,
            f"listening on {request.port}/{request.protocol} in {request.pod.describe()}",
        )

    def release(self, assignment_id: str) -> None:
        """The assignment ended: close its responder unless another assignment still uses it."""
        key = self._by_assignment.pop(assignment_id, None)
        if key is None:
            return
        listener = self._listeners.get(key)
        if listener is None:
            return
        timer = listener.holders.pop(assignment_id, None)
        if timer is not None:
            timer.cancel()
        if not listener.holders:
            del self._listeners[key]
            listener.close()
            log.debug("responder %s closed", key)

    def close_all(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._by_assignment.clear()

    def _hold(self, listener: _Listener, request: ResponderRequest) -> None:
        ttl = (
            min(request.ttl_seconds, self._max_lifetime)
            if request.ttl_seconds > 0
            else (self._max_lifetime)
        )
        old = listener.holders.pop(request.assignment_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        listener.holders[request.assignment_id] = loop.call_later(
            ttl, self.release, request.assignment_id
        )
        self._by_assignment[request.assignment_id] = listener.key

    @staticmethod
    def _report(request: ResponderRequest, state: ResponderState, detail: str) -> ResponderReport:
        return ResponderReport(assignment_id=request.assignment_id, state=state, detail=detail)

    async def _listen(
        self, key: tuple[str, int, Protocol], request: ResponderRequest
    ) -> tuple[_Listener | None, ResponderReport | None]:
        if request.protocol == "SCTP" and not self._sctp:
            return None, self._report(request, ResponderState.FAILED, NO_SCTP)
        if not 1 <= request.port <= 65535:
            return None, self._report(
                request, ResponderState.FAILED, f"port {request.port} is outside 1-65535"
            )
        try:
            pod = await self._resolver.resolve(request.pod.uid)
        except PodNotFound as exc:
            return None, self._report(request, ResponderState.FAILED, str(exc))
        target = NetnsTarget(pod.path, pod.inode)
        kind = socket.SOCK_DGRAM if request.protocol == "UDP" else socket.SOCK_STREAM
        proto = socket.IPPROTO_SCTP if request.protocol == "SCTP" else 0
        try:
            sock = await self._dual_stack_socket(target, kind, proto)
        except (OSError, NamespaceError) as exc:
            return None, self._report(request, ResponderState.FAILED, f"no socket: {exc}")
        try:
            if kind == socket.SOCK_STREAM:
                # Lets the bind succeed past TIME_WAIT leftovers; Linux still refuses it while
                # anything listens on the port, which is what we want to detect.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", request.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return None, self._report(
                    request,
                    ResponderState.LISTENER_PRESENT,
                    f"something listens on {request.port}/{request.protocol} already",
                )
            return None, self._report(request, ResponderState.FAILED, f"bind: {exc}")
        listener = _Listener(key=key)
        try:
            if kind == socket.SOCK_STREAM:
                sock.listen(64)
                listener.server = await asyncio.start_server(_answer, sock=sock)
            else:
                transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                    _Echo, sock=sock
                )
                listener.transport = transport
        except OSError as exc:
            sock.close()
            return None, self._report(request, ResponderState.FAILED, f"listen: {exc}")
        log.debug("responder %s opened", key)
        return listener, None

    async def _dual_stack_socket(self, target: NetnsTarget, kind: int, proto: int) -> socket.socket:
        """An IPv6 socket that also takes IPv4, or IPv4 only where IPv6 is off."""
        try:
            sock = await self._sockets.create(target, SocketSpec(socket.AF_INET6, kind, proto))
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                raise
            return await self._sockets.create(target, SocketSpec(socket.AF_INET, kind, proto))
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            sock.close()
            return await self._sockets.create(target, SocketSpec(socket.AF_INET, kind, proto))
        return sock
