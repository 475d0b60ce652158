"""Builders of API objects (plain dicts, as the API sends them) and client configuration for tests.

Small functions with keyword overrides (`make_pod(labels=...)`), shared by the tests against the
real API server (tests/controlplane) and the fake one (tests/fakeapi); `kubeconfig_for` writes a
kubeconfig that points the real client at a plain-HTTP fake server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TOKEN = "fake-sa-token"


def make_namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def make_pod(
    name: str,
    namespace: str = "shop",
    *,
    labels: dict[str, str] | None = None,
    ip: str | None = "10.244.1.10",
    node: str = "node-1",
    port: int = 8080,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if ip else "Pending"}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "app", "ports": [{"containerPort": port}]}],
        },
        "status": status,
    }


def make_policy(name: str, namespace: str = "shop", *, port: int = 8080) -> dict[str, Any]:
    """Lets pods `app=web` reach pods `app=api` on `port`."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "api"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }


def make_flow(
    name: str = "web-to-api",
    *,
    source: str = "web",
    destination: str = "api",
    expect: str = "allow",
    port: str = "8080/TCP",
) -> dict[str, Any]:
    return {
        "name": name,
        "from": {"podSelector": {"matchLabels": {"app": source}}},
        "to": {"podSelector": {"matchLabels": {"app": destination}}},
        "ports": [port],
        "expect": expect,
    }


def make_expectations(
    name: str,
    namespace: str | None = "shop",
    *,
    flows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A FlowExpectations document (namespace None: left out, as a ConfigMap's may be)."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "flowproof.dev/v1alpha1",
        "kind": "FlowExpectations",
        "metadata": metadata,
        "spec": {"flows": flows if flows is not None else [make_flow()]},
    }


def make_configmap(
    name: str,
    namespace: str = "shop",
    *,
    data: dict[str, Any] | None = None,
    labelled: bool = True,
) -> dict[str, Any]:
    """A ConfigMap; values of `data` that are not strings are written as YAML (a list of them as
    one multi-document value)."""
    texts: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, list):
            texts[key] = yaml.safe_dump_all(value, sort_keys=False)
        elif isinstance(value, dict):
            texts[key] = yaml.safe_dump(value, sort_keys=False)
        else:
            texts[key] = value
    labels = {"flowproof.dev/expectations": "true"} if labelled else {"team": "shop"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": texts,
    }


def kubeconfig_for(path: Path, server: str, token: str | None = TOKEN) -> str:
    """Write a kubeconfig for `server` at `path`; returns the path."""
    user = {"token": token} if token else {}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "tester", "user": user}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
                "current-context": "fake",
            }
        )
    )
    return str(path)
