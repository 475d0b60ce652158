"""Resolving a pod uid to its network namespace on this node, from /proc.

Scans `/proc/*/cgroup` for the kubelet pod cgroup (cgroup v1 and v2; systemd names such as
`kubepods-besteffort-pod<uid_with_underscores>.slice`, cgroupfs names `pod<uid>`) and a container
scope below it (containerd `cri-containerd-<id>.scope`, CRI-O `crio-<id>.scope`, Docker
`docker-<id>.scope`, or a bare container id under cgroupfs), then takes the pod's namespace from
`/proc/PID/ns/net`. CRI-O's `crio-conmon-*` monitors run in the host's namespace and are skipped.
Results are cached and checked on every use (the pid still lives, its namespace inode is the same),
so a pod that is gone is noticed. The /proc root is injectable; this module never enters a netns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.errors import PodNotFound

log = logging.getLogger(__name__)

_UID = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"
# The pod's own cgroup: `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_>.slice` (systemd).
_POD_COMPONENT = re.compile(rf"^(?:kubepods(?:-[a-z]+)?-)?pod(?P<uid>{_UID})(?:\.slice)?$")
# A container below the pod cgroup, by runtime naming.
_CONTAINER_COMPONENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^cri-containerd-(?P<id>[0-9a-f]{12,64})\.scope$"), "containerd"),
    (re.compile(r"^crio-(?P<id>[0-9a-f]{12,64})(?:\.scope)?$"), "cri-o"),
    (re.compile(r"^docker-(?P<id>[0-9a-f]{12,64})\.scope$"), "docker"),
    (re.compile(r"^(?P<id>[0-9a-f]{64})$"), "cgroupfs"),
)


@dataclass(frozen=True)
class PodNetns:
    """Where a pod's network namespace can be entered: `/proc/PID/ns/net` of one of its pids."""

    uid: str
    pid: int
    path: str
    inode: int
    device: int
    container_id: str
    runtime: str


@dataclass(frozen=True)
class ContainerCgroup:
    """The pod uid (dashed) and container a process belongs to, from one /proc/PID/cgroup line."""

    pod_uid: str
    container_id: str
    runtime: str


def parse_cgroup_path(path: str) -> ContainerCgroup | None:
    """The pod and container of a cgroup path, or None when it is not inside a pod's container.

    A path needs a `kubepods` component before the pod component: a stray `pod<uid>` elsewhere is
    not a kubelet pod cgroup.
    """
    parts = [p for p in path.split("/") if p]
    seen_kubepods = False
    for i, part in enumerate(parts):
        if part.startswith("kubepods"):
            seen_kubepods = True
        match = _POD_COMPONENT.match(part)
        if not match or not seen_kubepods:
            continue
        if i + 1 >= len(parts):
            return None  # a process in the pod cgroup itself, not in a container
        child = parts[i + 1]
        for pattern, runtime in _CONTAINER_COMPONENTS:
            cm = pattern.match(child)
            if cm:
                return ContainerCgroup(
                    pod_uid=match.group("uid").replace("_", "-").lower(),
                    container_id=cm.group("id"),
                    runtime=runtime,
                )
        return None  # e.g. crio-conmon-<id>.scope: the monitor lives in the host namespace
    return None


def parse_proc_cgroup(text: str) -> ContainerCgroup | None:
    """The pod container named by the contents of /proc/PID/cgroup (v1 and/or v2 lines)."""
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        _, _, path = rest.partition(":")
        found = parse_cgroup_path(path)
        if found is not None:
            return found
    return None


class PodResolver:
    """Finds and caches the network namespace of pods on this node by uid.

    `resolve()` is async: a cache hit is checked with one stat of the namespace file at most every
    `recheck_seconds` (entering the namespace checks its inode again), a miss scans /proc in a
    worker thread (one scan serves every caller waiting at that moment), and a uid that a scan
    found missing is not rescanned for `miss_retry_seconds` (a uid never looked for always is, so
    a pod that just started is found at once).
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        miss_retry_seconds: float = 0.5,
        recheck_seconds: float = 0.2,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self._miss_retry_seconds = miss_retry_seconds
        self._recheck_seconds = recheck_seconds
        self._checked: dict[str, float] = {}
        self._monotonic = monotonic
        self._cache: dict[str, PodNetns] = {}
        self._missing: dict[str, float] = {}  # uid -> when a scan last found it missing
        self._scan: asyncio.Task[dict[str, PodNetns]] | None = None

    async def resolve(self, uid: str) -> PodNetns:
        """The namespace of pod `uid`; raises PodNotFound when no process of it runs here."""
        uid = uid.lower()
        hit = self.cached(uid)  # entering it re-checks the inode anyway (NetnsTarget)
        if hit is not None:
            return hit
        if uid in self._cache:
            self.forget(uid)
        elif self._monotonic() - self._missing.get(uid, float("-inf")) < self._miss_retry_seconds:
            raise PodNotFound(f"pod {uid} has no running container on this node")
        found = await self._rescan()
        entry = found.get(uid)
        if entry is None:
            self._missing[uid] = self._monotonic()
            raise PodNotFound(f"pod {uid} has no running container on this node")
        self._missing.pop(uid, None)
        return entry

    def cached(self, uid: str) -> PodNetns | None:
        """The cached namespace of pod `uid` if it is still valid, without scanning; else None."""
        uid = uid.lower()
        cached = self._cache.get(uid)
        if cached is None:
            return None
        now = self._monotonic()
        if now - self._checked.get(uid, float("-inf")) < self._recheck_seconds:
            return cached
        if self.still_valid(cached):
            self._checked[uid] = now
            return cached
        return None

    def forget(self, uid: str) -> None:
        """Drop a cached entry, e.g. when its namespace turned out to have changed."""
        self._cache.pop(uid.lower(), None)
        self._checked.pop(uid.lower(), None)

    def still_valid(self, entry: PodNetns) -> bool:
        """Whether the pid still lives in the same namespace (so the pod is not gone)."""
        try:
            st = os.stat(entry.path)
        except OSError:
            return False
        return st.st_ino == entry.inode and st.st_dev == entry.device

    async def _rescan(self) -> dict[str, PodNetns]:
        # The scan runs in its own task so that a caller cancelled meanwhile (a cancelled
        # assignment) cancels only its own wait, never the scan others are waiting for.
        if self._scan is None:
            self._scan = asyncio.create_task(self._run_scan(), name="pod_scan")
        return await asyncio.shield(self._scan)

    async def _run_scan(self) -> dict[str, PodNetns]:
        try:
            found = await asyncio.to_thread(self.scan)
            self._cache = found
            scanned_at = self._monotonic()
            self._checked = dict.fromkeys(found, scanned_at)
            # Forget misses long past, so the table stays as small as the pods recently asked for.
            horizon = scanned_at - 10 * self._miss_retry_seconds
            self._missing = {u: t for u, t in self._missing.items() if t >= horizon}
            return found
        finally:
            self._scan = None

    def scan(self) -> dict[str, PodNetns]:
        """Every pod with a container process under proc_root (blocking; run it in a thread).

        When a pod has several processes, the one with the lowest pid is used (usually the pause
        container, which lives as long as the pod).
        """
        found: dict[str, PodNetns] = {}
        for pid in self._pids():
            entry = self._read_pid(pid)
            if entry is None:
                continue
            current = found.get(entry.uid)
            if current is None or entry.pid < current.pid:
                found[entry.uid] = entry
        return found

    def _pids(self) -> Iterator[int]:
        try:
            names = os.listdir(self.proc_root)
        except OSError as exc:
            log.error("cannot list %s: %s", self.proc_root, exc.strerror)
            return
        for name in names:
            if name.isdigit():
                yield int(name)

    def _read_pid(self, pid: int) -> PodNetns | None:
        base = os.path.join(self.proc_root, str(pid))
        try:
            with open(os.path.join(base, "cgroup"), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            return None  # exited meanwhile, or a kernel thread we may not read
        container = parse_proc_cgroup(text)
        if container is None:
            return None
        path = os.path.join(base, "ns", "net")
        try:
            st = os.stat(path)
        except OSError:
            return None
        return PodNetns(
            uid=container.pod_uid,
            pid=pid,
            path=path,
            inode=st.st_ino,
            device=st.st_dev,
            container_id=container.container_id,
            runtime=container.runtime,
        )
