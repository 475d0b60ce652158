"""Replan benchmark: the event loop's longest stall under pod churn, planning in a thread vs on it.

A synthetic cluster (`--generator distinct`: `make_distinct_cluster`, 10,000 pods, 1,000
namespaces, 4,000 policies; `repeating`: `make_cluster`) with 100 declared flows
(`with_expectations`) is fed to a real `Collector`: the initial snapshot, then `--changes` pod
label changes at `--rate` per second (bounded in count and time). The loop-lag probe
(`flowproof.aio.event_loop_lag`, 10 ms period) records the event loop's scheduling delay from the
first plan on (the churn). Mode `thread`: the collector as it runs (replanner root task; updates
for a few changed pods and whole plans in a worker thread, newest snapshot wins). Mode `loop`: the
same snapshots planned whole with `Planner.update` on the event loop, as the collector did before.
Both run in one process, one after the other.

    python -m bench.replan_bench [--generator distinct] [--pods 10000] [--flows 100]
        [--changes 40] [--rate 20] [--modes thread loop]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time

from bench.synthetic import make_cluster, make_distinct_cluster, with_expectations
from collector.core.changes import diff_snapshots
from collector.core.model import Snapshot
from collector.loop import Collector
from collector.settings import CollectorSettings
from flowproof.aio import event_loop_lag


def churn(snapshot: Snapshot, count: int) -> list[Snapshot]:
    """`count` successive snapshots, each with one more pod's `version` label changed."""
    out = []
    pods = list(snapshot.pods)
    step = max(1, len(pods) // max(count, 1))
    for i in range(count):
        j = (i * step) % len(pods)
        pods[j] = dataclasses.replace(pods[j], labels={**pods[j].labels, "version": f"c{i}"})
        out.append(dataclasses.replace(snapshot, pods=tuple(pods)))
    return out


async def run(
    mode: str, initial: Snapshot, changed: list[Snapshot], rate: float
) -> dict[str, object]:
    snapshots = [initial, *changed]
    # The source diffs snapshots off the loop (ManifestSource in its poll thread, the Kubernetes
    # feeder in asyncio.to_thread); here they are diffed before the clock starts.
    changes = [
        diff_snapshots(before, after, generation=i + 1, at=0.0)
        for i, (before, after) in enumerate(zip([None, *snapshots], snapshots, strict=False))
    ]
    collector = Collector(CollectorSettings(token="bench", source="manifests"))
    stop = asyncio.Event()
    lags: list[float] = []
    probe = asyncio.create_task(event_loop_lag(lags.append, stop, interval_seconds=0.01))
    replanner = asyncio.create_task(collector.replanner(stop)) if mode == "thread" else None
    await asyncio.sleep(0)
    started = time.perf_counter()
    first_plans = 0
    for generation, (snapshot, dated) in enumerate(zip(snapshots, changes, strict=True), start=1):
        change = dataclasses.replace(dated, at=time.time(), observed_at=time.time())
        if mode == "thread":
            await collector.on_snapshot(snapshot, change, wait=generation in (1, len(snapshots)))
        else:
            collector.planner.update(snapshot, change, collector.clock.time())  # the old way
        if generation == 1:  # the churn is measured from the first plan on
            lags.clear()
            started = time.perf_counter()
            first_plans = collector.replans_total
            continue
        await asyncio.sleep(1 / rate)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(probe, *([replanner] if replanner else []))
    lags.sort()
    return {
        "mode": mode,
        "snapshots": len(snapshots),
        "plans_in_churn": collector.replans_total - first_plans
        if mode == "thread"
        else len(changed),
        "of_them_updates": collector.updates_total,
        "coalesced": collector.snapshots_coalesced_total,
        "flows": len(collector.planner.plan.flows),
        "seconds": round(elapsed, 1),
        "lag_samples": len(lags),
        "lag_max_ms": round(1000 * lags[-1], 1),
        "lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 1),
        "lag_median_ms": round(1000 * statistics.median(lags), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--namespaces", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=4000)
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--modes", nargs="+", default=["thread", "loop"])
    parser.add_argument("--generator", choices=["distinct", "repeating"], default="distinct")
    args = parser.parse_args()
    make = make_distinct_cluster if args.generator == "distinct" else make_cluster
    cluster = make(args.pods, args.namespaces, args.policies, 7)
    # Pods in key order, as the Kubernetes source publishes them.
    cluster = dataclasses.replace(cluster, pods=tuple(sorted(cluster.pods, key=lambda p: p.key)))
    initial = with_expectations(cluster, args.flows, 1)
    changed = churn(initial, args.changes)
    for mode in args.modes:
        print(json.dumps(asyncio.run(run(mode, initial, changed, args.rate))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
