"""`flowproof lab …` (and `python -m lab …`): the lab's command line.

Owns parsing the lab's flags and printing what each command did. Exit codes: 0 done, 1 the lab
could not do it (LabError), 2 bad input (the InputError's text on stderr; nothing was changed).
It never changes the lab except through lab/lifecycle.py (`lab test`: flowproof/labtest.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from tabulate import tabulate

from collector.core.reporting import to_yaml
from flowproof.errors import ConfigurationError, InputError
from flowproof.output import add_output_flag, with_examples
from lab.config import DEFAULT_NAME, DEFAULT_STATE_DIR, LabSettings
from lab.errors import LabError
from lab.faults import FAULT_MODES
from lab.lifecycle import Lab, read_manifests
from lab.loop import LoopSettings
from lab.mirroring import ApiServerOptions
from lab.report import ChangeReport

NAME_ENV = "FLOWPROOF_LAB_NAME"
STATE_DIR_ENV = "FLOWPROOF_LAB_STATE_DIR"

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the top parser the defaults apply; on subcommands SUPPRESS keeps a value given earlier.
    default_name = os.environ.get(NAME_ENV, DEFAULT_NAME) if top else argparse.SUPPRESS
    default_dir = (
        os.environ.get(STATE_DIR_ENV, str(DEFAULT_STATE_DIR)) if top else argparse.SUPPRESS
    )
    parser.add_argument(
        "--name",
        default=default_name,
        help=f"lab name: 1-8 lowercase letters and digits (default {DEFAULT_NAME}, or ${NAME_ENV})",
    )
    parser.add_argument(
        "--state-dir",
        default=default_dir,
        help=f"where labs keep their state (default {DEFAULT_STATE_DIR}, or ${STATE_DIR_ENV})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowproof lab",
        description="A cluster in network namespaces on this host, with NetworkPolicies enforced "
        "by nftables (needs root).",
    )
    with_examples(
        parser,
        ("build the example shop with a collector and an agent per node",
         "flowproof lab up -f examples/shop"),
        ("prove a team's manifests with real packets in CI, no cluster",
         "flowproof lab test -f k8s/ -e flows.yaml --junit lab.xml"),
        ("a second lab beside the first", "flowproof lab --name two up -f examples/shop"),
    )  # fmt: skip
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _common(common, top=False)
    _add_up(sub, common)
    _add_changes(sub, common)
    _add_test(sub, common)
    return parser


FILES_HELP = (
    "manifest files or directories (a kustomization directory is rendered with kubectl "
    "kustomize; - reads standard input; repeatable)"
)
EXPECTATIONS_HELP = "FlowExpectations files or directories (also read from the manifests)"


def _files_flag(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        nargs="+",
        required=required,
        default=[],
        metavar="PATH",
        help=FILES_HELP,
    )


def _expectations_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-e",
        "--expectations",
        action="append",
        default=[],
        metavar="PATH",
        nargs="+",
        help=EXPECTATIONS_HELP,
    )


def _flat(groups: Sequence[Sequence[str]]) -> list[str]:
    return [p for group in groups for p in group]


def _add_up(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    up = sub.add_parser(
        "up",
        parents=[common],
        help="build a lab from manifests",
        description="Build a lab from manifests: a node per network namespace, a pod per "
        "declared pod, policies in nftables, and (unless --no-loop) a collector and an agent "
        "per node proving the expectations.",
    )
    with_examples(
        up,
        ("the example shop", "flowproof lab up -f examples/shop"),
        ("manifests and expectations apart, as `lab test` takes them",
         "flowproof lab up -f k8s/ -e flows.yaml"),
        ("a rendered kustomization", "kustomize build overlays/dev | flowproof lab up -f -"),
        ("the lab alone, no collector and agents", "flowproof lab up -f k8s/ --no-loop"),
    )  # fmt: skip
    _files_flag(up, required=False)
    _expectations_flag(up)
    defaults = LabSettings()
    up.add_argument("--nodes", type=int, default=defaults.nodes, help="number of nodes (default 3)")
    up.add_argument(
        "--pod-cidr",
        default=defaults.pod_cidr,
        help=f"pod range; node N gets its N-th /24 (default {defaults.pod_cidr})",
    )
    up.add_argument(
        "--service-cidr",
        default=defaults.service_cidr,
        help=f"Service (ClusterIP) range (default {defaults.service_cidr})",
    )
    up.add_argument(
        "--dns-ip",
        default=defaults.dns_service_ip,
        help=f"the cluster DNS address (default {defaults.dns_service_ip})",
    )
    up.add_argument(
        "--fabric-cidr",
        default=defaults.fabric_cidr,
        help=f"node interconnect range (default {defaults.fabric_cidr})",
    )
    up.add_argument(
        "--cgroup-driver",
        choices=("systemd", "cgroupfs"),
        default="systemd",
        help="kubelet cgroup layout of the pods (default systemd)",
    )
    up.add_argument(
        "--owner-pid",
        type=int,
        default=0,
        help="take the lab down when this process ends (CI jobs, test runs)",
    )
    up.add_argument(
        "--cgroup-root", default="", help="cgroup hierarchy to use (default: the cgroup v2 mount)"
    )
    api = up.add_argument_group(
        "API server",
        "--apiserver gives the lab a kube-apiserver and etcd of its own (built from their Go "
        "modules by scripts/build-controlplane.sh) holding its cluster; kubectl changes to it "
        "reach the lab's enforcement, and the collector reads the cluster from it, as in a "
        "cluster (docs/lab.md)",
    )
    api.add_argument("--apiserver", action="store_true", help="run the lab with an API server")
    api.add_argument(
        "--apiserver-bin",
        default="",
        metavar="DIR",
        help="prebuilt kube-apiserver and etcd (default: $FLOWPROOF_CONTROLPLANE_BIN, else build)",
    )
    api.add_argument(
        "--probe-pod-namespaces",
        default=None,
        metavar="NS,...",
        help="where the collector may create probe pods (default: the manifests' namespaces)",
    )
    api.add_argument(
        "--expectations-configmaps",
        action="store_true",
        help="the collector also reads expectations from labelled ConfigMaps",
    )
    _loop_flags(up)


def _add_changes(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    apply = sub.add_parser(
        "apply",
        parents=[common],
        help="create or update objects",
        description="Create or update the objects in the files, as kubectl apply does; only the "
        "pods and policies that change are touched.",
    )
    with_examples(
        apply,
        ("break a required path", "flowproof lab apply -f examples/breaks/db-ingress-only-batch.yaml"),
        ("make the lab exactly the files", "flowproof lab apply -f k8s/ --prune"),
    )  # fmt: skip
    _files_flag(apply, required=True)
    apply.add_argument(
        "--prune", action="store_true", help="also delete every object the files do not declare"
    )

    delete = sub.add_parser(
        "delete",
        parents=[common],
        help="delete the objects in the files",
        description="Delete the objects the files name (by kind, namespace and name).",
    )
    with_examples(
        delete,
        ("undo a break", "flowproof lab delete -f examples/breaks/allow-frontend-to-db.yaml"),
    )
    _files_flag(delete, required=True)

    label = sub.add_parser(
        "label",
        parents=[common],
        help="change labels (key=value, key-)",
        description="Set (key=value) or remove (key-) labels of a pod or a namespace; the "
        "policies that select them are re-applied.",
    )
    with_examples(
        label,
        ("move a pod out of a policy's reach", "flowproof lab label pod shop/api app=other"),
        ("remove a namespace label", "flowproof lab label ns shop team-"),
    )
    label.add_argument(
        "kind",
        choices=("pod", "pods", "namespace", "namespaces", "ns"),
        help="what to label: pod or namespace",
    )
    label.add_argument("target", help="NAMESPACE/POD for a pod, NAME for a namespace")
    label.add_argument("changes", nargs="+", metavar="LABEL", help="key=value sets, key- removes")

    status = sub.add_parser(
        "status",
        parents=[common],
        help="nodes, pods, policies, enforcement",
        description="The lab's nodes, pods, policies, enforcement generation, faults and loop.",
    )
    with_examples(
        status,
        ("a summary", "flowproof lab status"),
        ("with pod ports and namespaces", "flowproof lab status -o wide"),
        ("for a script", "flowproof lab status -o json"),
    )
    add_output_flag(status, formats=("table", "wide", "json", "yaml"))

    fault = sub.add_parser(
        "fault",
        parents=[common],
        help="make enforcement deviate on purpose",
        description="modes: ignore-policy NS/NAME, lag SECONDS, reject, "
        "ignore-named-ports, ignore-endport, clear",
    )
    with_examples(
        fault,
        ("enforce every policy but one (ENFORCEMENT_DRIFT follows)",
         "flowproof lab fault ignore-policy shop/default-deny"),
        ("apply policy changes 5 s late", "flowproof lab fault lag 5"),
        ("back to faithful enforcement", "flowproof lab fault clear"),
    )  # fmt: skip
    fault.add_argument("mode", choices=FAULT_MODES, help="the fault: " + ", ".join(FAULT_MODES))
    fault.add_argument(
        "args", nargs="*", help="its argument: NS/NAME for ignore-policy, SECONDS for lag"
    )

    down = sub.add_parser(
        "down",
        parents=[common],
        help="remove everything the lab created",
        description="Remove every namespace, veth, nft table, cgroup and process the lab made, "
        "by their recorded names and pids (also after a crash).",
    )
    with_examples(
        down,
        ("the default lab", "flowproof lab down"),
        ("another", "flowproof lab --name two down"),
    )

    loop = sub.add_parser(
        "loop",
        parents=[common],
        help="start, stop or restart the collector and agents",
        description="COMPONENT: collector, agents, all, or a node name (its agent). "
        "stop kills by recorded pid; start and restart wait until they are connected.",
    )
    with_examples(
        loop,
        ("what an agent crash looks like", "flowproof lab loop stop node-1"),
        ("restart the collector", "flowproof lab loop restart collector"),
    )
    loop.add_argument("action", choices=("start", "stop", "restart"), help="what to do")
    loop.add_argument(
        "component",
        nargs="?",
        default="all",
        metavar="COMPONENT",
        help="collector, agents, all (default) or a node name",
    )


def _add_test(sub: Subcommands, common: argparse.ArgumentParser) -> None:
    test = sub.add_parser(
        "test",
        parents=[common],
        help="up, verify, down in one command (real packets in CI, no cluster)",
        description="Build a lab of its own from the manifests and expectations, run "
        "`flowproof verify --once` against it, and take it down (also on failure or Ctrl-C). "
        "Exit code: verify's (0 every expectation holds, 1 one fails, 2 undecided).",
    )
    with_examples(
        test,
        ("the CI job: real packets, no cluster, a JUnit report",
         "flowproof lab test -f k8s/ -e flows.yaml --junit lab.xml"),
        ("a kustomization, rendered", "flowproof lab test -f overlays/ci -e flows.yaml"),
        ("a Helm chart", "helm template app ./chart | flowproof lab test -f - -e flows.yaml"),
    )  # fmt: skip
    _files_flag(test, required=True)
    _expectations_flag(test)
    test.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    test.add_argument("--json", dest="json_file", metavar="FILE", help="write JSON here")
    test.add_argument("--markdown", metavar="FILE", help="write Markdown here")
    add_output_flag(test)
    test.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="show flows decided / total on stderr while verifying: auto (on a terminal, not "
        "in CI), always, never",
    )
    test.add_argument(
        "--fail-on-not-enforced",
        action="store_true",
        help="fail (exit 1) also when a NetworkPolicy is not enforced as written (a witness "
        "contradicts it)",
    )
    test.add_argument(
        "--timeout", type=float, default=60.0, help="seconds verify waits for results (default 60)"
    )
    test.add_argument(
        "--nodes", type=int, default=LabSettings().nodes, help="number of nodes (default 3)"
    )
    _loop_flags(test, with_switch=False)


def _loop_flags(parser: argparse.ArgumentParser, *, with_switch: bool = True) -> None:
    loop = LoopSettings().planner
    if with_switch:
        parser.add_argument(
            "--no-loop", action="store_true", help="no collector and agents (the lab alone)"
        )
    parser.add_argument(
        "--probe-timeout-seconds",
        type=float,
        default=loop.probe_timeout_seconds,
        help=f"the loop's probe timeout: no answer within it is a drop (default "
        f"{loop.probe_timeout_seconds:g})",
    )
    parser.add_argument(
        "--interval-seconds",
        type=float,
        default=loop.interval_seconds,
        help=f"the loop's cadence: each flow is probed about this often (default "
        f"{loop.interval_seconds:g})",
    )
    parser.add_argument(
        "--freshness-seconds",
        type=float,
        default=loop.freshness_seconds,
        help=f"a result older than this is STALE (default {loop.freshness_seconds:g})",
    )
    parser.add_argument(
        "--sweep-probes-per-second",
        type=float,
        default=loop.sweep_probes_per_second,
        help="cells of the model's truth table probed per second, in a rotating order "
        f"(default {loop.sweep_probes_per_second:g}; 0: no sweep)",
    )


def _loop_settings(args: argparse.Namespace) -> LoopSettings | None:
    if getattr(args, "no_loop", False):
        return None
    return LoopSettings.with_planner(
        probe_timeout_seconds=args.probe_timeout_seconds,
        interval_seconds=args.interval_seconds,
        freshness_seconds=args.freshness_seconds,
        sweep_probes_per_second=args.sweep_probes_per_second,
    ).validate()


def _print_report(report: ChangeReport) -> None:
    for line in report.lines():
        print(line)


def _settings(args: argparse.Namespace) -> LabSettings:
    return LabSettings(
        name=args.name,
        nodes=args.nodes,
        pod_cidr=args.pod_cidr,
        service_cidr=args.service_cidr,
        dns_service_ip=args.dns_ip,
        fabric_cidr=args.fabric_cidr,
        cgroup_driver=args.cgroup_driver,
        cgroup_root=args.cgroup_root,
        owner_pid=args.owner_pid,
    )


def _print_status(data: dict[str, Any], *, wide: bool = False) -> None:
    print(
        f"lab {data['name']} ({data['phase']}): {len(data['nodes'])} nodes, "
        f"{len(data['pods'])} pods, "
        f"{len(data['policies'])} policies; enforcement generation {data['generation']} "
        f"(kernel: {data['enforcedGeneration']})"
    )
    print(f"faults: {', '.join(data['faults']) or 'none'}")
    for pending in data["pending"]:
        print(
            f"pending: generation {pending['generation']} due in {pending['dueInSeconds']}s "
            f"({pending['pods']} pods)"
        )
    print()
    print(
        tabulate(
            [(n["name"], n["netns"], n["podCIDR"], n["address"], n["pods"]) for n in data["nodes"]],
            headers=["NODE", "NETNS", "POD CIDR", "ADDRESS", "PODS"],
        )
    )
    print()
    rows = []
    for pod in data["pods"]:
        iso = "/".join(
            x for x, on in (("in", pod["ingressIsolated"]), ("eg", pod["egressIsolated"])) if on
        )
        row = [
            pod["key"],
            pod["node"],
            pod["ip"],
            "yes" if pod["running"] else "NO",
            iso or "-",
            ",".join(f"{k}={v}" for k, v in sorted(pod["labels"].items())),
        ]
        if wide:
            row += [_ports_text(pod.get("ports", [])), pod.get("netns", "-")]
        rows.append(row)
    headers = ["POD", "NODE", "IP", "RUNNING", "ISOLATED", "LABELS"]
    print(tabulate(rows, headers=headers + (["PORTS", "NETNS"] if wide else [])))
    print()
    print("policies: " + (", ".join(data["policies"]) or "none"))
    print(f"cluster DNS {data['dns']['service']} -> {', '.join(data['dns']['pods']) or 'nobody'}")
    print(f"outside ({data['outside']['netns']}): {', '.join(data['outside']['ips'])}")
    print(f"cluster manifests: {data['clusterDir']}")
    api = data.get("apiserver")
    if api is not None:
        down = [r for r, p in api["processes"].items() if not p["running"]]
        state = f"NOT RUNNING: {', '.join(down)}" if down else "running"
        print(f"API server: {api['url']} ({state}); kubectl --kubeconfig {api['kubeconfig']}")
    loop = data.get("loop")
    if loop is None:
        print("loop: none (started with --no-loop)")
        return
    collector = loop["collector"]
    state = f"pid {collector['pid']}" if collector["running"] else "NOT RUNNING"
    print(f"collector: {loop['url']} (grpc {loop['grpcAddress']}, {state})")
    agents = [
        f"{a['node']} (pid {a['pid']})" if a["running"] else f"{a['node']} (NOT RUNNING)"
        for a in loop["agents"]
    ]
    print("agents: " + ", ".join(agents))


def _ports_text(ports: Any) -> str:
    """A pod's declared ports as `http:8080/TCP,5432/TCP`."""
    parts = []
    for port in ports if isinstance(ports, list) else []:
        if isinstance(port, dict):
            name = f"{port['name']}:" if port.get("name") else ""
            parts.append(f"{name}{port.get('port')}/{port.get('protocol', 'TCP')}")
        else:
            parts.append(str(port))
    return ",".join(parts) or "-"


LabTest = Callable[[argparse.Namespace], int]
"""Runs `lab test` (flowproof.labtest: it needs the verify client, which sits above the lab)."""


def run(args: argparse.Namespace, test: LabTest | None = None) -> int:
    lab = Lab(args.name, args.state_dir)
    command = args.command
    if command == "up":
        return _run_up(lab, args)
    if command == "loop":
        return _run_loop(lab, args)
    if command == "test":
        if test is None:
            raise LabError("`lab test` runs from the front door: use `flowproof lab test`")
        return test(args)
    if command == "apply":
        _print_report(lab.apply(read_manifests(_flat(args.filename)), prune=args.prune))
        return 0
    if command == "delete":
        _print_report(lab.delete(read_manifests(_flat(args.filename))))
        return 0
    if command == "label":
        if args.kind in ("pod", "pods"):
            if args.target.count("/") != 1:
                raise InputError(f"{args.target!r} is not NAMESPACE/POD", field="pod")
            _print_report(lab.label_pod(args.target, args.changes))
        else:
            _print_report(lab.label_namespace(args.target, args.changes))
        return 0
    if command == "status":
        data = lab.status()
        if args.output == "json":
            print(json.dumps(data, indent=2, sort_keys=True))
        elif args.output == "yaml":
            print(to_yaml(data), end="")
        else:
            _print_status(data, wide=args.output == "wide")
        return 0
    if command == "fault":
        _print_report(lab.fault(args.mode, args.args))
        return 0
    if command == "down":
        removed = lab.down()
        print(f"lab {lab.name} is down: removed {', '.join(removed)}, its cgroups and processes")
        return 0
    raise AssertionError(command)


def _apiserver_options(args: argparse.Namespace) -> ApiServerOptions | None:
    if not args.apiserver:
        for flag in ("apiserver_bin", "probe_pod_namespaces", "expectations_configmaps"):
            if getattr(args, flag):
                raise InputError("needs --apiserver", field="--" + flag.replace("_", "-"))
        return None
    namespaces = None
    if args.probe_pod_namespaces is not None:
        namespaces = tuple(
            n for n in (p.strip() for p in args.probe_pod_namespaces.split(",")) if n
        )
    return ApiServerOptions(
        bin_dir=args.apiserver_bin,
        probe_pod_namespaces=namespaces,
        expectations_configmaps=args.expectations_configmaps,
    )


def _run_up(lab: Lab, args: argparse.Namespace) -> int:
    loop = _loop_settings(args)
    apiserver = _apiserver_options(args)
    report = lab.up(
        read_manifests(_flat(args.filename) + _flat(args.expectations)),
        _settings(args),
        loop,
        apiserver,
    )
    _print_report(report)
    status = lab.status()
    print(
        f"lab {lab.name} is up in {report.seconds:.1f}s: {len(status['nodes'])} nodes, "
        f"{len(status['pods'])} pods; cluster manifests in {status['clusterDir']}"
    )
    if status["loop"] is not None:
        print(
            f"collector {status['loop']['url']}, an agent on every node; "
            f"`{_verify_command(lab, args)}` proves every expectation"
        )
    return 0


def _run_loop(lab: Lab, args: argparse.Namespace) -> int:
    if args.action == "stop":
        roles = lab.loop_stop(args.component)
        print("stopped: " + (", ".join(roles) or "nothing was running"))
    elif args.action == "start":
        roles = lab.loop_start(args.component)
        print("started: " + (", ".join(roles) or "everything was running"))
    else:
        roles = lab.loop_restart(args.component)
        print("restarted: " + ", ".join(roles))
    return 0


def _verify_command(lab: Lab, args: argparse.Namespace) -> str:
    """The `flowproof verify` command line that finds this lab's collector."""
    env = []
    if str(args.state_dir) != os.environ.get(STATE_DIR_ENV, str(DEFAULT_STATE_DIR)):
        env.append(f"{STATE_DIR_ENV}={args.state_dir}")
    lab_flag = [] if lab.name == os.environ.get(NAME_ENV, DEFAULT_NAME) else ["--lab", lab.name]
    return " ".join([*env, "flowproof verify --once", *lab_flag])


def main(argv: Sequence[str] | None = None, *, test: LabTest | None = None) -> int:
    """Run `lab` with `argv` (without the program name); the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="lab: %(levelname)s: %(message)s")
    try:
        return run(args, test)
    except InputError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (LabError, ConfigurationError) as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 1
