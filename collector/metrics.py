"""The collector's Prometheus metrics: flow state read at scrape time, loop counters as they happen.

Owns `CollectorMetrics` (every `flowproof_` series of the collector, in one registry passed in) and
`FlowStateCollector`, the custom collector that derives the per-flow series from `FlowState` at
each scrape, so a flow that disappears leaves no stale series. Labels stay bounded: per declared
flow (never per pod pair), per status, per protocol and outcome (docs/metrics.md). It never
changes the flow state and does no I/O; serving `/metrics` is `collector.web`'s job.
"""

from __future__ import annotations

import contextvars
import platform
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from collector.core.evidence import EVIDENCE_STATUSES, WITNESS_KEY_PREFIX, PolicyEvidence
from collector.core.flowstate import Coverage, DeclaredStatus, FlowState, LatencySample
from collector.core.planning import FLOW_KINDS
from collector.core.statuses import STATUS_ORDER, Status
from collector.core.views import LoopStatus, compliance_ratio, nodes_needing_agents
from collector.dispatching import IntakeCounters
from collector.loop import LatencyMeasured, LoopEvent, ResultRecorded
from flowproof import __version__
from flowproof.probes import Outcome, ProbeKind, ProbeResult

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""What `CollectorMetrics.exposition()` returns: the text format 0.0.4."""

PROBE_DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
FEEDBACK_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

LOOP_LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

FLOW_LABELS = ("expectation", "flow", "namespace")
"""The labels of every per-declared-flow series, in exposition (sorted) order."""


def _number(value: float) -> str:
    """A sample value as prometheus-client writes it (Go's float formatting)."""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@dataclass
class _ScrapeView:
    """One reading of the flow state, shared by both halves of a fast exposition."""

    declared: list[DeclaredStatus]
    loop: LoopStatus
    needed_nodes: frozenset[str]
    flow_counts: dict[str, Counter[Status]] = field(default_factory=dict)
    evidence: list[PolicyEvidence] = field(default_factory=list)
    coverage: Coverage | None = None

    @property
    def standby(self) -> bool:
        return not self.loop.leading


# (help, type) of the per-declared-flow families; their samples are written by `render_flows`.
_FLOW_FAMILIES: dict[str, tuple[str, str]] = {
    "flowproof_flow_status": (
        "Status of a declared flow: 1 for its current status, 0 for every other "
        "(the worst status of its concrete flows).",
        "gauge",
    ),
    "flowproof_flow_observed_allowed": (
        "Concrete flows (pod pairs and ports) of a declared flow whose latest probe result was "
        "allowed.",
        "gauge",
    ),
    "flowproof_flow_observed_denied": (
        "Concrete flows (pod pairs and ports) of a declared flow whose latest probe result was "
        "denied.",
        "gauge",
    ),
    "flowproof_flow_last_verified_timestamp_seconds": (
        "When the least recently verified concrete flow of a declared flow got its latest result "
        "(absent until every one has one).",
        "gauge",
    ),
    "flowproof_flow_info": (
        "A declared flow's intent (allow or deny); always 1.",
        "gauge",
    ),
}

_SKIP_FLOW_FAMILIES: contextvars.ContextVar[_ScrapeView | None] = contextvars.ContextVar(
    "flowproof_skip_flow_families", default=None
)


class FlowStateCollector(Collector):
    """Every series derived from the flow state and the loop status, computed at collect time.

    Plain `generate_latest(registry)` gets everything through `collect()`. For speed,
    `CollectorMetrics.exposition` writes the per-declared-flow families itself (`render_flows`),
    which gives the same samples about sixty times faster than prometheus-client's generic path.
    """

    def __init__(self, state: FlowState, loop_status: Callable[[], LoopStatus]) -> None:
        self.state = state
        self.loop_status = loop_status
        self._label_cache: dict[tuple[str, str, str], str] = {}

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed at scrape time: nothing to check for name clashes up front

    def view(self) -> _ScrapeView:
        loop = self.loop_status()
        if not loop.leading:  # a standby has no results: its flow series would only mislead
            return _ScrapeView(declared=[], loop=loop, needed_nodes=frozenset())
        view = _ScrapeView(
            declared=self.state.declared(),
            loop=loop,
            needed_nodes=nodes_needing_agents(self.state),
        )
        for kind in FLOW_KINDS:
            view.flow_counts[kind] = self.state.counts(kind)
        view.evidence = self.state.evidence()
        view.coverage = self.state.coverage()
        return view

    def collect(self) -> Iterator[Metric]:
        skip = _SKIP_FLOW_FAMILIES.get()
        view = skip if skip is not None else self.view()
        yield _gauge(
            "flowproof_collector_leader",
            "1 when this collector acts (holds the Lease, or runs without leader election); 0 "
            "for a standby, which exports no flow, evidence or agent series.",
            0 if view.standby else 1,
        )
        if view.standby:
            return
        if skip is None:
            yield from self._flow_families(view.declared)
        yield from self._loop_families(view)

    # -- per declared flow -------------------------------------------------------------------------

    def _flow_families(self, declared: list[DeclaredStatus]) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(name, help_text, labels=list(FLOW_LABELS))
            for name, (help_text, _) in _FLOW_FAMILIES.items()
            if name not in ("flowproof_flow_status", "flowproof_flow_info")
        }
        status_family = GaugeMetricFamily(
            "flowproof_flow_status",
            _FLOW_FAMILIES["flowproof_flow_status"][0],
            labels=[*FLOW_LABELS, "status"],
        )
        info = GaugeMetricFamily(
            "flowproof_flow_info",
            _FLOW_FAMILIES["flowproof_flow_info"][0],
            labels=[*FLOW_LABELS, "intent"],
        )
        for item in declared:
            labels = [item.expectation, item.flow, item.namespace]
            for name in STATUS_ORDER:
                status_family.add_metric([*labels, name], 1.0 if name == item.status else 0.0)
            families["flowproof_flow_observed_allowed"].add_metric(labels, item.observed_allowed)
            families["flowproof_flow_observed_denied"].add_metric(labels, item.observed_denied)
            if item.last_verified_at is not None:
                families["flowproof_flow_last_verified_timestamp_seconds"].add_metric(
                    labels, item.last_verified_at
                )
            info.add_metric([*labels, "allow" if item.intent else "deny"], 1.0)
        yield status_family
        yield from families.values()
        yield info

    # -- evidence per policy ----------------------------------------------------------------------

    def _evidence_families(self, view: _ScrapeView) -> Iterator[Metric]:
        evidence = GaugeMetricFamily(
            "flowproof_policy_evidence",
            "Evidence status of a NetworkPolicy from its witness flows: 1 for its current status "
            "(PROVEN, NOT_ENFORCED, UNPROVABLE, PENDING), 0 for the others.",
            labels=["namespace", "policy", "status"],
        )
        by_status = GaugeMetricFamily(
            "flowproof_policies",
            "NetworkPolicies by their evidence status.",
            labels=["status"],
        )
        counts: Counter[str] = Counter()
        for item in view.evidence:
            counts[item.status] += 1
            for status in EVIDENCE_STATUSES:
                evidence.add_metric(
                    [item.namespace, item.name, status], 1.0 if status == item.status else 0.0
                )
        for status in EVIDENCE_STATUSES:
            by_status.add_metric([status], counts[status])
        yield evidence
        yield by_status
        coverage = view.coverage
        cells = GaugeMetricFamily(
            "flowproof_sweep_cells",
            "Cells of the model's truth table (source class, destination class, declared port) "
            "the sweep walks.",
        )
        cells.add_metric([], coverage.cells if coverage else 0)
        yield cells
        ratio = GaugeMetricFamily(
            "flowproof_sweep_coverage_ratio",
            "Share of the truth table's cells probed within the coverage window "
            "(coverage_window_seconds).",
        )
        if coverage is not None and coverage.ratio is not None:
            ratio.add_metric([], coverage.ratio)
        yield ratio

    # -- aggregates and loop health ----------------------------------------------------------------

    def _loop_families(self, view: _ScrapeView) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            "flowproof_compliance_ratio",
            "Declared flows proven as declared (PASS) over all declared flows, per namespace of "
            "the expectation.",
            labels=["namespace"],
        )
        for namespace, value in sorted(compliance_ratio(view.declared).items()):
            ratio.add_metric([namespace], value)
        yield ratio
        declared = GaugeMetricFamily(
            "flowproof_declared_flows",
            "Declared flows by their status.",
            labels=["status"],
        )
        declared_counts = Counter(item.status for item in view.declared)
        for status in STATUS_ORDER:
            declared.add_metric([status], declared_counts[status])
        yield declared
        flows = GaugeMetricFamily(
            "flowproof_flows",
            "Concrete flows (pod pairs and ports) by kind (declared, witness, sweep) and status.",
            labels=["kind", "status"],
        )
        for kind in FLOW_KINDS:
            counts = view.flow_counts[kind]
            for status in STATUS_ORDER:
                flows.add_metric([kind, status], counts[status])
        yield flows
        yield from self._evidence_families(view)
        loop = view.loop
        yield _gauge(
            "flowproof_nodes",
            "Nodes that must run an agent: they host a probe's source pod or a responder.",
            len(view.needed_nodes),
        )
        yield _gauge(
            "flowproof_agents_connected",
            "Agents connected to this collector.",
            len(loop.agent_nodes),
        )
        yield _gauge(
            "flowproof_nodes_without_agent",
            "Nodes that must run an agent and have none connected.",
            len(view.needed_nodes - loop.agent_nodes),
        )
        yield _gauge(
            "flowproof_assignments_queued",
            "Assignments waiting to be sent to an agent.",
            loop.assignments_queued,
        )
        yield _gauge(
            "flowproof_assignments_in_flight",
            "Assignments sent and still without a result.",
            loop.assignments_in_flight,
        )
        for name, help_text, total in (
            (
                "flowproof_assignments_issued",
                "Assignments issued by the planner.",
                loop.assignments_issued_total,
            ),
            (
                "flowproof_assignment_retries",
                "Retries issued to confirm a failing result before it is reported.",
                loop.assignment_retries_total,
            ),
            (
                "flowproof_assignments_lost",
                "Assignments that got no result in time and were redone.",
                loop.assignments_lost_total,
            ),
            (
                "flowproof_assignments_rate_limited",
                "Times a due assignment was held back by a per-node or per-destination limit.",
                loop.assignments_rate_limited_total,
            ),
        ):
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], total)
            yield counter
        plans = CounterMetricFamily(
            "flowproof_plans",
            "Plans applied: built whole, or updated from the one before for a few changed pods.",
            labels=["how"],
        )
        plans.add_metric(["whole"], loop.plans_whole_total)
        plans.add_metric(["update"], loop.plans_updated_total)
        yield plans

    # -- fast path ---------------------------------------------------------------------------------

    def render_flows(self, declared: list[DeclaredStatus]) -> str:
        """The per-declared-flow families in the text format, exactly as `collect()` gives them."""
        known = self._label_cache
        fresh: dict[tuple[str, str, str], str] = {}
        bases: list[str] = []
        for item in declared:
            key = (item.expectation, item.flow, item.namespace)
            base = known.get(key)
            if base is None:
                base = (
                    f'{{expectation="{_escape(item.expectation)}",flow="{_escape(item.flow)}",'
                    f'namespace="{_escape(item.namespace)}"'
                )
            fresh[key] = base
            bases.append(base)
        self._label_cache = fresh  # only flows that still exist: the cache never outgrows them
        out: list[str] = []
        add = out.append
        rows = list(zip(declared, bases, strict=True))
        for name, (help_text, kind) in _FLOW_FAMILIES.items():
            add(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            if name == "flowproof_flow_status":
                lines = {
                    s: (f',status="{s}"}} 1.0\n', f',status="{s}"}} 0.0\n') for s in STATUS_ORDER
                }
                for item, base in rows:
                    for status in STATUS_ORDER:
                        add(name)
                        add(base)
                        add(lines[status][0 if status == item.status else 1])
            elif name == "flowproof_flow_info":
                for item, base in rows:
                    add(f'{name}{base},intent="{"allow" if item.intent else "deny"}"}} 1.0\n')
            elif name == "flowproof_flow_last_verified_timestamp_seconds":
                for item, base in rows:
                    if item.last_verified_at is not None:
                        add(f"{name}{base}}} {_number(item.last_verified_at)}\n")
            else:
                allowed = name == "flowproof_flow_observed_allowed"
                for item, base in rows:
                    count = item.observed_allowed if allowed else item.observed_denied
                    add(f"{name}{base}}} {count}.0\n")  # a count: Go writes it as N.0
        return "".join(out)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


class IntakeCollector(Collector):
    """The dispatcher's refusals and corrections, read at scrape time."""

    def __init__(self, counters: Callable[[], IntakeCounters]) -> None:
        self.counters = counters

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        counters = self.counters()
        refused = CounterMetricFamily(
            "flowproof_results_refused",
            "Results acked but not delivered: not issued by this collector (unsigned or changed), "
            "issued to another node, answered already, never sent, issued too long ago, malformed.",
            labels=["reason"],
        )
        for reason, count in sorted(counters.results_refused.items()):
            refused.add_metric([reason], count)
        yield refused
        for name, help_text, total in (
            (
                "flowproof_result_timestamps_adjusted",
                "Results whose start time lay outside the time between issuing the assignment "
                "and receiving the result (an agent's clock off, or a forged time), taken within it.",
                counters.timestamps_adjusted_total,
            ),
            (
                "flowproof_streams_refused",
                "Agent streams refused: a bad or missing token, no hello, another protocol.",
                counters.streams_refused_total,
            ),
            (
                "flowproof_streams_refused_standby",
                "Agent streams ended at once because this collector was a standby (it did not "
                "hold the Lease); the agent tried again.",
                counters.standby_refusals_total,
            ),
            (
                "flowproof_results_duplicate",
                "Results received again (after a reconnect) and dropped as delivered already.",
                counters.duplicates_total,
            ),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], total)
            yield family


class CollectorMetrics:
    """All `flowproof_` metrics of the collector, registered in `registry`.

    It subscribes to the collector's events (`on_loop_event`: every result and the feedback
    latencies measured); everything else is read from `state` and `loop_status()` at scrape time.
    Use it from one event loop.
    """

    content_type = CONTENT_TYPE

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        state: FlowState,
        loop_status: Callable[[], LoopStatus] = LoopStatus,
        intake: Callable[[], IntakeCounters] | None = None,
        version: str = __version__,
    ) -> None:
        self.registry = registry
        self.probes_total = PromCounter(
            "flowproof_probes",
            "Probe results received, by probe protocol and raw outcome.",
            ["protocol", "outcome"],
            registry=registry,
        )
        self.probe_duration = Histogram(
            "flowproof_probe_duration_seconds",
            "How long probes took, from start to outcome, by probe protocol.",
            ["protocol"],
            buckets=PROBE_DURATION_BUCKETS,
            registry=registry,
        )
        self.change_to_verdict = Histogram(
            "flowproof_change_to_verdict_seconds",
            "Feedback latency: from a policy, pod or expectation change to the first fresh "
            "verdict on each flow it touched.",
            buckets=FEEDBACK_BUCKETS,
            registry=registry,
        )
        self.event_loop_lag = Histogram(
            "flowproof_event_loop_lag_seconds",
            "How late the collector's event loop ran a timer (scheduling delay, sampled every "
            "50 ms): how long gRPC streams, the web view and /metrics waited behind other work.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.witness_probes = PromCounter(
            "flowproof_witness_probes",
            "Probe results of witness flows (the evidence that each policy is enforced).",
            registry=registry,
        )
        self.build_info = Info(
            "flowproof_build", "Version of the flowproof collector.", registry=registry
        )
        self.build_info.info(
            {"version": version, "component": "collector", "python": platform.python_version()}
        )
        for kind in ProbeKind:
            self.probe_duration.labels(protocol=str(kind))
            for outcome in Outcome:
                self.probes_total.labels(protocol=str(kind), outcome=str(outcome))
        self.flow_state = FlowStateCollector(state, loop_status)
        registry.register(self.flow_state)
        if intake is not None:
            registry.register(IntakeCollector(intake))

    def on_loop_event(self, event: LoopEvent) -> None:
        """Count what a loop event carries (results and feedback latencies)."""
        if isinstance(event, ResultRecorded):
            self.observe_result(event.result)
        elif isinstance(event, LatencyMeasured):
            self.observe_latency(event.samples)

    def observe_loop_lag(self, seconds: float) -> None:
        """One sample of the event loop's scheduling delay (see `flowproof.aio.event_loop_lag`)."""
        self.event_loop_lag.observe(seconds)

    def observe_result(self, result: ProbeResult) -> None:
        """Count one probe result and its duration."""
        protocol = str(result.assignment.kind)
        self.probes_total.labels(protocol=protocol, outcome=str(result.outcome)).inc()
        if result.assignment.flow_key.startswith(WITNESS_KEY_PREFIX):
            self.witness_probes.inc()
        self.probe_duration.labels(protocol=protocol).observe(max(result.latency_seconds, 0.0))

    def observe_latency(self, samples: Iterable[LatencySample]) -> int:
        """Record feedback-latency samples (`FlowState.take_latency_samples()`); how many."""
        count = 0
        for sample in samples:
            self.change_to_verdict.observe(max(sample.seconds, 0.0))
            count += 1
        return count

    def exposition(self) -> bytes:
        """The registry in the text format 0.0.4 (`CONTENT_TYPE`): what `/metrics` serves.

        Same samples as `generate_latest(self.registry)`; the per-declared-flow families are
        written directly, which keeps a scrape of 10,000 flows well under 100 ms.
        """
        view = self.flow_state.view()
        token = _SKIP_FLOW_FAMILIES.set(view)
        try:
            head = generate_latest(self.registry)
        finally:
            _SKIP_FLOW_FAMILIES.reset(token)
        if view.standby:
            return head
        return head + self.flow_state.render_flows(view.declared).encode()


__all__ = ["CONTENT_TYPE", "CollectorMetrics", "FlowStateCollector", "IntakeCollector"]
