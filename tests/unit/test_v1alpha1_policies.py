"""The older AdminNetworkPolicy and BaselineAdminNetworkPolicy (v1alpha1), mapped onto the tiers.

Reading follows sigs.k8s.io/network-policy-api v0.3.0 apis/v1alpha1 (kubebuilder markers): ANP has
a priority 0-1000 and Allow/Deny/Pass, BANP is the singleton `default` with Allow/Deny only; ports
are portNumber (protocol defaults to TCP), portRange or namedPort. And every conformance case of
the ClusterNetworkPolicy API, rewritten in v1alpha1 where it can be (Admin CNPs as ANPs, a single
Baseline CNP as the BANP, no Pass in Baseline), gets the same verdict for every probe.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.core.engine import Engine
from collector.core.model import Snapshot
from collector.reading.clusterpolicies import cluster_policy_from_dict
from collector.reading.fields import Where
from collector.reading.manifests import load_snapshot
from flowproof.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from loader import ApiStep, load_npapi_cases, write_npapi_step_manifests


def anp(spec: dict[str, Any], kind: str = "AdminNetworkPolicy", name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


SUBJECT = {"namespaces": {"matchLabels": {"team": "a"}}}
FROM_ALL = [{"namespaces": {}}]


def test_an_admin_network_policy_reads_as_the_admin_tier_with_allow_as_accept() -> None:
    policy = cluster_policy_from_dict(
        anp(
            {
                "priority": 7,
                "subject": SUBJECT,
                "ingress": [
                    {
                        "name": "web",
                        "action": "Allow",
                        "from": FROM_ALL,
                        "ports": [
                            {"portNumber": {"port": 80}},
                            {"portRange": {"protocol": "UDP", "start": 5000, "end": 5100}},
                            {"namedPort": "dns"},
                        ],
                    }
                ],
            }
        ),
        Where(file="anp.yaml"),
    )
    assert (policy.key, policy.tier, policy.priority) == ("AdminNetworkPolicy/p", "Admin", 7)
    (rule,) = policy.ingress
    assert rule.action == "Accept" and policy.action_word(rule.action) == "Allow"
    assert [(p.protocol, p.port, p.end_port, p.name) for p in rule.ports] == [
        ("TCP", 80, None, None),
        ("UDP", 5000, 5100, None),
        (None, None, None, "dns"),
    ]


@pytest.mark.parametrize(
    ("doc", "field", "says"),
    [
        pytest.param(
            anp(
                {"subject": SUBJECT, "ingress": [{"action": "Allow", "from": FROM_ALL}]},
                "BaselineAdminNetworkPolicy",
                "other",
            ),
            "metadata.name",
            "must be 'default'",
            id="the BaselineAdminNetworkPolicy is the singleton named default",
        ),
        pytest.param(
            anp(
                {"subject": SUBJECT, "ingress": [{"action": "Pass", "from": FROM_ALL}]},
                "BaselineAdminNetworkPolicy",
                "default",
            ),
            "spec.ingress[0].action",
            "unsupported value 'Pass'",
            id="a BaselineAdminNetworkPolicy has Allow and Deny only",
        ),
        pytest.param(
            anp({"subject": SUBJECT, "ingress": [{"action": "Accept", "from": FROM_ALL}]}),
            "spec.ingress[0].action",
            "unsupported value 'Accept'",
            id="v1alpha1 says Allow",
        ),
        pytest.param(
            anp({"priority": 1001, "subject": SUBJECT}),
            "spec.priority",
            "must be between 0 and 1000",
            id="priority 0-1000",
        ),
        pytest.param(
            anp(
                {
                    "priority": 1,
                    "subject": SUBJECT,
                    "egress": [
                        {
                            "action": "Deny",
                            "to": FROM_ALL,
                            "ports": [{"portNumber": {"protocol": "ICMP", "port": 1}}],
                        }
                    ],
                }
            ),
            "spec.egress[0].ports[0].portNumber.protocol",
            "unsupported value 'ICMP'",
            id="a port's protocol is TCP, UDP or SCTP",
        ),
        pytest.param(
            anp(
                {
                    "subject": SUBJECT,
                    "egress": [{"action": "Deny", "to": [{"domainNames": ["example.com"]}]}],
                },
                "BaselineAdminNetworkPolicy",
                "default",
            ),
            "spec.egress[0].to[0].domainNames",
            "unknown field 'domainNames'",
            id="a BaselineAdminNetworkPolicy has no domainNames peer",
        ),
    ],
)
def test_v1alpha1_validation(doc: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(InputError) as caught:
        cluster_policy_from_dict(doc, Where(file="p.yaml"))
    problems = caught.value.problems or (caught.value,)
    found = next(p for p in problems if p.field == field)
    assert says in found.reason


# --- the conformance cases in v1alpha1 --------------------------------------------------------


def _protocols_as_ports(protocols: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ports = []
    for entry in protocols:
        if "destinationNamedPort" in entry:
            ports.append({"namedPort": entry["destinationNamedPort"]})
            continue
        ((proto, body),) = entry.items()
        dest = body["destinationPort"]
        if "number" in dest:
            ports.append({"portNumber": {"protocol": proto.upper(), "port": dest["number"]}})
        else:
            rng = dest["range"]
            ports.append(
                {"portRange": {"protocol": proto.upper(), "start": rng["start"], "end": rng["end"]}}
            )
    return ports


def _as_v1alpha1(policies: tuple[dict[str, Any], ...]) -> list[dict[str, Any]] | None:
    """The step's policies with cluster policies as ANPs/the BANP; None if v1alpha1 cannot say it."""
    baseline = [
        p
        for p in policies
        if p.get("kind") == "ClusterNetworkPolicy" and p["spec"]["tier"] == "Baseline"
    ]
    if len(baseline) > 1:
        return None
    out = []
    for policy in policies:
        if policy["kind"] != "ClusterNetworkPolicy":
            out.append(policy)
            continue
        spec = copy.deepcopy(policy["spec"])
        tier = spec.pop("tier")
        kind = "AdminNetworkPolicy" if tier == "Admin" else "BaselineAdminNetworkPolicy"
        if kind == "BaselineAdminNetworkPolicy":
            spec.pop("priority")
        for direction in ("ingress", "egress"):
            for rule in spec.get(direction, ()):
                if rule["action"] == "Pass" and tier == "Baseline":
                    return None
                rule["action"] = "Allow" if rule["action"] == "Accept" else rule["action"]
                if "protocols" in rule:
                    rule["ports"] = _protocols_as_ports(rule.pop("protocols"))
        name = policy["metadata"]["name"] if tier == "Admin" else "default"
        out.append(anp(spec, kind, name))
    return out


def _steps() -> list[Any]:
    return [
        pytest.param(step, id=f"{case.stem}-step{step.index}")
        for case in load_npapi_cases()
        for step in case.steps
        if _as_v1alpha1(step.policies) is not None
    ]


def _snapshot(step: ApiStep, directory: Path, policies: list[dict[str, Any]]) -> Snapshot:
    write_npapi_step_manifests(step, directory, "v1alpha1 variant")
    (directory / "02-policies.yaml").write_text(yaml.safe_dump_all(policies, sort_keys=False))
    return load_snapshot([directory])


@pytest.mark.parametrize("step", _steps())
def test_a_conformance_step_in_v1alpha1_gets_the_same_verdicts(
    step: ApiStep, tmp_path: Path
) -> None:
    policies = _as_v1alpha1(step.policies)
    assert policies is not None
    snapshot = _snapshot(step, tmp_path, policies)
    assert {p.kind for p in snapshot.cluster_policies} <= {
        "AdminNetworkPolicy",
        "BaselineAdminNetworkPolicy",
    }
    engine = Engine(snapshot)
    for probe in step.probes:
        source, destination = snapshot.pod(probe.source), snapshot.pod(probe.destination)
        assert source is not None and destination is not None
        verdict = engine.evaluate(source, destination, probe.port, probe.protocol)  # type: ignore[arg-type]
        assert (verdict.known, verdict.allowed) == (True, probe.allowed), (
            probe.text,
            verdict.summary(),
        )


def test_most_conformance_steps_can_be_said_in_v1alpha1() -> None:
    assert len(_steps()) >= 100
