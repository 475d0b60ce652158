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
    "MODEL_INCOMPLETE",
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
    "MODEL_INCOMPLETE",
    "STALE",
    "PENDING",
    "PASS",
)


FAILING: frozenset[Status] = frozenset(
    {"REQUIRED_BLOCKED", "FORBIDDEN_OPEN", "POLICY_MISMATCH", "ENFORCEMENT_DRIFT"}
)
"""Statuses that fail a gate (exit 1)."""

UNDECIDED: frozenset[Status] = frozenset({"INCONCLUSIVE", "MODEL_INCOMPLETE", "PENDING", "STALE"})
"""Statuses that leave a gate undecided (exit 2 when nothing fails).

MODEL_INCOMPLETE: the model cannot say what the policies do for this flow (another plugin's policy
objects may select its pods, a peer or a tie the model does not resolve), so intent cannot be
compared with the model, nor the model with reality: never POLICY_MISMATCH or ENFORCEMENT_DRIFT.
It is not INCONCLUSIVE, which says the probe could not decide: here reality may be perfectly
clear, the model is what is missing, and the remedy is another (know that kind of policy, or
accept that flowproof does not), so it is kept apart in reports, metrics and alerts."""

RealityVerdict = Literal["allow", "deny", "inconclusive"]
"""What a probe result says about a flow."""


def status_rank(status: Status) -> int:
    return STATUS_ORDER.index(status)


def model_status(intent: bool, model_allowed: bool, *, model_known: bool = True) -> Status:
    """Offline status: intent against the model (MODEL_INCOMPLETE when the model is unknown)."""
    if not model_known:
        return "MODEL_INCOMPLETE"
    return "PASS" if intent == model_allowed else "POLICY_MISMATCH"


def flow_status(
    intent: bool,
    model: bool,
    reality: RealityVerdict | None,
    *,
    stale: bool = False,
    model_known: bool = True,
) -> Status:
    """The status of a flow from its three truths (DESIGN.md), `stale` when its result is old.

    Intent against the model needs no packet: when reality is missing, inconclusive or old, a
    disagreement between them is still a certain POLICY_MISMATCH. With the model unknown
    (`model_known` False) only intent and reality can be compared: a reality that contradicts
    intent is still REQUIRED_BLOCKED or FORBIDDEN_OPEN, one that agrees is MODEL_INCOMPLETE (the
    model cannot confirm it), and nothing is ever POLICY_MISMATCH or ENFORCEMENT_DRIFT.
    """
    if not model_known:
        if stale and reality is not None:
            return "STALE"
        if reality is None:
            return "MODEL_INCOMPLETE"
        if reality == "inconclusive":
            return "INCONCLUSIVE"
        if (reality == "allow") == intent:
            return "MODEL_INCOMPLETE"
        return "REQUIRED_BLOCKED" if intent else "FORBIDDEN_OPEN"
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
