"""The PolicyReport of a namespace (wgpolicyk8s.io/v1alpha2): one result per NetworkPolicy."""

from __future__ import annotations

from make import make_pod, make_policy, make_snapshot, peer, rule, sel

from collector.cluster import POLICY_REPORT_NAME, policy_report
from collector.core.evidence import FlowOutcome, evidence_of, plan_evidence

DB = make_pod("shop/db", labels={"app": "db"}, ports=((5432, "TCP", "pg"),), ip="10.244.1.3")
API = make_pod("shop/api", labels={"app": "api"}, ports=((8080, "TCP", None),), ip="10.244.1.2")
POLICIES = (
    make_policy(
        "db-from-api", "shop", selector=sel({"app": "db"}), ingress=[rule(peer({"app": "api"}))]
    ),
    make_policy("ghost", "shop", selector=sel({"app": "ghost"})),
)


def test_proven_is_pass_not_enforced_is_fail_and_unprovable_is_skip_with_the_reason() -> None:
    snapshot = make_snapshot([DB, API], POLICIES)
    plan = plan_evidence(snapshot, running_only=False)
    keys = [w.flow_key for w in plan.witnesses()]
    evidence = evidence_of(plan, {k: FlowOutcome("PASS", "") for k in keys})
    report = policy_report("shop", evidence, 1_800_000_000.5)
    assert report["apiVersion"] == "wgpolicyk8s.io/v1alpha2" and report["kind"] == "PolicyReport"
    assert report["metadata"]["name"] == POLICY_REPORT_NAME
    assert report["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "flowproof"
    by_policy = {r["policy"]: r for r in report["results"]}
    assert by_policy["db-from-api"]["result"] == "pass"
    assert by_policy["ghost"]["result"] == "skip"
    assert by_policy["ghost"]["message"] == "UNPROVABLE: it selects no pod"
    assert by_policy["db-from-api"]["resources"] == [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "namespace": "shop",
            "name": "db-from-api",
        }
    ]
    assert report["summary"] == {"pass": 1, "fail": 0, "warn": 0, "error": 0, "skip": 1}
    assert by_policy["db-from-api"]["timestamp"] == {"seconds": 1_800_000_000, "nanos": 0}
    broken = evidence_of(
        plan, {k: FlowOutcome("ENFORCEMENT_DRIFT", "the network does not") for k in keys}
    )
    failed = policy_report("shop", broken, 0)
    (result,) = [r for r in failed["results"] if r["policy"] == "db-from-api"]
    assert (result["result"], result["severity"]) == ("fail", "high")
    assert result["message"].startswith("NOT_ENFORCED: shop/db-from-api")
