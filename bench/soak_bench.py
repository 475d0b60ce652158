"""Soak benchmark: the shop lab's whole loop for half an hour, at a 1 s cadence, a policy flip every
10 s. Run as root.

Builds the demo lab (the shop example, 3 nodes, its collector and an agent per node) under a
unique name in a temporary state directory with the loop at a 1 s cadence (probe timeout 0.3 s,
freshness 3 s), then for `--minutes` applies the break that blocks shop/api-to-db and its fix in
turn every `--flip-seconds`. Every minute it samples, for the collector and each agent: RSS, open
file descriptors and threads (from /proc), and the collector's asyncio tasks and delivered
results (its read-only /api/v1/debug/loop). Reported: the least-squares slope of each series
after the first `--warmup-minutes` (MiB or count per hour), the first and last values, the number
of flips whose status change the collector reported, and what carries the lab's name after
`down` (must be nothing). Every loop is bounded in count and time; all traffic stays inside the
lab's namespaces and on 127.0.0.1; the lab is always taken down.

    sudo python -m bench.soak_bench [--minutes 30] [--flip-seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.loop import LoopSettings
from tests.lab.labtools import leftovers

REPO = Path(__file__).resolve().parents[1]
SHOP = REPO / "examples" / "shop"
BREAK = REPO / "examples" / "breaks" / "db-ingress-only-batch.yaml"
FIX = SHOP / "policies" / "api-to-db.yaml"
FLOW = "shop/shop/api-to-db"


def proc_figures(pid: int) -> dict[str, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / var * 3600


def declared_status(base: str) -> str:
    detail = get_json(f"{base}/api/v1/flows/{FLOW}")
    return str((detail.get("declared") or {}).get("status", ""))


def run(minutes: float, flip_seconds: float, warmup_minutes: float) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="fp-soak-"))
    lab = Lab("soak" + secrets.token_hex(2), state_dir)
    loop = dataclasses.replace(
        LoopSettings.with_planner(
            probe_timeout_seconds=0.3, interval_seconds=1.0, freshness_seconds=3.0
        ),
        log_level="WARNING",
    )
    samples: list[dict[str, Any]] = []
    flips = changes_seen = 0
    state = None
    started = time.monotonic()
    try:
        lab.up(read_manifests([SHOP]), LabSettings(owner_pid=os.getpid()), loop)
        state = lab.state()
        assert state.loop is not None
        base = state.loop.url
        roles = lab.loop_processes()
        pids = {role: record.pid for role, record in roles.items()}
        print(
            f"lab {lab.name} up in {time.monotonic() - started:.1f}s; loop pids {pids}", flush=True
        )
        begin = time.monotonic()
        next_sample = begin
        next_flip = begin + flip_seconds
        broken = False
        last_status = declared_status(base)
        deadline = begin + minutes * 60
        for _ in range(int(minutes * 60 * 4) + 10):  # bounded: 250 ms steps
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_sample:
                debug = get_json(f"{base}/api/v1/debug/loop")
                sample: dict[str, Any] = {
                    "seconds": round(now - begin, 1),
                    "tasks": debug["tasks"],
                    "delivered_total": debug["delivered_total"],
                    "refused": sum(debug["results_refused"].values()),
                }
                for role, pid in pids.items():
                    sample[role] = proc_figures(pid)
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += 60
            if now >= next_flip:
                lab.apply(read_manifests([BREAK if not broken else FIX]))
                broken = not broken
                flips += 1
                next_flip += flip_seconds
            status = declared_status(base)
            if status != last_status:
                changes_seen += 1
                last_status = status
            time.sleep(0.25)
        final_debug = get_json(f"{base}/api/v1/debug/loop")
    finally:
        if lab.exists():
            lab.down()
    left = leftovers(lab.name, state)
    shutil.rmtree(state_dir, ignore_errors=True)  # after the leftovers check read it
    warm = [s for s in samples if s["seconds"] >= warmup_minutes * 60]
    series: dict[str, dict[str, float]] = {}
    for role in pids:
        for key in ("rss_mib", "fds", "threads"):
            points = [(s["seconds"], s[role][key]) for s in warm]
            series[f"{role} {key}"] = {
                "first": samples[0][role][key],
                "last": samples[-1][role][key],
                "slope_per_hour": round(slope_per_hour(points), 2),
            }
    tasks = [(s["seconds"], s["tasks"]) for s in warm]
    series["collector tasks"] = {
        "first": samples[0]["tasks"],
        "last": samples[-1]["tasks"],
        "slope_per_hour": round(slope_per_hour(tasks), 2),
    }
    return {
        "minutes": minutes,
        "flip_seconds": flip_seconds,
        "flips": flips,
        "status_changes_seen": changes_seen,
        "results_delivered": final_debug["delivered_total"],
        "results_refused": final_debug["results_refused"],
        "samples": samples,
        "series": series,
        "left_after_down": left,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--flip-seconds", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument("--json", metavar="FILE", help="also write every figure here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the soak bench builds a lab: run it as root")
        return 2
    figures = run(args.minutes, args.flip_seconds, args.warmup_minutes)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(
        f"\n{figures['minutes']:g} min, {figures['flips']} policy flips "
        f"({figures['status_changes_seen']} status changes seen), "
        f"{figures['results_delivered']} results delivered, refused {figures['results_refused']}"
    )
    print(f"{'series':32} {'first':>9} {'last':>9} {'slope/h':>9}")
    for name, values in figures["series"].items():
        print(
            f"{name:32} {values['first']:9.1f} {values['last']:9.1f} "
            f"{values['slope_per_hour']:9.2f}"
        )
    print("left after down:", figures["left_after_down"] or "nothing")
    return 1 if figures["left_after_down"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
