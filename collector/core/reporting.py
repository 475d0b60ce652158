"""Reports of flow statuses: a terminal table, JSON, JUnit XML and Markdown for a pull request.

Owns the rendering of report rows, used by the offline `check` and by `verify`. Rows are plain data;
this module never evaluates policies and never touches the network; writing files is the caller's.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml
from tabulate import tabulate

from collector.core.checking import CheckReport
from collector.core.evidence import EVIDENCE_STATUSES, EvidencePlan
from collector.core.statuses import FAILING, UNDECIDED, status_rank
from collector.core.views import FlowView, check_view


def rows_from_check(report: CheckReport) -> list[FlowView]:
    return sort_rows(check_view(item) for item in report.checks)


def sort_rows(rows: Iterable[FlowView]) -> list[FlowView]:
    """Worst status first, then by expectation, flow and endpoints."""
    return sorted(
        rows,
        key=lambda r: (
            status_rank(r.status),
            r.expectation,
            r.flow,
            r.source,
            r.destination,
            r.port,
        ),
    )


def verdict_word(rows: Sequence[FlowView], *, decided: bool = True) -> str:
    """FAIL when a flow fails, else UNDECIDED when the answer is not decided, else OK: the same
    word as the exit code (1, 2, 0) of the command that prints it."""
    if any(r.status in FAILING for r in rows):
        return "FAIL"
    return "OK" if decided else "UNDECIDED"


def summary_line(rows: Sequence[FlowView], *, decided: bool = True) -> str:
    """`OK: 10 flows: 10 PASS`; never OK when `decided` is False (an exit code of 2)."""
    counts = Counter(r.status for r in rows)
    parts = [f"{counts[s]} {s}" for s in sorted(counts, key=status_rank)]
    verdict = verdict_word(rows, decided=decided)
    return f"{verdict}: {len(rows)} flows: " + (", ".join(parts) if parts else "none")


Policies = Sequence[Mapping[str, Any]]
"""Policies' evidence as collector.core.views.policy_json gives it (worst first)."""


def policy_summary_line(policies: Policies) -> str:
    counts = Counter(str(p["status"]) for p in policies)
    parts = [f"{counts[s]} {s}" for s in EVIDENCE_STATUSES if counts[s]]
    return f"{len(policies)} NetworkPolicies: " + (", ".join(parts) if parts else "none")


def _policy_table(policies: Policies, width: int) -> str:
    body = []
    for p in policies:
        why = str(p["reason"]) if p["status"] != "PROVEN" else ""
        body.append([p["status"], p["id"], why if len(why) <= width else why[: width - 1] + "…"])
    table = tabulate(body, headers=["EVIDENCE", "POLICY", "WHY"], tablefmt="simple")
    return f"{table}\n\n{policy_summary_line(policies)}"


def _word(value: bool | None) -> str:
    return "-" if value is None else ("allow" if value else "deny")


def render_table(
    rows: Sequence[FlowView],
    *,
    with_reality: bool = False,
    width: int = 60,
    policies: Policies = (),
    wide: bool = False,
    decided: bool = True,
) -> str:
    """A table, worst first, and the summary line (then the policies' evidence, when given).
    `wide` adds the kind, the last verification and the latency, and cuts no reason."""
    headers = ["STATUS", "FLOW", "FROM", "TO", "PORT", "INTENT", "MODEL"]
    if with_reality:
        headers.append("REALITY")
    if wide:
        headers += ["KIND", "LAST VERIFIED", "LATENCY"]
    headers.append("WHY")
    body = []
    for r in rows:
        line = [
            r.status,
            f"{r.expectation}/{r.flow}",
            r.source,
            r.destination,
            f"{r.port}/{r.protocol}",
            "allow" if r.intent else "deny",
            r.model_word or "-",
        ]
        if with_reality:
            line.append(r.reality_text() or "-")
        if wide:
            line += [
                r.kind,
                _time(r.last_verified_at),
                "-" if r.latency_seconds is None else f"{r.latency_seconds * 1000:.1f} ms",
            ]
        why = r.reason if r.status != "PASS" or wide else ""
        line.append(why if wide or len(why) <= width else why[: width - 1] + "…")
        body.append(line)
    table = tabulate(body, headers=headers, tablefmt="simple") if body else "(no flows)"
    text = f"{table}\n\n{summary_line(rows, decided=decided)}"
    if policies:
        text += "\n\n" + _policy_table(policies, 10_000 if wide else width)
    return text


def _time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_json(
    rows: Sequence[FlowView],
    *,
    problems: Sequence[str] = (),
    details: Mapping[str, Mapping[str, Any]] | None = None,
    policies: Policies | None = None,
    decided: bool = True,
) -> str:
    """The report as JSON (report_document)."""
    document = report_document(
        rows, problems=problems, details=details, policies=policies, decided=decided
    )
    return json.dumps(document, indent=2, sort_keys=False)


def report_document(
    rows: Sequence[FlowView],
    *,
    problems: Sequence[str] = (),
    details: Mapping[str, Mapping[str, Any]] | None = None,
    policies: Policies | None = None,
    decided: bool = True,
) -> dict[str, Any]:
    """The report as a JSON-able document (`-o json` and `-o yaml`): a summary with the verdict,
    the problems, every flow (in detail where `details` holds it by key: collector.core.views'
    flow_detail and check_detail) and, when given, every policy's evidence."""
    details = details or {}
    counts = Counter(r.status for r in rows)
    document: dict[str, Any] = {
        "summary": {
            "verdict": verdict_word(rows, decided=decided),
            "flows": len(rows),
            "failed": sum(counts[s] for s in FAILING),
            "statuses": dict(sorted(counts.items(), key=lambda kv: status_rank(kv[0]))),
        },
        "problems": list(problems),
        "flows": [dict(details.get(r.key) or r.to_json()) for r in rows],
    }
    if policies is not None:
        evidence = Counter(str(p["status"]) for p in policies)
        document["summary"]["policies"] = {s: evidence[s] for s in EVIDENCE_STATUSES}
        document["policies"] = list(policies)
    return document


def render_junit(
    rows: Sequence[FlowView], *, name: str = "flowproof", policies: Policies = ()
) -> str:
    """JUnit XML: a suite per expectations document, a case per concrete flow, and a suite of
    NetworkPolicies with a case per policy (NOT_ENFORCED fails, PENDING and UNPROVABLE skip)."""
    by_expectation: dict[str, list[FlowView]] = defaultdict(list)
    for r in rows:
        by_expectation[r.expectation].append(r)
    suites = ET.Element("testsuites", name=name)
    total_fail = total_err = 0
    for expectation, items in sorted(by_expectation.items()):
        failures = sum(1 for r in items if r.status in FAILING)
        errors = sum(1 for r in items if r.status in UNDECIDED)
        total_fail += failures
        total_err += errors
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=expectation,
            tests=str(len(items)),
            failures=str(failures),
            errors=str(errors),
        )
        for r in items:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{expectation}/{r.flow}",
                name=f"{r.source} -> {r.destination} {r.port}/{r.protocol}",
            )
            text = (
                f"intent {_word(r.intent)}, model {r.model_word or '-'}"
                + (f", reality {r.reality_text()}" if r.reality else "")
                + f": {r.reason}"
            )
            if r.status in FAILING:
                ET.SubElement(case, "failure", message=r.status, type=r.status).text = text
            elif r.status != "PASS":
                ET.SubElement(case, "error", message=r.status, type=r.status).text = text
    skipped = 0
    if policies:
        suite = ET.SubElement(suites, "testsuite", name="NetworkPolicies", tests=str(len(policies)))
        failed = 0
        for p in policies:
            case = ET.SubElement(suite, "testcase", classname="NetworkPolicies", name=str(p["id"]))
            status, reason = str(p["status"]), str(p["reason"])
            if status == "NOT_ENFORCED":
                ET.SubElement(case, "failure", message=status, type=status).text = reason
                failed += 1
            elif status != "PROVEN":
                ET.SubElement(case, "skipped", message=f"{status}: {reason}")
                skipped += 1
        suite.set("failures", str(failed))
        suite.set(
            "skipped",
            str(sum(1 for p in policies if p["status"] not in ("PROVEN", "NOT_ENFORCED"))),
        )
        total_fail += failed
    suites.set("tests", str(len(rows) + len(policies)))
    suites.set("failures", str(total_fail))
    suites.set("errors", str(total_err))
    if skipped:
        suites.set("skipped", str(skipped))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(
    rows: Sequence[FlowView],
    *,
    title: str = "flowproof",
    with_reality: bool = False,
    policies: Policies = (),
    decided: bool = True,
) -> str:
    """A pull-request comment: the verdict, the failing flows with why, the rest folded; then
    each NetworkPolicy's evidence (not proven ones first, with why)."""
    failing = [r for r in rows if r.status != "PASS"]
    passing = [r for r in rows if r.status == "PASS"]
    icon = {"FAIL": "❌", "UNDECIDED": "⚠️", "OK": "✅"}[verdict_word(rows, decided=decided)]
    lines = [f"### {icon} {title}", "", summary_line(rows, decided=decided), ""]
    header = "| status | flow | from | to | port | intent | model |"
    sep = "|---|---|---|---|---|---|---|"
    if with_reality:
        header += " reality |"
        sep += "---|"

    def row(r: FlowView, why: bool) -> str:
        cells = [
            f"`{r.status}`",
            _md(f"{r.expectation}/{r.flow}"),
            r.source,
            r.destination,
            f"{r.port}/{r.protocol}",
            _word(r.intent),
            r.model_word or "-",
        ]
        if with_reality:
            cells.append(r.reality_text() or "-")
        if why:
            cells.append(_md(r.reason))
        return "| " + " | ".join(cells) + " |"

    if failing:
        lines += [header + " why |", sep + "---|"]
        lines += [row(r, True) for r in failing]
        lines.append("")
    if passing:
        lines += [f"<details><summary>{len(passing)} passing flows</summary>", "", header, sep]
        lines += [row(r, False) for r in passing]
        lines += ["", "</details>"]
    if policies:
        lines += ["", "#### NetworkPolicies", "", policy_summary_line(policies), ""]
        open_ = [p for p in policies if p["status"] != "PROVEN"]
        proven = [p for p in policies if p["status"] == "PROVEN"]
        if open_:
            lines += ["| evidence | policy | why |", "|---|---|---|"]
            lines += [
                f"| `{p['status']}` | {_md(str(p['id']))} | {_md(str(p['reason']))} |"
                for p in open_
            ]
        if proven:
            lines += ["", f"<details><summary>{len(proven)} proven policies</summary>", ""]
            lines += [f"- {_md(str(p['id']))}: {_md(str(p['reason']))}" for p in proven]
            lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


# --- the evidence plan, offline (`flowproof evidence`) --------------------------------------------


def render_evidence_text(plan: EvidencePlan) -> str:
    """Each policy with its witnesses, rule by rule, or why it has none; lint; a summary."""
    lines: list[str] = []
    for policy in plan.policies:
        where = f"  ({policy.source})" if policy.source else ""
        lines.append(f"{policy.policy}{where}")
        if policy.unprovable:
            lines.append(f"  unprovable: {policy.unprovable}")
        for w in policy.witnesses:
            lines.append(f"  witness: {w.describe()}")
        for rule in policy.rules:
            lines.append(f"  {rule.rule.direction}[{rule.rule.index}] {rule.text}")
            if rule.unprovable:
                lines.append(f"    no witness: {rule.unprovable}")
            for w in rule.witnesses:
                lines.append(f"    witness: {w.describe()}")
        for line in policy.lint:
            lines.append(f"  lint: {line}")
        lines.append("")
    lines.append(evidence_summary_line(plan))
    return "\n".join(lines) + "\n"


def evidence_summary_line(plan: EvidencePlan) -> str:
    total = len(plan.policies)
    proven = sum(1 for p in plan.policies if p.all_witnesses())
    witnesses = len({w.flow_key for w in plan.witnesses()})
    rules = [r for p in plan.policies for r in p.rules]
    lint = sum(len(p.lint) for p in plan.policies)
    per_rule = sum(len(r.witnesses) for r in rules) / len(rules) if rules else 0.0
    return (
        f"{total} NetworkPolicies: {proven} with witnesses, {total - proven} unprovable; "
        f"{witnesses} witness flows ({per_rule:.1f} per rule); {lint} lint finding(s)"
    )


def render_evidence_markdown(plan: EvidencePlan) -> str:
    lines = ["### flowproof evidence", "", evidence_summary_line(plan), ""]
    lines += ["| policy | rule | witness or why none |", "|---|---|---|"]
    for policy in plan.policies:
        name = _md(policy.policy)
        if policy.unprovable:
            lines.append(f"| {name} | | unprovable: {_md(policy.unprovable)} |")
        for w in policy.witnesses:
            lines.append(f"| {name} | | {_md(w.describe())} |")
        for rule in policy.rules:
            ref = f"{rule.rule.direction}[{rule.rule.index}]"
            if rule.unprovable:
                lines.append(f"| {name} | {ref} | no witness: {_md(rule.unprovable)} |")
            for w in rule.witnesses:
                lines.append(f"| {name} | {ref} | {_md(w.describe())} |")
    lint = [line for p in plan.policies for line in p.lint]
    if lint:
        lines += ["", "#### Lint", ""] + [f"- {_md(line)}" for line in lint]
    return "\n".join(lines) + "\n"


class _YamlDumper(yaml.SafeDumper):
    """Block style, list items indented under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def to_yaml(document: Any) -> str:
    """`document` (anything JSON can hold) as YAML, keys in their order (`-o yaml`)."""
    return yaml.dump(
        document, Dumper=_YamlDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
