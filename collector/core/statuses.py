"""Statuses: the words for how a flow stands (DESIGN.md), their order, and how they are decided.

Owns `Status`, the worst-first order every report and aggregate uses, which statuses fail a gate
and which leave it undecided, and the two rules that decide a status: intent against the model
offline (`model_status`) and the three truths live (`flow_status`). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Status = Literal[
    "PASS",
    "REQUIRED_BLOCKED",
    "FORBIDDEN_OPEN",
    "POLICY_MISMATCH",
    "ENFORCEMENT_DRIFT",
    "INCONCLUSIVE",
    "PENDING",
    "STALE",
]


# Worst first: the order in which reports group and the status an expectation takes from its flows.
STATUS_ORDER: tuple[Status, ...] = (
    "REQUIRED_BLOCKED",
    "FORBIDDEN_OPEN",
    "POLICY_MISMATCH",
    "ENFORCEMENT_DRIFT",
    "INCONCLUSIVE",
    "STALE",
    "PENDING",
    "PASS",
)


FAILING: frozenset[Status] = frozenset(
    {"REQUIRED_BLOCKED", "FORBIDDEN_OPEN", "POLICY_MISMATCH", "ENFORCEMENT_DRIFT"}
)
"""Statuses that fail a gate (exit 1)."""

UNDECIDED: frozenset[Status] = frozenset({"INCONCLUSIVE", "PENDING", "STALE"})
"""Statuses that leave a gate undecided (exit 2 when nothing fails)."""

RealityVerdict = Literal["allow", "deny", "inconclusive"]
"""What a probe result says about a flow."""


def status_rank(status: Status) -> int:
    return STATUS_ORDER.index(status)


def model_status(intent: bool, model_allowed: bool) -> Status:
    """Offline status: intent against the model."""
    return "PASS" if intent == model_allowed else "POLICY_MISMATCH"


def flow_status(
    intent: bool, model: bool, reality: RealityVerdict | None, *, stale: bool = False
) -> Status:
    """The status of a flow from its three truths (DESIGN.md), `stale` when its result is old.

    Intent against the model needs no packet: when reality is missing, inconclusive or old, a
    disagreement between them is still a certain POLICY_MISMATCH.
    """
    if (reality is None or reality == "inconclusive" or stale) and intent != model:
        return "POLICY_MISMATCH"
    if reality is None:
        return "PENDING"
    if stale:  # an old answer, inconclusive or not, says nothing about now
        return "STALE"
    if reality == "inconclusive":
        return "INCONCLUSIVE"
    observed = reality == "allow"
    if model == observed:
        if intent == model:
            return "PASS"
        return "REQUIRED_BLOCKED" if intent else "FORBIDDEN_OPEN"
    return "ENFORCEMENT_DRIFT" if intent == model else "POLICY_MISMATCH"


def worst(statuses: Iterable[Status]) -> Status | None:
    """The worst status (STATUS_ORDER), or None when there is none."""
    return min(statuses, key=status_rank, default=None)
