#!/usr/bin/env python3
"""Generates flowproof's Grafana dashboards (deploy/grafana/dashboards/*.json) from this code.

Three dashboards over the collector's metrics (docs/metrics.md): `overview` (compliance ratio and
its trend, status counts, the open mismatches, feedback latency) for managers and on-call,
`flows` (each declared flow's status over time, filtered by namespace and expectation) for the
teams, `agents` (agents against nodes, probe rate and errors, the assignment queue) for whoever
runs flowproof. Plain Grafana JSON (schemaVersion 39) with a `datasource` variable, so it imports
or provisions anywhere. Never edit the output.

    scripts/gen-dashboards.py            write deploy/grafana/dashboards/*.json
    scripts/gen-dashboards.py --check    exit 1 if a file is stale (tests/unit/test_dashboards.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = ROOT / "deploy" / "grafana" / "dashboards"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["flowproof", "networkpolicy"]

# Worst first, as the collector orders them; colours match the web view's.
STATUSES = (
    ("REQUIRED_BLOCKED", "#c62828", "required blocked"),
    ("FORBIDDEN_OPEN", "#8e1b5a", "forbidden open"),
    ("POLICY_MISMATCH", "#f5a524", "policy mismatch"),
    ("ENFORCEMENT_DRIFT", "#6d28d9", "enforcement drift"),
    ("INCONCLUSIVE", "#8c959f", "inconclusive"),
    ("MODEL_INCOMPLETE", "#4a7fb0", "model incomplete"),
    ("STALE", "#b7791f", "stale"),
    ("PENDING", "#adb5bd", "pending"),
    ("PASS", "#2e7d32", "pass"),
)
FAILING = "REQUIRED_BLOCKED|FORBIDDEN_OPEN|POLICY_MISMATCH|ENFORCEMENT_DRIFT"
FLOW_FILTER = 'namespace=~"$namespace", expectation=~"$expectation"'


# --- building blocks --------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False) -> dict[str, Any]:
    query: dict[str, Any] = {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
    }
    if instant:
        query["format"] = "table"
    return query


def panel(
    kind: str,
    title: str,
    targets: Sequence[dict[str, Any]],
    *,
    grid: tuple[int, int, int, int],
    description: str,
    unit: str = "short",
    options: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    overrides: Sequence[dict[str, Any]] = (),
    transformations: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    x, y, w, h = grid
    field_defaults: dict[str, Any] = {"unit": unit}
    field_defaults.update(defaults or {})
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": list(targets),
        "fieldConfig": {"defaults": field_defaults, "overrides": list(overrides)},
        "options": options or {},
        "transformations": list(transformations),
    }


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"value": value, "color": color} for value, color in steps],
    }


def status_overrides(by: str = "byName") -> list[dict[str, Any]]:
    """Each status series in its colour (series named by the status label)."""
    return [
        {
            "matcher": {"id": by, "options": name},
            "properties": [
                {"id": "color", "value": {"mode": "fixed", "fixedColor": color}},
                {"id": "displayName", "value": f"{name} ({words})"},
            ],
        }
        for name, color, words in STATUSES
    ]


def status_value_mappings() -> list[dict[str, Any]]:
    """Status names in table cells, coloured."""
    return [
        {
            "type": "value",
            "options": {
                name: {"text": f"{name} ({words})", "color": color, "index": i}
                for i, (name, color, words) in enumerate(STATUSES)
            },
        }
    ]


def status_code_expr(selector: str) -> str:
    """One series per declared flow whose value is its status' code (PASS=1 … REQUIRED_BLOCKED=8).

    flowproof_flow_status is 1 only for the current status, so the maximum of status × code over a
    flow's statuses is the code of its current status.
    """
    parts = [
        f'flowproof_flow_status{{status="{name}", {selector}}} * {len(STATUSES) - i}'
        for i, (name, _, _) in enumerate(STATUSES)
    ]
    return "max by (namespace, expectation, flow) (\n  " + "\n  or ".join(parts) + "\n)"


def status_code_mappings() -> list[dict[str, Any]]:
    return [
        {
            "type": "value",
            "options": {
                str(len(STATUSES) - i): {"text": name, "color": color, "index": i}
                for i, (name, color, _) in enumerate(STATUSES)
            },
        }
    ]


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "includeAll": False,
        "multi": False,
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: Iterable[dict[str, Any]],
    *,
    variables: Sequence[dict[str, Any]] = (),
    time_from: str = "now-6h",
) -> dict[str, Any]:
    numbered = []
    for number, item in enumerate(panels, start=1):
        numbered.append({"id": number, **item})
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "timezone": "browser",
        "templating": {"list": [datasource_variable(), *variables]},
        "annotations": {"list": []},
        "links": [
            {
                "title": "flowproof",
                "type": "dashboards",
                "tags": ["flowproof"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": numbered,
    }


STAT = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
ORGANIZE_FLOW_TABLE = {
    "id": "organize",
    "options": {
        "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
        "indexByName": {"namespace": 0, "expectation": 1, "flow": 2, "status": 3},
        "renameByName": {},
    },
}


# --- the dashboards ---------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    panels = [
        panel(
            "stat",
            "Compliance",
            [target('avg(flowproof_flow_status{status="PASS"})', "compliance")],
            grid=(0, 0, 5, 5),
            unit="percentunit",
            description="Declared flows proven as declared (PASS) over all declared flows.",
            defaults={
                "min": 0,
                "max": 1,
                "decimals": 1,
                "thresholds": thresholds((None, "#c62828"), (0.9, "#f5a524"), (0.99, "#2e7d32")),
            },
            options={**STAT, "colorMode": "background", "graphMode": "area"},
        ),
        panel(
            "stat",
            "Open mismatches",
            [target(f'sum(flowproof_declared_flows{{status=~"{FAILING}"}})', "open")],
            grid=(5, 0, 4, 5),
            description="Declared flows that are blocked, open, mismatched or drifting now.",
            defaults={"thresholds": thresholds((None, "#2e7d32"), (1, "#c62828"))},
            options={**STAT, "colorMode": "background", "graphMode": "none"},
        ),
        panel(
            "stat",
            "Declared flows by status",
            [target("sum by (status) (flowproof_declared_flows)", "{{status}}")],
            grid=(9, 0, 15, 5),
            description="How many declared flows are in each status now.",
            defaults={"color": {"mode": "fixed", "fixedColor": "#8c959f"}},
            overrides=status_overrides(),
            options={
                **STAT,
                "colorMode": "background",
                "graphMode": "none",
                "textMode": "value_and_name",
            },
        ),
        panel(
            "timeseries",
            "Compliance trend by namespace",
            [
                target("flowproof_compliance_ratio", "{{namespace}}"),
                target('avg(flowproof_flow_status{status="PASS"})', "all namespaces", ref="B"),
            ],
            grid=(0, 5, 12, 9),
            unit="percentunit",
            description="Share of declared flows in PASS per namespace of the expectation, over time.",
            defaults={"min": 0, "max": 1, "custom": {"lineWidth": 2, "fillOpacity": 0}},
            options={
                "legend": {
                    "displayMode": "table",
                    "placement": "right",
                    "calcs": ["lastNotNull", "min"],
                }
            },
        ),
        panel(
            "timeseries",
            "Status counts over time",
            [target("sum by (status) (flowproof_declared_flows)", "{{status}}")],
            grid=(12, 5, 12, 9),
            description="Declared flows per status, stacked: a break shows as a red band.",
            defaults={
                "custom": {"stacking": {"mode": "normal"}, "fillOpacity": 60, "lineWidth": 0}
            },
            overrides=status_overrides(),
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
        panel(
            "table",
            "Open mismatches",
            [target(f'flowproof_flow_status{{status=~"{FAILING}"}} == 1', instant=True)],
            grid=(0, 14, 14, 10),
            description=(
                "Every declared flow in a failing status now, with its expectation and namespace. "
                "The web view explains each one (deciding policy and rule, last probe results)."
            ),
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "status"},
                    "properties": [
                        {"id": "mappings", "value": status_value_mappings()},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                    ],
                }
            ],
            options={"showHeader": True, "sortBy": [{"displayName": "status", "desc": False}]},
            transformations=[ORGANIZE_FLOW_TABLE],
        ),
        panel(
            "timeseries",
            "Feedback latency (change to verdict)",
            [
                target(
                    "histogram_quantile(0.5, sum by (le) "
                    "(rate(flowproof_change_to_verdict_seconds_bucket[$__rate_interval])))",
                    "p50",
                ),
                target(
                    "histogram_quantile(0.95, sum by (le) "
                    "(rate(flowproof_change_to_verdict_seconds_bucket[$__rate_interval])))",
                    "p95",
                    ref="B",
                ),
            ],
            grid=(14, 14, 10, 10),
            unit="s",
            description=(
                "From a policy, pod or expectation change to the first fresh verdict on each flow "
                "it touched (flowproof_change_to_verdict_seconds). Empty between changes."
            ),
            defaults={"custom": {"lineWidth": 2, "showPoints": "always", "spanNulls": True}},
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
    ]
    return dashboard(
        "flowproof-overview",
        "flowproof / Overview",
        "Are the declared flows open and closed as declared? Compliance, mismatches, feedback latency.",
        panels,
    )


def flows() -> dict[str, Any]:
    variables = [
        query_variable("namespace", "Namespace", "label_values(flowproof_flow_status, namespace)"),
        query_variable(
            "expectation",
            "Expectation",
            'label_values(flowproof_flow_status{namespace=~"$namespace"}, expectation)',
        ),
    ]
    panels = [
        panel(
            "state-timeline",
            "Status of each declared flow",
            [target(status_code_expr(FLOW_FILTER), "{{namespace}} · {{expectation}} · {{flow}}")],
            grid=(0, 0, 24, 12),
            description="One row per declared flow, coloured by its status over time.",
            defaults={
                "mappings": status_code_mappings(),
                "color": {"mode": "thresholds"},
                "thresholds": thresholds((None, "#8c959f")),
                "custom": {"fillOpacity": 85, "lineWidth": 0},
            },
            options={
                "showValue": "never",
                "mergeValues": True,
                "rowHeight": 0.8,
                "alignValue": "left",
                "legend": {"showLegend": False},
            },
        ),
        panel(
            "table",
            "Declared flows now",
            [
                target(f"flowproof_flow_status{{{FLOW_FILTER}}} == 1", instant=True),
            ],
            grid=(0, 12, 12, 10),
            description="Each declared flow's current status.",
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "status"},
                    "properties": [
                        {"id": "mappings", "value": status_value_mappings()},
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                    ],
                }
            ],
            options={"showHeader": True, "sortBy": [{"displayName": "status", "desc": False}]},
            transformations=[ORGANIZE_FLOW_TABLE],
        ),
        panel(
            "table",
            "Time since last verified",
            [
                target(
                    f"time() - flowproof_flow_last_verified_timestamp_seconds{{{FLOW_FILTER}}}",
                    instant=True,
                )
            ],
            grid=(12, 12, 12, 10),
            unit="s",
            description=(
                "How long ago the least recently probed pod pair of each declared flow got a "
                "result. A flow never probed yet is missing here."
            ),
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "Value"},
                    "properties": [
                        {"id": "displayName", "value": "age"},
                        {"id": "custom.cellOptions", "value": {"type": "color-text"}},
                        {
                            "id": "thresholds",
                            "value": thresholds(
                                (None, "#2e7d32"), (60, "#f5a524"), (300, "#c62828")
                            ),
                        },
                    ],
                }
            ],
            options={"showHeader": True, "sortBy": [{"displayName": "age", "desc": True}]},
            transformations=[
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "__name__": True, "job": True},
                        "indexByName": {"namespace": 0, "expectation": 1, "flow": 2, "Value": 3},
                        "renameByName": {},
                    },
                }
            ],
        ),
        panel(
            "timeseries",
            "Pod pairs seen allowed and denied",
            [
                target(
                    f"sum by (namespace, expectation, flow) "
                    f"(flowproof_flow_observed_allowed{{{FLOW_FILTER}}})",
                    "allowed · {{flow}}",
                ),
                target(
                    f"sum by (namespace, expectation, flow) "
                    f"(flowproof_flow_observed_denied{{{FLOW_FILTER}}})",
                    "denied · {{flow}}",
                    ref="B",
                ),
            ],
            grid=(0, 22, 24, 8),
            description=(
                "Concrete flows (pod pairs and ports) of each declared flow whose latest probe got "
                "through (allowed) or not (denied)."
            ),
            defaults={"custom": {"lineWidth": 1, "fillOpacity": 0}},
            options={"legend": {"displayMode": "table", "placement": "right"}},
        ),
    ]
    return dashboard(
        "flowproof-flows",
        "flowproof / Flows",
        "Each declared flow's status over time, by namespace and expectation.",
        panels,
        variables=variables,
    )


def agents() -> dict[str, Any]:
    panels = [
        panel(
            "stat",
            "Agents connected",
            [target("sum(flowproof_agents_connected)", "agents")],
            grid=(0, 0, 6, 5),
            description="Agents with a live stream to the collector.",
            options={**STAT, "colorMode": "value", "graphMode": "area"},
        ),
        panel(
            "stat",
            "Nodes needing an agent",
            [target("sum(flowproof_nodes)", "nodes")],
            grid=(6, 0, 6, 5),
            description="Nodes that host a probe's source pod or a responder.",
            options={**STAT, "colorMode": "value", "graphMode": "none"},
        ),
        panel(
            "stat",
            "Nodes without an agent",
            [target("sum(flowproof_nodes_without_agent)", "missing")],
            grid=(12, 0, 6, 5),
            description="Nodes that need an agent and have none connected: their flows cannot be verified.",
            defaults={"thresholds": thresholds((None, "#2e7d32"), (1, "#c62828"))},
            options={**STAT, "colorMode": "background", "graphMode": "none"},
        ),
        panel(
            "stat",
            "Probe errors (5m)",
            [
                target(
                    'sum(rate(flowproof_probes_total{outcome="ERROR"}[5m])) '
                    "/ sum(rate(flowproof_probes_total[5m]))",
                    "errors",
                )
            ],
            grid=(18, 0, 6, 5),
            unit="percentunit",
            description="Share of probe results with outcome ERROR (the probe could not be made).",
            defaults={
                "thresholds": thresholds((None, "#2e7d32"), (0.01, "#f5a524"), (0.1, "#c62828"))
            },
            options={**STAT, "colorMode": "background", "graphMode": "area"},
        ),
        panel(
            "timeseries",
            "Agents and nodes",
            [
                target("sum(flowproof_agents_connected)", "agents connected"),
                target("sum(flowproof_nodes)", "nodes needing an agent", ref="B"),
            ],
            grid=(0, 5, 12, 8),
            description="Fewer agents than nodes means some flows go unverified.",
            defaults={"custom": {"lineWidth": 2}, "decimals": 0},
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
        panel(
            "timeseries",
            "Probe rate by outcome",
            [
                target(
                    "sum by (outcome) (rate(flowproof_probes_total[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            grid=(12, 5, 12, 8),
            unit="reqps",
            description="Probe results per second, by raw outcome (DESIGN.md).",
            defaults={"custom": {"stacking": {"mode": "normal"}, "fillOpacity": 40}},
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "ERROR"},
                    "properties": [
                        {"id": "color", "value": {"mode": "fixed", "fixedColor": "#c62828"}}
                    ],
                }
            ],
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
        panel(
            "timeseries",
            "Probe errors by protocol",
            [
                target(
                    'sum by (protocol) (rate(flowproof_probes_total{outcome="ERROR"}[$__rate_interval]))',
                    "{{protocol}}",
                )
            ],
            grid=(0, 13, 12, 8),
            unit="reqps",
            description="Probes that could not be made, per second, by probe protocol.",
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
        panel(
            "timeseries",
            "Probe duration p95 by protocol",
            [
                target(
                    "histogram_quantile(0.95, sum by (le, protocol) "
                    "(rate(flowproof_probe_duration_seconds_bucket[$__rate_interval])))",
                    "{{protocol}}",
                )
            ],
            grid=(12, 13, 12, 8),
            unit="s",
            description="How long probes take; a timeout (dropped packets) shows as the probe timeout.",
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
        panel(
            "timeseries",
            "Assignments queued and in flight",
            [
                target("sum(flowproof_assignments_queued)", "queued"),
                target("sum(flowproof_assignments_in_flight)", "in flight", ref="B"),
            ],
            grid=(0, 21, 12, 8),
            description="Assignments waiting for an agent, and sent without a result yet.",
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
        panel(
            "timeseries",
            "Retries, lost and rate-limited assignments",
            [
                target(
                    "sum(rate(flowproof_assignment_retries_total[$__rate_interval]))", "retries"
                ),
                target(
                    "sum(rate(flowproof_assignments_lost_total[$__rate_interval]))", "lost", ref="B"
                ),
                target(
                    "sum(rate(flowproof_assignments_rate_limited_total[$__rate_interval]))",
                    "held back by rate limits",
                    ref="C",
                ),
            ],
            grid=(12, 21, 12, 8),
            unit="reqps",
            description=(
                "Retries confirm a failing result before it is reported; lost assignments got no "
                "result in time and were redone."
            ),
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        ),
    ]
    return dashboard(
        "flowproof-agents",
        "flowproof / Agents and probes",
        "Is the loop healthy? Agents against nodes, probe rate and errors, the assignment queue.",
        panels,
        time_from="now-3h",
    )


DASHBOARDS = {"overview": overview, "flows": flows, "agents": agents}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = OUTPUT_DIR / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(ROOT)))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"stale: {', '.join(stale)}: run `python3 scripts/gen-dashboards.py`", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
