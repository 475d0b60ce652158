"""How the live loop plans, schedules and judges probes: one frozen dataclass and its rules.

Owns `PlannerSettings` (the settings the planner, the scheduler and the flow state share) and the
freshness rule: a flow is STALE only after the longest gap two results of it can have. Every
service that configures the loop (the collector, the lab) composes these settings; none repeats
them. Pure.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from collector.core.resolving import DEFAULT_CLUSTER_DNS_IP
from flowproof.errors import ConfigurationError


@dataclass(frozen=True)
class PlannerSettings:
    """How the live loop plans, schedules and judges probes (planner and flow state)."""

    probe_timeout_seconds: float = 2.0
    """How long a probe waits for an answer; no answer within it is a TIMEOUT (dropped)."""
    interval_seconds: float = 10.0
    """The steady cadence: every flow is probed again about this often."""
    jitter_fraction: float = 0.2
    """Each flow's next probe is `interval_seconds` times a random factor in 1 ± this."""
    max_pairs_per_flow: int = 16
    """A declared flow with at most this many pod pairs has every pair probed; above it,
    representatives per (source class, destination class) are."""
    representatives_per_class_pair: int = 1
    """How many pod pairs stand for one (source class, destination class) of a large flow."""
    witnesses: bool = True
    """Probe every policy's and rule's witness flows (evidence that each policy is enforced)."""
    sweep_probes_per_second: float = 2.0
    """Cluster-wide budget of the truth-table sweep: cells of the model's truth table probed per
    second, in a rotating order (0 turns the sweep off)."""
    sweep_random_fraction: float = 0.2
    """Share of each sweep batch drawn at random (random pods of random cells) instead of in
    order, to find faults tied to neither a policy nor a representative pod."""
    sweep_seed: int = 0
    """Seed of the sweep's order and its random picks: same inputs, same order."""
    coverage_window_seconds: float = 600.0
    """The window the sweep's coverage is reported over (cells probed within it / all cells)."""
    max_per_node_per_second: float = 200.0
    """At most this many assignments per second for one source node."""
    max_per_destination_per_second: float = 20.0
    """At most this many assignments per second towards one destination address."""
    settle_seconds: float = 1.0
    """A flow a change touched is probed at once and again this long after (0: not again): the
    network may enforce the change a moment after the API holds it (a CNI agent, the lab's
    mirror), and that is then seen at once instead of a whole interval later."""
    result_grace_seconds: float = 10.0
    """An assignment with no result after its timeout plus this is taken as lost and redone."""
    freshness_seconds: float = 30.0
    """A flow whose last result is older than this is STALE."""
    results_kept: int = 10
    """Probe results kept per flow."""
    history_kept: int = 50
    """Status changes kept per flow."""
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP
    """The cluster DNS service address that `dns: cluster` flows query."""

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "probe_timeout_seconds",
            "interval_seconds",
            "max_per_node_per_second",
            "max_per_destination_per_second",
        ):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.sweep_random_fraction <= 1:
            problems.append(
                f"sweep_random_fraction must be in [0, 1], not {self.sweep_random_fraction}"
            )
        if not self.coverage_window_seconds > 0:
            problems.append("coverage_window_seconds must be positive")
        if not 0 <= self.jitter_fraction < 1:
            problems.append(f"jitter_fraction must be in [0, 1), not {self.jitter_fraction}")
        for name in ("max_pairs_per_flow", "representatives_per_class_pair", "results_kept"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in (
            "sweep_probes_per_second",
            "history_kept",
            "result_grace_seconds",
            "settle_seconds",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, not {getattr(self, name)}")
        freshness = freshness_problem(
            self.freshness_seconds,
            interval_seconds=self.interval_seconds,
            jitter_fraction=self.jitter_fraction,
            probe_timeout_seconds=self.probe_timeout_seconds,
        )
        if freshness:
            problems.append(f"freshness_seconds ({self.freshness_seconds}) {freshness}")
        try:
            ipaddress.ip_address(self.cluster_dns_ip)
        except ValueError:
            problems.append(f"cluster_dns_ip: {self.cluster_dns_ip!r} is not an IP address")
        if problems:
            raise ConfigurationError("; ".join(problems))


def longest_result_gap(
    *, interval_seconds: float, jitter_fraction: float, probe_timeout_seconds: float
) -> float:
    """The longest time two consecutive results of a flow can be apart while the loop is well:
    one cadence interval at its largest jitter, plus the probe's own timeout."""
    return interval_seconds * (1 + jitter_fraction) + probe_timeout_seconds


def freshness_problem(
    freshness_seconds: float,
    *,
    interval_seconds: float,
    jitter_fraction: float,
    probe_timeout_seconds: float,
) -> str | None:
    """Why a freshness bound would call healthy flows STALE, or None when it cannot.

    The one freshness rule: a result is fresh until a newer one is overdue, so the bound must
    exceed `longest_result_gap`.
    """
    gap = longest_result_gap(
        interval_seconds=interval_seconds,
        jitter_fraction=jitter_fraction,
        probe_timeout_seconds=probe_timeout_seconds,
    )
    if freshness_seconds > gap:
        return None
    return (
        "must exceed the longest gap between two results of a flow, "
        f"interval × (1 + jitter) + timeout = {gap:g}"
    )


__all__ = ["PlannerSettings", "freshness_problem", "longest_result_gap"]
