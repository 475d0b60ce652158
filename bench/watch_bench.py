"""Watch decode benchmark: the cost per watch event of the official client's `watch.Watch` against
collector/kube.py's own reading of the stream, side by side in one run.

Both read the same JSON lines (MODIFIED events of realistic pods, as an API server sends them) and
end with the same model object (collector.kube's conversion of the event's object):
- official: `Watch.unmarshal_event` (what `watch.Watch().stream()` does per line: json.loads and
  deserialisation into V1Pod, its raw dict kept as raw_object), then the conversion of raw_object;
- ours: json.loads of the line, then the conversion.
(`stream(..., deserialize=False)` would skip the models, but then it tracks no resourceVersion,
sees no BOOKMARK and fails on an ERROR event with KeyError 'raw_object': not a usable watch.)
Bounded: `--events` lines, best of `--rounds`. CPU only; nothing leaves the process.

    python -m bench.watch_bench [--events 2000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from kubernetes import watch

from collector.kube import _convert
from tests.support.apiobjects import make_pod


def lines(count: int) -> list[str]:
    out = []
    for i in range(count):
        pod = make_pod(
            f"web-{i}",
            labels={"app": "web", "tier": "frontend", "pod-template-hash": f"{i:08x}"},
            ip=f"10.244.{i // 250}.{i % 250 + 1}",
        )
        out.append(json.dumps({"type": "MODIFIED", "object": pod}))
    return out


def official(events: list[str]) -> float:
    w = watch.Watch()
    start = time.perf_counter()
    for line in events:
        event = w.unmarshal_event(line, "V1Pod")
        _convert("Pod", event["raw_object"])
    return time.perf_counter() - start


def ours(events: list[str]) -> float:
    start = time.perf_counter()
    for line in events:
        event = json.loads(line)
        _convert("Pod", event["object"])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="watch lines per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best one counts")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    events = lines(args.events)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, run in (("official", official), ("ours", ours)):
            seconds = run(events)
            best[name] = min(best.get(name, seconds), seconds)
    result: dict[str, Any] = {
        "events": args.events,
        "official_us_per_event": best["official"] / args.events * 1e6,
        "ours_us_per_event": best["ours"] / args.events * 1e6,
        "ratio": best["official"] / best["ours"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.events} pod events: watch.Watch {result['official_us_per_event']:.0f} µs/event, "
            f"collector.kube {result['ours_us_per_event']:.0f} µs/event "
            f"({result['ratio']:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
