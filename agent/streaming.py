"""The agent's one stream to the collector: hello, assignments in, results out, and resuming.

`CollectorLink.run()` keeps the stream up: it connects, sends a hello (listing the assignments it
still holds), waits for the hello-ack, re-sends every result not yet acked, then serves: it starts a
probe for each assignment, opens and releases responders, sends result batches and heartbeats, and
forgets a result only when the collector acks its id. On any break it reconnects with exponential
backoff and full jitter (a standby collector's refusal is no failure: it tries again soon, each
stream on a new connection, and on the next address when several are given); probes keep running meanwhile and their results wait in a bounded buffer
(the oldest dropped and counted when it overflows). It probes only what the collector assigned and
never listens for connections.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

import grpc
import grpc.aio

from agent.errors import AgentError, NetnsThreadBroken
from agent.probing import Prober
from agent.responders import Responders
from agent.settings import AgentSettings
from flowproof import convert
from flowproof.aio import Backoff
from flowproof.logs import LogLimiter
from flowproof.probes import (
    PROTOCOL_VERSION,
    STANDBY_REFUSAL,
    AgentCapabilities,
    AgentHello,
    Assignment,
    DestinationPolicy,
    Heartbeat,
    Outcome,
    ProbeKind,
    ProbeResult,
    ResponderReport,
    ResponderRequest,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub

log = logging.getLogger(__name__)

_Call = grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage]

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


class StreamBroken(AgentError):
    """The stream ended or the collector broke the contract; the link reconnects."""


class ResultOutbox:
    """Results kept until the collector acks them, in the order they were measured.

    Each result is kept as the message that goes on the wire (converted once, re-sent as is).
    Bounded: adding beyond `capacity` drops the oldest result and counts it in `dropped_total`.
    `take_unsent()` hands out each kept result once per stream; `rewind()` after a reconnect makes
    every kept result unsent again, so it is re-sent.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._kept: OrderedDict[str, pb.ProbeResult] = OrderedDict()
        self._assignments: dict[str, str] = {}
        self._unsent: deque[str] = deque()
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, result: pb.ProbeResult) -> None:
        while len(self._kept) >= self._capacity:
            dropped_id, dropped = self._kept.popitem(last=False)
            self._assignments.pop(dropped.assignment.id, None)
            self.dropped_total += 1
            log.warning(
                "result buffer full (%d): dropped result %s of assignment %s",
                self._capacity,
                dropped_id,
                dropped.assignment.id,
            )
        self._kept[result.id] = result
        self._assignments[result.assignment.id] = result.id
        self._unsent.append(result.id)
        # One line per result at DEBUG: what an agent measured, id by id (the lab's tests compare
        # it with what the collector recorded).
        log.debug("result %s of assignment %s measured", result.id, result.assignment.id)

    def ack(self, result_ids: Iterable[str]) -> None:
        for rid in result_ids:
            result = self._kept.pop(rid, None)
            if result is not None:
                self._assignments.pop(result.assignment.id, None)
                log.debug("result %s acked", rid)

    def take_unsent(self, limit: int) -> list[pb.ProbeResult]:
        taken: list[pb.ProbeResult] = []
        while self._unsent and len(taken) < limit:
            result = self._kept.get(self._unsent.popleft())
            if result is not None:  # else acked or dropped meanwhile
                taken.append(result)
        return taken

    def rewind(self) -> None:
        self._unsent = deque(self._kept)

    def holds(self, assignment_id: str) -> bool:
        """Whether a result of this assignment waits for its ack."""
        return assignment_id in self._assignments

    def assignment_ids(self) -> set[str]:
        return set(self._assignments)


class CollectorLink:
    """The agent's side of the stream; `run()` is the agent's root task."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        prober: Prober,
        responders: Responders,
        capabilities: AgentCapabilities,
        agent_version: str,
        ca_certificates: bytes,
        rng: random.Random | None = None,
        observe: Callable[[ProbeResult], None] | None = None,
    ) -> None:
        self._settings = settings
        self._ca_certificates = ca_certificates
        self._observe = observe
        self._prober = prober
        self._responders = responders
        self._capabilities = capabilities
        self._agent_version = agent_version
        self.instance_id = uuid.uuid4().hex
        self._backoff = Backoff(
            settings.reconnect_initial_seconds,
            settings.reconnect_max_seconds,
            rng=rng or random.Random(),
        )
        self.outbox = ResultOutbox(settings.result_buffer_size)
        self._probes: dict[str, pb.Assignment] = {}
        """Assignments held by the prober, with the message each came in (echoed in its result)."""
        self._responder_tasks: set[asyncio.Task[None]] = set()
        self._reports: deque[ResponderReport] = deque()
        self._wake = asyncio.Event()
        self._heartbeat_interval = 5.0
        self._heartbeat_sequence = 0
        self.destination_policy: DestinationPolicy | None = None
        """Where this agent may probe, as the collector last said (None before the first ack)."""
        self._limiter = LogLimiter()
        self._stopping = False
        self._fatal: BaseException | None = None
        self.connected = asyncio.Event()
        """Set while a stream is up (after the hello-ack); for tests and the runtime's log."""
        self.sessions = 0
        """How many streams were established so far."""
        self.standby_refusals = 0
        """Streams a standby collector ended at once (it did not hold the Lease)."""
        self._addresses = settings.collector_addresses or (settings.collector_address,)
        self._address_index = 0

    @property
    def in_flight(self) -> int:
        return len(self._probes)

    @property
    def address(self) -> str:
        """The collector address the current (or next) stream uses."""
        return self._addresses[self._address_index % len(self._addresses)]

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the stream up until `stop` is set, then drain gracefully (bounded) and return."""
        try:
            while not stop.is_set():
                self._raise_if_fatal()
                standby = False
                try:
                    await self._session(stop)
                except (
                    grpc.aio.AioRpcError,
                    StreamBroken,
                    TimeoutError,
                    asyncio.InvalidStateError,  # a write after the call ended
                ) as exc:
                    standby = _is_standby_refusal(exc)
                    if not standby:
                        self._log_break(exc)
                self._raise_if_fatal()
                if stop.is_set():
                    break
                refused = self.address
                self._address_index += 1  # the next stream goes to the next address, if several
                if standby:
                    # Not a failure: another replica leads. No escalation: try again soon on a
                    # new connection (each session opens its own channel, so a Service may route
                    # it to another replica) or the next address.
                    self._backoff.reset()
                    self.standby_refusals += 1
                delay = self._backoff.next_delay()
                if standby:
                    suffix = self._limiter.admit("standby refusal")
                    if suffix is not None:
                        log.info(
                            "the collector at %s is a standby; trying %s in %.2f s%s",
                            refused,
                            self.address,
                            delay,
                            suffix,
                        )
                else:
                    log.info("reconnecting to %s in %.2f s", self.address, delay)
                await _wait(stop, delay)
        finally:
            await self._shutdown()

    def _log_break(self, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            details = exc.details() or ""
            if any(m in details for m in ("CERTIFICATE_VERIFY_FAILED", "Handshake", "handshake")):
                log.error(
                    "the collector at %s was not authenticated (its certificate does not verify "
                    "against ca_file, or carries another name): no token was sent; %s",
                    self.address,
                    details,
                )
                return
            level = (
                logging.ERROR if exc.code() == grpc.StatusCode.UNAUTHENTICATED else logging.WARNING
            )
            log.log(level, "stream to the collector broke: %s %s", exc.code().name, details)
        else:
            log.warning("stream to the collector broke: %s", exc or type(exc).__name__)

    def _raise_if_fatal(self) -> None:
        if self._fatal is None and self._prober.broken is not None:
            self._fatal = self._prober.broken
        if self._fatal is not None:
            raise self._fatal

    # --- one stream ----------------------------------------------------------------------------

    def _credentials(self) -> tuple[grpc.ChannelCredentials, tuple[tuple[str, str | int], ...]]:
        """TLS checked against the CA, with the token as a call credential: gRPC attaches it
        only to a connection whose certificate verified, never to a plaintext one."""
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=self._ca_certificates),
            grpc.access_token_call_credentials(self._settings.token),
        )
        options: tuple[tuple[str, str | int], ...] = CHANNEL_OPTIONS
        if self._settings.collector_server_name:
            options += (("grpc.ssl_target_name_override", self._settings.collector_server_name),)
        return credentials, options

    async def _session(self, stop: asyncio.Event) -> None:
        credentials, options = self._credentials()
        async with grpc.aio.secure_channel(self.address, credentials, options=options) as channel:
            stub = AgentServiceStub(channel)
            call = stub.Connect()
            try:
                await self._handshake(call)
                self.connected.set()
                self.sessions += 1
                self._backoff.reset()
                self.outbox.rewind()
                log.info(
                    "connected to %s (%d results to re-send, %d probes running)",
                    self.address,
                    len(self.outbox),
                    len(self._probes),
                )
                await self._serve(call, stop)
            finally:
                self.connected.clear()
                call.cancel()

    async def _handshake(self, call: _Call) -> None:
        known = set(self._probes) | self.outbox.assignment_ids()
        hello = AgentHello(
            node_name=self._settings.node_name,
            agent_version=self._agent_version,
            protocol_version=PROTOCOL_VERSION,
            capabilities=self._capabilities,
            instance_id=self.instance_id,
            known_assignment_ids=tuple(sorted(known)),
        )
        await call.write(pb.AgentMessage(hello=convert.hello_to_proto(hello)))
        async with asyncio.timeout(self._settings.hello_timeout_seconds):
            first = await call.read()
        if first is grpc.aio.EOF or not isinstance(first, pb.CollectorMessage):
            raise StreamBroken("the collector closed the stream before its hello-ack")
        if first.WhichOneof("body") != "hello_ack":
            raise StreamBroken(f"expected a hello-ack, got {first.WhichOneof('body')}")
        ack = convert.hello_ack_from_proto(first.hello_ack)
        if ack.protocol_version != PROTOCOL_VERSION:
            raise StreamBroken(
                f"collector speaks protocol {ack.protocol_version}, agent {PROTOCOL_VERSION}"
            )
        if ack.heartbeat_interval_seconds > 0:
            self._heartbeat_interval = ack.heartbeat_interval_seconds
        self.destination_policy = ack.destination_policy

    async def _serve(
        self,
        call: _Call,
        stop: asyncio.Event,
    ) -> None:
        reader = asyncio.create_task(self._read(call, stop), name="collector_reader")
        writer = asyncio.create_task(self._write(call, stop), name="collector_writer")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            graceful = writer in done and writer.exception() is None
            if not graceful:
                for task in done:
                    task.result()  # re-raises the break
            if graceful and reader not in done:
                # Graceful end: we said done_writing; let the collector finish its side briefly.
                try:
                    async with asyncio.timeout(1.0):
                        await reader
                except (TimeoutError, StreamBroken, grpc.aio.AioRpcError):
                    pass
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read(
        self,
        call: _Call,
        stop: asyncio.Event,
    ) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF or not isinstance(msg, pb.CollectorMessage):
                raise StreamBroken("the collector ended the stream")
            which = msg.WhichOneof("body")
            if which == "assignments":
                for item in msg.assignments.assignments:
                    self._accept(item, stop)
            elif which == "responder_requests":
                for req in msg.responder_requests.requests:
                    self._open_responder(req)
            elif which == "cancel":
                for aid in msg.cancel.assignment_ids:
                    self._cancel(aid)
            elif which == "result_ack":
                self.outbox.ack(msg.result_ack.result_ids)
                self._wake.set()
            elif which == "destination_policy":
                self.destination_policy = convert.destination_policy_from_proto(
                    msg.destination_policy
                )
            else:
                log.warning("ignoring unexpected %s from the collector", which)

    async def _write(
        self,
        call: _Call,
        stop: asyncio.Event,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time()
        drain_deadline: float | None = None
        while True:
            self._raise_if_fatal()
            if stop.is_set() and drain_deadline is None:
                self._stopping = True
                drain_deadline = loop.time() + self._settings.shutdown_grace_seconds
            while self._reports:
                batch = [self._reports.popleft() for _ in range(min(len(self._reports), 256))]
                reports = [convert.responder_report_to_proto(r) for r in batch]
                await call.write(
                    pb.AgentMessage(responder_reports=pb.ResponderReportBatch(reports=reports))
                )
            while True:
                results = self.outbox.take_unsent(self._settings.result_batch_size)
                if not results:
                    break
                await call.write(pb.AgentMessage(results=pb.ResultBatch(results=results)))
            now = loop.time()
            if now >= next_heartbeat:
                await call.write(
                    pb.AgentMessage(heartbeat=convert.heartbeat_to_proto(self._beat()))
                )
                next_heartbeat = now + self._heartbeat_interval
            if drain_deadline is not None:
                drained = not self._probes and not len(self.outbox)
                if drained or now >= drain_deadline:
                    if not drained:
                        log.warning(
                            "stopping with %d probes running and %d results unacked",
                            len(self._probes),
                            len(self.outbox),
                        )
                    await call.done_writing()
                    return
            wait = next_heartbeat - now
            if drain_deadline is not None:
                wait = min(wait, drain_deadline - now)
            self._wake.clear()
            await _wait_any(self._wake, stop if drain_deadline is None else None, max(wait, 0.0))

    def _beat(self) -> Heartbeat:
        self._heartbeat_sequence += 1
        return Heartbeat(
            sequence=self._heartbeat_sequence,
            sent_at=time.time(),
            assignments_in_flight=len(self._probes),
            results_buffered=len(self.outbox),
            results_dropped_total=self.outbox.dropped_total,
            responders_open=self._responders.open_count,
        )

    # --- assignments, responders, cancels ------------------------------------------------------

    def _accept(self, msg: pb.Assignment, stop: asyncio.Event) -> None:
        if stop.is_set() or self._stopping:
            return  # not acknowledged: the collector re-queues it when this stream ends
        if msg.id in self._probes or self.outbox.holds(msg.id):
            return  # already held (re-sent after a reconnect)
        try:
            assignment = convert.assignment_from_proto(msg)
        except convert.ContractError as exc:
            log.error("malformed assignment from the collector: %s", exc)
            if msg.id:
                self._fail_malformed(msg, str(exc))
            return
        policy = self.destination_policy
        refusal = (
            "no destination policy from the collector"
            if policy is None
            else policy.refusal(assignment.destination_ip)
        )
        if refusal is not None:
            suffix = self._limiter.admit("destination refused")
            if suffix is not None:
                log.warning("refused assignment %s: %s%s", assignment.id[:80], refusal, suffix)
            self._finish_now(
                assignment, f"refused by the agent's destination policy: {refusal}", msg
            )
            return
        if len(self._probes) >= self._capabilities.max_in_flight:
            self._finish_now(
                assignment,
                f"agent holds {len(self._probes)} assignments (max_in_flight "
                f"{self._capabilities.max_in_flight})",
                msg,
            )
            return
        self._probes[assignment.id] = msg
        self._prober.submit(assignment, self._on_result)

    def _fail_malformed(self, msg: pb.Assignment, reason: str) -> None:
        # The assignment cannot be read back, so the result carries it as far as it is valid.
        source = convert.pod_from_proto(msg.source)
        stub = Assignment(
            id=msg.id,
            source=source,
            source_node=msg.source_node,
            destination_ip=msg.destination_ip,
            port=msg.port,
            protocol="TCP",
            kind=ProbeKind.TCP,
            timeout_seconds=1.0,
            flow_key=msg.flow_key,
        )
        self._finish_now(stub, f"malformed assignment: {reason}")

    def _finish_now(
        self, assignment: Assignment, detail: str, msg: pb.Assignment | None = None
    ) -> None:
        result = ProbeResult(
            id=uuid.uuid4().hex,
            assignment=assignment,
            outcome=Outcome.ERROR,
            latency_seconds=0.0,
            node=self._settings.node_name,
            started_at=time.time(),
            detail=detail,
        )
        self.outbox.add(convert.result_to_proto(result, assignment_msg=msg))
        self._wake.set()

    def _on_result(self, result: ProbeResult) -> None:
        if self._observe is not None:
            self._observe(result)
        msg = self._probes.pop(result.assignment_id, None)
        if self._prober.broken is not None and self._fatal is None:
            log.critical("%s", self._prober.broken)
            self._fatal = self._prober.broken
        # The assignment goes back as it came (no second conversion); the result is converted
        # once and re-sent as is after a reconnect.
        self.outbox.add(convert.result_to_proto(result, assignment_msg=msg))
        self._wake.set()

    def _open_responder(self, msg: pb.ResponderRequest) -> None:
        try:
            request = convert.responder_request_from_proto(msg)
        except convert.ContractError as exc:
            log.error("malformed responder request from the collector: %s", exc)
            return
        task = asyncio.create_task(
            self._respond(request), name=f"responder {request.assignment_id}"
        )
        self._responder_tasks.add(task)
        task.add_done_callback(self._responder_tasks.discard)

    async def _respond(self, request: ResponderRequest) -> None:
        try:
            report = await self._responders.open(request)
        except NetnsThreadBroken as exc:
            log.critical("%s", exc)
            self._fatal = exc
            self._wake.set()
            return
        self._reports.append(report)
        self._wake.set()

    def _cancel(self, assignment_id: str) -> None:
        if self._probes.pop(assignment_id, None) is not None:
            self._prober.cancel(assignment_id)
        self._responders.release(assignment_id)

    async def _shutdown(self) -> None:
        for assignment_id in list(self._probes):
            self._prober.cancel(assignment_id)
        self._probes.clear()
        tasks = list(self._responder_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._responders.close_all()
        if len(self.outbox):
            log.warning("%d results were never acked by the collector", len(self.outbox))


def _is_standby_refusal(exc: BaseException) -> bool:
    """Whether a standby collector ended the stream (it does so before its hello-ack)."""
    return (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() == grpc.StatusCode.UNAVAILABLE
        and (exc.details() or "").startswith(STANDBY_REFUSAL)
    )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep by waiting on the stop event: returns early when it is set."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


async def _wait_any(first: asyncio.Event, second: asyncio.Event | None, seconds: float) -> None:
    waiters = [asyncio.ensure_future(first.wait())]
    if second is not None:
        waiters.append(asyncio.ensure_future(second.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
