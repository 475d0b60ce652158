"""The dispatcher: the collector's gRPC server, one stream per agent, each result delivered once.

Assignments are queued per node and sent to the agent on the source pod's node when it is connected,
at most as many at a time as the agent accepts (`max_in_flight` in its hello). An assignment with a
responder first asks the agent on the destination's node to open one, then goes to the source's
agent with the responder's report attached to its result. When a stream drops, what was sent on it
without a result is queued again, unless the agent says in its next hello that it still holds it.
Results are acked by id and delivered to `on_result` at most once per result id and once per
assignment id, so a reconnect of either side never loses or double-counts one. The stream needs
`authorization: Bearer <token>` over TLS (agents check the collector's certificate before they
send the token); the standard gRPC health service is served beside it (no token). Only this module
and flowproof.convert touch the contract's messages on the collector side.

    dispatcher = Dispatcher(token=..., tls=ServerTLS.from_files(cert, key), on_result=...)
    port = await dispatcher.start("0.0.0.0:7070")
    dispatcher.submit(assignments)        # from the planner, on the event loop
    dispatcher.agents()                   # who is connected, for metrics and `verify`
    await dispatcher.stop()
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collector.core.sealing import KEY_BYTES, AssignmentSeal
from collector.ledger import DeliveryLedger
from flowproof import __version__, convert
from flowproof.errors import ConfigurationError, bounded
from flowproof.logs import LogLimiter
from flowproof.probes import (
    PROTOCOL_VERSION,
    STANDBY_REFUSAL,
    AgentCapabilities,
    AgentHello,
    Assignment,
    DestinationPolicy,
    HelloAck,
    ProbeResult,
    ResponderReport,
    ResponderRequest,
    ResponderState,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1 import agent_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "flowproof.v1.AgentService"
MAX_RESULT_AGE_SECONDS = 300.0
"""A result of an assignment issued longer ago than this, and no longer awaited, is refused: it
is stale by then, and the delivery ledger needs to remember no longer than this."""
MAX_ID_CHARS = 128
"""The longest result id taken (agents make 32 hex digits)."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # An agent's batch of 256 results is about 100 KB; the bound is what one message may cost.
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)
INTAKE_CHUNK = 64
"""Results taken in one go before the event loop serves others (/metrics, the web view): a
message's results are taken chunk by chunk, and the stream's next message is read only after
its last chunk, so gRPC's flow control holds a burst back at the agent (the intake is bounded)."""


@dataclass(frozen=True)
class ServerTLS:
    """The certificate chain and private key (PEM) the gRPC port serves."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)

    @classmethod
    def from_files(cls, certificate_file: str, key_file: str) -> ServerTLS:
        """Read both files; ConfigurationError naming the one that cannot be read."""
        data: list[bytes] = []
        for name, path in (("tls_cert_file", certificate_file), ("tls_key_file", key_file)):
            try:
                data.append(Path(path).read_bytes())
            except OSError as exc:
                raise ConfigurationError(f"{name}: cannot read {path!r}: {exc.strerror}") from exc
            if b"-----BEGIN " not in data[-1]:
                raise ConfigurationError(f"{name}: {path!r} holds no PEM data")
        return cls(certificate_chain=data[0], private_key=data[1])

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])


@dataclass(frozen=True)
class AgentInfo:
    """A connected agent, as `Dispatcher.agents()` reports it."""

    node: str
    agent_version: str
    protocol_version: int
    capabilities: AgentCapabilities
    instance_id: str
    peer: str
    connected_at: float
    """Wall clock, seconds since the epoch."""
    last_seen_at: float
    """Wall clock of the last message from the agent."""
    assignments_in_flight: int
    assignments_queued: int
    results_dropped_total: int
    """Results the agent had to drop from its buffer since it started (from its heartbeat)."""


@dataclass(frozen=True)
class IntakeCounters:
    """What the dispatcher turned away or corrected, for /metrics."""

    results_refused: dict[str, int]
    timestamps_adjusted_total: int
    streams_refused_total: int
    duplicates_total: int
    standby_refusals_total: int = 0


REFUSAL_REASONS = (
    "malformed",
    "malformed id",
    "not issued by this collector",
    "issued to another node",
    "answered already",
    "never sent",
    "issued too long ago",
)
"""Why a result is acked but not delivered (the `reason` label of the refusal counter)."""


_State = Literal["awaiting_responder", "queued", "sent"]


@dataclass
class _Pending:
    assignment: Assignment
    sequence: int
    state: _State
    issued_at_ns: int
    seal: pb.IssueSeal
    sent_to: str | None = None  # the node whose stream it was sent on (None: never sent)
    session: _Session | None = None
    responder: ResponderReport | None = None
    responder_timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Session:
    hello: AgentHello
    peer: str
    connected_at: float
    last_seen: float
    last_seen_at: float
    max_in_flight: int
    in_flight: set[str] = field(default_factory=set)
    control: deque[pb.CollectorMessage] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    writing_since: float | None = None  # monotonic start of the write now blocked, if any
    results_dropped_total: int = 0

    @property
    def node(self) -> str:
        return self.hello.node_name

    def poke(self) -> None:
        self.wake.set()


class Dispatcher:
    """The collector's side of the agent streams. Use it from one event loop.

    `serving()`, when given, says whether to take agents' streams at all: a standby collector
    (one not holding the Lease) ends each at once with UNAVAILABLE and `STANDBY_REFUSAL`, before
    the hello, so agents try again (through a Service, maybe reaching the leader) and no result
    reaches a collector that issued nothing.

    `on_result(result)` is called exactly once per result (and at most once per assignment), on the
    event loop, with `result.responder` set when the assignment asked for a responder. It must not
    block; an exception it raises is logged and the result still counts as delivered.
    """

    def __init__(
        self,
        *,
        token: str,
        tls: ServerTLS,
        on_result: Callable[[ProbeResult], None],
        heartbeat_interval_seconds: float = 5.0,
        silent_heartbeats_before_drop: int = 3,
        responder_wait_seconds: float = 2.0,
        responder_margin_seconds: float = 10.0,
        hello_timeout_seconds: float = 10.0,
        batch_size: int = 256,
        default_max_in_flight: int = 256,
        ledger: DeliveryLedger | None = None,
        assignment_key: bytes | None = None,
        max_result_age_seconds: float = MAX_RESULT_AGE_SECONDS,
        clock_tolerance_seconds: float = 2.0,
        wall: Callable[[], float] = time.time,
        collector_version: str = __version__,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        if not token:
            raise ValueError("the dispatcher needs a non-empty token")
        self._expected_auth = f"Bearer {token}".encode()
        self._tls = tls
        self._on_result = on_result
        self._heartbeat_interval = heartbeat_interval_seconds
        self._silence_limit = heartbeat_interval_seconds * silent_heartbeats_before_drop
        self._responder_wait = responder_wait_seconds
        self._responder_margin = responder_margin_seconds
        self._hello_timeout = hello_timeout_seconds
        self._batch_size = batch_size
        self._default_max_in_flight = default_max_in_flight
        self._collector_version = collector_version
        self._ledger = (
            ledger
            if ledger is not None
            else DeliveryLedger(100_000, horizon_seconds=max_result_age_seconds)
        )
        self._seal = AssignmentSeal(assignment_key or secrets.token_bytes(KEY_BYTES))
        self._max_result_age = max_result_age_seconds
        self._tolerance = clock_tolerance_seconds
        self._wall = wall
        self._pending: dict[str, _Pending] = {}
        self._queues: dict[str, deque[str]] = {}
        self._responder_queues: dict[str, deque[ResponderRequest]] = {}
        self._sessions: dict[str, _Session] = {}
        self._sequence = itertools.count()
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.delivered_total = 0
        """Results handed to on_result so far."""
        self.duplicates_total = 0
        """Results received again (after a reconnect) and dropped as already delivered."""
        self.refused_total = 0
        """Streams refused (bad token, no hello, another protocol)."""
        self.results_refused: collections.Counter[str] = collections.Counter()
        """Results acked but not delivered, by reason (none of them issued to that stream)."""
        self.timestamps_adjusted_total = 0
        """Results whose start time lay outside when the collector issued the assignment and
        received the result (beyond the tolerance), brought back within it."""
        self._limiter = LogLimiter()
        self._policy = DestinationPolicy()
        self._serving = serving
        self.standby_refusals_total = 0
        """Streams ended at once because this collector was a standby (`serving()` false)."""

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Serve TLS on `address` (host:port, port 0 picks one); returns the bound port.

        Can be called again after `stop()`: queued assignments and the delivery ledger are kept,
        so a restarted server resumes where it stopped.
        """
        if self._server is not None:
            raise RuntimeError("the dispatcher is already serving")
        server = grpc.aio.server(options=SERVER_OPTIONS)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(_Servicer(self), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = server.add_secure_port(address, self._tls.credentials())
        except RuntimeError as exc:  # grpc's "Failed to bind to address"
            port = 0
            cause: BaseException | None = exc
        else:
            cause = None
        if port == 0:
            await server.stop(0)
            raise OSError(
                f"cannot listen for gRPC on {address} (--grpc-port): the port is taken or the "
                "address is not one of this host's"
            ) from cause
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("dispatcher listening on port %d", port)
        return port

    async def stop(self, grace_seconds: float = 1.0) -> None:
        """Stop serving: end every stream (agents reconnect to the next server) and the server."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        for session in list(self._sessions.values()):
            self._end_session(session, "collector stopping")
        await server.stop(grace_seconds)

    # --- API for the collector -----------------------------------------------------------------

    def submit(self, assignments: Iterable[Assignment]) -> None:
        """Queue assignments for the agents on their source nodes; ids already known are ignored."""
        touched: set[str] = set()
        for a in assignments:
            if a.id in self._pending or self._ledger.has_assignment(a.id):
                log.debug("assignment %s submitted twice; ignored", a.id)
                continue
            issued_at_ns = int(self._wall() * 1e9)
            seal = pb.IssueSeal(mac=self._seal.seal(a, issued_at_ns))
            seal.issued_at.FromNanoseconds(issued_at_ns)
            pending = _Pending(
                assignment=a,
                sequence=next(self._sequence),
                state="queued",
                issued_at_ns=issued_at_ns,
                seal=seal,
            )
            self._pending[a.id] = pending
            if a.responder is not None:
                pending.state = "awaiting_responder"
                request = ResponderRequest(
                    assignment_id=a.id,
                    pod=a.responder.pod,
                    port=a.port,
                    protocol=a.protocol,
                    ttl_seconds=a.timeout_seconds + self._responder_wait + self._responder_margin,
                )
                self._responder_queues.setdefault(a.responder.node, deque()).append(request)
                loop = asyncio.get_running_loop()
                pending.responder_timer = loop.call_later(
                    self._responder_wait, self._responder_timed_out, a.id
                )
                touched.add(a.responder.node)
            else:
                self._queues.setdefault(a.source_node, deque()).append(a.id)
                touched.add(a.source_node)
        for node in touched:
            self._poke(node)

    def set_destination_policy(self, policy: DestinationPolicy) -> None:
        """Where agents may probe; sent to every agent now (before the assignments that follow)
        and in each new hello-ack. Nothing is sent when it did not change."""
        if policy == self._policy:
            return
        self._policy = policy
        message = pb.CollectorMessage(
            destination_policy=convert.destination_policy_to_proto(policy)
        )
        for session in self._sessions.values():
            session.control.append(message)
            session.poke()

    def cancel(self, assignment_ids: Iterable[str]) -> None:
        """Forget assignments: queued ones are never sent, running ones are stopped (no result)."""
        for aid in assignment_ids:
            pending = self._pending.pop(aid, None)
            self._ledger.add_assignment(aid)
            if pending is None:
                continue
            if pending.responder_timer is not None:
                pending.responder_timer.cancel()
            if pending.session is not None and pending.state == "sent":
                pending.session.in_flight.discard(aid)
                self._send_cancel(pending.session.node, aid)
            if pending.assignment.responder is not None:
                self._send_cancel(pending.assignment.responder.node, aid)

    def forget(self, assignment_ids: Iterable[str]) -> None:
        """Drop assignments the planner gave up on (it issues their flows again under new ids).

        A queued one is never sent (its node's queue is compacted, so a node without an agent
        does not pile up ids); one already sent is no longer awaited, but its probe runs on, and
        a late result is still delivered once (as one the planner no longer expects). Unlike
        `cancel`, nothing is refused later and no agent is told to stop.
        """
        nodes: set[str] = set()
        for aid in assignment_ids:
            pending = self._pending.pop(aid, None)
            if pending is None:
                continue
            if pending.responder_timer is not None:
                pending.responder_timer.cancel()
            if pending.session is not None:
                pending.session.in_flight.discard(aid)
                pending.session.poke()
            if pending.state == "awaiting_responder" and pending.assignment.responder is not None:
                nodes.add(pending.assignment.responder.node)
            elif pending.state == "queued":
                nodes.add(pending.assignment.source_node)
            # A responder already opened stays until its own TTL: a probe still running needs it.
        for node in nodes:
            queue = self._queues.get(node)
            if queue:
                self._queues[node] = deque(a for a in queue if a in self._pending)
            requests = self._responder_queues.get(node)
            if requests:
                self._responder_queues[node] = deque(
                    r for r in requests if r.assignment_id in self._pending
                )

    def agents(self) -> list[AgentInfo]:
        """The connected agents, by node name."""
        now_wall = time.time()
        infos = []
        for node, s in sorted(self._sessions.items()):
            infos.append(
                AgentInfo(
                    node=node,
                    agent_version=s.hello.agent_version,
                    protocol_version=s.hello.protocol_version,
                    capabilities=s.hello.capabilities,
                    instance_id=s.hello.instance_id,
                    peer=s.peer,
                    connected_at=s.connected_at,
                    last_seen_at=min(s.last_seen_at, now_wall),
                    assignments_in_flight=len(s.in_flight),
                    assignments_queued=self._queued_count(node),
                    results_dropped_total=s.results_dropped_total,
                )
            )
        return infos

    def intake_counters(self) -> IntakeCounters:
        return IntakeCounters(
            results_refused={r: self.results_refused[r] for r in REFUSAL_REASONS},
            timestamps_adjusted_total=self.timestamps_adjusted_total,
            streams_refused_total=self.refused_total,
            duplicates_total=self.duplicates_total,
            standby_refusals_total=self.standby_refusals_total,
        )

    def pending_count(self) -> int:
        """Assignments submitted and not yet answered or cancelled."""
        return len(self._pending)

    # --- streams -------------------------------------------------------------------------------

    async def _connect(
        self,
        requests: AsyncIterator[pb.AgentMessage],
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.CollectorMessage],
    ) -> AsyncGenerator[pb.CollectorMessage, None]:
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        auth_bytes = auth.encode() if isinstance(auth, str) else auth
        if not hmac.compare_digest(auth_bytes, self._expected_auth):
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        try:
            async with asyncio.timeout(self._hello_timeout):
                first = await anext(aiter(requests))
        except (TimeoutError, StopAsyncIteration):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "expected a hello first")
        if self._serving is not None and not self._serving():
            # After the hello was read: an abort that crossed the agent's write of it would reach
            # the agent as INTERNAL ("Internal error from Core"), not as this refusal.
            self.standby_refusals_total += 1  # not a bad stream: not counted as refused
            await context.abort(grpc.StatusCode.UNAVAILABLE, STANDBY_REFUSAL)
        if first.WhichOneof("body") != "hello":
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "expected a hello first")
        try:
            hello = convert.hello_from_proto(first.hello)
        except convert.ContractError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if hello.protocol_version != PROTOCOL_VERSION:
            await self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collector speaks protocol {PROTOCOL_VERSION}, agent {hello.protocol_version}",
            )
        session = self._open_session(hello, context.peer())
        reader = asyncio.create_task(
            self._read(session, requests), name=f"agent_reader {hello.node_name}"
        )
        handler = asyncio.current_task()
        watchdog = asyncio.create_task(
            self._watch(session, handler), name=f"agent_watchdog {hello.node_name}"
        )
        try:
            ack = HelloAck(
                protocol_version=PROTOCOL_VERSION,
                collector_version=self._collector_version,
                heartbeat_interval_seconds=self._heartbeat_interval,
                destination_policy=self._policy,
            )
            session.writing_since = time.monotonic()
            yield pb.CollectorMessage(hello_ack=convert.hello_ack_to_proto(ack))
            session.writing_since = None
            while not session.closed:
                messages = self._outgoing(session)
                if messages:
                    for msg in messages:
                        session.writing_since = time.monotonic()
                        yield msg
                        session.writing_since = None
                    continue
                if reader.done():
                    break
                session.wake.clear()
                try:
                    async with asyncio.timeout(self._heartbeat_interval):
                        await session.wake.wait()
                except TimeoutError:
                    pass
        finally:
            watchdog.cancel()
            reader.cancel()
            await asyncio.gather(reader, watchdog, return_exceptions=True)
            self._end_session(session, "stream ended")

    async def _watch(self, session: _Session, handler: asyncio.Task[Any] | None) -> None:
        """Drop the session once the agent is silent for three heartbeats, or a write to it has
        been blocked that long (it stopped reading), whatever the stream's own task is doing:
        the session goes at once (its assignments back to the queue), then the call is ended."""
        while not session.closed:
            await asyncio.sleep(self._heartbeat_interval)
            now = time.monotonic()
            silent = now - session.last_seen
            stuck = now - session.writing_since if session.writing_since is not None else 0.0
            if silent <= self._silence_limit and stuck <= self._silence_limit:
                continue
            why = (
                f"silent for {silent:.1f} s"
                if silent > self._silence_limit
                else f"not reading for {stuck:.1f} s"
            )
            self._noisy(logging.WARNING, "agent on %s %s; dropping its stream", session.node, why)
            blocked = session.writing_since is not None
            self._end_session(session, why)  # closed and poked: a waiting stream ends normally
            if blocked and handler is not None and not handler.done():
                handler.cancel()  # a write that never completes: only cancelling ends the call
            return

    async def _read(self, session: _Session, requests: AsyncIterator[pb.AgentMessage]) -> None:
        try:
            async for msg in requests:
                session.last_seen = time.monotonic()
                session.last_seen_at = time.time()
                which = msg.WhichOneof("body")
                if which == "results":
                    await self._take_results(session, msg.results.results)
                elif which == "heartbeat":
                    session.results_dropped_total = msg.heartbeat.results_dropped_total
                elif which == "responder_reports":
                    for report in msg.responder_reports.reports:
                        self._take_responder_report(session, report)
                else:
                    self._noisy(
                        logging.WARNING, "agent on %s sent an unexpected %s", session.node, which
                    )
        except grpc.aio.AioRpcError as exc:
            log.info("stream from %s broke: %s", session.node, exc.code().name)
        finally:
            session.poke()

    def _open_session(self, hello: AgentHello, peer: str) -> _Session:
        old = self._sessions.get(hello.node_name)
        if old is not None:
            self._end_session(old, "replaced by a new stream from the same node")
        session = _Session(
            hello=hello,
            peer=peer,
            connected_at=time.time(),
            last_seen=time.monotonic(),
            last_seen_at=time.time(),
            max_in_flight=hello.capabilities.max_in_flight or self._default_max_in_flight,
        )
        self._sessions[hello.node_name] = session
        held = 0
        for aid in hello.known_assignment_ids:
            pending = self._pending.get(aid)
            if (
                pending is not None
                and pending.assignment.source_node == hello.node_name
                and pending.sent_to == hello.node_name  # never one it was not sent
                and pending.state in ("queued", "sent")
            ):
                pending.state = "sent"
                pending.session = session
                pending.sent_to = session.node
                session.in_flight.add(aid)
                held += 1
        log.info(
            "agent %s on %s connected from %s (still holds %d assignments)",
            hello.agent_version,
            hello.node_name,
            peer,
            held,
        )
        return session

    def _end_session(self, session: _Session, why: str) -> None:
        """Close a session; what it had in flight goes back to the front of its node's queue."""
        if session.closed:
            return
        session.closed = True
        session.poke()
        if self._sessions.get(session.node) is session:
            del self._sessions[session.node]
        back = sorted(
            (p for aid in session.in_flight if (p := self._pending.get(aid)) is not None),
            key=lambda p: p.sequence,
        )
        queue = self._queues.setdefault(session.node, deque())
        for pending in reversed(back):
            pending.state = "queued"
            pending.session = None
            queue.appendleft(pending.assignment.id)
        session.in_flight.clear()
        log.info(
            "agent on %s disconnected (%s); %d assignments re-queued", session.node, why, len(back)
        )
        if back:
            log.debug("re-queued for %s: %s", session.node, " ".join(p.assignment.id for p in back))

    def _outgoing(self, session: _Session) -> list[pb.CollectorMessage]:
        """What to send now: control messages, responder requests, and assignments up to credit."""
        messages = list(session.control)
        session.control.clear()
        requests = self._responder_queues.get(session.node)
        if requests:
            batch: list[pb.ResponderRequest] = []
            while requests and len(batch) < self._batch_size:
                req = requests.popleft()
                pending = self._pending.get(req.assignment_id)
                if pending is not None and pending.state == "awaiting_responder":
                    batch.append(convert.responder_request_to_proto(req))
            if batch:
                messages.append(
                    pb.CollectorMessage(responder_requests=pb.ResponderRequestBatch(requests=batch))
                )
        queue = self._queues.get(session.node)
        credit = session.max_in_flight - len(session.in_flight)
        if queue and credit > 0:
            assignments: list[pb.Assignment] = []
            while queue and len(assignments) < min(credit, self._batch_size):
                aid = queue.popleft()
                pending = self._pending.get(aid)
                if pending is None or pending.state != "queued":
                    continue  # answered or cancelled while queued
                pending.state = "sent"
                pending.session = session
                pending.sent_to = session.node
                session.in_flight.add(aid)
                message = convert.assignment_to_proto(pending.assignment)
                message.seal.CopyFrom(pending.seal)
                assignments.append(message)
            if assignments:
                messages.append(
                    pb.CollectorMessage(assignments=pb.AssignmentBatch(assignments=assignments))
                )
        return messages

    def _noisy(self, level: int, message: str, *args: object) -> None:
        """A line a peer can trigger at will: rate-limited per message, its values bounded."""
        suffix = self._limiter.admit(message)
        if suffix is not None:
            shown = tuple(bounded(str(a), 200) for a in args)
            log.log(level, message + "%s", *shown, suffix)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.CollectorMessage],
        code: grpc.StatusCode,
        why: str,
    ) -> NoReturn:
        """End a stream before it became a session; logged at most a few times a minute."""
        self.refused_total += 1
        suffix = self._limiter.admit(f"refused {why}")
        if suffix is not None:
            log.warning("refused a stream from %s: %s%s", context.peer(), bounded(why, 200), suffix)
        await context.abort(code, why)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    # --- results and responders ----------------------------------------------------------------

    async def _take_results(self, session: _Session, results: Sequence[pb.ProbeResult]) -> None:
        """Ack every result; deliver those of assignments issued to this stream's node, once.

        A result is refused (acked, counted by reason, never delivered) unless its assignment
        carries this collector's seal, was issued to this node, was sent on one of its streams
        (or, issued before a restart, is recent), and was not answered before. Its start time is
        taken on the collector's clock: within when the assignment was issued and the result
        came in (a start outside that, beyond the tolerance, is counted and brought within it).
        """
        acked: list[str] = []
        for index, msg in enumerate(results):
            if index and index % INTAKE_CHUNK == 0:
                await asyncio.sleep(0)  # let /metrics and the web view in between chunks
            acked.append(msg.id)
            if self._ledger.has_result(msg.id):
                self.duplicates_total += 1
                continue
            result, why = self._accepted(session, msg)
            if result is None:
                self.results_refused[why] += 1
                self._noisy(
                    logging.WARNING, "refused a result from the agent on %s: %s", session.node, why
                )
                continue
            aid = result.assignment_id
            self._ledger.add(msg.id, aid)
            pending = self._pending.pop(aid, None)
            if pending is not None:
                if pending.session is not None:
                    pending.session.in_flight.discard(aid)
                if pending.responder_timer is not None:
                    pending.responder_timer.cancel()
                if pending.assignment.responder is not None:
                    self._send_cancel(pending.assignment.responder.node, aid)
                result = dataclasses.replace(
                    result, assignment=pending.assignment, responder=pending.responder
                )
            self.delivered_total += 1
            try:
                self._on_result(result)
            except Exception:
                log.exception("on_result failed for result %s", result.id)
        self._ledger.flush()
        if acked:
            session.control.append(pb.CollectorMessage(result_ack=pb.ResultAck(result_ids=acked)))
            session.poke()

    def _accepted(self, session: _Session, msg: pb.ProbeResult) -> tuple[ProbeResult | None, str]:
        """The result to deliver (on the collector's clock), or None and why it is refused."""
        if len(msg.id) > MAX_ID_CHARS or not msg.id.isprintable():
            return None, "malformed id"
        if not msg.assignment.HasField("seal"):  # the cheap refusal first: nothing to convert
            return None, "not issued by this collector"
        try:
            result = convert.result_from_proto(msg)
        except convert.ContractError:
            return None, "malformed"
        assignment = result.assignment
        seal = msg.assignment.seal
        issued_at_ns = seal.issued_at.ToNanoseconds()
        if not self._seal.verify(assignment, issued_at_ns, seal.mac):
            return None, "not issued by this collector"
        if assignment.source_node != session.node:
            return None, "issued to another node"
        if self._ledger.has_assignment(assignment.id):
            self.duplicates_total += 1
            return None, "answered already"
        now = self._wall()
        issued_at = issued_at_ns / 1e9
        pending = self._pending.get(assignment.id)
        if pending is not None:
            if pending.sent_to is None:
                return None, "never sent"
        elif not -self._tolerance <= now - issued_at <= self._max_result_age:
            return None, "issued too long ago"
        started = result.started_at
        if not issued_at - self._tolerance <= started <= now + self._tolerance:
            self.timestamps_adjusted_total += 1
        started = min(max(started, issued_at), now)
        latency = min(max(result.latency_seconds, 0.0), max(now - started, 0.0))
        return (
            dataclasses.replace(
                result, node=session.node, started_at=started, latency_seconds=latency
            ),
            "",
        )

    def _take_responder_report(self, session: _Session, msg: pb.ResponderReport) -> None:
        try:
            report = convert.responder_report_from_proto(msg)
        except convert.ContractError as exc:
            self._noisy(
                logging.ERROR,
                "agent on %s sent a malformed responder report: %s",
                session.node,
                exc,
            )
            return
        pending = self._pending.get(report.assignment_id)
        if pending is None:
            if report.state is ResponderState.OPENED:  # its assignment ended meanwhile
                self._send_cancel(session.node, report.assignment_id)
            return
        if pending.state != "awaiting_responder":
            return  # gave up waiting; the probe went ahead without it
        self._responder_ready(pending, report)

    def _responder_timed_out(self, assignment_id: str) -> None:
        pending = self._pending.get(assignment_id)
        if pending is None or pending.state != "awaiting_responder":
            return
        spec = pending.assignment.responder
        node = spec.node if spec is not None else "?"
        report = ResponderReport(
            assignment_id=assignment_id,
            state=ResponderState.UNAVAILABLE,
            detail=f"no responder report from the agent on {node} "
            f"within {self._responder_wait:g} s",
        )
        self._responder_ready(pending, report)

    def _responder_ready(self, pending: _Pending, report: ResponderReport) -> None:
        if pending.responder_timer is not None:
            pending.responder_timer.cancel()
            pending.responder_timer = None
        pending.responder = report
        pending.state = "queued"
        node = pending.assignment.source_node
        self._queues.setdefault(node, deque()).append(pending.assignment.id)
        self._poke(node)

    # --- helpers -------------------------------------------------------------------------------

    def _send_cancel(self, node: str, assignment_id: str) -> None:
        session = self._sessions.get(node)
        if session is None:
            return  # the agent's own bound closes a responder; a probe result is dropped
        session.control.append(
            pb.CollectorMessage(cancel=pb.Cancel(assignment_ids=[assignment_id]))
        )
        session.poke()

    def _poke(self, node: str) -> None:
        session = self._sessions.get(node)
        if session is not None:
            session.poke()

    def _queued_count(self, node: str) -> int:
        queue = self._queues.get(node, ())
        return sum(1 for aid in queue if (p := self._pending.get(aid)) and p.state == "queued")


class _Servicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.AgentMessage],
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.CollectorMessage],
    ) -> AsyncIterator[pb.CollectorMessage]:
        stream = self._dispatcher._connect(request_iterator, context)
        try:
            async for msg in stream:
                yield msg
        finally:
            await stream.aclose()
