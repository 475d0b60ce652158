"""The Grafana dashboards: generated from scripts/gen-dashboards.py and not stale, well formed, every
query over metrics the collector exports and variables the dashboard defines; the provisioning
snippets point at them. (That every panel shows data against a real Prometheus is
tests/integration/test_web_monitoring.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from collector.metrics import CollectorMetrics
from tests.e2e_support.dashboards import DASHBOARDS, panel_queries, substitute
from tests.e2e_support.samples import SampleLoop

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen-dashboards.py"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


def boards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def test_the_dashboards_are_what_the_generator_makes() -> None:
    checked = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr


def test_a_hand_edited_dashboard_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "scripts" / "gen-dashboards.py"
    copy.parent.mkdir()
    copy.write_text(GENERATOR.read_text())
    out = tmp_path / "deploy" / "grafana" / "dashboards"
    out.mkdir(parents=True)
    for path in DASHBOARDS.glob("*.json"):
        (out / path.name).write_text(path.read_text())
    edited = out / "overview.json"
    edited.write_text(edited.read_text().replace('"Compliance"', '"Compliance!"', 1))
    checked = subprocess.run(
        [sys.executable, str(copy), "--check"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 1
    assert "overview.json" in checked.stderr


def test_there_are_the_three_dashboards_with_the_panels_people_need() -> None:
    found = boards()
    assert set(found) == {"overview", "flows", "agents"}
    titles = {name: {p["title"] for p in board["panels"]} for name, board in found.items()}
    assert {
        "Compliance",
        "Compliance trend by namespace",
        "Declared flows by status",
        "Open mismatches",
        "Feedback latency (change to verdict)",
    } <= titles["overview"]
    assert "Status of each declared flow" in titles["flows"]
    assert {v["name"] for v in found["flows"]["templating"]["list"]} >= {"namespace", "expectation"}
    assert {"Agents connected", "Probe rate by outcome", "Probe errors by protocol"} <= titles[
        "agents"
    ]
    assert len({b["uid"] for b in found.values()}) == 3


@pytest.mark.parametrize("name", ["overview", "flows", "agents"])
def test_panels_are_well_formed_and_do_not_overlap(name: str) -> None:
    board = boards()[name]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_queries_use_exported_metrics_and_defined_variables() -> None:
    loop = SampleLoop()
    loop.probe_all()
    exposition = CollectorMetrics(CollectorRegistry(), state=loop.state).exposition().decode()
    exported = set(re.findall(r"^(flowproof_\w+?)(?:\{| )", exposition, flags=re.MULTILINE))
    for name, board in boards().items():
        defined = {v["name"] for v in board["templating"]["list"]} | BUILTIN_VARIABLES
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                used = set(re.findall(r"\$\{?(\w+)\}?", expr))
                assert used <= defined, (name, panel["title"], used - defined)
                for metric in re.findall(r"flowproof_\w+", expr):
                    assert metric in exported, (name, panel["title"], metric)
    assert len(panel_queries()) >= 20


@pytest.mark.parametrize("name", ["overview", "flows", "agents"])
def test_every_query_can_be_narrowed_to_one_cluster(name: str) -> None:
    """A multi-cluster Prometheus (an external `cluster` label): each dashboard has the variable
    and every selector of every query filters on it; All matches series without the label."""
    board = boards()[name]
    [cluster] = [v for v in board["templating"]["list"] if v["name"] == "cluster"]
    assert cluster["includeAll"] is True and cluster["allValue"] == ".*"
    for panel in board["panels"]:
        for target in panel["targets"]:
            selectors = re.findall(r"flowproof_\w+(\{[^}]*\})?", target["expr"])
            assert selectors and all('cluster=~"$cluster"' in s for s in selectors), (
                panel["title"],
                target["expr"],
            )
    for variable in board["templating"]["list"]:
        if variable["name"] not in ("datasource", "cluster"):
            assert 'cluster=~"$cluster"' in variable["query"]["query"], variable["name"]


def test_the_generator_builds_with_the_typed_sdk() -> None:
    text = GENERATOR.read_text()
    assert "grafana_foundation_sdk" in text and "JSONEncoder" in text


def test_variable_substitution_refuses_unknown_variables() -> None:
    assert substitute('x{namespace=~"$namespace"}[$__rate_interval]') == 'x{namespace=~".*"}[10s]'
    with pytest.raises(KeyError):
        substitute('x{team=~"$team"}')


def test_provisioning_snippets_point_at_the_dashboards_and_prometheus() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards.yaml").read_text())
    provider = dashboards["providers"][0]
    assert dashboards["apiVersion"] == 1
    assert provider["type"] == "file" and provider["options"]["path"]
    datasources = yaml.safe_load((PROVISIONING / "datasources.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
