"""The front door: the `flowproof` command line, offline `matrix`, `check`, `explain`, and the rest.

Owns argument parsing and output for the offline commands, and hands `lab`, `agent`, `collector`
and `verify` to their packages, composing what only the top may join: the lab's probe pods for
the collector, the verify client for `lab test`. Exit codes: 0 ok, 1 a violation (or failure), 2 bad input or
a verdict that could not be reached. It never evaluates policies itself: that is collector.core.engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import shtab
from tabulate import tabulate

from agent import runtime as agent_runtime
from agent.settings import build_parser as agent_parser
from collector import runtime as collector_runtime
from collector.core.checking import check, is_ip, parse_port
from collector.core.classes import ClassModel
from collector.core.engine import Engine, endpoint_name
from collector.core.evidence import plan_evidence
from collector.core.model import Pod, Snapshot
from collector.core.reporting import (
    render_evidence_markdown,
    render_evidence_text,
    render_json,
    render_junit,
    render_markdown,
    render_table,
    report_document,
    rows_from_check,
    to_yaml,
)
from collector.core.resolving import DEFAULT_CLUSTER_DNS_IP
from collector.core.views import evidence_plan_json
from collector.reading.manifests import load_snapshot
from collector.settings import build_parser as collector_parser
from flowproof import __version__, verifying
from flowproof.errors import FlowproofError, InputError, shown
from flowproof.labtest import run_lab_test
from flowproof.output import add_output_flag, quiet_broken_pipe, with_examples
from lab import cli as lab_cli
from lab.probepods import lab_probe_pods

EXIT_OK, EXIT_VIOLATION, EXIT_INPUT = 0, 1, 2


def run_collector(argv: list[str]) -> int:
    """The collector, with the lab's probe pods on offer (`--probe-pods lab`)."""
    return collector_runtime.main(argv, providers={"lab": lab_probe_pods})


def run_lab(argv: list[str]) -> int:
    """The lab's command line, with `lab test` run here (it needs the verify client)."""
    return lab_cli.main(argv, test=run_lab_test)


@dataclass(frozen=True)
class Delegated:
    """A command whose own package parses its arguments (`flowproof lab …` runs lab.cli)."""

    run: Callable[[list[str]], int]
    help: str
    parser: Callable[[], argparse.ArgumentParser]
    """Its whole parser, for `flowproof --help` and shell completion."""


DELEGATED: dict[str, Delegated] = {
    "lab": Delegated(
        run_lab,
        "the local lab: up, apply, delete, label, fault, status, down, test",
        lab_cli.build_parser,
    ),
    "agent": Delegated(agent_runtime.main, "run the node agent", agent_parser),
    "collector": Delegated(run_collector, "run the collector", collector_parser),
    "verify": Delegated(
        verifying.main, "run every expectation now against a collector", verifying.build_parser
    ),
}
SHELLS = ("bash", "zsh", "tcsh")

Stdin = BinaryIO | None
"""Where `-f -` reads from (None: the process's standard input)."""


def _paths(values: list[list[str]] | None) -> list[str]:
    return [p for group in values or [] for p in group]


def build_parser() -> argparse.ArgumentParser:
    """Every command of `flowproof`, the delegated ones with their whole parsers (for help and
    completion; they parse their own arguments when run)."""
    parser = argparse.ArgumentParser(
        prog="flowproof",
        description="Prove Kubernetes NetworkPolicies with real packets: intent, model, reality.",
    )
    with_examples(
        parser,
        ("offline: do the policies give what the expectations declare?",
         "flowproof check -f manifests/ -e expectations.yaml"),
        ("the same for a kustomization or a Helm chart",
         "kustomize build overlays/prod | flowproof check -f - -e expectations.yaml"),
        ("real packets in a lab of network namespaces, up and down in one command",
         "flowproof lab test -f manifests/ -e expectations.yaml --junit report.xml"),
        ("shell completion", "source <(flowproof completion bash)"),
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"flowproof {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def manifests(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-f",
            "--filename",
            dest="files",
            action="append",
            nargs="+",
            required=True,
            metavar="PATH",
            help="manifests: files or directories (YAML/JSON, multi-document, List); a directory "
            "with a kustomization file is rendered with `kubectl kustomize`; - reads standard "
            "input (repeatable)",
        ).complete = shtab.FILE  # type: ignore[attr-defined]

    matrix = sub.add_parser(
        "matrix",
        help="the model's reachability matrix with the deciding rules",
        description="The model's verdict for every pod pair on each port: a grid per port "
        "(table), a line per pair with the deciding rules (wide), or every cell as data.",
    )
    with_examples(
        matrix,
        ("a grid per declared port", "flowproof matrix -f examples/shop"),
        ("every pair on 5432/TCP with the rule that decides it",
         "flowproof matrix -f examples/shop --port 5432/TCP -o wide"),
        ("only the totals, fast on large clusters",
         "flowproof matrix -f big/ --port 8080/TCP --counts -o json"),
    )  # fmt: skip
    manifests(matrix)
    matrix.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="PORT/PROTO",
        help="port to evaluate, e.g. 80/TCP (repeatable; default: every declared container port)",
    )
    matrix.add_argument(
        "--counts",
        action="store_true",
        help="only the totals per port (pods, pairs, allowed, denied, classes): fast at any size",
    )
    add_output_flag(matrix, formats=("table", "wide", "json", "yaml"))

    check = sub.add_parser(
        "check",
        help="offline: intent vs model, no cluster; exit 1 on violation",
        description="Offline: compare the declared flows (intent) with what the NetworkPolicies "
        "say (model), no cluster. Exit 0 all hold, 1 a violation, 2 bad input.",
    )
    with_examples(
        check,
        ("the example shop", "flowproof check -f examples/shop"),
        ("manifests and expectations apart, a JUnit report for CI",
         "flowproof check -f k8s/ -e flows.yaml --junit check.xml"),
        ("a kustomization directory is rendered, never read file by file",
         "flowproof check -f deploy/overlays/prod -e flows.yaml"),
        ("a Helm chart", "helm template my-app ./chart | flowproof check -f - -e flows.yaml"),
        ("a comment for the pull request", "flowproof check -f k8s/ -o markdown > comment.md"),
    )  # fmt: skip
    manifests(check)
    check.add_argument(
        "-e",
        "--expectations",
        action="append",
        nargs="+",
        default=None,
        metavar="PATH",
        help="FlowExpectations files or directories; - reads standard input (default: the "
        "ones among the manifests)",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    add_output_flag(check)
    check.add_argument(
        "--junit", metavar="FILE", help="also write JUnit XML here"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    check.add_argument(
        "--json", dest="json_file", metavar="FILE", help="also write JSON here"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    check.add_argument(
        "--markdown", metavar="FILE", help="also write Markdown here"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    check.add_argument(
        "--cluster-dns-ip",
        default=DEFAULT_CLUSTER_DNS_IP,
        help=f"address of the cluster DNS when no kube-dns pod is in the manifests (default "
        f"{DEFAULT_CLUSTER_DNS_IP})",
    )

    evidence = sub.add_parser(
        "evidence",
        help="every policy's witness flows (or why it has none); redundant and shadowed policies",
        description="For every NetworkPolicy and every rule in it, the flows whose verdict flips "
        "when it is removed: what `flowproof verify` and the live loop probe to prove the policy "
        "is enforced as written. Lists redundant policies and shadowed rules. Offline: no cluster.",
    )
    with_examples(
        evidence,
        ("every policy of the example shop and its witnesses", "flowproof evidence -f examples/shop"),
        ("one policy, as JSON",
         "flowproof evidence -f examples/shop --policy shop/default-deny -o json"),
        ("a rendered chart", "helm template app ./chart | flowproof evidence -f - -o markdown"),
    )  # fmt: skip
    manifests(evidence)
    add_output_flag(evidence)
    evidence.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NS/NAME",
        help="only this policy (repeatable)",
    )

    explain = sub.add_parser(
        "explain",
        help="why a flow is allowed or denied, in words",
        description="Why the policies allow or deny one flow: each side (egress at the "
        "source, ingress at the destination), the policies that isolate it, the deciding rule.",
    )
    with_examples(
        explain,
        ("why may the frontend not reach the database?",
         "flowproof explain -f examples/shop --from shop/frontend --to shop/db --port 5432/TCP"),
        ("to an address outside the cluster, as JSON",
         "flowproof explain -f k8s/ --from shop/api --to 203.0.113.7 --port 443/TCP -o json"),
    )  # fmt: skip
    manifests(explain)
    explain.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="NS/POD or IP",
        help="the source: a pod of the manifests (namespace/name) or an IP address",
    )
    explain.add_argument(
        "--to",
        dest="destination",
        required=True,
        metavar="NS/POD or IP",
        help="the destination: a pod of the manifests (namespace/name) or an IP address",
    )
    explain.add_argument(
        "--port",
        required=True,
        metavar="PORT/PROTO",
        help="the port, by number or by the destination's port name, e.g. 5432/TCP or http/TCP",
    )
    add_output_flag(explain, formats=("table", "wide", "json", "yaml"))

    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for the shell: every command, flag and choice "
        "of flowproof (generated by shtab from this very parser).",
    )
    with_examples(
        completion,
        ("bash, for this shell", "source <(flowproof completion bash)"),
        ("bash, for every shell",
         "flowproof completion bash > /etc/bash_completion.d/flowproof"),
        ("zsh", 'flowproof completion zsh > "${fpath[1]}/_flowproof"'),
    )  # fmt: skip
    completion.add_argument("shell", choices=SHELLS, help="the shell: " + ", ".join(SHELLS))

    for name, delegated in DELEGATED.items():
        own = delegated.parser()
        sub.add_parser(
            name,
            help=delegated.help,
            parents=[own],
            conflict_handler="resolve",
            description=own.description,
            epilog=own.epilog,
            formatter_class=own.formatter_class,
        )
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stdin: Stdin = None,
) -> int:
    """Run `flowproof` with `argv` (without the program name); the exit code. A closed output
    (`| head`) ends it quietly with 141."""
    return quiet_broken_pipe(lambda: _main(argv, stdout=stdout, stdin=stdin))


def _main(argv: Sequence[str] | None, *, stdout: TextIO | None, stdin: Stdin) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    out = stdout or sys.stdout
    if args_list and args_list[0] in DELEGATED:
        return DELEGATED[args_list[0]].run(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "completion":
        out.write(shtab.complete(parser, shell=args.shell))
        return EXIT_OK
    args.stdin = stdin  # where `-f -` reads (None: the process's standard input)
    commands: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
        "matrix": cmd_matrix,
        "check": cmd_check,
        "explain": cmd_explain,
        "evidence": cmd_evidence,
    }
    try:
        return commands[args.command](args, out)
    except FlowproofError as exc:
        print(f"flowproof {args.command}: error:\n{exc}", file=sys.stderr)
        return EXIT_INPUT


def _load(args: argparse.Namespace, paths: Sequence[str]) -> Snapshot:
    """The snapshot of the manifests, its warnings printed to stderr (file and line first)."""
    snapshot = load_snapshot(paths, stdin=args.stdin)
    for warning in snapshot.warnings:
        print(f"flowproof {args.command}: warning: {warning}", file=sys.stderr)
    return snapshot


def _write_document(out: TextIO, document: Any, output: str) -> None:
    """A JSON-able document as `-o json` or `-o yaml` asks."""
    if output == "yaml":
        out.write(to_yaml(document))
    else:
        json.dump(document, out, indent=2)
        out.write("\n")


# --- matrix ---------------------------------------------------------------------------------------


def _ports(args: argparse.Namespace, snapshot: Any) -> list[tuple[int, str]]:

    ports: list[tuple[int, str]]

    if args.port:
        ports = []
        for text in args.port:
            value, protocol = parse_port(text)
            if isinstance(value, str):
                raise InputError(
                    f"matrix needs port numbers, not the name {value!r}", field="--port"
                )
            ports.append((value, protocol))
        return ports
    declared = {(cp.port, cp.protocol) for pod in snapshot.pods for cp in pod.ports}
    return sorted(declared, key=lambda pp: (pp[1], pp[0]))


def cmd_matrix(args: argparse.Namespace, out: TextIO) -> int:

    snapshot = _load(args, _paths(args.files))
    ports = _ports(args, snapshot)
    if args.counts:
        model = ClassModel(snapshot)
        rows = []
        for port, protocol in ports:
            counts = model.counts(port, protocol)  # type: ignore[arg-type]
            rows.append(
                {
                    "port": port,
                    "protocol": protocol,
                    "pods": counts.pods,
                    "pairs": counts.pods * counts.pods,
                    "allowed": counts.allowed,
                    "denied": counts.denied,
                    "unknown": counts.unknown,
                    "classes": counts.classes,
                }
            )
        if args.output in ("json", "yaml"):
            _write_document(out, rows, args.output)
        else:
            out.write(tabulate(rows, headers="keys") + "\n")
        return EXIT_OK
    engine = Engine(snapshot)
    pods = sorted(snapshot.pods, key=lambda p: p.key)
    if args.output == "wide":
        out.write(render_matrix_wide(engine, pods, ports))
        return EXIT_OK
    if args.output in ("json", "yaml"):
        cells = []
        for port, protocol in ports:
            for src in pods:
                for dst in pods:
                    verdict = engine.evaluate(src, dst, port, protocol)  # type: ignore[arg-type]
                    cell = {
                        "from": src.key,
                        "to": dst.key,
                        "port": port,
                        "protocol": protocol,
                        "allowed": verdict.allowed,
                        "model": verdict.model,
                        "ingress": verdict.ingress.to_dict(),
                        "egress": verdict.egress.to_dict(),
                    }
                    if verdict.notes:
                        cell["notes"] = list(verdict.notes)
                    if verdict.incomplete:
                        cell["incomplete"] = list(verdict.incomplete)
                    cells.append(cell)
        if args.output == "yaml":
            out.write(to_yaml(cells))
        else:
            json.dump(cells, out, indent=1)
            out.write("\n")
        return EXIT_OK
    out.write(render_matrix_table(engine, pods, ports))
    return EXIT_OK


def render_matrix_wide(engine: Any, pods: list[Any], ports: list[tuple[int, str]]) -> str:
    """A line per pod pair and port, with the rules that decided it on each side."""
    if not pods:
        return "no pods in the manifests\n"
    body = []
    for port, protocol in ports:
        for src in pods:
            for dst in pods:
                verdict = engine.evaluate(src, dst, port, protocol)
                body.append(
                    [
                        src.key,
                        dst.key,
                        f"{port}/{protocol}",
                        "allow" if verdict.allowed else "DENY",
                        _side(verdict.egress),
                        _side(verdict.ingress),
                    ]
                )
    headers = ["FROM", "TO", "PORT", "MODEL", "EGRESS (AT THE SOURCE)", "INGRESS (AT THE DEST)"]
    return tabulate(body, headers=headers, tablefmt="simple") + "\n"


def _side(part: Any) -> str:
    """One side of a verdict in a cell: the deciding rules, or why it denies or is open."""
    if not part.isolated:
        return "not isolated"
    if part.allowed:
        return "; ".join(m.describe() for m in part.allowed_by)
    return "denied: isolated by " + ", ".join(part.policies)


def render_matrix_table(engine: Any, pods: list[Any], ports: list[tuple[int, str]]) -> str:
    """A grid per port: rows are sources, numbered columns are destinations (legend on the rows)."""
    if not pods:
        return "no pods in the manifests\n"
    lines: list[str] = []
    width = max(len(p.key) for p in pods)
    num = len(str(len(pods)))
    for port, protocol in ports:
        allowed = unknown = 0
        lines.append(
            f"{port}/{protocol}   ('.' allowed, 'X' denied, '?' unknown to the model; "
            "row = from, column = to)"
        )
        header = " " * (num + width + 3)
        # Column numbers written vertically so 30+ pods stay narrow.
        for digit in range(num):
            lines.append(header + " ".join(str(i + 1).rjust(num)[digit] for i in range(len(pods))))
        for i, src in enumerate(pods):
            cells = []
            for dst in pods:
                verdict = engine.evaluate(src, dst, port, protocol)
                if not verdict.known:
                    unknown += 1
                    cells.append("?")
                    continue
                allowed += verdict.allowed
                cells.append("." if verdict.allowed else "X")
            lines.append(f"{str(i + 1).rjust(num)} {src.key.ljust(width)}  " + " ".join(cells))
        total = len(pods) * len(pods)
        line = f"{allowed} of {total} pairs allowed, {total - allowed - unknown} denied"
        if unknown:
            line += f", {unknown} unknown (policies flowproof does not model: see `explain`)"
        lines.append(line)
        lines.append("")
    return "\n".join(lines)


# --- check ----------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:

    manifest_paths = _paths(args.files)
    expectation_paths = _paths(args.expectations)
    if not is_ip(args.cluster_dns_ip):
        raise InputError(
            f"{shown(args.cluster_dns_ip)} is not an IP address", field="--cluster-dns-ip"
        )
    verifying.check_output_files(
        {"--junit": args.junit, "--json": args.json_file, "--markdown": args.markdown}
    )
    snapshot = _load(args, manifest_paths + expectation_paths)
    if not snapshot.expectations:
        raise InputError(
            "no FlowExpectations found in "
            + ", ".join(expectation_paths or manifest_paths)
            + " (kind: FlowExpectations, apiVersion: flowproof.dev/v1alpha1)",
            field="--expectations",
        )
    report = check(snapshot, cluster_dns_ip=args.cluster_dns_ip)
    rows = rows_from_check(report)
    renderers: dict[str, Callable[[], str]] = {
        "table": lambda: render_table(rows) + "\n",
        "wide": lambda: render_table(rows, wide=True) + "\n",
        "json": lambda: render_json(rows, problems=report.problems) + "\n",
        "yaml": lambda: to_yaml(report_document(rows, problems=report.problems)),
        "markdown": lambda: render_markdown(rows, title="flowproof check"),
    }
    out.write(renderers[args.output]())
    extra_files: list[tuple[str, str | None, Callable[[], str]]] = [
        ("--junit", args.junit, lambda: render_junit(rows, name="flowproof check")),
        ("--json", args.json_file, lambda: render_json(rows, problems=report.problems)),
        ("--markdown", args.markdown, lambda: render_markdown(rows, title="flowproof check")),
    ]
    for flag, path, text in extra_files:
        if path:
            verifying.write_report_file(path, text(), flag)
    return EXIT_VIOLATION if report.failed else EXIT_OK


# --- explain --------------------------------------------------------------------------------------


def cmd_evidence(args: argparse.Namespace, out: TextIO) -> int:
    snapshot = load_snapshot(_paths(args.files), stdin=args.stdin)
    known = {p.key for p in snapshot.policies}
    unknown = sorted(set(args.policy) - known)
    if unknown:
        raise InputError(
            f"no NetworkPolicy {', '.join(unknown)} in the manifests "
            f"(policies: {', '.join(sorted(known)[:12]) or 'none'})",
            field="--policy",
        )
    plan = plan_evidence(snapshot, running_only=False, policies=args.policy or None)
    renderers: dict[str, Callable[[], str]] = {
        "table": lambda: render_evidence_text(plan),
        "wide": lambda: render_evidence_text(plan),  # the text cuts nothing already
        "json": lambda: json.dumps(evidence_plan_json(plan), indent=2) + "\n",
        "yaml": lambda: to_yaml(evidence_plan_json(plan)),
        "markdown": lambda: render_evidence_markdown(plan),
    }
    out.write(renderers[args.output]())
    return EXIT_OK


def cmd_explain(args: argparse.Namespace, out: TextIO) -> int:

    snapshot = _load(args, _paths(args.files))

    def endpoint(text: str, flag: str) -> Pod | str:
        if is_ip(text):
            return text
        pod = snapshot.pod(text)
        if pod is None:
            known = ", ".join(sorted(p.key for p in snapshot.pods)[:12])
            raise InputError(f"no pod {text!r} in the manifests (pods: {known})", field=flag)
        return pod

    source = endpoint(args.source, "--from")
    destination = endpoint(args.destination, "--to")
    value, protocol = parse_port(args.port)
    if isinstance(value, str):
        if not isinstance(destination, Pod) or destination.named_port(value, protocol) is None:
            raise InputError(
                f"the destination has no port named {value}/{protocol}", field="--port"
            )
        port = destination.named_port(value, protocol)
        assert port is not None
    else:
        port = value
    verdict = Engine(snapshot).evaluate(source, destination, port, protocol)
    if args.output in ("json", "yaml"):
        _write_document(out, verdict.to_dict(), args.output)
        return EXIT_OK
    out.write(
        explain_text(verdict, source, destination, port, protocol, wide=args.output == "wide")
    )
    return EXIT_OK


def explain_text(
    verdict: Any, source: Any, destination: Any, port: int, protocol: str, *, wide: bool = False
) -> str:
    """The verdict in words; `wide` adds every rule that admits it on each side."""

    name_src, name_dst = endpoint_name(source), endpoint_name(destination)
    word = {"allow": "ALLOWED", "deny": "DENIED"}.get(verdict.model, "UNKNOWN")
    lines = [f"{name_src} -> {name_dst} on {port}/{protocol}: {word}", ""]
    if not verdict.known:
        modelled = "allowed" if verdict.allowed else "denied"
        lines.append(
            f"  the model is incomplete for this flow (the policies flowproof models say {modelled}):"
        )
        lines += [f"    - {reason}" for reason in verdict.incomplete]
        lines.append("")
    for label, part in (
        ("egress at the source", verdict.egress),
        ("ingress at the destination", verdict.ingress),
    ):
        state = "allows" if part.allowed else "DENIES"
        decided = f" (decided in the {part.tier} tier)" if part.tier != "none" else ""
        lines.append(f"  {label}: {state}{decided}")
        lines.append(f"    {part.reason}")
        if part.cluster_policies:
            lines.append("    cluster policies of the pod: " + ", ".join(part.cluster_policies))
        if part.isolated:
            lines.append("    isolating policies: " + ", ".join(part.policies))
        if wide:
            for match in part.allowed_by:
                lines.append(f"    allowed by: {match.describe()}")
    for note in verdict.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
