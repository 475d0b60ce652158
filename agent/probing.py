"""Probing: one assignment in, one result out, sent from inside the source pod's network namespace.

TCP and SCTP connect; UDP sends a random nonce on a connected socket (so ICMP errors are seen) and
waits for it to come back; HTTP makes a GET through aiohttp on a socket made in the pod's namespace;
DNS asks the assignment's destination for an A record. Every fate of a probe is an `Outcome`: a
failure is a result, never an exception. Concurrency is bounded and every destination address is
rate limited. This module probes only what it is handed (the collector's assignments) and never
opens a socket outside a pod namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import secrets
import socket
import struct
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import yarl

from agent.errors import NamespaceError, NetnsThreadBroken, PodNotFound
from agent.netns import NetnsSockets, NetnsTarget, SocketSpec
from agent.resolving import PodResolver
from flowproof.aio import SYSTEM_CLOCK, Clock
from flowproof.probes import Assignment, Outcome, ProbeKind, ProbeResult, ip_version

log = logging.getLogger(__name__)

UDP_NONCE_PREFIX = b"flowproof-probe "
"""Every UDP probe datagram starts with this; responders echo only such datagrams."""

NO_SCTP = "kernel has no SCTP module (EPROTONOSUPPORT)"

RESET_ON_CLOSE = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: a connect probe closes with a reset, like HAProxy's health checks, so that
probing leaves no TIME_WAIT sockets holding the pod's ephemeral ports (and costs less)."""

_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPERM, errno.EACCES}


def classify_os_error(exc: OSError) -> Outcome:
    """The outcome an OSError from connect/send/recv stands for (FIELD-NOTES' table)."""
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return Outcome.TIMEOUT
    if exc.errno == errno.ECONNREFUSED:
        return Outcome.REFUSED
    if exc.errno in _UNREACHABLE_ERRNOS:
        return Outcome.UNREACHABLE
    return Outcome.ERROR


def _measured_errno(err: int) -> _Measured:
    exc = OSError(err, os.strerror(err))
    return _Measured(classify_os_error(exc), _describe_os_error(exc))


def _describe_os_error(exc: OSError) -> str:
    if exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


class DestinationRateLimiter:
    """A rate per destination address (GCRA, equivalent to a token bucket), with an injected clock.

    `reserve(dest)` books the next slot and returns how long the caller must wait for it, so tests
    check the schedule without sleeping.
    """

    def __init__(self, rate_per_second: float, burst: int, clock: Clock) -> None:
        self._interval = 1.0 / rate_per_second
        self._tolerance = (max(burst, 1) - 1) * self._interval
        self._clock = clock
        self._next: dict[str, float] = {}

    def reserve(self, destination: str) -> float:
        now = self._clock.monotonic()
        tat = max(self._next.get(destination, now), now)
        start = max(now, tat - self._tolerance)
        self._next[destination] = tat + self._interval
        if len(self._next) > 10_000:
            self._next = {d: t for d, t in self._next.items() if t > now}
        return start - now


@dataclass(frozen=True)
class _Measured:
    outcome: Outcome
    detail: str = ""
    http_status: int | None = None


_ProbeFn = Callable[[Assignment, NetnsTarget, float], Awaitable[_Measured]]
ResultCallback = Callable[[ProbeResult], None]


@dataclass(eq=False)
class _Job:
    """One assignment inside the prober, from submit to its result."""

    assignment: Assignment
    on_result: ResultCallback
    state: str = "waiting"  # waiting, delayed, running, done
    started_at: float = 0.0
    t0: float = 0.0
    timer: asyncio.TimerHandle | None = None
    sock: socket.socket | None = None
    task: asyncio.Task[_Measured] | None = None


class Prober:
    """Runs assignments from inside source pods' network namespaces.

    `submit()` queues an assignment and calls back with its result; at most `max_concurrency` run
    at once and each destination address is rate limited. A TCP or SCTP probe from a pod already
    resolved takes the lean path (socket from the helper thread, non-blocking connect, one
    writability callback, no task); every other probe runs as a task.
    """

    def __init__(
        self,
        *,
        node_name: str,
        resolver: PodResolver,
        sockets: NetnsSockets,
        max_concurrency: int,
        destination_rate_per_second: float,
        destination_burst: int,
        max_timeout_seconds: float,
        sctp_supported: bool,
        clock: Clock | None = None,
    ) -> None:
        self._node = node_name
        self._resolver = resolver
        self._sockets = sockets
        self._max_concurrency = max_concurrency
        self._clock = clock or SYSTEM_CLOCK
        self._limiter = DestinationRateLimiter(
            destination_rate_per_second, destination_burst, self._clock
        )
        self._max_timeout = max_timeout_seconds
        self._sctp = sctp_supported
        self._kinds: dict[ProbeKind, _ProbeFn] = {
            ProbeKind.TCP: self._tcp,
            ProbeKind.SCTP: self._sctp_probe,
            ProbeKind.UDP: self._udp,
            ProbeKind.HTTP: self._http,
            ProbeKind.DNS: self._dns,
        }
        self._jobs: dict[str, _Job] = {}
        self._waiting: deque[_Job] = deque()
        self._running = 0
        self._pumping = False
        self.broken: NetnsThreadBroken | None = None
        """Set when the namespace helper thread broke: the agent must stop."""

    @property
    def held(self) -> int:
        """Assignments submitted and not finished (waiting, delayed or running)."""
        return len(self._jobs)

    def submit(self, assignment: Assignment, on_result: ResultCallback) -> None:
        """Queue a probe; `on_result` is called once with its result (never for a cancelled one).

        Must be called on the event loop. An id already held is ignored.
        """
        if assignment.id in self._jobs:
            return
        job = _Job(assignment, on_result)
        self._jobs[assignment.id] = job
        self._waiting.append(job)
        self._pump()

    def cancel(self, assignment_id: str) -> bool:
        """Stop a probe and forget it: no result. False when it is not held."""
        job = self._jobs.pop(assignment_id, None)
        if job is None:
            return False
        was_running = job.state == "running"
        job.state = "done"
        self._release(job)
        if job.task is not None:
            job.task.cancel()
        if was_running:
            self._running -= 1
            self._pump()
        return True

    async def probe(self, assignment: Assignment) -> ProbeResult:
        """Probe once and wait for the result (submit + wait); cancelling cancels the probe."""
        fut: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()
        self.submit(assignment, fut.set_result)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(assignment.id)
            raise

    # --- scheduling ----------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return  # a result delivered from inside the loop below: the loop goes on by itself
        self._pumping = True
        try:
            self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        while self._waiting and self._running < self._max_concurrency:
            job = self._waiting.popleft()
            if job.state != "waiting":
                continue  # cancelled while waiting
            problems = job.assignment.problems()
            if problems:
                self._running += 1
                job.state = "running"
                self._finish(job, _Measured(Outcome.ERROR, "invalid assignment: "
                                            + "; ".join(problems)))  # fmt: skip
                continue
            delay = self._limiter.reserve(job.assignment.destination_ip)
            if delay > 0:
                # Waits for its slot of the destination's rate without holding a concurrency slot.
                job.state = "delayed"
                job.timer = asyncio.get_running_loop().call_later(delay, self._undelay, job)
                continue
            self._start(job)

    def _undelay(self, job: _Job) -> None:
        if job.state != "delayed":
            return
        job.timer = None
        if self._running < self._max_concurrency:
            self._start(job)
        else:
            job.state = "waiting"
            self._waiting.appendleft(job)

    def _start(self, job: _Job) -> None:
        self._running += 1
        job.state = "running"
        job.started_at = self._clock.time()
        job.t0 = self._clock.monotonic()
        a = job.assignment
        if a.kind in (ProbeKind.TCP, ProbeKind.SCTP) and (a.kind is ProbeKind.TCP or self._sctp):
            pod = self._resolver.cached(a.source.uid)
            if pod is not None:
                self._lean_connect(job, NetnsTarget(pod.path, pod.inode))
                return
        self._run_as_task(job)

    def _run_as_task(self, job: _Job) -> None:
        job.task = asyncio.create_task(
            self._measure(job.assignment), name=f"probe {job.assignment.id}"
        )
        job.task.add_done_callback(functools.partial(self._task_done, job))

    def _task_done(self, job: _Job, task: asyncio.Task[_Measured]) -> None:
        if task.cancelled() or job.state != "running":
            return
        exc = task.exception()
        if exc is None:
            self._finish(job, task.result())
            return
        if isinstance(exc, NetnsThreadBroken):
            self.broken = exc
        log.error("probe %s failed unexpectedly", job.assignment.id, exc_info=exc)
        self._finish(job, _Measured(Outcome.ERROR, f"agent error: {exc!r}"[:300]))

    def _finish(self, job: _Job, measured: _Measured) -> None:
        if job.state != "running":
            return
        job.state = "done"
        self._release(job)
        self._running -= 1
        self._jobs.pop(job.assignment.id, None)
        latency = self._clock.monotonic() - job.t0 if job.t0 else 0.0
        result = self._result(job.assignment, measured, job.started_at or self._clock.time(),
                              latency)  # fmt: skip
        try:
            job.on_result(result)
        except Exception:
            log.exception("delivering the result of %s failed", job.assignment.id)
        self._pump()

    @staticmethod
    def _release(job: _Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_writer(job.sock.fileno())
            job.sock.close()
            job.sock = None

    def _result(
        self, assignment: Assignment, m: _Measured, started_at: float, latency: float
    ) -> ProbeResult:
        return ProbeResult(
            id=uuid.uuid4().hex,
            assignment=assignment,
            outcome=m.outcome,
            latency_seconds=latency,
            node=self._node,
            started_at=started_at,
            detail=m.detail,
            http_status=m.http_status,
        )

    # --- the lean TCP/SCTP path ----------------------------------------------------------------

    def _lean_connect(self, job: _Job, target: NetnsTarget) -> None:
        a = job.assignment
        family = socket.AF_INET6 if ip_version(a.destination_ip) == 6 else socket.AF_INET
        proto = socket.IPPROTO_SCTP if a.kind is ProbeKind.SCTP else 0
        self._sockets.request(
            target,
            SocketSpec(family, socket.SOCK_STREAM, proto),
            functools.partial(self._lean_socket, job),
        )

    def _lean_socket(self, job: _Job, made: socket.socket | BaseException) -> None:
        if job.state != "running":
            if isinstance(made, socket.socket):
                made.close()
            return
        if not isinstance(made, socket.socket):
            if isinstance(made, NetnsThreadBroken):
                self.broken = made
            # Namespace trouble or no socket: the task path resolves again and says why.
            self._run_as_task(job)
            return
        a = job.assignment
        job.sock = made
        made.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        job.t0 = self._clock.monotonic()
        err = made.connect_ex((a.destination_ip, a.port))
        if err == 0:
            self._finish(job, _Measured(Outcome.CONNECTED, "connected"))
        elif err == errno.EINPROGRESS:
            loop = asyncio.get_running_loop()
            # By fd, not socket: asyncio formats the socket's repr (two syscalls) on every call.
            loop.add_writer(made.fileno(), self._lean_writable, job)
            seconds = min(a.timeout_seconds, self._max_timeout)
            job.timer = loop.call_later(seconds, self._lean_timeout, job, seconds)
        else:
            self._finish(job, _measured_errno(err))

    def _lean_writable(self, job: _Job) -> None:
        if job.sock is None:
            return
        err = job.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._finish(job, _Measured(Outcome.CONNECTED, "connected"))
        else:
            self._finish(job, _measured_errno(err))

    def _lean_timeout(self, job: _Job, seconds: float) -> None:
        job.timer = None
        self._finish(job, _Measured(Outcome.TIMEOUT, f"no answer within {seconds:g} s"))

    async def _measure(self, a: Assignment) -> _Measured:
        if a.kind is ProbeKind.SCTP and not self._sctp:
            return _Measured(Outcome.ERROR, NO_SCTP)
        timeout = min(a.timeout_seconds, self._max_timeout)
        for attempt in (1, 2):
            try:
                pod = await self._resolver.resolve(a.source.uid)
            except PodNotFound as exc:
                return _Measured(
                    Outcome.ERROR, f"source pod {a.source.describe()} not found: {exc}"
                )
            target = NetnsTarget(pod.path, pod.inode)
            try:
                return await self._kinds[a.kind](a, target, timeout)
            except OSError as exc:  # the socket itself could not be made (EMFILE, ENOBUFS, ...)
                return _Measured(Outcome.ERROR, f"cannot make a socket: {_describe_os_error(exc)}")
            except NamespaceError as exc:
                # The pid may have exited or been reused between resolving and entering: look again.
                self._resolver.forget(a.source.uid)
                if attempt == 2:
                    return _Measured(Outcome.ERROR, f"source pod {a.source.describe()}: {exc}")
        raise AssertionError("unreachable")

    async def _new_socket(
        self, target: NetnsTarget, a: Assignment, kind: int, proto: int = 0
    ) -> socket.socket:
        family = socket.AF_INET6 if ip_version(a.destination_ip) == 6 else (socket.AF_INET)
        return await self._sockets.create(target, SocketSpec(family, kind, proto))

    # --- kinds ---------------------------------------------------------------------------------

    async def _tcp(self, a: Assignment, target: NetnsTarget, seconds: float) -> _Measured:
        sock = await self._new_socket(target, a, socket.SOCK_STREAM)
        with sock:
            return await self._connect(sock, a, seconds)

    async def _sctp_probe(self, a: Assignment, target: NetnsTarget, seconds: float) -> _Measured:
        try:
            sock = await self._new_socket(target, a, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
        except OSError as exc:
            if exc.errno == errno.EPROTONOSUPPORT:
                return _Measured(Outcome.ERROR, NO_SCTP)
            return _Measured(Outcome.ERROR, f"cannot make an SCTP socket: {exc}")
        with sock:
            return await self._connect(sock, a, seconds)

    async def _connect(self, sock: socket.socket, a: Assignment, seconds: float) -> _Measured:
        loop = asyncio.get_running_loop()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        try:
            async with asyncio.timeout(seconds):
                await loop.sock_connect(sock, (a.destination_ip, a.port))
        except TimeoutError:
            return _Measured(Outcome.TIMEOUT, f"no answer within {seconds:g} s")
        except OSError as exc:
            return _Measured(classify_os_error(exc), _describe_os_error(exc))
        return _Measured(Outcome.CONNECTED, "connected")

    async def _udp(self, a: Assignment, target: NetnsTarget, seconds: float) -> _Measured:
        nonce = UDP_NONCE_PREFIX + secrets.token_hex(16).encode()

        def matches(reply: bytes) -> bool:
            return reply.startswith(nonce)

        return await self._datagram_exchange(a, target, seconds, nonce, matches, "nonce echoed")

    async def _dns(self, a: Assignment, target: NetnsTarget, seconds: float) -> _Measured:
        query = dns.message.make_query(a.dns_query_name or ".", dns.rdatatype.A)
        answer: list[dns.message.Message] = []

        def matches(reply: bytes) -> bool:
            try:
                msg = dns.message.from_wire(reply)
            except dns.exception.DNSException:
                return False
            if not query.is_response(msg):
                return False
            answer.append(msg)
            return True

        measured = await self._datagram_exchange(
            a, target, seconds, query.to_wire(), matches, "answered"
        )
        if measured.outcome is Outcome.CONNECTED and answer:
            msg = answer[0]
            addresses = [
                item.to_text()
                for rrset in msg.answer
                if rrset.rdtype == dns.rdatatype.A
                for item in rrset
            ]
            text = dns.rcode.to_text(msg.rcode())
            detail = f"{text}: {', '.join(addresses)}" if addresses else f"{text}: no A record"
            return _Measured(Outcome.CONNECTED, detail)
        return measured

    async def _datagram_exchange(
        self,
        a: Assignment,
        target: NetnsTarget,
        seconds: float,
        payload: bytes,
        matches: Callable[[bytes], bool],
        success: str,
    ) -> _Measured:
        """Send `payload` on a connected UDP socket (re-sent twice) until a reply `matches`."""
        loop = asyncio.get_running_loop()
        sock = await self._new_socket(target, a, socket.SOCK_DGRAM)
        with sock:
            try:
                await loop.sock_connect(sock, (a.destination_ip, a.port))
            except OSError as exc:
                return _Measured(classify_os_error(exc), _describe_os_error(exc))
            deadline = loop.time() + seconds
            resend_every = seconds / 3
            other_replies = 0
            try:
                while True:
                    await loop.sock_sendall(sock, payload)
                    next_send = min(loop.time() + resend_every, deadline)
                    while True:
                        remaining = next_send - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            async with asyncio.timeout(remaining):
                                reply = await loop.sock_recv(sock, 4096)
                        except TimeoutError:
                            break
                        if matches(reply):
                            return _Measured(Outcome.CONNECTED, success)
                        other_replies += 1
                    if loop.time() >= deadline:
                        break
            except OSError as exc:
                return _Measured(classify_os_error(exc), _describe_os_error(exc))
        if other_replies:
            # The peer of a connected socket answered, just not with our nonce: the path is open.
            return _Measured(
                Outcome.CONNECTED, f"{other_replies} replies, none echoing the probe's payload"
            )
        return _Measured(Outcome.TIMEOUT, f"no reply within {seconds:g} s")

    async def _http(self, a: Assignment, target: NetnsTarget, seconds: float) -> _Measured:
        sock = await self._new_socket(target, a, socket.SOCK_STREAM)
        handed_out = False

        def socket_factory(_addr_info: Any) -> socket.socket:
            # aiohttp connects the socket itself; it is the only one it may use.
            nonlocal handed_out
            if handed_out:
                raise OSError(errno.EADDRNOTAVAIL, "one socket per HTTP probe")
            handed_out = True
            return sock

        connected = False

        async def on_connected(*_args: Any) -> None:
            nonlocal connected
            connected = True

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_connected)
        host = a.destination_ip
        literal = f"[{host}]" if ip_version(host) == 6 else host
        url = yarl.URL(f"http://{literal}:{a.port}{a.http_path or '/'}", encoded=False)
        headers = {"Host": a.http_host} if a.http_host else None
        connector = aiohttp.TCPConnector(
            socket_factory=socket_factory, force_close=True, limit=1, use_dns_cache=False
        )
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector,
                    timeout=aiohttp.ClientTimeout(total=seconds),
                    trace_configs=[trace],
                    trust_env=False,
                    auto_decompress=False,
                ) as session,
                session.get(url, headers=headers, allow_redirects=False) as response,
            ):
                return _Measured(
                    Outcome.HTTP_STATUS, f"HTTP {response.status}", http_status=response.status
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            if connected:
                # aiohttp may retry a GET whose connection closed early and then fail to get a
                # second socket: the first connection already proved the path open.
                return _Measured(
                    Outcome.CONNECTED, f"TCP connected; no HTTP response: {exc!r}"[:300]
                )
            if isinstance(exc, aiohttp.ClientConnectorError):
                os_error = exc.os_error
                return _Measured(classify_os_error(os_error), _describe_os_error(os_error))
            if isinstance(exc, TimeoutError):
                return _Measured(Outcome.TIMEOUT, f"no answer within {seconds:g} s")
            return _Measured(Outcome.ERROR, f"HTTP probe failed: {exc!r}"[:300])
        finally:
            if not handed_out:
                sock.close()
