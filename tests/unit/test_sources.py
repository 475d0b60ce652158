"""ManifestSource: real files rewritten the way the lab does (atomically), polled and re-read."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from collector.core.changes import ChangeEvent
from collector.core.model import Snapshot
from collector.reading.manifests import load_snapshot
from collector.sources import ManifestSource, fingerprint
from tests.support.clock import ManualClock


def pod(name: str, labels: str = "{app: api}", ip: str = "10.244.1.2") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {labels}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: x, ports: [{{containerPort: 8080}}]}}]
status: {{phase: Running, podIP: {ip}}}
"""


POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}}
"""


def write_atomically(path: Path, text: str, *, mtime: float | None = None) -> None:
    """Like the lab: write a temporary file beside the target, then rename it over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    write_atomically(cluster / "pods.yaml", pod("api"), mtime=900.0)
    write_atomically(cluster / "policies.yaml", POLICY, mtime=900.0)
    return cluster


def test_the_first_poll_reads_everything_then_nothing_until_a_file_changes(state: Path) -> None:
    source = ManifestSource([state], clock=ManualClock(1000.0))
    found = source.poll()
    assert found is not None
    snapshot, change = found
    assert [p.key for p in snapshot.pods] == ["shop/api"]
    assert (change.generation, change.initial, change.at) == (1, True, 1000.0)
    assert source.poll() is None
    assert (source.generation, source.snapshot) == (1, snapshot)


def test_an_atomic_rewrite_is_noticed_and_dated_by_the_file(state: Path) -> None:
    clock = ManualClock(1000.0)
    source = ManifestSource([state], clock=clock)
    source.poll()
    clock.now = 1010.0
    write_atomically(state / "pods.yaml", pod("api", labels="{app: api, v: '2'}"), mtime=1009.5)
    clock.now = 1010.2
    found = source.poll()
    assert found is not None
    snapshot, change = found
    assert snapshot.pods[0].labels == {"app": "api", "v": "2"}
    assert (change.generation, change.initial) == (2, False)
    assert change.pods_changed == {"shop/api"}
    assert (change.at, change.observed_at) == (1009.5, 1010.2)


def test_a_change_is_never_dated_before_the_previous_poll(state: Path) -> None:
    clock = ManualClock(1000.0)
    source = ManifestSource([state], clock=clock)
    source.poll()
    clock.now = 1001.0
    assert source.poll() is None
    write_atomically(state / "pods.yaml", pod("api", ip="10.244.1.3"), mtime=10.0)  # cp -p
    clock.now = 1001.2
    found = source.poll()
    assert found is not None and found[1].at == 1001.0


def test_a_rewrite_with_the_same_meaning_is_not_a_change(state: Path) -> None:
    source = ManifestSource([state], clock=ManualClock(1000.0))
    source.poll()
    write_atomically(state / "policies.yaml", "# moved\n" + POLICY, mtime=950.0)
    assert source.poll() is None
    assert source.generation == 1


def test_a_bad_version_keeps_the_last_good_snapshot_and_is_logged_once(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collector.sources")
    source = ManifestSource([state], clock=ManualClock(1000.0))
    found = source.poll()
    assert found is not None
    good = found[0]

    write_atomically(state / "policies.yaml", "kind: NetworkPolicy\nspec: [oops\n")
    assert source.poll() is None
    assert source.poll() is None
    assert source.snapshot is good and source.generation == 1
    assert source.last_error is not None and "policies.yaml" in str(source.last_error)
    assert len(caplog.records) == 1, "one bad version, one log line"
    assert "keeping the last good snapshot" in caplog.records[0].getMessage()

    write_atomically(state / "policies.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {}\n")
    assert source.poll() is None
    assert len(caplog.records) == 2, "another bad version is logged again"
    assert source.errors_total == 2

    write_atomically(state / "policies.yaml", "")
    found = source.poll()
    assert found is not None
    snapshot, change = found
    assert source.last_error is None
    assert change.policies_removed == {"shop/deny"}, "diffed against the last good snapshot"
    assert (change.generation, snapshot.pods) == (2, good.pods)


def test_a_change_parses_only_the_files_it_changed_and_keeps_the_others_problems(
    state: Path,
) -> None:
    source = ManifestSource([state], clock=ManualClock(1000.0))
    assert source.poll() is not None and source.documents.parsed_total == 2
    write_atomically(state / "pods.yaml", pod("api", "{app: web}"))
    found = source.poll()
    assert found is not None and source.documents.parsed_total == 3, "pods.yaml only"
    assert found[0] == load_snapshot([state]), "as a fresh read of every file says"
    write_atomically(state / "policies.yaml", "kind: NetworkPolicy\nspec: [oops\n")
    assert source.poll() is None and source.documents.parsed_total == 4
    write_atomically(state / "pods.yaml", pod("api", "{app: db}"))
    assert source.poll() is None, "the unchanged bad file is still bad"
    assert source.documents.parsed_total == 5
    assert source.last_error is not None and "policies.yaml" in str(source.last_error)
    (state / "policies.yaml").unlink()
    found = source.poll()
    assert found is not None and found[0] == load_snapshot([state])
    assert found[1].policies_removed == {"shop/deny"}


def test_a_bad_first_read_gives_no_snapshot_until_it_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: shop}\nspec: 3\n")
    source = ManifestSource([path], clock=ManualClock(1000.0))
    assert source.poll() is None and source.snapshot is None
    write_atomically(path, pod("x"))
    found = source.poll()
    assert found is not None and found[1].initial and found[1].generation == 1


def test_a_missing_path_is_a_bad_version_not_a_crash(tmp_path: Path) -> None:
    source = ManifestSource([tmp_path / "nowhere"], clock=ManualClock(1000.0))
    assert source.poll() is None
    assert source.last_error is not None and "no such file" in str(source.last_error)


def test_fingerprint_sees_renames_and_skips_hidden_files(state: Path) -> None:
    before = fingerprint([state])
    assert sorted(Path(p).name for p in before) == ["pods.yaml", "policies.yaml"]
    write_atomically(state / "pods.yaml", pod("api"), mtime=900.0)  # same content, same mtime
    after = fingerprint([state])
    assert after != before, "a new inode is a new version"
    (state / ".hidden.yaml").write_text("x")
    assert fingerprint([state]) == after


async def test_run_hands_each_new_snapshot_to_the_consumer_until_stopped(state: Path) -> None:
    source = ManifestSource([state], poll_interval_seconds=0.01)
    seen: list[tuple[Snapshot, ChangeEvent]] = []
    arrived = asyncio.Event()

    async def consume(snapshot: Snapshot, change: ChangeEvent) -> None:
        seen.append((snapshot, change))
        arrived.set()

    stop = asyncio.Event()
    task = asyncio.create_task(source.run(consume, stop))
    try:
        await asyncio.wait_for(arrived.wait(), timeout=5)
        arrived.clear()
        write_atomically(state / "pods.yaml", pod("api") + "---\n" + pod("db", ip="10.244.1.9"))
        await asyncio.wait_for(arrived.wait(), timeout=5)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert [c.generation for _, c in seen] == [1, 2]
    assert seen[1][1].pods_added == {"shop/db"}
    assert seen[1][1].at <= seen[1][1].observed_at


def test_the_manifest_poll_benchmark_compares_the_cached_read_with_every_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/manifest_poll_bench.py at a small size, so it cannot rot."""
    from bench import manifest_poll_bench

    argv = ["manifest_poll_bench", "--pods", "300", "--per-file", "20", "--changes", "2"]
    monkeypatch.setattr("sys.argv", argv)
    assert manifest_poll_bench.main() == 0
    row = json.loads(capsys.readouterr().out)
    assert row["files"] > 15 and len(row["poll_cached_s"]) == len(row["poll_every_file_s"]) == 2
