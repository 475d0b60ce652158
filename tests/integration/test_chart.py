"""The Helm chart (charts/flowproof): `helm lint`, and rendered with the usual values it is the same
objects as the kustomize base and each overlay, passes `kubernetes-validate --strict`, and each
value does what values.yaml says.

`helm` is built from its Go module (helm.sh/helm/v4, pinned in tools/helm/go.mod) by
scripts/build-helm.sh into a cache outside the repository; scripts/test.sh builds it before the
tests and passes it in $FLOWPROOF_HELM. The kustomize side is tests/integration/test_deploy.py's.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_deploy import CUSTOM_KINDS, _newest_kubernetes_versions
from tests.integration.test_deploy import render as kustomize

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "flowproof"
RELEASE, NAMESPACE = "flowproof", "flowproof"
HELM_ONLY_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    # The chart puts these on every object; kustomize only on the base's.
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
}
# What each overlay adds, as chart values.
PLAIN = {
    "collector": {
        "service": {
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "8080",
                "prometheus.io/path": "/metrics",
            }
        }
    },
    "agent": {
        "podAnnotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "9445",
            "prometheus.io/path": "/metrics",
        }
    },
}
PROMETHEUS_OPERATOR = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True},
}
PROBE_PODS = {**PLAIN, "probePods": {"enabled": True, "namespaces": ["shop"]}}
POLICY_REPORTS = {**PLAIN, "policyReports": {"enabled": True}}


@functools.cache
def helm() -> str:
    given = os.environ.get("FLOWPROOF_HELM") or shutil.which("helm")
    if given:
        return given
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-helm.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"helm could not be built (scripts/build-helm.sh): {done.stderr[-500:]}")
    return str(Path(done.stdout.strip().splitlines()[-1]) / "helm")


def run_helm(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), *argv], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def values_file(tmp_path: Path, values: Mapping[str, Any]) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(dict(values)), encoding="utf-8")
    return str(path)


def template(tmp_path: Path, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    argv = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
    if values:
        argv += ["--values", values_file(tmp_path, values)]
    done = run_helm(*argv)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def normalized(docs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Any]:
    """Objects by (kind, namespace, name), without the labels only one side puts on them."""
    out = {}
    for doc in docs:
        meta = dict(doc["metadata"])
        labels = {k: v for k, v in meta.get("labels", {}).items() if k not in HELM_ONLY_LABELS}
        meta["labels"] = labels
        key = (doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in out, f"{key} twice"
        out[key] = {**doc, "metadata": meta}
    return out


def merged(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def test_the_chart_copies_of_deploy_are_not_stale() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gen-chart.py", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            merged(
                PROMETHEUS_OPERATOR, PROBE_PODS, POLICY_REPORTS, {"monitoring": {"release": "kps"}}
            ),
            id="everything on",
        ),
    ],
)
def test_helm_lint_strict_passes(values: dict[str, Any], tmp_path: Path) -> None:
    argv = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values:
        argv += ["--values", values_file(tmp_path, values)]
    done = run_helm(*argv)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("overlay", "values"),
    [
        pytest.param("base", {}, id="base = the defaults"),
        pytest.param("overlays/plain", PLAIN, id="plain"),
        pytest.param("overlays/prometheus-operator", PROMETHEUS_OPERATOR, id="prometheus-operator"),
        pytest.param("overlays/probe-pods", PROBE_PODS, id="probe-pods"),
        pytest.param("overlays/policy-reports", POLICY_REPORTS, id="policy-reports"),
    ],
)
def test_the_chart_renders_the_same_objects_as_kustomize(
    overlay: str, values: dict[str, Any], tmp_path: Path
) -> None:
    chart = normalized(template(tmp_path, merged({"namespace": {"create": True}}, values)))
    secret = chart.pop(("Secret", NAMESPACE, "flowproof-token"))
    assert base64.b64decode(secret["data"]["token"]), "the chart makes the token Secret"
    ours = normalized(kustomize(overlay))
    assert sorted(chart) == sorted(ours)
    for key in ours:
        assert chart[key] == ours[key], key


def test_every_object_carries_the_version_and_helm_labels(tmp_path: Path) -> None:
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    from flowproof import __version__

    assert chart_yaml["appVersion"] == chart_yaml["version"] == __version__
    for doc in template(tmp_path, merged(PROMETHEUS_OPERATOR, PROBE_PODS)):
        if doc["kind"] == "CustomResourceDefinition":
            continue  # crds/ is installed as it is (and is deploy/crds' copy)
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/version"] == __version__, doc["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            merged(PROBE_PODS, {"tls": {"existingSecret": "certs"}}), id="probe pods and TLS"
        ),
    ],
)
def test_the_rendered_core_kinds_pass_strict_validation(
    values: dict[str, Any], tmp_path: Path
) -> None:
    utils = pytest.importorskip(
        "kubernetes_validate.utils", reason="pip install kubernetes-validate"
    )
    problems = []
    for doc in template(tmp_path, merged({"namespace": {"create": True}}, values)):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in _newest_kubernetes_versions():
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert problems == []


def _pod(docs: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind]
    return dict(found["spec"]["template"]["spec"])


def test_an_existing_token_secret_is_used_and_none_is_made(tmp_path: Path) -> None:
    docs = template(tmp_path, {"auth": {"existingSecret": "from-vault"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for kind in ("Deployment", "DaemonSet"):
        [volume] = [v for v in _pod(docs, kind)["volumes"] if v["name"] == "token"]
        assert volume["secret"]["secretName"] == "from-vault"


def test_a_given_token_is_the_secret_s(tmp_path: Path) -> None:
    [secret] = [
        d for d in template(tmp_path, {"auth": {"token": "s3cret"}}) if d["kind"] == "Secret"
    ]
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"


def test_the_collector_gets_its_tls_secret_and_the_agents_only_its_ca(tmp_path: Path) -> None:
    docs = template(tmp_path, {"tls": {"existingSecret": "flowproof-tls"}})
    collector = _pod(docs, "Deployment")
    [volume] = [v for v in collector["volumes"] if v["name"] == "tls"]
    assert volume["secret"] == {"secretName": "flowproof-tls", "defaultMode": 0o440}
    container = collector["containers"][0]
    assert {"name": "tls", "mountPath": "/var/run/secrets/flowproof-tls", "readOnly": True} in (
        container["volumeMounts"]
    )
    assert "--tls-cert-file=/var/run/secrets/flowproof-tls/tls.crt" in container["args"]
    assert "--tls-key-file=/var/run/secrets/flowproof-tls/tls.key" in container["args"]
    agents = _pod(docs, "DaemonSet")
    [volume] = [v for v in agents["volumes"] if v["name"] == "collector-ca"]
    assert volume["secret"]["secretName"] == "flowproof-tls"
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "never the key"
    assert "--ca-file=/var/run/secrets/flowproof-tls/ca.crt" in agents["containers"][0]["args"]


def test_images_come_from_your_registry_by_tag_or_digest(tmp_path: Path) -> None:
    digest = "sha256:" + "a" * 64
    docs = template(
        tmp_path,
        {
            "image": {"registry": "registry.example.com/platform/", "tag": "0.1.0-rc1"},
            "agent": {"image": {"digest": digest}},
        },
    )
    assert _pod(docs, "Deployment")["containers"][0]["image"] == (
        "registry.example.com/platform/flowproof-collector:0.1.0-rc1"
    )
    assert _pod(docs, "DaemonSet")["containers"][0]["image"] == (
        f"registry.example.com/platform/flowproof-agent@{digest}"
    )


def test_scheduling_values_reach_the_pods(tmp_path: Path) -> None:
    docs = template(
        tmp_path,
        {
            "agent": {
                "priorityClassName": "flowproof-agents",
                "nodeSelector": {"pool": "general"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}},
            },
            "collector": {"nodeSelector": {"pool": "system"}, "priorityClassName": "high"},
            "imagePullSecrets": [{"name": "regcred"}],
        },
    )
    agent, collector = _pod(docs, "DaemonSet"), _pod(docs, "Deployment")
    assert agent["priorityClassName"] == "flowproof-agents"
    # Helm merges maps with the defaults: the agent stays on Linux nodes.
    assert agent["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "general"}
    assert agent["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert agent["containers"][0]["resources"] == {
        "requests": {"cpu": "20m", "memory": "32Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert (collector["nodeSelector"], collector["priorityClassName"]) == (
        {"pool": "system"},
        "high",
    )
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert all(a["imagePullSecrets"] == [{"name": "regcred"}] for a in accounts)


def test_the_release_label_hook_and_runbook_base(tmp_path: Path) -> None:
    docs = template(
        tmp_path,
        merged(
            PROMETHEUS_OPERATOR,
            {
                "monitoring": {"release": "kube-prometheus-stack"},
                "prometheusRule": {"runbookBaseURL": "https://wiki.example.com/flowproof/"},
            },
        ),
    )
    monitoring = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in monitoring} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for doc in monitoring:
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["kind"]
    [rule] = [d for d in monitoring if d["kind"] == "PrometheusRule"]
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert alerts and all(
        r["annotations"]["runbook_url"]
        == f"https://wiki.example.com/flowproof#{r['alert'].lower()}"
        for r in alerts
    )
    assert "{{ $labels.flow }}" in alerts[0]["annotations"]["summary"], "alert templates untouched"


def test_probe_pods_need_a_namespace(tmp_path: Path) -> None:
    done = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--values",
        values_file(tmp_path, {"probePods": {"enabled": True}}),
    )
    assert done.returncode != 0
    assert "probePods.namespaces" in done.stderr


def test_one_replica_without_leader_election_is_recreated_and_grants_no_lease(
    tmp_path: Path,
) -> None:
    values = {"collector": {"replicas": 1, "leaderElection": {"enabled": False}}}
    docs = normalized(template(tmp_path, values))
    deployment = docs[("Deployment", NAMESPACE, "flowproof-collector")]["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}
    [c] = deployment["template"]["spec"]["containers"]
    assert not [a for a in c["args"] if a.startswith("--leader-election")]
    assert not [e for e in c["env"] if e["name"].startswith("FLOWPROOF_LEADER_ELECTION")]
    assert "--state-dir=/var/lib/flowproof" in c["args"], "the ledger is kept either way"
    assert ("Role", NAMESPACE, "flowproof-collector-leader") not in docs
    assert ("PodDisruptionBudget", NAMESPACE, "flowproof-collector") not in docs


def test_two_replicas_without_leader_election_are_refused(tmp_path: Path) -> None:
    done = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--values",
        values_file(tmp_path, {"collector": {"leaderElection": {"enabled": False}}}),
    )
    assert done.returncode != 0
    assert "collector.replicas > 1 needs collector.leaderElection.enabled" in done.stderr


def test_one_replica_with_leader_election_has_no_disruption_budget(tmp_path: Path) -> None:
    docs = normalized(template(tmp_path, {"collector": {"replicas": 1}}))
    assert ("PodDisruptionBudget", NAMESPACE, "flowproof-collector") not in docs, (
        "minAvailable 1 of 1 would block every drain"
    )
    assert ("Role", NAMESPACE, "flowproof-collector-leader") in docs
    deployment = docs[("Deployment", NAMESPACE, "flowproof-collector")]["spec"]
    assert deployment["strategy"]["type"] == "RollingUpdate"
