"""`python -m bench [NAME…]`: run the benchmarks (all by default) one after another.

Each benchmark is a module of its own with its own flags (`python -m bench.engine_bench --help`);
this runner only calls them with their defaults, in a fresh process each so that one's memory or
threads never skew the next. Figures go to docs/benchmarks.md by hand, with the command.
"""

from __future__ import annotations

import subprocess
import sys

BENCHES = {
    "engine": "bench.engine_bench",
    "lab": "bench.lab_bench",
    "agent": "bench.agent_bench",
    "web": "bench.web_bench",
    "loop": "bench.loop_bench",
    "evidence": "bench.evidence_bench",
    "replan": "bench.replan_bench",
    "apiserver": "bench.apiserver_bench",
    "watch": "bench.watch_bench",
    "intake": "bench.intake_bench",
    "failover": "bench.failover_bench",
    "manifest-poll": "bench.manifest_poll_bench",
}


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHES)
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
        return 2
    worst = 0
    for name in chosen:
        print(f"== {name}: python -m {BENCHES[name]}", flush=True)
        worst = max(
            worst, subprocess.run([sys.executable, "-m", BENCHES[name]], check=False).returncode
        )
    return worst


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
