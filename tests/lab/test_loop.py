"""The whole loop in the lab, with real packets: the shop example, its agents and its collector.

One lab for the module (the demo's shop: 3 nodes, 8 pods, 9 policies, 10 declared flows, a
collector and an agent per node, probe timeout 1 s). Each test changes it (a policy, a fault, an
agent or the collector stopped), watches the statuses the collector reports, and the `restored`
fixture puts the shop back afterwards, also when the test failed. Every status of DESIGN.md
appears for real; `flowproof verify --once` and `flowproof lab test` are run as the CI would. The
module's lab is taken down at the end and nothing carrying its name may be left.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from labtools import assert_nothing_left, lab_unavailable, leftovers, unique_name

from lab import system
from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.loop import LoopSettings

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
POLICIES = SHOP / "policies"
BREAKS = REPO / "examples" / "breaks"
EXPECTATION = "shop/shop"
DECLARED = (
    "api-dns",
    "api-to-db",
    "api-to-payments",
    "batch-not-to-api",
    "batch-to-db",
    "frontend-not-to-db",
    "frontend-not-to-outside",
    "frontend-to-api",
    "monitoring-not-to-db",
    "monitoring-scrapes-api",
)
# Fast enough for tests: a flow is probed every ~2 s and STALE 6 s after its last result. DEBUG:
# the agents log every result they measure and every ack, id by id (the restart tests read them).
LOOP = dataclasses.replace(
    LoopSettings.with_planner(
        probe_timeout_seconds=1.0,
        interval_seconds=2.0,
        freshness_seconds=6.0,
        sweep_probes_per_second=5.0,
    ),
    log_level="DEBUG",
)


# --- the module's lab -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(unique_name(), tmp_path_factory.mktemp("loop") / "state")
    try:
        lab.up(read_manifests([SHOP]), LabSettings(owner_pid=os.getpid()), LOOP)
        yield lab
    finally:
        state = lab.paths.load() if lab.exists() else None
        if lab.exists():
            lab.down()
        assert_nothing_left(lab.name, state)


@pytest.fixture
def lab(shop: Lab) -> Iterator[Lab]:
    """The shop lab, put back as it was after the test (policies, faults, pods, agents)."""
    yield shop
    shop.fault("clear")
    shop.apply(read_manifests([SHOP]), prune=True)  # also restarts a pod server that was killed
    shop.loop_start("all")
    # Probe pods go when the collector no longer asks for them.
    wait_for(lambda: not probe_pods(shop), 10, "the probe pods to be deleted")
    # The next test starts from a shop whose every flow is proven again. (A pod whose process
    # was restarted may be missed by its agent for up to 0.5 s: then verify once more.)
    last: list[dict[str, Any]] = [{}]

    def proven() -> bool:
        last[0] = post_verify(shop)
        return bool(last[0]["decided"]) and statuses(last[0]) == {f: {"PASS"} for f in DECLARED}

    wait_for(proven, 20, lambda: "the shop to pass again:\n" + table(last[0]))


# --- helpers --------------------------------------------------------------------------------------


def url(lab: Lab) -> str:
    loop = lab.state().loop
    assert loop is not None
    return loop.url


def lab_token(lab: Lab) -> str:
    loop = lab.state().loop
    assert loop is not None
    return Path(loop.token_file).read_text().strip()


def post_verify(lab: Lab | str, timeout: float = 15.0, *, token: str = "") -> dict[str, Any]:
    """`POST /api/v1/verify` to a lab's collector (or a collector URL and its token): probe every
    declared flow now; the answer once all are settled."""
    base = lab if isinstance(lab, str) else url(lab)
    token = token or (lab_token(lab) if not isinstance(lab, str) else "")
    request = urllib.request.Request(
        f"{base}/api/v1/verify",
        data=json.dumps({"timeout_seconds": timeout}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout + 30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def get(lab: Lab, path: str) -> Any:
    with urllib.request.urlopen(f"{url(lab)}{path}", timeout=10) as response:
        return json.loads(response.read())


def counters(lab: Lab) -> dict[str, Any]:
    data: dict[str, Any] = get(lab, "/api/v1/debug/loop")
    return data


def table(answer: dict[str, Any]) -> str:
    return "\n".join(
        f"{r['status']:18} {r['flow']:24} {r['source']} -> {r['destination']} "
        f"{r['port']}/{r['protocol']} reality={reality_of(r)}"
        + ("" if r["status"] == "PASS" else f" ({r['reason']})")
        for r in answer["rows"]
    )


def statuses(answer: dict[str, Any]) -> dict[str, set[str]]:
    """Declared flow name -> the statuses of its concrete flows."""
    found: dict[str, set[str]] = {}
    for row in answer["rows"]:
        found.setdefault(row["flow"], set()).add(row["status"])
    return found


def assert_statuses(answer: dict[str, Any], **expected: str) -> None:
    """Every declared flow has the status given for it (flow names with _ for -), else PASS."""
    flows = {*DECLARED, *statuses(answer)}
    wanted = {flow: expected.get(flow.replace("-", "_"), "PASS") for flow in flows}
    assert statuses(answer) == {flow: {status} for flow, status in wanted.items()}, table(answer)


def reality_of(row: dict[str, Any]) -> str:
    """`allow (CONNECTED)`: a row's reality with the outcome that gave it."""
    if row.get("reality") is None:
        return "None"
    return f"{row['reality']} ({row['observed']})"


def realities(answer: dict[str, Any], flow: str) -> set[str]:
    return {reality_of(r) for r in answer["rows"] if r["flow"] == flow}


def wait_for(condition: Callable[[], Any], seconds: float, what: str | Callable[[], str]) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {seconds:g}s waiting for {text}")
        time.sleep(0.1)


def probe_pods(lab: Lab) -> list[str]:
    return [p.key for p in lab.state().pods if p.name.startswith("flowproof-probe-")]


def node_of(lab: Lab, key: str) -> str:
    record = lab.state().pod(key)
    assert record is not None
    return f"node-{record.node}"


def flowproof(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowproof.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        check=False,
    )


def lab_env(lab: Lab) -> dict[str, str]:
    """What `flowproof verify` needs to find the lab's collector with no flags."""
    return {"FLOWPROOF_LAB_NAME": lab.name, "FLOWPROOF_LAB_STATE_DIR": str(lab.paths.state_dir)}


def in_background(action: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `action` in a thread; its result (or exception) lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(action())
        except Exception as exc:  # the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# --- PASS, and the CI gate ------------------------------------------------------------------------


def test_the_demo_lab_passes_and_verify_once_exits_0_with_reports(lab: Lab, tmp_path: Path) -> None:
    junit, report, markdown = tmp_path / "v.xml", tmp_path / "v.json", tmp_path / "v.md"
    done = flowproof(
        "verify",
        "--once",
        "--timeout",
        "20",
        "--junit",
        str(junit),
        "--json",
        str(report),
        "--markdown",
        str(markdown),
        env=lab_env(lab),  # no --collector: found through lab.state.collector_url
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 PASS" in done.stdout
    suites = ET.parse(junit).getroot()
    # 20 concrete flows and a testcase per NetworkPolicy of the shop (9), none failing.
    assert (suites.get("tests"), suites.get("failures"), suites.get("errors")) == ("29", "0", "0")
    [policies] = [s for s in suites if s.get("name") == "NetworkPolicies"]
    assert len(policies) == 9
    data = json.loads(report.read_text())
    assert data["summary"]["verdict"] == "OK"
    assert {k: data["summary"][k] for k in ("flows", "failed", "statuses")} == {
        "flows": 20,
        "failed": 0,
        "statuses": {"PASS": 20},
    }
    assert data["summary"]["policies"]["NOT_ENFORCED"] == 0
    assert len(data["policies"]) == 9
    rows = data["flows"]
    assert {r["status"] for r in rows} == {"PASS"}
    assert {r["flow"] for r in rows} == set(DECLARED)
    text = markdown.read_text()
    assert "PASS" in text and "api-to-db" in text


def test_verify_shows_its_progress_when_asked_and_stays_quiet_in_ci(lab: Lab) -> None:
    """The collector streams its progress (NDJSON) to a client that asks; the report is the same."""
    shown = flowproof(
        "verify", "--once", "--timeout", "20", "--progress", "always", env=lab_env(lab)
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "verify: 20/20 flows decided" in shown.stderr
    assert shown.stderr.count("\x1b[K") >= 2, "one line, rewritten in place and cleared"
    assert "OK: 20 flows: 20 PASS" in shown.stdout.splitlines()
    quiet = flowproof("verify", "--once", "--timeout", "20", env={**lab_env(lab), "CI": "true"})
    assert quiet.returncode == 0, quiet.stderr
    assert "flows decided" not in quiet.stderr and "\x1b" not in quiet.stderr
    assert "OK: 20 flows: 20 PASS" in quiet.stdout.splitlines()


def test_verify_says_how_each_flow_was_decided(lab: Lab) -> None:
    answer = post_verify(lab)
    assert answer["decided"], answer["reasons"]
    assert_statuses(answer)
    assert realities(answer, "frontend-to-api") == {"allow (HTTP_STATUS 200)"}
    assert realities(answer, "api-dns") == {"allow (CONNECTED)"}
    # Drop is the lab's default deny: the probe times out.
    assert realities(answer, "frontend-not-to-db") == {"deny (TIMEOUT)"}


# --- REQUIRED_BLOCKED, FORBIDDEN_OPEN --------------------------------------------------------------


def test_a_policy_that_blocks_a_declared_path_is_required_blocked(lab: Lab, tmp_path: Path) -> None:
    lab.apply(read_manifests([BREAKS / "db-ingress-only-batch.yaml"]))
    answer = post_verify(lab)
    assert_statuses(answer, api_to_db="REQUIRED_BLOCKED")
    assert realities(answer, "api-to-db") == {"deny (TIMEOUT)"}

    junit = tmp_path / "v.xml"
    done = flowproof("verify", "--once", "--junit", str(junit), env=lab_env(lab))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "REQUIRED_BLOCKED" in done.stdout
    assert ET.parse(junit).getroot().get("failures") == "2"  # api-0 and api-1 -> db-0

    lab.apply(read_manifests([POLICIES / "api-to-db.yaml"]))
    assert_statuses(post_verify(lab))


PROMETHEUS_EGRESS = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "prometheus-egress", "namespace": "monitoring"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "prometheus"}},
        "policyTypes": ["Egress"],
        "egress": [
            {
                "to": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}}
                ],
                "ports": [{"port": "metrics"}],
            }
        ],
    },
}
PROMETHEUS_EXPECTATIONS = {
    "apiVersion": "flowproof.dev/v1alpha1",
    "kind": "FlowExpectations",
    "metadata": {"name": "monitoring", "namespace": "monitoring"},
    "spec": {
        "flows": [
            {
                "name": "prometheus-not-to-outside",
                "from": {"podSelector": {"matchLabels": {"app": "prometheus"}}},
                "to": {"cidr": "198.51.100.0/24"},
                "ports": ["443/TCP"],
                "expect": "deny",
            }
        ]
    },
}


def test_removing_the_policy_that_closed_a_forbidden_path_is_forbidden_open(
    lab: Lab, tmp_path: Path
) -> None:
    policy, expectations = tmp_path / "policy.yaml", tmp_path / "expectations.yaml"
    policy.write_text(yaml.safe_dump(PROMETHEUS_EGRESS))
    expectations.write_text(yaml.safe_dump(PROMETHEUS_EXPECTATIONS))
    lab.apply(read_manifests([policy, expectations]))
    answer = post_verify(lab)
    assert_statuses(answer)  # prometheus-not-to-outside holds: its egress is isolated
    assert realities(answer, "prometheus-not-to-outside") == {"deny (TIMEOUT)"}

    lab.delete(read_manifests([policy]))
    answer = post_verify(lab)
    assert_statuses(answer, prometheus_not_to_outside="FORBIDDEN_OPEN")
    assert realities(answer, "prometheus-not-to-outside") == {"allow (CONNECTED)"}


def test_a_policy_that_opens_a_forbidden_path_is_forbidden_open(lab: Lab) -> None:
    lab.apply(read_manifests([BREAKS / "allow-frontend-to-db.yaml"]))  # the demo's second break
    answer = post_verify(lab)
    assert_statuses(answer, frontend_not_to_db="FORBIDDEN_OPEN")
    assert realities(answer, "frontend-not-to-db") == {"allow (CONNECTED)"}


# --- POLICY_MISMATCH, ENFORCEMENT_DRIFT (every fault mode) ------------------------------------------


def test_policies_that_contradict_intent_while_the_kernel_lags_are_policy_mismatch(
    lab: Lab,
) -> None:
    # The policies now deny api -> db (intent allow); the kernel still allows it (lag).
    lab.fault("lag", ["60"])
    lab.apply(read_manifests([BREAKS / "db-ingress-only-batch.yaml"]))
    answer = post_verify(lab)
    assert_statuses(answer, api_to_db="POLICY_MISMATCH")
    assert realities(answer, "api-to-db") == {"allow (CONNECTED)"}
    # Once the kernel catches up, model and reality agree: the failure is the policy's.
    lab.fault("clear")
    assert_statuses(post_verify(lab), api_to_db="REQUIRED_BLOCKED")


def _endport_policy(tmp_path: Path) -> Path:
    """batch -> db on the range 5400-5500 instead of 5432 (the model allows 5432 either way)."""
    text = (POLICIES / "batch-to-db.yaml").read_text()
    doc = next(d for d in yaml.safe_load_all(text) if d)
    doc["spec"]["egress"][0]["ports"] = [{"port": 5400, "endPort": 5500, "protocol": "TCP"}]
    path = tmp_path / "batch-to-db-range.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("fault", "drifting"),
    [
        pytest.param(
            ["ignore-policy", "shop/db-ingress"],
            {"api_to_db", "batch_to_db"},
            id="ignore-policy: the default deny still isolates the database",
        ),
        pytest.param(
            ["lag"],
            {"api_to_db"},
            id="lag: the policy that opens api -> db again is not enforced yet",
        ),
        pytest.param(
            ["reject"],
            set(),
            id="reject: still a deny (reset or admin-prohibited), so no drift",
        ),
        pytest.param(
            ["ignore-named-ports"],
            {"api_to_db", "batch_to_db", "frontend_to_api", "monitoring_scrapes_api"},
            id="ignore-named-ports: every flow opened by a named port is blocked",
        ),
        pytest.param(
            ["ignore-endport"],
            {"batch_to_db"},
            id="ignore-endport: a range matches only its first port",
        ),
    ],
)
def test_enforcement_that_deviates_from_the_policies_is_enforcement_drift(
    lab: Lab, tmp_path: Path, fault: list[str], drifting: set[str]
) -> None:
    mode = fault[0]
    if mode == "lag":
        lab.apply(read_manifests([BREAKS / "db-ingress-only-batch.yaml"]))  # enforced at once
        lab.fault("lag", ["60"])
        lab.apply(read_manifests([POLICIES / "api-to-db.yaml"]))  # the fix, not enforced yet
    elif mode == "ignore-endport":
        lab.apply(read_manifests([_endport_policy(tmp_path)]))
        lab.fault(mode)
    else:
        lab.fault(mode, fault[1:])
    answer = post_verify(lab)
    expected = dict.fromkeys(drifting, "ENFORCEMENT_DRIFT")
    if mode == "reject":
        # A reset from a pod that declares the port reads as a deny, like a drop; the reset the
        # frontend's own egress rule sends for the outside has no known listener behind it.
        expected["frontend_not_to_outside"] = "INCONCLUSIVE"
    assert_statuses(answer, **expected)
    for flow in drifting:
        assert realities(answer, flow.replace("_", "-")) <= {"deny (TIMEOUT)"}, table(answer)


def test_drop_and_reject_both_read_as_deny_but_a_refusal_with_no_listener_does_not(
    lab: Lab,
) -> None:
    dropped = post_verify(lab)
    lab.fault("reject")
    rejected = post_verify(lab)
    for flow in ("frontend-not-to-db", "batch-not-to-api", "monitoring-not-to-db"):
        assert realities(dropped, flow) == {"deny (TIMEOUT)"}, table(dropped)
        assert realities(rejected, flow) == {"deny (REFUSED)"}, table(rejected)
        assert statuses(rejected)[flow] == {"PASS"}
    # Nothing is known to listen on the outside's 443: a refusal there cannot prove a deny.
    assert realities(rejected, "frontend-not-to-outside") == {"inconclusive (REFUSED)"}
    outside = [r for r in rejected["rows"] if r["flow"] == "frontend-not-to-outside"]
    assert {r["status"] for r in outside} == {"INCONCLUSIVE"}
    assert all("nothing known to listen" in r["reason"] for r in outside), table(rejected)


# --- INCONCLUSIVE, STALE --------------------------------------------------------------------------


def test_a_source_pod_that_is_gone_makes_its_flows_inconclusive(lab: Lab) -> None:
    record = lab.state().pod("shop/batch-0")
    assert record is not None and record.server is not None
    # The pod's only process dies; the cluster still lists it as running (as before a kubelet
    # notices): the agent finds no process in its cgroup, hence no namespace to probe from.
    assert not system.stop_processes([record.server])
    answer = post_verify(lab)
    assert_statuses(answer, batch_to_db="INCONCLUSIVE", batch_not_to_api="INCONCLUSIVE")
    rows = [r for r in answer["rows"] if r["flow"] == "batch-to-db"]
    assert {reality_of(r) for r in rows} == {"inconclusive (ERROR)"}, table(answer)


def test_a_stopped_agent_makes_its_flows_stale_and_verify_exits_2(lab: Lab) -> None:
    node = node_of(lab, "shop/batch-0")
    sourced_there = {
        r["flow"]
        for r in post_verify(lab)["rows"]
        if node_of(lab, r["source"]) == node and r["flow"] in DECLARED
    }
    assert sourced_there
    assert lab.loop_stop(node) == [f"agent {node}"]

    seen: list[dict[str, str]] = [{}]

    def stale() -> bool:
        seen[0] = {
            f["flow"]: f"{f['status']}: {f['reason']}" for f in get(lab, "/api/v1/flows")["flows"]
        }
        return all(
            text.startswith("STALE" if flow in sourced_there else "PASS")
            for flow, text in seen[0].items()
        )

    wait_for(
        stale,
        LOOP.planner.freshness_seconds + 5,
        lambda: f"flows sourced on {node} to be STALE, the others PASS: {seen[0]}",
    )
    done = flowproof("verify", "--once", "--timeout", "3", env=lab_env(lab))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"no agent connected on node(s) {node}" in done.stderr

    assert lab.loop_start(node) == [f"agent {node}"]
    assert_statuses(post_verify(lab))


def test_verify_exits_2_when_the_collector_cannot_be_reached(lab: Lab) -> None:
    lab.loop_stop("collector")
    done = flowproof("verify", "--once", "--timeout", "3", env=lab_env(lab))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot reach the collector" in done.stderr


# --- restarts lose nothing and count nothing twice --------------------------------------------------
#
# The agents log every result they measure and every ack they get (DEBUG, in the lab's logs); the
# collector appends every result it delivers to its ledger (<lab>/collector/delivered.jsonl, one
# "run" line per start). The tests compare the two id by id.

_MEASURED = re.compile(r"result (\S+) of assignment (\S+) measured")
_ACKED = re.compile(r"result (\S+) acked")


@dataclass
class AgentRecord:
    """What the agents said they did: results measured (result id -> assignment id), acked."""

    measured: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    by_node: dict[str, set[str]] = field(default_factory=dict)  # node -> result ids measured


def agent_record(lab: Lab) -> AgentRecord:
    record = AgentRecord()
    for log in sorted(lab.paths.log_dir.glob("agent-*.log")):
        node = log.stem.removeprefix("agent-")
        for line in log.read_text(errors="replace").splitlines():
            if match := _MEASURED.search(line):
                record.measured[match.group(1)] = match.group(2)
                record.by_node.setdefault(node, set()).add(match.group(1))
            elif match := _ACKED.search(line):
                record.acked.add(match.group(1))
    return record


@dataclass
class Delivered:
    """The collector's ledger: every result delivered, in order, with the run that delivered it."""

    results: list[tuple[int, str, str]]  # (run, result id, assignment id)
    runs: int

    def result_ids(self, run: int | None = None) -> list[str]:
        return [r for n, r, _ in self.results if run is None or n == run]

    def assignment_ids(self) -> list[str]:
        return [a for _, _, a in self.results]


def delivered(lab: Lab) -> Delivered:
    runs = 0
    results: list[tuple[int, str, str]] = []
    path = lab.paths.root / "collector" / "delivered.jsonl"
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry[0] == "run":
            runs += 1
        elif entry[0] == "result" and entry[1]:
            results.append((runs, entry[1], entry[2]))
    return Delivered(results, runs)


def requeued(lab: Lab, node: str, since: int) -> list[str]:
    """Assignment ids the collector re-queued when `node`'s agent went (its log past `since`)."""
    lines = (lab.paths.log_dir / "collector.log").read_text().splitlines()[since:]
    ids: list[str] = []
    for line in lines:
        if match := re.search(rf"re-queued for {node}: (.+)$", line):
            ids += match.group(1).split()
    return ids


def probes_counted(lab: Lab) -> float:
    """sum(flowproof_probes_total) of the running collector: the results it counted."""
    with urllib.request.urlopen(f"{url(lab)}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("flowproof_probes_total{")
    )


def settle(lab: Lab, seconds: float = 3.0) -> None:
    """Wait until every result measured more than `seconds` ago is acked (results keep coming:
    the loop never stops)."""
    time.sleep(seconds)


def snapshot_of_delivery(lab: Lab) -> tuple[Delivered, AgentRecord]:
    """The collector's ledger and the agents' record, consistent although the loop goes on: the
    acks read before the ledger (an ack follows its ledger line), the measurements after it (an
    agent logs a result before it sends it)."""
    before = agent_record(lab)
    ledger = delivered(lab)
    after = agent_record(lab)
    return ledger, AgentRecord(after.measured, before.acked, after.by_node)


def assert_every_result_once(lab: Lab, record: AgentRecord, ledger: Delivered) -> None:
    recorded = ledger.result_ids()
    assert len(recorded) == len(set(recorded)), "a result was delivered twice"
    assignments = ledger.assignment_ids()
    twice = [a for a, n in collections.Counter(assignments).items() if n > 1]
    assert not twice, f"assignments answered twice: {twice[:5]}"
    unknown = set(recorded) - set(record.measured)
    assert not unknown, f"the collector recorded results no agent measured: {sorted(unknown)[:5]}"
    lost = record.acked - set(recorded)
    assert not lost, f"acked but never recorded: {sorted(lost)[:5]}"
    refused = counters(lab)["results_refused"]
    assert not any(refused.values()), refused


def test_restarting_an_agent_mid_run_loses_no_result_and_counts_none_twice(lab: Lab) -> None:
    node = node_of(lab, "shop/frontend-0")
    post_verify(lab)
    before = counters(lab)
    seen = (lab.paths.log_dir / "collector.log").read_text().count("\n")
    thread, outcome = in_background(lambda: post_verify(lab, timeout=20))
    time.sleep(0.3)  # the denied probes (1 s each) are in flight on the agent now
    assert counters(lab)["in_flight"] > 0
    killed = agent_record(lab).by_node.get(node, set())
    lab.loop_restart(node)  # SIGKILL: whatever it held is re-queued for its successor
    thread.join(40)
    (answer,) = outcome
    assert isinstance(answer, dict), answer
    assert answer["decided"], answer["reasons"]
    assert_statuses(answer)
    settle(lab)
    ledger, record = snapshot_of_delivery(lab)
    after = counters(lab)
    assert after["lost_total"] == before["lost_total"] == 0, after
    instance = {a["node"]: a["instance_id"] for a in after["agents"]}
    assert instance[node] != {a["node"]: a["instance_id"] for a in before["agents"]}[node]
    assert_every_result_once(lab, record, ledger)
    # Every assignment the killed agent held went back to the queue and got exactly one result,
    # from its successor (a result the killed one measured but never delivered is not counted).
    again = requeued(lab, node, seen)
    assert again, "the killed agent held probes; they must be redone"
    answered = collections.Counter(ledger.assignment_ids())
    missing = [a for a in again if answered[a] != 1]
    assert not missing, f"re-queued assignments without exactly one result: {missing[:5]}"
    successor = record.by_node[node] - killed
    for assignment in again:
        [rid] = [r for _, r, a in ledger.results if a == assignment]
        assert rid in successor, f"{assignment} was answered by the killed agent, not its successor"


def test_restarting_the_collector_mid_run_loses_no_result_and_counts_none_twice(lab: Lab) -> None:
    post_verify(lab)
    old = counters(lab)
    thread, outcome = in_background(lambda: post_verify(lab, timeout=20))
    time.sleep(0.3)  # the agents are probing for this collector now
    assert counters(lab)["in_flight"] > 0
    runs_before = delivered(lab).runs
    lab.loop_restart("collector")  # SIGKILL, then the same ports, token, key and ledger
    thread.join(40)
    (broken,) = outcome
    assert isinstance(broken, (urllib.error.URLError, ConnectionError, OSError)), broken
    new = counters(lab)
    assert new["started_at"] > old["started_at"]
    answer = post_verify(lab)
    assert_statuses(answer)
    settle(lab)
    ledger, record = snapshot_of_delivery(lab)
    assert ledger.runs == runs_before + 1
    assert_every_result_once(lab, record, ledger)
    # What the agents measured while the collector was down reached the new one: delivered
    # (issued by the old collector: "unplanned", its seal verified with the kept key).
    now = counters(lab)
    assert now["results_unplanned_total"] > 0, now
    assert all(a["results_dropped_total"] == 0 for a in now["agents"]), now
    assert {a["node"] for a in now["agents"]} == {"node-1", "node-2", "node-3"}
    # The new collector's counters count what it delivered, and nothing the old one had: a
    # result re-sent because its ack was lost is acked again, not counted again.
    run = ledger.runs
    first = set(ledger.result_ids(run - 1))
    assert not first & set(ledger.result_ids(run)), "a result was counted by both collectors"
    lines_before = len(delivered(lab).result_ids(run))
    counted = probes_counted(lab)
    time.sleep(0.5)  # the ledger is flushed once a message of results is taken
    lines_after = len(delivered(lab).result_ids(run))
    assert lines_before <= counted <= lines_after, (lines_before, counted, lines_after)


# --- probe pods -----------------------------------------------------------------------------------


CANARY = {
    "apiVersion": "flowproof.dev/v1alpha1",
    "kind": "FlowExpectations",
    "metadata": {"name": "canary", "namespace": "shop"},
    "spec": {
        "flows": [
            {
                "name": "canary-to-api",
                "from": {"podSelector": {"matchLabels": {"app": "frontend", "track": "canary"}}},
                "to": {"podSelector": {"matchLabels": {"app": "api"}}},
                "ports": ["8080/TCP"],
                "expect": "allow",
            },
            {
                "name": "reports-not-to-db",
                "from": {"podSelector": {"matchLabels": {"app": "reports"}}},
                "to": {"podSelector": {"matchLabels": {"app": "db"}}},
                "ports": ["5432/TCP"],
                "expect": "deny",
            },
        ]
    },
}


def test_a_flow_whose_from_matches_no_running_pod_is_probed_from_a_probe_pod(
    lab: Lab, tmp_path: Path
) -> None:
    path = tmp_path / "canary.yaml"
    path.write_text(yaml.safe_dump(CANARY))
    lab.apply(read_manifests([path]))

    def settled() -> dict[str, Any] | None:
        # verify waits for the probe pods the collector asked the lab for. (The agent may not
        # find a brand-new pod for up to 0.5 s after its last /proc scan: then ask again.)
        answer = post_verify(lab)
        found = statuses(answer)
        fresh = {"canary-to-api", "reports-not-to-db"} <= found.keys()
        return answer if fresh and "INCONCLUSIVE" not in set().union(*found.values()) else None

    answer = wait_for(settled, 15, "the flows from probe pods to settle")
    assert answer["decided"], answer["reasons"]
    made = probe_pods(lab)
    assert len(made) == 2
    cluster = list(yaml.safe_load_all(lab.paths.cluster_file.read_text()))
    for key in made:
        name = key.split("/")[1]
        (doc,) = [d for d in cluster if d and d["kind"] == "Pod" and d["metadata"]["name"] == name]
        assert doc["metadata"]["labels"]["flowproof.dev/probe-pod"] == "true"
        assert doc["status"]["containerStatuses"][0]["ready"] is False, "never Ready"
        assert doc["spec"]["containers"][0].get("ports") is None, "no listener"
    found = statuses(answer)
    assert found["canary-to-api"] == {"PASS"}, table(answer)
    assert found["reports-not-to-db"] == {"PASS"}, table(answer)
    for flow, reality in (("canary-to-api", "allow"), ("reports-not-to-db", "deny")):
        records = get(lab, f"/api/v1/flows/shop/canary/{flow}")["flows"]
        assert records
        for record in records:
            assert record["source"] in made
            assert record["results"][-1]["sourceKind"] == "PROBE_POD"
            assert record["results"][-1]["reality"] == reality
    # Flows from real pods say so too.
    (record, *_) = get(lab, f"/api/v1/flows/{EXPECTATION}/api-to-db")["flows"]
    assert record["results"][-1]["sourceKind"] == "POD"

    lab.delete(read_manifests([path]))
    wait_for(lambda: not probe_pods(lab), 10, "the probe pods to be deleted")


# --- flowproof lab test: up, verify, down ---------------------------------------------------------


def _lab_test(state_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    done = flowproof("lab", "--state-dir", str(state_dir), "test", *args)
    names = [
        line.split("building lab ")[1].strip()
        for line in done.stderr.splitlines()
        if "building lab " in line
    ]
    assert len(names) == 1, done.stderr
    return done, names[0]


@pytest.fixture
def lab_test_state(tmp_path: Path) -> Path:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return tmp_path / "state"


def test_lab_test_proves_the_shop_and_leaves_nothing(lab_test_state: Path, tmp_path: Path) -> None:
    junit, report = tmp_path / "shop.xml", tmp_path / "shop.json"
    done, name = _lab_test(
        lab_test_state,
        "-f",
        str(SHOP / "manifests"),
        str(POLICIES),
        "-e",
        str(SHOP / "expectations.yaml"),
        "--junit",
        str(junit),
        "--json",
        str(report),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 PASS" in done.stdout
    assert ET.parse(junit).getroot().get("failures") == "0"
    assert json.loads(report.read_text())
    assert not Lab(name, lab_test_state).exists()
    assert_nothing_left(name, None)


def test_lab_test_exits_1_when_an_expectation_fails(lab_test_state: Path) -> None:
    policies = [str(p) for p in sorted(POLICIES.glob("*.yaml")) if p.name != "api-to-db.yaml"]
    done, name = _lab_test(
        lab_test_state,
        "-f",
        str(SHOP / "manifests"),
        *policies,
        str(BREAKS / "db-ingress-only-batch.yaml"),
        "-e",
        str(SHOP / "expectations.yaml"),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "REQUIRED_BLOCKED" in done.stdout
    assert_nothing_left(name, None)


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGINT, id="Ctrl-C"),
        pytest.param(signal.SIGTERM, id="SIGTERM from a cancelled CI job"),
        pytest.param(signal.SIGKILL, id="SIGKILL: the lab's supervisor sees its owner gone"),
    ],
)
def test_lab_test_takes_its_lab_down_when_interrupted(
    lab_test_state: Path, sig: signal.Signals
) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowproof.cli",
            "lab",
            "--state-dir",
            str(lab_test_state),
            "test",
            "-f",
            str(SHOP),
            "--timeout",
            "60",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        name = ""
        for line in process.stderr:
            if "building lab " in line:
                name = line.split("building lab ")[1].strip()
            if "verifying" in line:
                break
        assert name, "lab test never built its lab"
        process.send_signal(sig)
        rest = process.stderr.read()
        if sig == signal.SIGKILL:
            assert process.wait(30) == -signal.SIGKILL
            lab = Lab(name, lab_test_state)
            wait_for(lambda: not lab.exists(), 20, f"the supervisor to take lab {name} down")
        else:
            assert process.wait(30) == 130, rest
            assert f"lab {name} is down" in rest
        wait_for(lambda: not leftovers(name, None), 10, f"nothing of lab {name} to be left")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
