"""Engine benchmark: verdicts for every ordered pod pair on one port, 1,000 and 10,000 pods.

Synthetic clusters (bench/synthetic.py: 100 namespaces, 500 policies) are written as YAML and fed to
`flowproof matrix --counts -o json` in a fresh process each, measuring wall time and peak RSS; the engine
alone (snapshot already built) is timed too. With `--nca`, np-guard's network-config-analyzer
(`nca`, installed for the benchmark only: `pip install network-config-analyzer` into any venv and
pass `--nca PATH`) reads the same manifests at 1,000 pods, side by side in the same run.

With `--distinct`, the clusters come from `make_distinct_cluster` (no selector repeats across
namespaces) at PODS:NAMESPACES:POLICIES sizes, and the same command runs side by side on the
engine of `--baseline` (a commit, extracted with `git archive` into a temporary directory and put
first on PYTHONPATH) up to `--baseline-max-pods`, each run bounded by `--timeout` seconds.

    python -m bench.engine_bench [--sizes 1000 10000] [--nca /path/to/nca] [--repeat 3]
    python -m bench.engine_bench --distinct 10000:1000:4000 100000:5000:20000 [--baseline ec75892]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.synthetic import make_cluster, make_distinct_cluster, write_manifests

MEASURE = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from flowproof.cli import main
import io
out = io.StringIO()
rc = main(["matrix", "-f", sys.argv[1], "--port", "8080/TCP", "--counts", "-o", "json"], stdout=out)
t1 = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rc": rc, "seconds": t1 - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "rss_mb": usage.ru_maxrss / 1024,
                  "counts": json.loads(out.getvalue())}))
"""

PHASES = """
import json, resource, sys, time
from collector.reading.manifests import _load_documents
from collector.reading.objects import build_snapshot
from collector.core.classes import ClassModel
marks = [time.process_time()]
documents = _load_documents([sys.argv[1]], [], [])
marks.append(time.process_time())
snapshot = build_snapshot(documents, [])
marks.append(time.process_time())
model = ClassModel(snapshot)
marks.append(time.process_time())
counts = model.counts(8080, "TCP")
marks.append(time.process_time())
names = ("read_yaml", "build_snapshot", "classes", "counts")
print(json.dumps({n + "_cpu_seconds": round(b - a, 2) for n, a, b in zip(names, marks, marks[1:])}))
"""

ENGINE_ONLY = """
import json, sys, time
from bench.synthetic import make_cluster
from collector.core.classes import ClassModel
snap = make_cluster(int(sys.argv[1]), 100, 500, 7)
t0 = time.perf_counter()
model = ClassModel(snap)
t1 = time.perf_counter()
counts = model.counts(8080, "TCP")
t2 = time.perf_counter()
print(json.dumps({"classes_seconds": t1 - t0, "count_seconds": t2 - t1, "classes": counts.classes}))
"""


def run_json(args: list[str]) -> dict[str, object]:
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def time_command(args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    return time.perf_counter() - start, done.returncode


def _measure(directory: Path, pythonpath: str | None, timeout: float) -> dict[str, object]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    try:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(directory)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=pythonpath or None,
        )
    except subprocess.TimeoutExpired:
        return {"finished": False, "why": f"over the {timeout:.0f} s bound"}
    if done.returncode != 0:
        return {"finished": False, "why": done.stderr.strip().splitlines()[-1:]}
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["finished"] = True
    return result


def distinct(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        baseline = Path(tmp) / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.baseline], capture_output=True, check=True, timeout=120
        )
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        for size in args.distinct:
            pods, namespaces, policies = (int(x) for x in size.split(":"))
            directory = Path(tmp) / f"d{pods}"
            write_manifests(make_distinct_cluster(pods, namespaces, policies, 7), directory)
            megabytes = sum(f.stat().st_size for f in directory.iterdir()) / 1e6
            ours = _measure(directory, None, args.timeout)
            phases = run_json([sys.executable, "-c", PHASES, str(directory)])
            row: dict[str, object] = {
                "pods": pods,
                "namespaces": namespaces,
                "policies": policies,
                "yaml_mb": round(megabytes, 1),
                "new": _rounded(ours),
                "new_phases": phases,
            }
            if pods <= args.baseline_max_pods:
                row["baseline"] = _rounded(_measure(directory, str(baseline), args.timeout))
            else:
                row["baseline"] = {"finished": False, "why": "not run (--baseline-max-pods)"}
            print(json.dumps(row), flush=True)
    return 0


def _rounded(result: dict[str, object]) -> dict[str, object]:
    out = dict(result)
    for key in ("seconds", "cpu_seconds", "rss_mb"):
        if isinstance(out.get(key), float):
            out[key] = round(float(out[key]), 2)  # type: ignore[arg-type]
    counts = out.pop("counts", None)
    if isinstance(counts, list) and counts:
        out["allowed"] = counts[0]["allowed"]
        out["classes"] = counts[0]["classes"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--nca", help="path of np-guard's nca executable, for the side-by-side run")
    parser.add_argument("--nca-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--distinct", nargs="+", metavar="PODS:NAMESPACES:POLICIES")
    parser.add_argument("--baseline", default="ec75892", help="the commit to compare with")
    parser.add_argument("--baseline-max-pods", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.distinct:
        return distinct(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        for size in args.sizes:
            directory = Path(tmp) / f"c{size}"
            write_manifests(make_cluster(size, 100, 500, 7), directory)
            runs = [
                run_json([sys.executable, "-c", MEASURE, str(directory)])
                for _ in range(args.repeat)
            ]
            best = min(runs, key=lambda r: float(r["seconds"]))  # type: ignore[arg-type]
            engine = run_json([sys.executable, "-c", ENGINE_ONLY, str(size)])
            counts = best["counts"][0]  # type: ignore[index]
            rows.append(
                {
                    "pods": size,
                    "pairs": counts["pairs"],
                    "allowed": counts["allowed"],
                    "denied": counts["denied"],
                    "classes": counts["classes"],
                    "cli_seconds_best": round(float(best["seconds"]), 2),  # type: ignore[arg-type]
                    "cli_seconds_all": [round(float(r["seconds"]), 2) for r in runs],  # type: ignore[arg-type]
                    "peak_rss_mb": round(max(float(r["rss_mb"]) for r in runs)),  # type: ignore[arg-type]
                    "engine_seconds": round(
                        float(engine["classes_seconds"]) + float(engine["count_seconds"]),
                        2,  # type: ignore[arg-type]
                    ),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if args.nca:
            directory = Path(tmp) / f"c{args.nca_size}"
            if not directory.exists():
                write_manifests(make_cluster(args.nca_size, 100, 500, 7), directory)
            ours, rc = time_command(
                [
                    sys.executable,
                    "-m",
                    "flowproof.cli",
                    "matrix",
                    "-f",
                    str(directory),
                    "--port",
                    "8080/TCP",
                    "--counts",
                    "-o",
                    "json",
                ]
            )
            # nca answers every port at once: also time flowproof on every declared port.
            ours_all, rc_all = time_command(
                [
                    sys.executable,
                    "-m",
                    "flowproof.cli",
                    "matrix",
                    "-f",
                    str(directory),
                    "--counts",
                    "-o",
                    "json",
                ]
            )
            theirs, nca_rc = time_command(
                [
                    args.nca,
                    "--connectivity",
                    str(directory / "networkpolicies.yaml"),
                    "--pod_list",
                    str(directory / "pods.yaml"),
                    "--ns_list",
                    str(directory / "namespaces.yaml"),
                    "--output_format",
                    "txt",
                ]
            )
            result = {
                "side_by_side_pods": args.nca_size,
                "flowproof_seconds": round(ours, 2),
                "flowproof_rc": rc,
                "nca_seconds": round(theirs, 2),
                "nca_rc": nca_rc,
                "ratio": round(theirs / ours, 1),
                "flowproof_all_ports_seconds": round(ours_all, 2),
                "flowproof_all_ports_rc": rc_all,
                "ratio_all_ports": round(theirs / ours_all, 1),
            }
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
