"""The alert rules: promtool checks and unit-tests them, the PrometheusRule is the same groups and
not stale, every alert is documented in the runbook, and the example Alertmanager config is valid
and routes as its comments say."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules.yaml"
RULES_TEST = PROM / "tests" / "rules_test.yaml"
PROMETHEUS_RULE = PROM / "prometheusrule.yaml"
ALERTMANAGER = PROM / "alertmanager-example.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
REQUIRED_ALERTS = {
    "FlowproofRequiredFlowBlocked",
    "FlowproofForbiddenFlowOpen",
    "FlowproofPolicyMismatch",
    "FlowproofEnforcementDrift",
    "FlowproofVerificationStale",
    "FlowproofModelIncomplete",
    "FlowproofAgentsMissing",
    "FlowproofProbeErrorsHigh",
    "FlowproofPolicyNotEnforced",
    "FlowproofCollectorDown",
    "FlowproofNoLeader",
    "FlowproofScrapeStale",
    "FlowproofAgentDown",
}
FLOW_ALERTS = {
    "FlowproofRequiredFlowBlocked",
    "FlowproofForbiddenFlowOpen",
    "FlowproofPolicyMismatch",
    "FlowproofEnforcementDrift",
    "FlowproofVerificationStale",
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name}: apt-get install -y {package}")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)


def alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    checked = run(tool("promtool", "prometheus"), "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_rule_tests_pass() -> None:
    tested = run(tool("promtool", "prometheus"), "test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rule_tests_catch_a_changed_rule(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    slower = RULES.read_text().replace(
        'expr: flowproof_flow_status{status="REQUIRED_BLOCKED"} == 1\n        for: 1m',
        'expr: flowproof_flow_status{status="REQUIRED_BLOCKED"} == 1\n        for: 5m',
    )
    assert slower != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(slower)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "rules_test.yaml").write_text(RULES_TEST.read_text())
    tested = run(promtool, "test", "rules", str(tmp_path / "tests" / "rules_test.yaml"))
    assert tested.returncode != 0, "a blocked flow paging 4 minutes later must fail the rule tests"
    assert "FlowproofRequiredFlowBlocked" in tested.stdout + tested.stderr


def test_every_required_alert_is_there_with_severity_and_annotations() -> None:
    found = alerts()
    assert {rule["alert"] for rule in found} == REQUIRED_ALERTS
    for rule in found:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook_url"}, rule["alert"]
        assert annotations["runbook_url"] == (
            f"{gen_rules().DEFAULT_RUNBOOK_BASE_URL}#{rule['alert'].lower()}"
        )
        if rule["alert"] in FLOW_ALERTS and "kind" not in rule["expr"]:
            for label in ("flow", "expectation", "namespace"):
                assert f"$labels.{label}" in annotations["description"], (rule["alert"], label)


def gen_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_rules", ROOT / "scripts" / "gen-rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runbook_links_can_point_at_your_own_copy() -> None:
    done = run(
        sys.executable,
        "scripts/gen-rules.py",
        "--stdout",
        "--plain",
        "--runbook-base-url",
        "https://wiki.example.com/flowproof/runbook/",
    )
    assert done.returncode == 0, done.stderr
    rebased = yaml.safe_load(done.stdout)
    assert "groups" in rebased and "spec" not in rebased
    urls = [r["annotations"]["runbook_url"] for g in rebased["groups"] for r in g["rules"]]
    names = [r["alert"] for g in rebased["groups"] for r in g["rules"]]
    assert urls == [f"https://wiki.example.com/flowproof/runbook#{n.lower()}" for n in names]
    refused = run(sys.executable, "scripts/gen-rules.py", "--stdout", "--runbook-base-url", "wiki")
    assert refused.returncode == 2 and "absolute" in refused.stderr


def test_a_dead_collector_is_not_silent(tmp_path: Path) -> None:
    """Without the health group, the dead-collector rule test must fail: every flow alert
    resolves when the series vanish, and nothing else fires."""
    promtool = tool("promtool", "prometheus")
    document = yaml.safe_load(RULES.read_text())
    document["groups"] = [g for g in document["groups"] if g["name"] != "flowproof-health"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "rules_test.yaml").write_text(RULES_TEST.read_text())
    tested = run(promtool, "test", "rules", str(tmp_path / "tests" / "rules_test.yaml"))
    assert tested.returncode != 0
    assert "a dead collector pages" in tested.stdout + tested.stderr


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_its_runbook_section() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].partition("#")[2]
        assert anchor in anchors, f"docs/runbook.md has no section for {rule['alert']}"


def test_rules_use_only_metrics_the_collector_exports() -> None:
    from prometheus_client import CollectorRegistry

    from collector.metrics import CollectorMetrics
    from tests.e2e_support.samples import SampleLoop

    loop = SampleLoop()
    loop.probe_all()
    exposition = CollectorMetrics(CollectorRegistry(), state=loop.state).exposition().decode()
    exported = set(re.findall(r"^(flowproof_\w+)", exposition, flags=re.MULTILINE))
    for rule in alerts():
        for name in re.findall(r"flowproof_\w+", rule["expr"]):
            assert name in exported, (
                f"{rule['alert']} uses {name}, which the collector never exports"
            )


def test_the_prometheus_rule_wraps_the_same_groups_and_is_not_stale() -> None:
    checked = run(sys.executable, "scripts/gen-rules.py", "--check")
    assert checked.returncode == 0, checked.stderr
    wrapped = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert wrapped["kind"] == "PrometheusRule"
    assert wrapped["apiVersion"] == "monitoring.coreos.com/v1"
    assert wrapped["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_a_stale_prometheus_rule_is_caught(tmp_path: Path) -> None:
    generator = (ROOT / "scripts" / "gen-rules.py").read_text()
    copy = tmp_path / "scripts" / "gen-rules.py"
    copy.parent.mkdir()
    copy.write_text(generator)
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "deploy" / "prometheus" / "rules.yaml").write_text(RULES.read_text())
    stale = PROMETHEUS_RULE.read_text().replace("for: 1m", "for: 2m", 1)
    (tmp_path / "deploy" / "prometheus" / "prometheusrule.yaml").write_text(stale)
    checked = subprocess.run(
        [sys.executable, str(copy), "--check"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 1
    assert "stale" in checked.stderr


def test_amtool_accepts_the_example_alertmanager_config() -> None:
    checked = run(tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("alertname", "receivers"),
    [
        pytest.param(
            "FlowproofForbiddenFlowOpen",
            "security-team,owning-team",
            id="a security hole reaches security and the owners",
        ),
        pytest.param(
            "FlowproofRequiredFlowBlocked",
            "owning-team",
            id="a broken path reaches the owning team",
        ),
        pytest.param(
            "FlowproofEnforcementDrift", "owning-team", id="drift reaches the owning team"
        ),
        pytest.param(
            "FlowproofAgentsMissing",
            "platform-team",
            id="a missing agent reaches the platform team",
        ),
        pytest.param(
            "FlowproofCollectorDown",
            "platform-team",
            id="a dead collector reaches the platform team",
        ),
        pytest.param(
            "FlowproofAgentDown", "platform-team", id="a dead agent reaches the platform team"
        ),
    ],
)
def test_the_example_alertmanager_config_routes_as_documented(
    alertname: str, receivers: str
) -> None:
    routed = run(
        tool("amtool", "prometheus-alertmanager"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER}",
        f"--verify.receivers={receivers}",
        f"alertname={alertname}",
        "namespace=shop",
    )
    assert routed.returncode == 0, routed.stdout + routed.stderr
