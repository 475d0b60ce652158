"""Resolving pod uids to network namespaces on recorded /proc layouts.

Each case writes a small fake /proc tree (pid directories with a `cgroup` file and an `ns/net` file
whose inode stands for the namespace) the way kubelet, containerd and CRI-O lay it out under cgroup
v1 and v2, with systemd and cgroupfs drivers. The real thing (a process in a kubelet-style cgroup in
a real namespace) is tested in tests/integration/test_agent_probing.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent.errors import PodNotFound
from agent.resolving import PodResolver, parse_cgroup_path, parse_proc_cgroup

UID = "8d2b1c5e-4f7a-4b1e-9c3d-2e6f0a9b7c11"
UID_ = UID.replace("-", "_")
CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899"

V1_CONTROLLERS = ("memory", "cpu,cpuacct", "pids", "name=systemd")


def v1(path: str) -> str:
    """A cgroup v1 /proc/PID/cgroup: the same path under several hierarchies."""
    return "".join(f"{i + 2}:{c}:{path}\n" for i, c in enumerate(V1_CONTROLLERS))


def v2(path: str) -> str:
    return f"0::{path}\n"


def hybrid(path: str) -> str:
    """cgroup v1 controllers beside a unified hierarchy (this machine's layout)."""
    return v1(path) + v2(path)


LAYOUTS = {
    "containerd systemd": (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope",
        "containerd",
    ),
    "containerd systemd guaranteed": (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        "containerd",
    ),
    "containerd cgroupfs": (f"/kubepods/burstable/pod{UID}/{CID}", "cgroupfs"),
    "CRI-O systemd": (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"crio-{CID}.scope",
        "cri-o",
    ),
    "CRI-O cgroupfs": (f"/kubepods/besteffort/pod{UID}/crio-{CID}", "cri-o"),
    "kind node (nested under the node container's cgroup)": (
        f"/docker/0123abcd/kubepods/besteffort/pod{UID}/{CID}",
        "cgroupfs",
    ),
    "docker systemd": (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"docker-{CID}.scope",
        "docker",
    ),
}


class FakeProc:
    """A fake /proc: pid directories with a cgroup file and an ns/net file standing for a netns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.netns: dict[str, Path] = {}

    def add(self, pid: int, cgroup: str, netns: str) -> None:
        base = self.root / str(pid)
        (base / "ns").mkdir(parents=True)
        (base / "cgroup").write_text(cgroup)
        # A namespace is a file; processes in the same namespace share it (a hard link: one inode).
        if netns not in self.netns:
            self.netns[netns] = self.root.parent / f"netns-{netns}"
            self.netns[netns].write_text(netns)
        os.link(self.netns[netns], base / "ns" / "net")

    def remove(self, pid: int) -> None:
        base = self.root / str(pid)
        (base / "ns" / "net").unlink()
        (base / "ns").rmdir()
        (base / "cgroup").unlink()
        base.rmdir()

    def inode(self, netns: str) -> int:
        return self.netns[netns].stat().st_ino


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    root = tmp_path / "proc"
    root.mkdir()
    fake = FakeProc(root)
    fake.add(1, hybrid("/init.scope"), "host")
    fake.add(57, hybrid("/system.slice/containerd.service"), "host")
    (root / "self").mkdir()  # non-pid entries are ignored
    (root / "meminfo").write_text("")
    return fake


@pytest.mark.parametrize(
    "fmt", [pytest.param(v1, id="cgroup v1"), pytest.param(v2, id="cgroup v2"),
            pytest.param(hybrid, id="cgroup v1 and v2 together")],
)  # fmt: skip
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
async def test_pod_is_found_by_uid(proc: FakeProc, fmt: object, layout: str) -> None:
    path, runtime = LAYOUTS[layout]
    assert callable(fmt)
    proc.add(4242, fmt(path), "pod")
    found = await PodResolver(str(proc.root)).resolve(UID)
    assert (found.pid, found.runtime, found.container_id) == (4242, runtime, CID)
    assert found.inode == proc.inode("pod")
    assert found.path == str(proc.root / "4242" / "ns" / "net")


async def test_the_lowest_pid_of_the_pod_is_used(proc: FakeProc) -> None:
    path = LAYOUTS["containerd systemd"][0]
    proc.add(900, v2(path.replace(CID, "a" * 64)), "pod")  # app container
    proc.add(800, v2(path), "pod")  # pause container, started first
    found = await PodResolver(str(proc.root)).resolve(UID)
    assert found.pid == 800


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
                     f"crio-conmon-{CID}.scope", id="CRI-O's conmon lives in the host namespace"),
        pytest.param(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",
                     id="a process in the pod slice itself is in no container"),
        pytest.param(f"/system.slice/pod{UID}/{CID}", id="a pod-like name outside kubepods"),
        pytest.param("/user.slice/user-0.slice/session-1.scope", id="an ordinary process"),
    ],
)  # fmt: skip
async def test_processes_outside_pod_containers_are_ignored(proc: FakeProc, path: str) -> None:
    proc.add(4242, hybrid(path), "host")
    with pytest.raises(PodNotFound):
        await PodResolver(str(proc.root)).resolve(UID)


async def test_uid_case_does_not_matter(proc: FakeProc) -> None:
    path = LAYOUTS["containerd systemd"][0].replace(UID_, UID_.upper())
    proc.add(4242, v2(path), "pod")
    resolver = PodResolver(str(proc.root))
    assert (await resolver.resolve(UID.upper())).pid == 4242
    assert (await resolver.resolve(UID)).uid == UID


def test_unparseable_cgroup_lines_name_no_pod() -> None:
    assert parse_proc_cgroup("garbage without colons\n") is None
    assert parse_cgroup_path("") is None


async def test_cache_notices_a_pod_that_is_gone(proc: FakeProc) -> None:
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod")
    resolver = PodResolver(str(proc.root), miss_retry_seconds=0, recheck_seconds=0)
    first = await resolver.resolve(UID)
    assert resolver.still_valid(first)
    proc.remove(4242)
    assert not resolver.still_valid(first)
    with pytest.raises(PodNotFound, match="no running container"):
        await resolver.resolve(UID)


async def test_cache_notices_a_namespace_that_changed(proc: FakeProc) -> None:
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod")
    resolver = PodResolver(str(proc.root), miss_retry_seconds=0, recheck_seconds=0)
    first = await resolver.resolve(UID)
    # The pid was reused by a process of a new sandbox of the same pod (another namespace).
    proc.remove(4242)
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod-restarted")
    assert not resolver.still_valid(first)
    again = await resolver.resolve(UID)
    assert again.inode == proc.inode("pod-restarted") != first.inode


async def test_a_hit_is_rechecked_only_after_a_while(proc: FakeProc) -> None:
    now = [0.0]
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod")
    resolver = PodResolver(str(proc.root), recheck_seconds=0.2, monotonic=lambda: now[0])
    first = await resolver.resolve(UID)
    proc.remove(4242)
    # Within the window the cached entry is trusted (entering it checks the inode again).
    assert await resolver.resolve(UID) == first
    now[0] = 0.3
    with pytest.raises(PodNotFound):
        await resolver.resolve(UID)


async def test_hits_do_not_rescan_and_misses_are_rescanned_after_a_while(proc: FakeProc) -> None:
    now = [0.0]
    resolver = PodResolver(str(proc.root), miss_retry_seconds=1.0, monotonic=lambda: now[0])
    scans = 0
    real_scan = resolver.scan

    def counting_scan() -> dict[str, object]:
        nonlocal scans
        scans += 1
        return real_scan()  # type: ignore[return-value]

    resolver.scan = counting_scan  # type: ignore[method-assign]
    with pytest.raises(PodNotFound):
        await resolver.resolve(UID)
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod")
    with pytest.raises(PodNotFound):  # seen missing a moment ago: not rescanned yet
        await resolver.resolve(UID)
    assert scans == 1
    now[0] = 1.5
    assert (await resolver.resolve(UID)).pid == 4242
    assert (await resolver.resolve(UID)).pid == 4242
    assert scans == 2


async def test_one_scan_serves_every_waiter_and_survives_a_cancelled_one(proc: FakeProc) -> None:
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod")
    resolver = PodResolver(str(proc.root))
    first = asyncio.create_task(resolver.resolve(UID))
    others = [asyncio.create_task(resolver.resolve(UID)) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()  # the caller that started the scan goes away
    results = await asyncio.gather(*others)
    assert {r.pid for r in results} == {4242}
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_an_unreadable_proc_root_finds_nothing(tmp_path: Path) -> None:
    with pytest.raises(PodNotFound):
        await PodResolver(str(tmp_path / "missing")).resolve(UID)


async def test_a_uid_never_looked_for_is_scanned_for_at_once(proc: FakeProc) -> None:
    """A miss of one pod must not hide a pod that just started: misses are remembered per uid."""
    now = [0.0]
    resolver = PodResolver(str(proc.root), miss_retry_seconds=1.0, monotonic=lambda: now[0])
    other = "0f0e0d0c-0000-4000-8000-000000000001"
    with pytest.raises(PodNotFound):
        await resolver.resolve(other)
    proc.add(4242, v2(LAYOUTS["containerd systemd"][0]), "pod")
    assert (await resolver.resolve(UID)).pid == 4242  # no wait behind the other uid's miss
