"""Intent vs model, offline: every declared flow resolved and compared with the engine's verdict.

Owns `check` (the offline statuses `PASS` and `POLICY_MISMATCH`, `MODEL_INCOMPLETE` where the
model is unknown, and `INCONCLUSIVE` for a host resolved only when probed) and the parsing of a command line's port. Resolution is
collector.core.resolving's; the live loop adds reality on top of the same flows. Pure: no I/O; an
expectation that matches nothing is an InputError unless it says `allowEmpty`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from collector.core.engine import Engine, Verdict
from collector.core.model import (
    Expectations,
    ExternalTarget,
    FlowExpectation,
    Protocol,
    Snapshot,
)
from collector.core.resolving import DEFAULT_CLUSTER_DNS_IP, ConcreteFlow, resolve, select_pods
from collector.core.statuses import FAILING, Status, model_status
from flowproof.errors import InputError


@dataclass(frozen=True)
class FlowCheck:
    """A concrete flow with the model's verdict and the offline status."""

    flow: ConcreteFlow
    verdict: Verdict | None
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    checks: tuple[FlowCheck, ...]
    problems: tuple[str, ...] = field(default=())  # expectations that resolved to nothing, etc.

    @property
    def failed(self) -> bool:
        return any(c.status in FAILING for c in self.checks)


def _host_checks(
    snapshot: Snapshot, document: Expectations, flow: FlowExpectation
) -> list[FlowCheck]:
    """A `to: {host: ...}` flow offline: INCONCLUSIVE per source pod and port, never an error.

    The host's addresses are known only when it is resolved at probe time, so no ipBlock can be
    matched against it here; the live loop decides these flows.
    """
    assert isinstance(flow.destination, ExternalTarget)
    host = flow.destination.host or ""
    detail = f"host {host} is resolved when probed; offline its addresses are unknown"
    checks = []
    for source in select_pods(snapshot, flow.source, document.namespace):
        for spec in flow.ports:
            if spec.port is None:
                continue
            item = ConcreteFlow(
                expectation=document.key,
                flow=flow.name,
                source=source,
                destination=host,
                port=spec.port,
                protocol=spec.protocol,
                intent=flow.expect == "allow",
            )
            checks.append(FlowCheck(item, None, "INCONCLUSIVE", detail))
    return checks


def check(
    snapshot: Snapshot,
    documents: Sequence[Expectations] | None = None,
    *,
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP,
    strict: bool = True,
) -> CheckReport:
    """Resolve every declared flow and compare intent with the model.

    With `strict` (the default), any expectation that resolves to nothing raises InputError: a typo
    in a selector must not pass silently.
    """
    engine = Engine(snapshot)
    documents = snapshot.expectations if documents is None else documents
    checks: list[FlowCheck] = []
    problems: list[str] = []
    for document in documents:
        for flow in document.flows:
            if isinstance(flow.destination, ExternalTarget) and flow.destination.host:
                checks.extend(_host_checks(snapshot, document, flow))
                continue
            concrete, flow_problems = resolve(
                snapshot, document, flow, cluster_dns_ip=cluster_dns_ip
            )
            problems.extend(flow_problems)
            for item in concrete:
                verdict = engine.evaluate(item.source, item.destination, item.port, item.protocol)
                status = model_status(item.intent, verdict.allowed, model_known=verdict.known)
                checks.append(FlowCheck(item, verdict, status))
    if strict and problems:
        raise InputError(
            "expectations do not resolve",
            problems=tuple(InputError(p) for p in problems),
        )
    return CheckReport(tuple(checks), tuple(problems))


def parse_port(text: str) -> tuple[int | str, Protocol]:
    """`80/TCP`, `80` (TCP), `53/udp`, or a name `http/TCP`, as given on a command line."""
    value, _, proto = text.partition("/")
    protocol = (proto or "TCP").upper()
    if protocol not in ("TCP", "UDP", "SCTP"):
        raise InputError(f"protocol must be TCP, UDP or SCTP, not {proto!r}", field="--port")
    if value.isdigit():
        number = int(value)
        if not 1 <= number <= 65535:
            raise InputError(f"port {number} is outside 1-65535", field="--port")
        return number, protocol  # type: ignore[return-value]
    if not value:
        raise InputError(f"{text!r} is not a port: use NUMBER/PROTOCOL", field="--port")
    return value, protocol  # type: ignore[return-value]


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
