"""Lab benchmark: `lab up` and `lab down` times, and enforcement latency over many policy changes.

Run as root: `python bench/lab_bench.py [--pods 100] [--nodes 3] [--changes 50]`. It builds a lab
with a unique name in a temporary state directory through the real command line, then flips one
policy `--changes` times through the lab API and measures, for each change, how long `apply`
took and how long after it returned a probe from inside a pod first saw the new verdict. Every
loop is bounded in count and time; the lab is always taken down, and the bench checks that
nothing of it is left. Prints a small table (markdown) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.lifecycle import Lab, read_manifests
from lab.probing import probe_outcomes

PROBE_TIMEOUT_SECONDS = 0.02  # a dropped SYN is known after this long; the lab is local
VERDICT_DEADLINE_SECONDS = 5.0


def workload(namespace: str, name: str, replicas: int) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": "app",
                            "ports": [
                                {"containerPort": 8080, "name": "web"},
                                {"containerPort": 53, "protocol": "UDP", "name": "udp"},
                            ],
                        }
                    ]
                },
            },
        },
    }


def write_cluster(directory: Path, pods: int) -> None:
    """`pods` pods (the lab adds its DNS pod) in four workloads over two namespaces."""
    sizes = [pods // 4 + (1 if i < pods % 4 else 0) for i in range(4)]
    docs = [workload("shop" if i < 2 else "batch", f"app{i}", size) for i, size in enumerate(sizes)]
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(docs))


def deny_policy(path: Path, selector: dict[str, str]) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "bench-deny", "namespace": "shop"},
                "spec": {"podSelector": {"matchLabels": selector}},
            }
        )
    )


def cli(name: str, state_dir: Path, *args: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lab", "--name", name, "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise SystemExit(f"lab {args[0]} failed ({proc.returncode}): {proc.stderr}")
    return time.monotonic() - started


async def first_verdict(lab: Lab, source: str, target: str, want_allowed: bool) -> float:
    """Seconds from now until a probe (started then) sees the wanted verdict."""
    started = time.monotonic()
    while time.monotonic() - started < VERDICT_DEADLINE_SECONDS:
        sent = time.monotonic()
        outcome = (
            await probe_outcomes(lab, [(source, target)], 8080, "TCP", PROBE_TIMEOUT_SECONDS)
        )[(source, target)]
        if (outcome == "CONNECTED") == want_allowed:
            return sent - started
    raise SystemExit(f"no {'allow' if want_allowed else 'deny'} verdict after 5s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()

    name = "bench" + secrets.token_hex(1)
    with tempfile.TemporaryDirectory(prefix="lab-bench-") as tmp:
        work = Path(tmp)
        state_dir = work / "state"
        write_cluster(work, args.pods)
        one, many = work / "one.yaml", work / "many.yaml"
        deny_policy(one, {"bench": "target"})  # selects one pod
        deny_policy(many, {"app": "app1"})  # selects a whole workload (a quarter of the pods)
        lab = Lab(name, state_dir)
        rows: list[tuple[str, str]] = []
        try:
            up_seconds = cli(
                name, state_dir, "up", "-f", str(work / "cluster.yaml"), "--nodes", str(args.nodes)
            )
            pods = len(lab.state().pods)
            rows.append(
                (f"lab up ({pods} pods incl. DNS, {args.nodes} nodes, CLI)", f"{up_seconds:.2f} s")
            )
            source, target = "batch/app2-0", "shop/app1-0"
            lab.label_pod(target, ["bench=target"])
            ms = 1000.0
            for title, policy in (("one pod", one), ("25 pods", many)):
                manifests = read_manifests([policy])
                apply_times: list[float] = []
                latencies: list[float] = []
                for i in range(args.changes):
                    adding = i % 2 == 0
                    started = time.monotonic()
                    if adding:
                        lab.apply(manifests)
                    else:
                        lab.delete(manifests)
                    apply_times.append(time.monotonic() - started)
                    latencies.append(asyncio.run(first_verdict(lab, source, target, not adding)))
                rows.append(
                    (
                        f"apply a policy selecting {title} (API, {args.changes} changes) p50 / p95",
                        f"{percentile(apply_times, 0.5) * ms:.1f} / "
                        f"{percentile(apply_times, 0.95) * ms:.1f} ms",
                    )
                )
                rows.append(
                    (
                        f"  apply returned -> probe sees the new verdict ({title}) p50 / p95",
                        f"{percentile(latencies, 0.5) * ms:.1f} / "
                        f"{percentile(latencies, 0.95) * ms:.1f} ms",
                    )
                )
            cli_times = [
                cli(name, state_dir, "apply" if i % 2 == 0 else "delete", "-f", str(one))
                for i in range(4)
            ]
            rows.append(
                (
                    "`lab apply -f` one pod, end to end (CLI, 4 runs) median",
                    f"{statistics.median(cli_times) * ms:.0f} ms",
                )
            )
        finally:
            if lab.exists():
                down_seconds = cli(name, state_dir, "down")
                rows.append(("lab down (CLI)", f"{down_seconds:.2f} s"))
        left = [
            n
            for n in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True
            ).stdout.split()
            if n.startswith(name + "-")
        ]
        if left:
            raise SystemExit(f"left behind: {left}")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for measure, value in rows:
        print(f"| {measure.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
