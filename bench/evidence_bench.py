"""Evidence benchmark: witness planning on the synthetic 10,000-pod cluster, and the sweep's reach.

For the project's synthetic cluster (bench/synthetic.py: 10,000 pods, 100 namespaces, 500
policies, and running pods on three nodes) it measures, in this process:

- witness planning time (`plan_evidence` over the equivalence classes, the classes built apart,
  side by side with the whole `build_plan` of the live loop);
- witnesses per policy and per rule, and how many policies and rules have none, by reason;
- the sweep's truth table (cells) and its coverage per minute at the collector's default budget.

Goals (issue 10): planning ≤ 2 s and ≤ 3 witnesses per rule on average. With `--mutations FILE`
it also prints the mutation score and detection times the lab test wrote
(tests/lab/test_lab_evidence.py: test-artifacts/evidence-mutations.json).

    python -m bench.evidence_bench [--pods 10000] [--namespaces 100] [--policies 500] [--repeat 3]
        [--generator repeating|distinct] [--no-whole]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time
from collections import Counter
from pathlib import Path

from bench.synthetic import make_cluster, make_distinct_cluster
from collector.core.classes import ClassModel
from collector.core.evidence import plan_evidence
from collector.core.model import Pod, Snapshot
from collector.core.planning import build_plan
from collector.core.settings import PlannerSettings
from collector.core.sweeping import SweepTable

DEFAULT_MUTATIONS = (
    Path(__file__).resolve().parents[1] / "test-artifacts" / "evidence-mutations.json"
)


def running(snapshot: Snapshot) -> Snapshot:
    """The cluster as a live one: every pod running on one of three nodes."""

    def run(i: int, pod: Pod) -> Pod:
        return dataclasses.replace(pod, phase="Running", node=f"node-{i % 3}", workload=None)

    return dataclasses.replace(snapshot, pods=tuple(run(i, p) for i, p in enumerate(snapshot.pods)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mutations", type=Path, default=DEFAULT_MUTATIONS)
    parser.add_argument(
        "--generator",
        choices=["repeating", "distinct"],
        default="repeating",
        help="distinct: make_distinct_cluster, selectors of their own per namespace",
    )
    parser.add_argument("--no-whole", action="store_true", help="skip the whole build_plan")
    args = parser.parse_args(argv)
    make = make_cluster if args.generator == "repeating" else make_distinct_cluster
    snapshot = running(make(args.pods, args.namespaces, args.policies, 7))
    model_s, plan_s, whole_s = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model = ClassModel(snapshot)
        t1 = time.perf_counter()
        plan = plan_evidence(snapshot, model=model)
        t2 = time.perf_counter()
        if not args.no_whole:
            build_plan(snapshot, PlannerSettings())
        t3 = time.perf_counter()
        model_s.append(t1 - t0)
        plan_s.append(t2 - t1)
        whole_s.append(t3 - t2)
    rules = [r for p in plan.policies for r in p.rules]
    per_policy = [len(p.all_witnesses()) for p in plan.policies]
    per_rule = [len(r.witnesses) for r in rules]
    unprovable = Counter(p.unprovable.split(":")[0] for p in plan.policies if p.unprovable)
    rule_reasons = Counter(r.unprovable.split(":")[0] for r in rules if r.unprovable)
    table = SweepTable(snapshot, model)
    budget = PlannerSettings().sweep_probes_per_second
    result = {
        "pods": len(snapshot.pods),
        "policies": len(snapshot.policies),
        "rules": len(rules),
        "classes": model.classes,
        "class_model_seconds_median": round(statistics.median(model_s), 3),
        "witness_planning_seconds_median": round(statistics.median(plan_s), 3),
        "build_plan_seconds_median": round(statistics.median(whole_s), 3),
        "witness_flows": len({w.flow_key for w in plan.witnesses()}),
        "witnesses_per_policy_mean": round(statistics.mean(per_policy), 2),
        "witnesses_per_rule_mean": round(statistics.mean(per_rule), 2) if per_rule else 0.0,
        "witnesses_per_rule_max": max(per_rule, default=0),
        "policies_unprovable_by_reason": dict(unprovable),
        "rules_without_witness_by_reason": dict(rule_reasons),
        "sweep_cells": table.size,
        "sweep_budget_per_second": budget,
        "sweep_coverage_per_minute": round(min(1.0, budget * 60 / table.size), 4)
        if table.size
        else None,
        "sweep_full_turn_minutes": round(table.size / budget / 60, 1) if table.size else None,
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result, indent=2))
    if args.mutations.exists():
        measured = json.loads(args.mutations.read_text(encoding="utf-8"))
        policies = measured.get("policies", {})
        print(
            json.dumps(
                {
                    "lab_mutation_score": policies.get("score"),
                    "lab_effective_policies": policies.get("effective"),
                    "lab_detected": policies.get("detected"),
                    "lab_detection_median_seconds": policies.get("median_seconds"),
                    "lab_detection_max_seconds": policies.get("max_seconds"),
                    "lab_detection_bound_seconds": policies.get("bound_seconds"),
                    "lab_feature_faults": measured.get("faults"),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
