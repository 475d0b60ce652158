"""Faults: enforcement that deviates from the policies on purpose (`lab fault`).

Owns the fault modes, parsing a mode and its arguments (InputError before anything changes), and
the change itself: the new faults are recorded and the policies enforced again with them (`clear`
also applies any lagged change at once). What each fault does to the rules is lab/enforcement.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from collector.core.evidence import plan_evidence
from collector.core.model import Namespace, Snapshot
from flowproof.errors import InputError
from lab.enforcing import enforce, load_policies
from lab.report import ChangeReport
from lab.state import Faults, LabPaths, LabState

FAULT_MODES = ("ignore-policy", "lag", "reject", "ignore-named-ports", "ignore-endport", "clear")

FaultChange = Callable[[Faults], Faults]

_SWITCHES: dict[str, FaultChange] = {
    "reject": lambda f: dataclasses.replace(f, reject=True),
    "ignore-named-ports": lambda f: dataclasses.replace(f, ignore_named_ports=True),
    "ignore-endport": lambda f: dataclasses.replace(f, ignore_endport=True),
}


def parse_fault(mode: str, args: Sequence[str]) -> FaultChange | None:
    """A function old faults -> new faults, or None for `clear`; InputError on bad input."""

    def expect(count: int, usage: str) -> None:
        if len(args) != count:
            raise InputError(f"usage: lab fault {mode} {usage}".rstrip(), field="fault")

    if mode == "clear":
        expect(0, "")
        return None
    if mode == "ignore-policy":
        expect(1, "NAMESPACE/NAME")
        key = args[0]
        if key.count("/") != 1 or not all(key.split("/")):
            raise InputError(f"{key!r} is not NAMESPACE/NAME", field="fault ignore-policy")
        return lambda f: dataclasses.replace(f, ignore_policies=sorted({*f.ignore_policies, key}))
    if mode == "lag":
        expect(1, "SECONDS")
        try:
            seconds = float(args[0])
        except ValueError as exc:
            raise InputError(f"{args[0]!r} is not a number of seconds", field="fault lag") from exc
        if not 0 <= seconds <= 3600:
            raise InputError("must be from 0 to 3600 seconds", field="fault lag")
        return lambda f: dataclasses.replace(f, lag_seconds=seconds)
    if mode in _SWITCHES:
        expect(0, "")
        return _SWITCHES[mode]
    raise InputError(f"unknown fault {mode!r}; one of {', '.join(FAULT_MODES)}", field="fault")


def ignored_policy_notes(state: LabState, key: str) -> list[str]:
    """What ignoring `key` will show (InputError when the lab has no such policy): a policy that
    other policies make redundant changes no verdict, so the loop cannot see it ignored."""
    policies = load_policies(state)
    known = sorted(p.key for p in policies)
    if key not in known:
        raise InputError(
            f"the lab has no NetworkPolicy {key!r} (policies: {', '.join(known) or 'none'})",
            field="fault ignore-policy",
        )
    snapshot = Snapshot(
        namespaces={name: Namespace(name, labels) for name, labels in state.namespaces.items()},
        pods=tuple(r.to_pod() for r in state.pods),
        policies=tuple(policies),
    )
    # Every lab pod runs (the lab's records stand for their workloads' pods, hence not live).
    (plan,) = plan_evidence(snapshot, policies=[key], running_only=False).policies
    if plan.all_witnesses():
        shown = plan.all_witnesses()[0]
        return [f"{key} ignored: its witness {shown.describe()} will show it NOT_ENFORCED"]
    return [
        f"{key} has no witness ({plan.unprovable}): ignoring it changes nothing the packets can "
        "show; `flowproof evidence -f MANIFESTS` lists the policies that have witnesses"
    ]


def change_faults(paths: LabPaths, state: LabState, change: FaultChange | None) -> ChangeReport:
    """Record the changed faults (None: none at all) and enforce the policies with them."""
    report = ChangeReport()
    if change is None:
        state.faults = Faults()
        enforce(paths, state, report, flush=True)
        report.notes.append("faults cleared: the kernel enforces the policies as written")
    else:
        state.faults = change(state.faults)
        enforce(paths, state, report)
        report.notes.append("faults: " + (", ".join(state.faults.describe()) or "none"))
    return report
