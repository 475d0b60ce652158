"""Update benchmark: one pod change re-planned by updating the plan before, against a whole plan.

A synthetic cluster (`--generator repeating`: `make_cluster`, selectors shared across namespaces;
`distinct`: `make_distinct_cluster`) with `--flows` declared flows is planned whole once
(`prepare_plan`). Then `--changes` single-pod changes, each on the snapshot before, alternate
between a label no selector reads (`version`) and a move to another workload's labels (the pod
leaves its declared flows and joins others'); with `--change policies`, each change removes a
random policy or puts the policies back (every declared flow planned again, witnesses
pending). Each is planned by `prepare_update` from the plan
before (timed, with the loop's destination-policy check), and the first `--whole` of them also
whole, side by side in the same process. Every updated plan's declared flows are compared with the
whole plan's where both were built. Bounded: the changes are a fixed count.

    python -m bench.update_bench [--generator repeating] [--pods 100000] [--flows 100]
        [--changes 20] [--whole 1] [--no-witnesses] [--change pods|policies]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import statistics
import time

from bench.synthetic import make_cluster, make_distinct_cluster, with_expectations
from collector.core.changes import diff_snapshots
from collector.core.destinations import destination_policy, still_covers
from collector.core.model import Snapshot
from collector.core.scheduling import PreparedPlan, prepare_plan, prepare_update
from collector.core.settings import PlannerSettings


def _changed(snapshot: Snapshot, rng: random.Random, i: int) -> Snapshot:
    pods = list(snapshot.pods)
    j = rng.randrange(len(pods))
    pod = pods[j]
    if i % 2 == 0:
        labels = {**pod.labels, "version": f"u{i}"}
    else:
        other = pods[rng.randrange(len(pods))]
        labels = {**other.labels, "version": pod.labels.get("version", "")}
    pods[j] = dataclasses.replace(pod, labels=labels)
    return dataclasses.replace(snapshot, pods=tuple(pods))


def _policy_changed(snapshot: Snapshot, rng: random.Random, i: int, first: Snapshot) -> Snapshot:
    """Change `i` of the policies: a random policy removed (even), the policies as they were
    first (odd)."""
    if i % 2 == 1:
        return dataclasses.replace(snapshot, policies=first.policies)
    j = rng.randrange(len(snapshot.policies))
    return dataclasses.replace(
        snapshot, policies=snapshot.policies[:j] + snapshot.policies[j + 1 :]
    )


def _declared(prepared: PreparedPlan) -> object:
    plan = prepared.plan
    return plan.declared, {k: f for k, f in plan.flows.items() if f.kind == "declared"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", choices=["repeating", "distinct"], default="repeating")
    parser.add_argument("--pods", type=int, default=100_000)
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--whole", type=int, default=1)
    parser.add_argument("--no-witnesses", action="store_true")
    parser.add_argument(
        "--change",
        choices=["pods", "policies"],
        default="pods",
        help="what each change alters: one pod, or the policies (one removed, then put back)",
    )
    args = parser.parse_args()
    settings = PlannerSettings(witnesses=not args.no_witnesses)
    make = make_cluster if args.generator == "repeating" else make_distinct_cluster
    if args.generator == "repeating":
        cluster = make(args.pods, max(1, args.pods // 100), max(1, args.pods // 25), 5)
    else:
        cluster = make(args.pods, max(1, args.pods // 10), max(1, args.pods // 5), 7)
    snapshot = with_expectations(cluster, args.flows, 1)
    snapshot = dataclasses.replace(snapshot, pods=tuple(sorted(snapshot.pods, key=lambda p: p.key)))
    started = time.perf_counter()
    prepared = prepare_plan(snapshot, settings, generation=1)
    first = time.perf_counter() - started
    policy = destination_policy((prepared.plan,), snapshot, settings.cluster_dns_ip)
    print(
        json.dumps(
            {
                "generator": args.generator,
                "pods": len(snapshot.pods),
                "policies": len(snapshot.policies),
                "declared": len(prepared.plan.declared),
                "flows": len(prepared.plan.flows),
                "witnesses": settings.witnesses,
                "change": args.change,
                "whole_plan_s": round(first, 2),
            }
        ),
        flush=True,
    )
    rng = random.Random(3)
    initial = snapshot
    updates: list[float] = []
    wholes: list[float] = []
    kept_policy = fallbacks = 0
    for i in range(args.changes):
        if args.change == "pods":
            after = _changed(snapshot, rng, i)
        else:
            after = _policy_changed(snapshot, rng, i, initial)
        change = diff_snapshots(snapshot, after, generation=i + 2, at=0.0)
        started = time.perf_counter()
        updated = prepare_update(prepared, after, change, settings, generation=i + 2)
        if updated is not None:
            moved = [p for k in change.pods_changed if (p := after.pod(k))]
            if still_covers(policy, updated.plan, prepared.plan.flows, moved):
                kept_policy += 1
            else:
                policy = destination_policy(
                    (prepared.plan, updated.plan), after, settings.cluster_dns_ip
                )
        elapsed = time.perf_counter() - started
        row: dict[str, object] = {"change": i, "update_ms": round(1000 * elapsed, 1)}
        if updated is None:
            fallbacks += 1
            row["update_ms"] = None
        else:
            updates.append(elapsed)
        if i < args.whole or updated is None:
            started = time.perf_counter()
            whole = prepare_plan(after, settings, generation=i + 2)
            row["whole_ms"] = round(1000 * (time.perf_counter() - started), 1)
            wholes.append(time.perf_counter() - started)
            if updated is not None:
                row["declared_equal"] = _declared(updated) == _declared(whole)
                assert row["declared_equal"], f"change {i}: the update differs from a whole plan"
        print(json.dumps(row), flush=True)
        prepared = updated if updated is not None else whole
        snapshot = after
    summary = {
        "updates": len(updates),
        "fell_back_to_whole": fallbacks,
        "destination_policy_kept": kept_policy,
        "update_median_ms": round(1000 * statistics.median(updates), 1) if updates else None,
        "update_p95_ms": round(1000 * sorted(updates)[int(0.95 * (len(updates) - 1))], 1)
        if updates
        else None,
        "update_max_ms": round(1000 * max(updates), 1) if updates else None,
        "whole_median_ms": round(1000 * statistics.median(wholes), 1) if wholes else None,
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if updates and wholes:
        summary["whole_over_update"] = round(statistics.median(wholes) / statistics.median(updates))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
