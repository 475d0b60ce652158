"""A tiny test bed for the agent: two pod network namespaces with real kubelet-style pod cgroups.

`two_pods()` builds, under a unique per-run prefix: namespaces `<prefix>s` (source) and `<prefix>d`
(destination) joined by a veth pair on 10.250.X.0/25 (X random per run), a blackhole route for
10.250.X.0/24 in the root namespace (nothing of this range may leave from there), and in each pod a
sleeping process placed in a cgroup v2 pod cgroup
(`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`)
so the agent resolves it by uid from /proc like a kubelet pod. In the source namespace 10.250.X.128/26
is an `unreachable` route and 10.250.X.192/26 a `prohibit` route. Everything is removed by recorded
name and pid in `finally`, also when a test fails. Other agent tests import it; its own tests check
that it builds and cleans up.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

CGROUP2_ROOT = "/sys/fs/cgroup/unified"
PARENTS = ("kubepods.slice", "kubepods-besteffort.slice")


def can_build() -> str | None:
    """Why the bed cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if shutil.which("nft") is None:
        return "needs nftables (nft)"
    if not os.path.exists(os.path.join(CGROUP2_ROOT, "cgroup.procs")):
        return f"needs cgroup v2 mounted at {CGROUP2_ROOT}"
    return None


needs_netlab = pytest.mark.skipif(can_build() is not None, reason=can_build() or "")


def run(*cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *cmd: str, stdin: str | None = None) -> str:
    return run("ip", "netns", "exec", ns, *cmd, stdin=stdin)


@dataclass
class PodNs:
    """One pod: its namespace, uid, address and the process standing for its container."""

    netns: str
    uid: str
    ip: str
    pid: int = 0
    cgroup: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    def stop_process(self) -> None:
        """The pod's container exits (the pod is gone from the agent's point of view)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class Bed:
    prefix: str
    subnet: str  # "10.250.X"
    src: PodNs
    dst: PodNs

    @property
    def unreachable_ip(self) -> str:
        return f"{self.subnet}.130"

    @property
    def prohibited_ip(self) -> str:
        return f"{self.subnet}.200"

    def nft(self, pod: PodNs, ruleset: str) -> None:
        in_ns(pod.netns, "nft", "-f", "-", stdin=ruleset)


def unique_prefix() -> str:
    return f"fp{os.getpid() % 1000:03d}{uuid.uuid4().hex[:4]}"


def _claim_subnet() -> str:
    for _ in range(50):
        subnet = f"10.250.{random.randint(1, 254)}"
        try:
            run("ip", "route", "add", "blackhole", f"{subnet}.0/24")
        except RuntimeError:
            continue  # taken by a parallel run
        return subnet
    raise RuntimeError("no free 10.250.X.0/24 for the test bed")


def _start_container(pod: PodNs) -> None:
    """A sleeping process in the pod's namespace, moved into a kubelet-style pod cgroup."""
    slice_name = f"kubepods-besteffort-pod{pod.uid.replace('-', '_')}.slice"
    scope = f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
    pod.cgroup = os.path.join(CGROUP2_ROOT, *PARENTS, slice_name, scope)
    os.makedirs(pod.cgroup, exist_ok=True)
    pod.process = subprocess.Popen(["ip", "netns", "exec", pod.netns, "sleep", "3600"])
    pod.pid = pod.process.pid
    want = os.stat(pod.netns_path).st_ino
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{pod.pid}/ns/net").st_ino != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pod.pid} never entered {pod.netns}")
        time.sleep(0.005)
    with open(os.path.join(pod.cgroup, "cgroup.procs"), "w") as fh:
        fh.write(str(pod.pid))


def _remove_cgroup(scope: str) -> None:
    """The container scope and pod slice; the shared parents only when empty (other runs)."""
    paths = (
        scope,
        os.path.dirname(scope),
        os.path.join(CGROUP2_ROOT, *PARENTS),
        os.path.join(CGROUP2_ROOT, PARENTS[0]),
    )
    for i, path in enumerate(paths):
        for _ in range(50 if i < 2 else 1):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)  # the killed process may take a moment to leave the cgroup


@contextlib.contextmanager
def two_pods() -> Iterator[Bed]:
    prefix = unique_prefix()
    src = PodNs(netns=f"{prefix}s", uid=str(uuid.uuid4()), ip="")
    dst = PodNs(netns=f"{prefix}d", uid=str(uuid.uuid4()), ip="")
    subnet = ""
    created: list[str] = []
    try:
        subnet = _claim_subnet()
        src.ip, dst.ip = f"{subnet}.1", f"{subnet}.2"
        for pod in (src, dst):
            run("ip", "netns", "add", pod.netns)
            created.append(pod.netns)
            in_ns(pod.netns, "ip", "link", "set", "lo", "up")
        run("ip", "link", "add", f"{prefix}a", "netns", src.netns, "type", "veth",
            "peer", "name", f"{prefix}b", "netns", dst.netns)  # fmt: skip
        for pod, dev in ((src, f"{prefix}a"), (dst, f"{prefix}b")):
            in_ns(pod.netns, "ip", "addr", "add", f"{pod.ip}/25", "dev", dev)
            in_ns(pod.netns, "ip", "link", "set", dev, "up")
        in_ns(src.netns, "ip", "route", "add", "unreachable", f"{subnet}.128/26")
        in_ns(src.netns, "ip", "route", "add", "prohibit", f"{subnet}.192/26")
        for pod in (src, dst):
            _start_container(pod)
        yield Bed(prefix=prefix, subnet=subnet, src=src, dst=dst)
    finally:
        for pod in (src, dst):
            pod.stop_process()
            if pod.cgroup:
                _remove_cgroup(pod.cgroup)
        for ns in created:
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "del", ns)
        if subnet:
            with contextlib.suppress(RuntimeError):
                run("ip", "route", "del", "blackhole", f"{subnet}.0/24")


# --- the bed's own tests ---------------------------------------------------------------------------


@needs_netlab
def test_bed_builds_pods_in_kubelet_cgroups_and_removes_everything() -> None:
    with two_pods() as bed:
        names = run("ip", "netns", "list")
        assert bed.src.netns in names and bed.dst.netns in names
        with open(f"/proc/{bed.src.pid}/cgroup") as fh:
            assert f"pod{bed.src.uid.replace('-', '_')}.slice/cri-containerd-" in fh.read()
        assert f"blackhole {bed.subnet}.0/24" in run("ip", "route", "show")
        # The pods reach each other, and only each other.
        assert f"{bed.dst.ip}" in in_ns(bed.src.netns, "ip", "route", "get", bed.dst.ip)
        kept = bed
    names = run("ip", "netns", "list")
    assert kept.src.netns not in names and kept.dst.netns not in names
    assert f"{kept.subnet}.0/24" not in run("ip", "route", "show")
    assert not os.path.exists(kept.src.cgroup)
    assert not os.path.exists(os.path.dirname(kept.src.cgroup))
    assert kept.src.process is not None and kept.src.process.returncode is not None
