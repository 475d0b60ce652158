"""Failover: how long verification stops when the leading collector goes, and what its results do.

`python -m bench.failover_bench [--trials 3] [--json]` — a real kube-apiserver and etcd of its own
(tests/support/controlplane.py finds or builds them), two `python -m collector --leader-election`
processes with the Deployment's lease timings (15 s, renew deadline 10 s, retry 2 s) and two real
agent links given both addresses (tests/support/leaderelection.py; their pods are never found
here, so each assignment comes back as a result and no packet is sent). Per trial the leader is
stopped while results flow, by SIGKILL (a crash: the Lease must run out) or by SIGTERM (a drain:
it releases the Lease), and it reports:

- takeover: from the signal to the Lease naming the standby;
- resumed: from the signal to the first result the new leader counts;
- per result id (the agents' own list against both delivery ledgers): counted by the old leader,
  by the new one, by both (must be 0), by neither, and refused by the new leader as not issued by
  it (what neither counted must be among those).

Every wait is bounded; the processes are killed by pid and the control plane removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.controlplane import ControlPlane
from tests.support.controlplane import controlplane_binaries
from tests.support.leaderelection import (
    Plane,
    agents,
    collectors,
    delivered_total,
    holder_or_none,
    refused,
    setup_plane,
    start_collector,
    until_delivered,
    until_holder,
)

TIMING = (15.0, 10.0, 2.0)
"""The Deployment's lease duration, renew deadline and retry period."""


async def trial(plane: Plane, tmp: Path, number: int, how: signal.Signals) -> dict[str, Any]:
    duration, _, _ = TIMING
    old_name, new_name = f"old-{number}", f"new-{number}"
    with collectors() as started:
        old = start_collector(plane, tmp, old_name, TIMING)
        started.append(old)
        await until_holder(plane, old_name, within=duration + 10)
        new = start_collector(plane, tmp, new_name, TIMING)
        started.append(new)
        async with agents(plane, tmp, [new.address, old.address]) as run:
            await until_delivered(old, 10)
            old.process.send_signal(how)
            signalled = time.monotonic()
            await asyncio.to_thread(old.process.wait, 30)
            await until_holder(plane, new_name, within=duration + 15)
            takeover = time.monotonic() - signalled
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(delivered_total, new) < 1:
                assert time.monotonic() < deadline, "the new leader counted nothing"
                await asyncio.sleep(0.05)
            resumed = time.monotonic() - signalled
            await until_delivered(new, 10)
        unacked = sum(len(link.outbox) for link in run.links)
        refusals = refused(new)
        new.process.send_signal(signal.SIGTERM)  # releases the Lease for the next trial
        await asyncio.to_thread(new.process.wait, 30)
    assert holder_or_none(plane) == ""
    produced = set(run.produced)
    by_old, by_new = old.delivered(), new.delivered()
    return {
        "trial": number,
        "stop": how.name,
        "takeover_seconds": round(takeover, 2),
        "resumed_seconds": round(resumed, 2),
        "produced": len(produced),
        "counted_by_old": len(by_old & produced),
        "counted_by_new": len(by_new & produced),
        "counted_twice": len(by_old & by_new),
        "counted_by_neither": len(produced - by_old - by_new),
        "refused_not_issued": int(refusals.get("not issued by this collector", 0)),
        "unacked_at_end": unacked,
    }


async def run(trials: int) -> list[dict[str, Any]]:
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="fp-failover-") as tmp,
        ControlPlane(controlplane_binaries()) as cp,
    ):
        plane = setup_plane(cp, Path(tmp))
        for _ in range(trials):
            for how in (signal.SIGKILL, signal.SIGTERM):
                rows.append(await trial(plane, Path(tmp), len(rows), how))
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| stop | takeover | resumed | produced | counted by old / new / both / neither "
        "| refused as not issued |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stop']} | {r['takeover_seconds']:.2f} s | {r['resumed_seconds']:.2f} s "
            f"| {r['produced']} | {r['counted_by_old']} / {r['counted_by_new']} / "
            f"{r['counted_twice']} / {r['counted_by_neither']} | {r['refused_not_issued']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover_bench", description=__doc__)
    parser.add_argument("--trials", type=int, default=3, help="of each stop, SIGKILL and SIGTERM")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the agents' reconnect warnings are expected here
    rows = asyncio.run(run(max(1, min(args.trials, 10))))
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    bad = [r for r in rows if r["counted_twice"] or r["unacked_at_end"]]
    bad += [r for r in rows if r["counted_by_neither"] > r["refused_not_issued"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
