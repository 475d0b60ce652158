"""Tiers benchmark: whole-cluster counts with ClusterNetworkPolicies of both tiers, and per flow.

The synthetic clusters of bench/synthetic.py (100 namespaces, 500 NetworkPolicies, seed 7) with
`--cluster-policies` ClusterNetworkPolicies added (Admin and Baseline, deny, accept and pass rules
over namespace and pod selectors, a port range, a named port and a networks peer): the class
count, the time to build the class model and to count every ordered pair on 8080/TCP, and the
engine's time per evaluated flow. In-process, best of `--repeat`.

    python -m bench.tiers_bench [--sizes 1000 10000] [--cluster-policies 0 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import time
from dataclasses import replace

from bench.synthetic import make_cluster
from collector.core.classes import ClassModel
from collector.core.engine import Engine
from collector.core.model import (
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    LabelSelector,
    Requirement,
    Snapshot,
)


def cluster_policies(snapshot: Snapshot, count: int, seed: int) -> tuple[ClusterNetworkPolicy, ...]:
    rng = random.Random(seed)
    names = sorted(snapshot.namespaces)
    apps = sorted({p.labels.get("app", "") for p in snapshot.pods} - {""})

    def namespaces(k: int) -> LabelSelector:
        return LabelSelector(
            (), (Requirement(NAMESPACE_NAME_LABEL, "In", tuple(rng.sample(names, k))),)
        )

    result = []
    for i in range(count):
        tier = "Admin" if i % 2 == 0 else "Baseline"
        peer = ClusterPeer(namespace_selector=namespaces(3))
        pods = ClusterPeer(
            namespace_selector=LabelSelector(),
            pod_selector=LabelSelector((("app", rng.choice(apps)),)),
        )
        networks = ClusterPeer(networks=(ipaddress.ip_network("203.0.113.0/24"),))
        rules = (
            ClusterRule(
                "Pass" if tier == "Admin" else "Accept", (pods,), (ClusterPort("TCP", 8000, 8100),)
            ),
            ClusterRule("Deny", (peer,), (ClusterPort(None, name="http"),)),
            ClusterRule(rng.choice(("Accept", "Deny")), (peer, networks)),
        )
        result.append(
            ClusterNetworkPolicy(
                name=f"cnp-{i}",
                tier=tier,  # type: ignore[arg-type]
                priority=rng.randrange(0, 50),
                subject_namespaces=namespaces(5),
                ingress=rules,
                egress=rules[1:],
            )
        )
    return tuple(result)


def best(repeat: int, fn: object) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cluster-policies", type=int, nargs="+", default=[0, 20])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for size in args.sizes:
        base = make_cluster(size, 100, 500, 7)
        for count in args.cluster_policies:
            snapshot = replace(base, cluster_policies=cluster_policies(base, count, 11))
            model = ClassModel(snapshot)
            counts = model.counts(8080, "TCP")
            build = best(args.repeat, lambda s=snapshot: ClassModel(s))
            count_time = best(args.repeat, lambda m=model: m.counts(8080, "TCP"))
            engine = Engine(snapshot)
            pods = snapshot.pods[:200]
            flows = len(pods) * len(pods)
            per_flow = best(
                args.repeat,
                lambda e=engine, p=pods: [e.evaluate(a, b, 8080, "TCP") for a in p for b in p],
            )
            print(
                json.dumps(
                    {
                        "pods": size,
                        "cluster_policies": count,
                        "classes": counts.classes,
                        "allowed": counts.allowed,
                        "unknown": counts.unknown,
                        "class_model_seconds": round(build, 3),
                        "count_seconds": round(count_time, 3),
                        "engine_microseconds_per_flow": round(per_flow / flows * 1e6, 1),
                    }
                )
            )


if __name__ == "__main__":
    main()
