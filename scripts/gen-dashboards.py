#!/usr/bin/env python3
"""Generates flowproof's Grafana dashboards (deploy/grafana/dashboards/*.json) with typed builders.

Three dashboards over the collector's metrics (docs/metrics.md): `overview` (compliance ratio and
its trend, status counts, the open mismatches, feedback latency) for managers and on-call,
`flows` (each declared flow's status over time, filtered by namespace and expectation) for the
teams, `agents` (agents against nodes, probe rate and errors, the assignment queue) for whoever
runs flowproof. Built with grafana-foundation-sdk (Grafana's own typed builders, serialised by its
JSONEncoder), so a misspelt option is a type error here, not a panel that silently shows nothing.
Every dashboard has a `datasource` and a `cluster` variable; every query filters on
`cluster=~"$cluster"` (a series without the label matches "All"), so one Grafana over a
multi-cluster Prometheus (an external `cluster` label) shows one cluster or all. Never edit the
output.

    scripts/gen-dashboards.py            write deploy/grafana/dashboards/*.json
    scripts/gen-dashboards.py --check    exit 1 if a file is stale (tests/unit/test_dashboards.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
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
CLUSTER = 'cluster=~"$cluster"'
FLOW_FILTER = f'{CLUSTER}, namespace=~"$namespace", expectation=~"$expectation"'


# --- building blocks --------------------------------------------------------------------------


def query(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False) -> Any:
    q = (
        prometheus.Dataquery()
        .expr(expr)
        .ref_id(ref)
        .legend_format(legend or "__auto")
        .datasource(DATASOURCE)
    )
    if instant:
        return q.instant().format(pm.PromQueryFormat.TABLE)
    return q.range()


def grid(x: int, y: int, w: int, h: int) -> dm.GridPos:
    return dm.GridPos(h=h, w=w, x=x, y=y)


def place(panel: Any, number: int, title: str, description: str, xywh: tuple[int, ...]) -> Any:
    """The parts every panel has: id, title, description, the datasource, its place."""
    return (
        panel.id(number)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .grid_pos(grid(*xywh))
    )


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def fixed(color: str) -> db.FieldColor:
    return db.FieldColor().mode(dm.FieldColorModeId.FIXED).fixed_color(color)


def status_overrides(panel: Any) -> Any:
    """Each status series in its colour (series named by the status label)."""
    for name, color, words in STATUSES:
        panel = panel.override_by_name(
            name,
            [
                dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
                dm.DynamicConfigValue(id_val="displayName", value=f"{name} ({words})"),
            ],
        )
    return panel


def status_value_mappings() -> list[dm.ValueMap]:
    """Status names in table cells, coloured."""
    return [
        dm.ValueMap(
            options={
                name: dm.ValueMappingResult(text=f"{name} ({words})", color=color, index=i)
                for i, (name, color, words) in enumerate(STATUSES)
            }
        )
    ]


def status_column(panel: Any) -> Any:
    return panel.override_by_name(
        "status",
        [
            dm.DynamicConfigValue(id_val="mappings", value=status_value_mappings()),
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
        ],
    )


def status_code_expr(selector: str) -> str:
    """One series per declared flow whose value is its status' code (PASS=1 … REQUIRED_BLOCKED=8).

    flowproof_flow_status is 1 only for the current status, so the maximum of status × code over a
    flow's statuses is the code of its current status.
    """
    parts = [
        f'flowproof_flow_status{{status="{name}", {selector}}} * {len(STATUSES) - i}'
        for i, (name, _, _) in enumerate(STATUSES)
    ]
    return "max by (cluster, namespace, expectation, flow) (\n  " + "\n  or ".join(parts) + "\n)"


def status_code_mappings() -> list[dm.ValueMap]:
    return [
        dm.ValueMap(
            options={
                str(len(STATUSES) - i): dm.ValueMappingResult(text=name, color=color, index=i)
                for i, (name, color, _) in enumerate(STATUSES)
            }
        )
    ]


def legend(mode: cm.LegendDisplayMode, placement: cm.LegendPlacement, *calcs: str) -> Any:
    built = cb.VizLegendOptions().display_mode(mode).placement(placement).show_legend(True)
    return built.calcs(list(calcs)) if calcs else built.calcs([])


LIST_BOTTOM = (cm.LegendDisplayMode.LIST, cm.LegendPlacement.BOTTOM)
TABLE_RIGHT = (cm.LegendDisplayMode.TABLE, cm.LegendPlacement.RIGHT)


def last_value() -> cb.ReduceDataOptions:
    return cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")


def datasource_variable() -> db.DatasourceVariable:
    return db.DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def query_variable(name: str, label: str, expr: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .query({"query": expr, "refId": f"{name}-variable"})
        .datasource(DATASOURCE)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


def cluster_variable() -> db.QueryVariable:
    """`cluster`: the values of the label on the collector's series; All matches series without it."""
    return query_variable(
        "cluster", "Cluster", "label_values(flowproof_build_info, cluster)"
    ).description(
        "The `cluster` label of a multi-cluster Prometheus (an external label); All also matches "
        "series without it."
    )


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: Sequence[Any],
    *,
    variables: Sequence[Any] = (),
    time_from: str = "now-6h",
) -> dm.Dashboard:
    built = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time(time_from, "now")
        .timezone("browser")
        .version(1)
        .link(
            db.DashboardLink("flowproof")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["flowproof"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    built = built.with_variable(datasource_variable()).with_variable(cluster_variable())
    for variable in variables:
        built = built.with_variable(variable)
    for panel in panels:
        built = built.with_panel(panel)
    return built.build()


ORGANIZE_FLOW_TABLE = dm.DataTransformerConfig(
    id_val="organize",
    options={
        "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
        "indexByName": {"cluster": 0, "namespace": 1, "expectation": 2, "flow": 3, "status": 4},
        "renameByName": {},
    },
)


# --- the dashboards ---------------------------------------------------------------------------


def overview() -> dm.Dashboard:
    compliance = f'avg(flowproof_flow_status{{status="PASS", {CLUSTER}}})'

    def latency(quantile: float) -> str:
        return (
            f"histogram_quantile({quantile}, sum by (le) "
            f"(rate(flowproof_change_to_verdict_seconds_bucket{{{CLUSTER}}}[$__rate_interval])))"
        )

    panels = [
        place(
            stat.Panel(),
            1,
            "Compliance",
            "Declared flows proven as declared (PASS) over all declared flows.",
            (0, 0, 5, 5),
        )
        .with_target(query(compliance, "compliance"))
        .unit("percentunit")
        .min(0)
        .max(1)
        .decimals(1)
        .thresholds(thresholds((None, "#c62828"), (0.9, "#f5a524"), (0.99, "#2e7d32")))
        .reduce_options(last_value())
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA),
        place(
            stat.Panel(),
            2,
            "Open mismatches",
            "Declared flows that are blocked, open, mismatched or drifting now.",
            (5, 0, 4, 5),
        )
        .with_target(
            query(f'sum(flowproof_declared_flows{{status=~"{FAILING}", {CLUSTER}}})', "open")
        )
        .thresholds(thresholds((None, "#2e7d32"), (1, "#c62828")))
        .reduce_options(last_value())
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.NONE),
        status_overrides(
            place(
                stat.Panel(),
                3,
                "Declared flows by status",
                "How many declared flows are in each status now.",
                (9, 0, 15, 5),
            )
            .with_target(
                query(f"sum by (status) (flowproof_declared_flows{{{CLUSTER}}})", "{{status}}")
            )
            .color_scheme(fixed("#8c959f"))
            .reduce_options(last_value())
            .color_mode(cm.BigValueColorMode.BACKGROUND)
            .graph_mode(cm.BigValueGraphMode.NONE)
            .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
        ),
        place(
            timeseries.Panel(),
            4,
            "Compliance trend by namespace",
            "Share of declared flows in PASS per namespace of the expectation, over time.",
            (0, 5, 12, 9),
        )
        .with_target(query(f"flowproof_compliance_ratio{{{CLUSTER}}}", "{{namespace}}"))
        .with_target(query(compliance, "all namespaces", ref="B"))
        .unit("percentunit")
        .min(0)
        .max(1)
        .line_width(2)
        .fill_opacity(0)
        .legend(legend(*TABLE_RIGHT, "lastNotNull", "min")),
        status_overrides(
            place(
                timeseries.Panel(),
                5,
                "Status counts over time",
                "Declared flows per status, stacked: a break shows as a red band.",
                (12, 5, 12, 9),
            )
            .with_target(
                query(f"sum by (status) (flowproof_declared_flows{{{CLUSTER}}})", "{{status}}")
            )
            .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
            .fill_opacity(60)
            .line_width(0)
            .legend(legend(*LIST_BOTTOM))
        ),
        status_column(
            place(
                table.Panel(),
                6,
                "Open mismatches",
                "Every declared flow in a failing status now, with its expectation and namespace. "
                "The web view explains each one (deciding policy and rule, last probe results).",
                (0, 14, 14, 10),
            )
            .with_target(
                query(f'flowproof_flow_status{{status=~"{FAILING}", {CLUSTER}}} == 1', instant=True)
            )
            .show_header(True)
            .sort_by([cb.TableSortByFieldState().display_name("status").desc(False)])
            .with_transformation(ORGANIZE_FLOW_TABLE)
        ),
        place(
            timeseries.Panel(),
            7,
            "Feedback latency (change to verdict)",
            "From a policy, pod or expectation change to the first fresh verdict on each flow "
            "it touched (flowproof_change_to_verdict_seconds). Empty between changes.",
            (14, 14, 10, 10),
        )
        .with_target(query(latency(0.5), "p50"))
        .with_target(query(latency(0.95), "p95", ref="B"))
        .unit("s")
        .line_width(2)
        .show_points(cm.VisibilityMode.ALWAYS)
        .span_nulls(True)
        .legend(legend(*LIST_BOTTOM)),
    ]
    return dashboard(
        "flowproof-overview",
        "flowproof / Overview",
        "Are the declared flows open and closed as declared? Compliance, mismatches, feedback latency.",
        panels,
    )


def flows() -> dm.Dashboard:
    variables = [
        query_variable(
            "namespace",
            "Namespace",
            f"label_values(flowproof_flow_status{{{CLUSTER}}}, namespace)",
        ),
        query_variable(
            "expectation",
            "Expectation",
            f'label_values(flowproof_flow_status{{{CLUSTER}, namespace=~"$namespace"}}, expectation)',
        ),
    ]
    age = f"time() - flowproof_flow_last_verified_timestamp_seconds{{{FLOW_FILTER}}}"
    panels = [
        place(
            statetimeline.Panel(),
            1,
            "Status of each declared flow",
            "One row per declared flow, coloured by its status over time.",
            (0, 0, 24, 12),
        )
        .with_target(
            query(status_code_expr(FLOW_FILTER), "{{namespace}} · {{expectation}} · {{flow}}")
        )
        .mappings(status_code_mappings())
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds((None, "#8c959f")))
        .fill_opacity(85)
        .line_width(0)
        .show_value(cm.VisibilityMode.NEVER)
        .merge_values(True)
        .row_height(0.8)
        .align_value(cm.TimelineValueAlignment.LEFT)
        .legend(cb.VizLegendOptions().show_legend(False)),
        status_column(
            place(
                table.Panel(),
                2,
                "Declared flows now",
                "Each declared flow's current status.",
                (0, 12, 12, 10),
            )
            .with_target(query(f"flowproof_flow_status{{{FLOW_FILTER}}} == 1", instant=True))
            .show_header(True)
            .sort_by([cb.TableSortByFieldState().display_name("status").desc(False)])
            .with_transformation(ORGANIZE_FLOW_TABLE)
        ),
        place(
            table.Panel(),
            3,
            "Time since last verified",
            "How long ago the least recently probed pod pair of each declared flow got a "
            "result. A flow never probed yet is missing here.",
            (12, 12, 12, 10),
        )
        .with_target(query(age, instant=True))
        .unit("s")
        .override_by_name(
            "Value",
            [
                dm.DynamicConfigValue(id_val="displayName", value="age"),
                dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
                dm.DynamicConfigValue(
                    id_val="thresholds",
                    value=thresholds((None, "#2e7d32"), (60, "#f5a524"), (300, "#c62828")).build(),
                ),
            ],
        )
        .show_header(True)
        .sort_by([cb.TableSortByFieldState().display_name("age").desc(True)])
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "__name__": True, "job": True},
                    "indexByName": {
                        "cluster": 0,
                        "namespace": 1,
                        "expectation": 2,
                        "flow": 3,
                        "Value": 4,
                    },
                    "renameByName": {},
                },
            )
        ),
        place(
            timeseries.Panel(),
            4,
            "Pod pairs seen allowed and denied",
            "Concrete flows (pod pairs and ports) of each declared flow whose latest probe got "
            "through (allowed) or not (denied).",
            (0, 22, 24, 8),
        )
        .with_target(
            query(
                f"sum by (cluster, namespace, expectation, flow) "
                f"(flowproof_flow_observed_allowed{{{FLOW_FILTER}}})",
                "allowed · {{flow}}",
            )
        )
        .with_target(
            query(
                f"sum by (cluster, namespace, expectation, flow) "
                f"(flowproof_flow_observed_denied{{{FLOW_FILTER}}})",
                "denied · {{flow}}",
                ref="B",
            )
        )
        .line_width(1)
        .fill_opacity(0)
        .legend(legend(*TABLE_RIGHT)),
    ]
    return dashboard(
        "flowproof-flows",
        "flowproof / Flows",
        "Each declared flow's status over time, by namespace and expectation.",
        panels,
        variables=variables,
    )


def agents() -> dm.Dashboard:
    errors = (
        f'sum(rate(flowproof_probes_total{{outcome="ERROR", {CLUSTER}}}[5m])) '
        f"/ sum(rate(flowproof_probes_total{{{CLUSTER}}}[5m]))"
    )
    panels = [
        place(
            stat.Panel(),
            1,
            "Agents connected",
            "Agents with a live stream to the collector.",
            (0, 0, 6, 5),
        )
        .with_target(query(f"sum(flowproof_agents_connected{{{CLUSTER}}})", "agents"))
        .reduce_options(last_value())
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.AREA),
        place(
            stat.Panel(),
            2,
            "Nodes needing an agent",
            "Nodes that host a probe's source pod or a responder.",
            (6, 0, 6, 5),
        )
        .with_target(query(f"sum(flowproof_nodes{{{CLUSTER}}})", "nodes"))
        .reduce_options(last_value())
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.NONE),
        place(
            stat.Panel(),
            3,
            "Nodes without an agent",
            "Nodes that need an agent and have none connected: their flows cannot be verified.",
            (12, 0, 6, 5),
        )
        .with_target(query(f"sum(flowproof_nodes_without_agent{{{CLUSTER}}})", "missing"))
        .thresholds(thresholds((None, "#2e7d32"), (1, "#c62828")))
        .reduce_options(last_value())
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.NONE),
        place(
            stat.Panel(),
            4,
            "Probe errors (5m)",
            "Share of probe results with outcome ERROR (the probe could not be made).",
            (18, 0, 6, 5),
        )
        .with_target(query(errors, "errors"))
        .unit("percentunit")
        .thresholds(thresholds((None, "#2e7d32"), (0.01, "#f5a524"), (0.1, "#c62828")))
        .reduce_options(last_value())
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA),
        place(
            timeseries.Panel(),
            5,
            "Agents and nodes",
            "Fewer agents than nodes means some flows go unverified.",
            (0, 5, 12, 8),
        )
        .with_target(query(f"sum(flowproof_agents_connected{{{CLUSTER}}})", "agents connected"))
        .with_target(query(f"sum(flowproof_nodes{{{CLUSTER}}})", "nodes needing an agent", ref="B"))
        .line_width(2)
        .decimals(0)
        .legend(legend(*LIST_BOTTOM)),
        place(
            timeseries.Panel(),
            6,
            "Probe rate by outcome",
            "Probe results per second, by raw outcome (DESIGN.md).",
            (12, 5, 12, 8),
        )
        .with_target(
            query(
                f"sum by (outcome) (rate(flowproof_probes_total{{{CLUSTER}}}[$__rate_interval]))",
                "{{outcome}}",
            )
        )
        .unit("reqps")
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
        .fill_opacity(40)
        .override_by_name(
            "ERROR",
            [
                dm.DynamicConfigValue(
                    id_val="color", value={"mode": "fixed", "fixedColor": "#c62828"}
                )
            ],
        )
        .legend(legend(*LIST_BOTTOM)),
        place(
            timeseries.Panel(),
            7,
            "Probe errors by protocol",
            "Probes that could not be made, per second, by probe protocol.",
            (0, 13, 12, 8),
        )
        .with_target(
            query(
                f'sum by (protocol) (rate(flowproof_probes_total{{outcome="ERROR", {CLUSTER}}}'
                "[$__rate_interval]))",
                "{{protocol}}",
            )
        )
        .unit("reqps")
        .legend(legend(*LIST_BOTTOM)),
        place(
            timeseries.Panel(),
            8,
            "Probe duration p95 by protocol",
            "How long probes take; a timeout (dropped packets) shows as the probe timeout.",
            (12, 13, 12, 8),
        )
        .with_target(
            query(
                "histogram_quantile(0.95, sum by (le, protocol) "
                f"(rate(flowproof_probe_duration_seconds_bucket{{{CLUSTER}}}[$__rate_interval])))",
                "{{protocol}}",
            )
        )
        .unit("s")
        .legend(legend(*LIST_BOTTOM)),
        place(
            timeseries.Panel(),
            9,
            "Assignments queued and in flight",
            "Assignments waiting for an agent, and sent without a result yet.",
            (0, 21, 12, 8),
        )
        .with_target(query(f"sum(flowproof_assignments_queued{{{CLUSTER}}})", "queued"))
        .with_target(
            query(f"sum(flowproof_assignments_in_flight{{{CLUSTER}}})", "in flight", ref="B")
        )
        .legend(legend(*LIST_BOTTOM)),
        place(
            timeseries.Panel(),
            10,
            "Retries, lost and rate-limited assignments",
            "Retries confirm a failing result before it is reported; lost assignments got no "
            "result in time and were redone.",
            (12, 21, 12, 8),
        )
        .with_target(
            query(
                f"sum(rate(flowproof_assignment_retries_total{{{CLUSTER}}}[$__rate_interval]))",
                "retries",
            )
        )
        .with_target(
            query(
                f"sum(rate(flowproof_assignments_lost_total{{{CLUSTER}}}[$__rate_interval]))",
                "lost",
                ref="B",
            )
        )
        .with_target(
            query(
                "sum(rate(flowproof_assignments_rate_limited_total"
                f"{{{CLUSTER}}}[$__rate_interval]))",
                "held back by rate limits",
                ref="C",
            )
        )
        .unit("reqps")
        .legend(legend(*LIST_BOTTOM)),
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
    text = json.dumps(DASHBOARDS[name](), cls=JSONEncoder, indent=2, ensure_ascii=False)
    return text + "\n"


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
