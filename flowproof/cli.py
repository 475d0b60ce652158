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
from typing import Any, TextIO

from agent import runtime as agent_runtime
from collector import runtime as collector_runtime
from collector.core.checking import check, is_ip, parse_port
from collector.core.classes import ClassModel
from collector.core.engine import Engine, endpoint_name
from collector.core.model import Pod
from collector.core.reporting import (
    render_json,
    render_junit,
    render_markdown,
    render_table,
    rows_from_check,
)
from collector.core.resolving import DEFAULT_CLUSTER_DNS_IP
from collector.reading.manifests import load_snapshot
from flowproof import __version__, verifying
from flowproof.errors import FlowproofError, InputError, shown
from flowproof.labtest import run_lab_test
from lab import cli as lab_cli
from lab.probepods import lab_probe_pods

EXIT_OK, EXIT_VIOLATION, EXIT_INPUT = 0, 1, 2


def run_collector(argv: list[str]) -> int:
    """The collector, with the lab's probe pods on offer (`--probe-pods lab`)."""
    return collector_runtime.main(argv, providers={"lab": lab_probe_pods})


def run_lab(argv: list[str]) -> int:
    """The lab's command line, with `lab test` run here (it needs the verify client)."""
    return lab_cli.main(argv, test=run_lab_test)


DELEGATED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "lab": (run_lab, "the local lab: up, apply, delete, label, fault, status, down, test"),
    "agent": (agent_runtime.main, "run the node agent"),
    "collector": (run_collector, "run the collector"),
    "verify": (verifying.main, "run every expectation now against a collector"),
}


def _paths(values: list[list[str]] | None) -> list[str]:
    return [p for group in values or [] for p in group]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowproof",
        description="Prove Kubernetes NetworkPolicies with real packets: intent, model, reality.",
    )
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
            help="manifests: files or directories (YAML/JSON, multi-document, List, kustomize)",
        )

    matrix = sub.add_parser(
        "matrix", help="the model's reachability matrix with the deciding rules"
    )
    manifests(matrix)
    matrix.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="PORT/PROTO",
        help="port to evaluate, e.g. 80/TCP (repeatable; default: every declared container port)",
    )
    matrix.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "counts"),
        default="table",
        help="table (a grid per port), json (a cell per pod pair), counts (totals only, fast)",
    )

    check = sub.add_parser(
        "check", help="offline: intent vs model, no cluster; exit 1 on violation"
    )
    manifests(check)
    check.add_argument(
        "-e",
        "--expectations",
        action="append",
        nargs="+",
        default=None,
        metavar="PATH",
        help="FlowExpectations files (default: the ones among the manifests)",
    )
    check.add_argument("-o", "--output", choices=("table", "json", "markdown"), default="table")
    check.add_argument("--junit", metavar="FILE", help="also write JUnit XML here")
    check.add_argument("--json", dest="json_file", metavar="FILE", help="also write JSON here")
    check.add_argument("--markdown", metavar="FILE", help="also write Markdown here")
    check.add_argument(
        "--cluster-dns-ip",
        default=DEFAULT_CLUSTER_DNS_IP,
        help="address of the cluster DNS when no kube-dns pod is in the manifests",
    )

    explain = sub.add_parser("explain", help="why a flow is allowed or denied, in words")
    manifests(explain)
    explain.add_argument("--from", dest="source", required=True, metavar="NS/POD or IP")
    explain.add_argument("--to", dest="destination", required=True, metavar="NS/POD or IP")
    explain.add_argument("--port", required=True, metavar="PORT/PROTO")
    explain.add_argument("-o", "--output", choices=("text", "json"), default="text")

    for name, (_, text) in DELEGATED.items():
        delegated = sub.add_parser(name, help=text, add_help=False)
        delegated.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:

    args_list = list(sys.argv[1:] if argv is None else argv)
    out = stdout or sys.stdout
    if args_list and args_list[0] in DELEGATED:
        entry, _ = DELEGATED[args_list[0]]
        return entry(args_list[1:])
    args = build_parser().parse_args(args_list)
    commands: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
        "matrix": cmd_matrix,
        "check": cmd_check,
        "explain": cmd_explain,
    }
    try:
        return commands[args.command](args, out)
    except FlowproofError as exc:
        print(f"flowproof {args.command}: error:\n{exc}", file=sys.stderr)
        return EXIT_INPUT


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

    snapshot = load_snapshot(_paths(args.files))
    ports = _ports(args, snapshot)
    if args.output == "counts":
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
                    "classes": counts.classes,
                }
            )
        json.dump(rows, out, indent=2)
        out.write("\n")
        return EXIT_OK
    engine = Engine(snapshot)
    pods = sorted(snapshot.pods, key=lambda p: p.key)
    if args.output == "json":
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
                        "ingress": verdict.ingress.to_dict(),
                        "egress": verdict.egress.to_dict(),
                    }
                    if verdict.notes:
                        cell["notes"] = list(verdict.notes)
                    cells.append(cell)
        json.dump(cells, out, indent=1)
        out.write("\n")
        return EXIT_OK
    out.write(render_matrix_table(engine, pods, ports))
    return EXIT_OK


def render_matrix_table(engine: Any, pods: list[Any], ports: list[tuple[int, str]]) -> str:
    """A grid per port: rows are sources, numbered columns are destinations (legend on the rows)."""
    if not pods:
        return "no pods in the manifests\n"
    lines: list[str] = []
    width = max(len(p.key) for p in pods)
    num = len(str(len(pods)))
    for port, protocol in ports:
        allowed = 0
        lines.append(f"{port}/{protocol}   ('.' allowed, 'X' denied; row = from, column = to)")
        header = " " * (num + width + 3)
        # Column numbers written vertically so 30+ pods stay narrow.
        for digit in range(num):
            lines.append(header + " ".join(str(i + 1).rjust(num)[digit] for i in range(len(pods))))
        for i, src in enumerate(pods):
            cells = []
            for dst in pods:
                ok = engine.evaluate(src, dst, port, protocol).allowed
                allowed += ok
                cells.append("." if ok else "X")
            lines.append(f"{str(i + 1).rjust(num)} {src.key.ljust(width)}  " + " ".join(cells))
        total = len(pods) * len(pods)
        lines.append(f"{allowed} of {total} pairs allowed, {total - allowed} denied")
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
    snapshot = load_snapshot(manifest_paths + expectation_paths)
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
        "json": lambda: render_json(rows, problems=report.problems) + "\n",
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


def cmd_explain(args: argparse.Namespace, out: TextIO) -> int:

    snapshot = load_snapshot(_paths(args.files))

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
    if args.output == "json":
        json.dump(verdict.to_dict(), out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(explain_text(verdict, source, destination, port, protocol))
    return EXIT_OK


def explain_text(verdict: Any, source: Any, destination: Any, port: int, protocol: str) -> str:

    name_src, name_dst = endpoint_name(source), endpoint_name(destination)
    lines = [
        f"{name_src} -> {name_dst} on {port}/{protocol}: "
        + ("ALLOWED" if verdict.allowed else "DENIED"),
        "",
    ]
    for label, part in (
        ("egress at the source", verdict.egress),
        ("ingress at the destination", verdict.ingress),
    ):
        state = "allows" if part.allowed else "DENIES"
        lines.append(f"  {label}: {state}")
        lines.append(f"    {part.reason}")
        if part.isolated:
            lines.append("    isolating policies: " + ", ".join(part.policies))
    for note in verdict.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
