"""A lab cluster of 32 pods and 33 policies of every shape, with one declared flow: the bed of
the evidence tests and benchmark (a plugin that stops enforcing one policy must be caught).

Shapes: default-deny (ingress, egress, both), pod selectors, namespace selectors, both in one
peer (AND), matchExpressions (In, NotIn, Exists, DoesNotExist), named ports, endPort ranges,
egress to the cluster DNS, an ipBlock to the outside (proven through the one declared flow), a
policy that selects no pod and a redundant one (neither can be proven; both are said so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

NAMESPACES = {
    "shop": {"team": "shop", "tier": "front"},
    "billing": {"team": "billing"},
    "monitoring": {"team": "monitoring"},
    "tools": {"team": "tools"},
    "legacy": {"team": "legacy", "retired": "soon"},
}

# (namespace, app, replicas, extra labels, container ports: (name or None, port, protocol))
WORKLOADS: list[tuple[str, str, int, dict[str, str], list[tuple[str | None, int, str]]]] = [
    ("shop", "frontend", 3, {"tier": "web"}, [("http", 8080, "TCP")]),
    ("shop", "api", 3, {"tier": "app"}, [("http", 8080, "TCP"), ("metrics", 9090, "TCP")]),
    ("shop", "db", 1, {"tier": "data"}, [("pg", 5432, "TCP")]),
    ("shop", "cache", 1, {"tier": "data"}, [(None, 6379, "TCP")]),
    ("shop", "worker", 3, {"tier": "app"}, [(None, 7005, "TCP")]),
    ("shop", "batch", 1, {}, []),
    ("billing", "ledger", 3, {"tier": "app"}, [("https", 8443, "TCP")]),
    ("billing", "invoices", 1, {"tier": "app"}, [(None, 8050, "TCP")]),
    ("billing", "reports", 1, {}, [("metrics", 9090, "TCP")]),
    ("monitoring", "prometheus", 1, {}, [("web", 9091, "TCP")]),
    ("tools", "debug", 3, {}, []),
    ("tools", "ci-runner", 1, {}, []),
    ("legacy", "legacy-a", 3, {"tier": "old"}, [(None, 80, "TCP")]),
    ("legacy", "legacy-b", 3, {}, [(None, 80, "TCP")]),
]
DNS_PODS = 2  # kube-system/coredns, k8s-app=kube-dns (the lab's own DNS servers)


def _selector(labels: dict[str, str] | None = None, **expressions: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if labels:
        out["matchLabels"] = labels
    if expressions.get("exprs"):
        out["matchExpressions"] = expressions["exprs"]
    return out


def _policy(
    namespace: str,
    name: str,
    selector: dict[str, Any],
    *,
    types: list[str],
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": selector, "policyTypes": types}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }


DNS_EGRESS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}


def _app(name: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {"app": name}}}


def policies() -> list[dict[str, Any]]:
    p = _policy
    return [
        # shop: default deny both ways, DNS, then each path
        p("shop", "default-deny-ingress", {}, types=["Ingress"]),
        p("shop", "default-deny-egress", {}, types=["Egress"]),
        p("shop", "dns-egress", {}, types=["Egress"], egress=[DNS_EGRESS]),
        p(
            "shop",
            "frontend-to-api",
            _selector({"app": "frontend"}),
            types=["Egress"],
            egress=[{"to": [_app("api")], "ports": [{"port": "http"}]}],
        ),
        p(
            "shop",
            "api-from-frontend",
            _selector({"app": "api"}),
            types=["Ingress"],
            ingress=[{"from": [_app("frontend")], "ports": [{"port": "http"}]}],
        ),
        p(
            "shop",
            "api-to-db",
            _selector({"app": "api"}),
            types=["Egress"],
            egress=[{"to": [_app("db")], "ports": [{"port": 5432}]}],
        ),
        p(
            "shop",
            "db-from-api",
            _selector({"app": "db"}),
            types=["Ingress"],
            ingress=[{"from": [_app("api")], "ports": [{"port": "pg"}]}],
        ),
        p(
            "shop",
            "cache-clients",
            _selector(exprs=[{"key": "app", "operator": "In", "values": ["api", "worker"]}]),
            types=["Egress"],
            egress=[{"to": [_app("cache")], "ports": [{"port": 6379}]}],
        ),
        p(
            "shop",
            "cache-from-clients",
            _selector({"app": "cache"}),
            types=["Ingress"],
            ingress=[
                {
                    "from": [
                        {
                            "podSelector": _selector(
                                exprs=[{"key": "tier", "operator": "In", "values": ["app"]}]
                            )
                        }
                    ],
                    "ports": [{"port": 6379}],
                }
            ],
        ),
        p(
            "shop",
            "metrics-from-monitoring",
            _selector({"app": "api"}),
            types=["Ingress"],
            ingress=[
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
                    "ports": [{"port": "metrics"}],
                }
            ],
        ),
        p(
            "shop",
            "batch-to-db",
            _selector({"app": "batch"}),
            types=["Egress"],
            egress=[{"to": [_app("db")], "ports": [{"port": 5432}]}],
        ),
        p(
            "shop",
            "db-from-batch",
            _selector({"app": "db"}),
            types=["Ingress"],
            ingress=[{"from": [_app("batch")], "ports": [{"port": 5432}]}],
        ),
        p(
            "shop",
            "api-to-workers",
            _selector({"app": "api"}),
            types=["Egress"],
            egress=[{"to": [_app("worker")], "ports": [{"port": 7000, "endPort": 7010}]}],
        ),
        p(
            "shop",
            "workers-from-api",
            _selector({"app": "worker"}),
            types=["Ingress"],
            ingress=[{"from": [_app("api")], "ports": [{"port": 7000, "endPort": 7010}]}],
        ),
        p(
            "shop",
            "frontend-from-anywhere",
            _selector({"app": "frontend"}),
            types=["Ingress"],
            ingress=[{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}],
        ),
        p(
            "shop",
            "api-to-ledger",
            _selector({"app": "api"}),
            types=["Egress"],
            egress=[
                {
                    "to": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": "billing"}},
                            "podSelector": {"matchLabels": {"app": "ledger"}},
                        }
                    ],
                    "ports": [{"port": 8443}],
                }
            ],
        ),
        # billing
        p("billing", "default-deny", {}, types=["Ingress", "Egress"]),
        p("billing", "dns-egress", {}, types=["Egress"], egress=[DNS_EGRESS]),
        p(
            "billing",
            "ledger-from-shop-api",
            _selector({"app": "ledger"}),
            types=["Ingress"],
            ingress=[
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": "shop"}},
                            "podSelector": {"matchLabels": {"app": "api"}},
                        }
                    ],
                    "ports": [{"port": "https"}],
                }
            ],
        ),
        p(
            "billing",
            "ledger-to-invoices",
            _selector({"app": "ledger"}),
            types=["Egress"],
            egress=[{"to": [_app("invoices")], "ports": [{"port": 8000, "endPort": 8100}]}],
        ),
        p(
            "billing",
            "invoices-from-ledger",
            _selector({"app": "invoices"}),
            types=["Ingress"],
            ingress=[{"from": [_app("ledger")], "ports": [{"port": 8000, "endPort": 8100}]}],
        ),
        p(
            "billing",
            "reports-from-monitoring",
            _selector(
                exprs=[
                    {"key": "app", "operator": "Exists"},
                    {"key": "tier", "operator": "DoesNotExist"},
                ]
            ),
            types=["Ingress"],
            ingress=[
                {
                    "from": [
                        {
                            "namespaceSelector": _selector(
                                exprs=[{"key": "team", "operator": "In", "values": ["monitoring"]}]
                            )
                        }
                    ],
                    "ports": [{"port": "metrics"}],
                }
            ],
        ),
        # monitoring
        p("monitoring", "default-deny-egress", {}, types=["Egress"]),
        p("monitoring", "dns-egress", {}, types=["Egress"], egress=[DNS_EGRESS]),
        p(
            "monitoring",
            "scrape-everywhere",
            _selector({"app": "prometheus"}),
            types=["Egress"],
            egress=[{"to": [{"namespaceSelector": {}}], "ports": [{"port": 9090}]}],
        ),
        # tools
        p("tools", "deny-ingress", {}, types=["Ingress"]),
        p(
            "tools",
            "debug-to-frontend",
            _selector({"app": "debug"}),
            types=["Egress"],
            egress=[
                {
                    "to": [
                        {"namespaceSelector": {"matchLabels": {"team": "shop"}}, **_app("frontend")}
                    ],
                    "ports": [{"port": 8080}],
                }
            ],
        ),
        p(
            "tools",
            "ci-to-outside",
            _selector({"app": "ci-runner"}),
            types=["Egress"],
            egress=[
                {
                    "to": [
                        {"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}}
                    ],
                    "ports": [{"port": 443}],
                }
            ],
        ),
        # legacy
        p(
            "legacy",
            "deny-untiered",
            _selector(exprs=[{"key": "tier", "operator": "DoesNotExist"}]),
            types=["Ingress"],
        ),
        p(
            "legacy",
            "legacy-from-legacy",
            {},
            types=["Ingress"],
            ingress=[
                {
                    "from": [
                        {
                            "podSelector": _selector(
                                exprs=[{"key": "app", "operator": "NotIn", "values": ["legacy-b"]}]
                            )
                        }
                    ]
                }
            ],
        ),
        p(
            "legacy",
            "legacy-to-shop",
            _selector({"app": "legacy-a"}),
            types=["Egress"],
            egress=[
                {
                    "to": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}}],
                    "ports": [{"port": 8080}],
                }
            ],
        ),
        # what no witness can prove: a policy for pods that do not exist, and a redundant one
        p("shop", "ghost", _selector({"app": "ghost"}), types=["Ingress"]),
        p(
            "shop",
            "db-from-api-again",
            _selector({"app": "db"}),
            types=["Ingress"],
            ingress=[{"from": [_app("api")], "ports": [{"port": 5432}]}],
        ),
    ]


def expectations() -> dict[str, Any]:
    """The one declared flow: the CI runner reaches the outside (what proves its ipBlock)."""
    return {
        "apiVersion": "flowproof.dev/v1alpha1",
        "kind": "FlowExpectations",
        "metadata": {"namespace": "tools", "name": "outside"},
        "spec": {
            "flows": [
                {
                    "name": "ci-to-registry",
                    "from": {"podSelector": {"matchLabels": {"app": "ci-runner"}}},
                    "to": {"cidr": "198.51.100.0/25"},
                    "ports": ["443/TCP"],
                    "expect": "allow",
                }
            ]
        },
    }


def objects() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name, labels in NAMESPACES.items():
        docs.append(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )
    docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}})
    for namespace, app, replicas, extra, ports in WORKLOADS:
        for i in range(replicas):
            container: dict[str, Any] = {"name": "main", "image": "example/app"}
            if ports:
                container["ports"] = [
                    {"containerPort": port, "protocol": proto, **({"name": pname} if pname else {})}
                    for pname, port, proto in ports
                ]
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "namespace": namespace,
                        "name": f"{app}-{i}",
                        "labels": {"app": app, **extra},
                    },
                    "spec": {"containers": [container]},
                }
            )
    for i in range(DNS_PODS):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "namespace": "kube-system",
                    "name": f"coredns-{i}",
                    "labels": {"k8s-app": "kube-dns"},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "coredns",
                            "image": "example/dns",
                            "ports": [
                                {"containerPort": 53, "protocol": "UDP", "name": "dns"},
                                {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"},
                            ],
                        }
                    ]
                },
            }
        )
    return docs + policies() + [expectations()]


def write(directory: Path) -> Path:
    """The cluster as one multi-document manifest in `directory`; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "evidence-cluster.yaml"
    path.write_text(yaml.safe_dump_all(objects(), sort_keys=False), encoding="utf-8")
    return path


POD_COUNT = sum(w[2] for w in WORKLOADS) + DNS_PODS
POLICY_COUNT = len(policies())
