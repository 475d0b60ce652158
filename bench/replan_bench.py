"""Replan benchmark: the event loop's longest stall under pod churn, planning in a thread vs on it.

A synthetic cluster (`--generator distinct`: `make_distinct_cluster`, 10,000 pods, 1,000
namespaces, 4,000 policies; `repeating`: `make_cluster`) with 100 declared flows
(`with_expectations`) is fed to a real `Collector`: the initial snapshot, then `--changes` pod
label changes at `--rate` per second (bounded in count and time). The loop-lag probe
(`flowproof.aio.event_loop_lag`, 10 ms period) records the event loop's scheduling delay from the
first plan on (the churn). Mode `thread`: the collector as it runs (replanner root task; updates
for a few changed pods and whole plans in a worker thread, newest snapshot wins; the heap frozen
after each plan, `collector.runtime.keep_heap_frozen`). Mode `loop`: the
same snapshots planned whole with `Planner.update` on the event loop, as the collector did before.
Both run in one process, one after the other.

    python -m bench.replan_bench [--generator distinct] [--pods 10000] [--flows 100]
        [--changes 40] [--rate 20] [--modes thread loop] [--interval 10] [--no-witnesses]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import statistics
import time

from bench.synthetic import make_cluster, make_distinct_cluster, with_expectations
from collector.core.changes import ChangeEvent, diff_snapshots
from collector.core.model import Snapshot
from collector.core.settings import PlannerSettings
from collector.loop import Collector
from collector.runtime import keep_heap_frozen
from collector.settings import CollectorSettings
from flowproof.aio import event_loop_lag


def churned(snapshot: Snapshot, i: int, count: int) -> tuple[Snapshot, str]:
    """The snapshot after change `i` of `count` (one more pod's `version` label changed), and
    that pod's key."""
    pods = list(snapshot.pods)
    j = (i * max(1, len(pods) // max(count, 1))) % len(pods)
    pods[j] = dataclasses.replace(pods[j], labels={**pods[j].labels, "version": f"c{i}"})
    return dataclasses.replace(snapshot, pods=tuple(pods)), pods[j].key


async def run(
    mode: str, initial: Snapshot, changes: int, rate: float, planner: PlannerSettings
) -> dict[str, object]:
    # Each snapshot is made when it is due, and its change says which pod changed, as the
    # Kubernetes source says it (`InventoryUpdate.pods_change`): the process holds the snapshots
    # a collector holds, not every one of the run, and diffs none.
    collector = Collector(CollectorSettings(token="bench", source="manifests", planner=planner))
    if mode == "thread":
        keep_heap_frozen(collector)  # as collector.runtime wires it
    stop = asyncio.Event()
    lags: list[float] = []
    probe = asyncio.create_task(event_loop_lag(lags.append, stop, interval_seconds=0.01))
    replanner = asyncio.create_task(collector.replanner(stop)) if mode == "thread" else None
    await asyncio.sleep(0)
    started = time.perf_counter()
    first_plans = first_updates = 0
    snapshot = initial
    change = diff_snapshots(None, initial, generation=1, at=time.time())
    for generation in range(1, changes + 2):
        if generation > 1:
            snapshot, key = churned(snapshot, generation - 2, changes)
            now = time.time()
            change = ChangeEvent(generation, now, now, pods_changed=frozenset({key}))
        if mode == "thread":
            await collector.on_snapshot(snapshot, change, wait=generation in (1, changes + 1))
        else:
            collector.planner.update(snapshot, change, collector.clock.time())  # the old way
        if generation == 1:  # the churn is measured from the first plan on
            lags.clear()
            started = time.perf_counter()
            first_plans = collector.replans_total
            first_updates = collector.updates_total
            continue
        await asyncio.sleep(1 / rate)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(probe, *([replanner] if replanner else []))
    lags.sort()
    # What FrozenHeap's full collection once a period costs at this size (on the loop).
    collected = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    full_collection = time.perf_counter() - collected
    return {
        "mode": mode,
        "snapshots": changes + 1,
        "plans_in_churn": collector.replans_total - first_plans if mode == "thread" else changes,
        "of_them_updates": collector.updates_total - first_updates,
        "coalesced": collector.snapshots_coalesced_total,
        "flows": len(collector.planner.plan.flows),
        "seconds": round(elapsed, 1),
        "lag_samples": len(lags),
        "lag_max_ms": round(1000 * lags[-1], 1),
        "lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 1),
        "lag_median_ms": round(1000 * statistics.median(lags), 2),
        "full_collection_ms": round(1000 * full_collection, 1),
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
    parser.add_argument(
        "--interval",
        type=float,
        default=PlannerSettings.interval_seconds,
        help="the planner's interval_seconds: a whole plan follows updates at most this often",
    )
    parser.add_argument("--no-witnesses", action="store_true", help="plan without evidence")
    args = parser.parse_args()
    planner = PlannerSettings(interval_seconds=args.interval, witnesses=not args.no_witnesses)
    make = make_distinct_cluster if args.generator == "distinct" else make_cluster
    cluster = make(args.pods, args.namespaces, args.policies, 7)
    # Pods in key order, as the Kubernetes source publishes them.
    cluster = dataclasses.replace(cluster, pods=tuple(sorted(cluster.pods, key=lambda p: p.key)))
    initial = with_expectations(cluster, args.flows, 1)
    for mode in args.modes:
        print(
            json.dumps(asyncio.run(run(mode, initial, args.changes, args.rate, planner))),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
