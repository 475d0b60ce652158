"""Manifest poll benchmark: one changed file among many, re-read with and without the document cache.

`make_cluster` (`--pods`, default 10,000) is written as manifests, its pods split into files of
`--per-file` documents (as the lab and the many-agents bench shard them). Two `ManifestSource`s
poll the same directory side by side: one as the collector runs it (a `DocumentCache`: a poll
parses only the files whose bytes changed), one with the plain `load_snapshot` (every file parsed
on every change). Each of `--changes` rounds appends a comment to one pods file and times one poll
of each. The directory is removed at the end.

    python -m bench.manifest_poll_bench [--pods 10000] [--per-file 50] [--changes 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.synthetic import make_cluster, write_manifests
from collector.reading.manifests import load_snapshot
from collector.sources import ManifestSource


def shard(directory: Path, per_file: int) -> list[Path]:
    """Split every pods file into files of `per_file` documents; the pods files made."""
    made = []
    for path in sorted(directory.rglob("*pods*")):
        documents = [d for d in path.read_text().split("\n---") if d.strip()]
        path.unlink()
        for start in range(0, len(documents), per_file):
            part = path.parent / f"pods-{start:06d}.yaml"
            part.write_text("\n---".join(documents[start : start + per_file]))
            made.append(part)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--per-file", type=int, default=50)
    parser.add_argument("--changes", type=int, default=3)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="fp-poll-bench-"))
    try:
        write_manifests(
            make_cluster(args.pods, max(1, args.pods // 100), args.pods // 25, 7), directory
        )
        pods_files = shard(directory, args.per_file)
        files = [p for p in directory.rglob("*") if p.is_file()]
        sources = {
            "cached": ManifestSource([directory]),
            "every file": ManifestSource([directory], loader=load_snapshot),
        }
        times: dict[str, list[float]] = {name: [] for name in sources}
        for source in sources.values():
            assert source.poll() is not None
        for i in range(args.changes):
            changed = pods_files[i % len(pods_files)]
            with changed.open("a") as out:
                out.write(f"\n# change {i}\n")
            for name, source in sources.items():
                started = time.perf_counter()
                source.poll()
                times[name].append(time.perf_counter() - started)
        cached, every = (statistics.median(times[n]) for n in ("cached", "every file"))
        print(
            json.dumps(
                {
                    "pods": args.pods,
                    "files": len(files),
                    "bytes": sum(p.stat().st_size for p in files),
                    "poll_cached_s": [round(t, 2) for t in times["cached"]],
                    "poll_every_file_s": [round(t, 2) for t in times["every file"]],
                    "every_file_over_cached": round(every / cached, 1),
                }
            )
        )
    finally:
        shutil.rmtree(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
