"""The lab's hands on the host: ip, nft and sysctl commands, namespaces, cgroups and processes.

Owns every system call and command the lab makes (batched: `ip -batch`, one `nft -f` per pod) and
the checks that keep it safe: processes are killed only by recorded pid and start time, cgroups
and namespaces only by recorded name. It must never kill by name pattern or touch an object that
is not in a lab's state.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from lab.errors import CommandError, LabError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
PARALLEL = 8

_libc = ctypes.CDLL(None, use_errno=True)


class RecordedProcess(Protocol):
    """A process as the lab records it (lab.state.ProcessRecord): pid and start time."""

    @property
    def pid(self) -> int: ...

    @property
    def start(self) -> int: ...  # field 22 of /proc/PID/stat


Recorded = TypeVar("Recorded", bound=RecordedProcess)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind `fd` (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


_NETNS_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,254}")


def check_netns_name(name: str) -> str:
    """`name` if it can only name a file directly in /run/netns (no '/', not '.' or '..')."""
    if not _NETNS_NAME.fullmatch(name) or name in (".", ".."):
        raise LabError(f"refusing network namespace name {name[:80]!r}: not a plain name")
    return name


def netns_path(name: str) -> str:
    return str(NETNS_DIR / check_netns_name(name))


def under(root: str | os.PathLike[str], relative: str, *, root_itself: bool = False) -> str:
    """`root/relative`, asserting it stays under `root` (no absolute part, no `..` out of it):
    every path the lab builds from a name goes through here before it is created or removed.
    The root itself (`relative` empty) only with `root_itself`."""
    base = os.path.normpath(os.fspath(root))
    joined = os.path.normpath(os.path.join(base, relative))
    if os.path.isabs(relative) or os.path.commonpath([base, joined]) != base:
        raise LabError(f"refusing path {relative[:120]!r}: it is not inside {base}")
    if joined == base and not root_itself:
        raise LabError(f"refusing path {relative[:120]!r}: it is not inside {base}")
    return joined


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, nftables, cgroups): run it as root")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            hint = " (apt-get install nftables)" if tool == "nft" else ""
            raise LabError(f"`{tool}` is not installed{hint}")


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    argv: tuple[str, ...]
    input: str | None = None


def _wrap(argv: Sequence[str]) -> list[str]:
    # `ip` dies with the lab command: a killed `lab up` leaves nothing creating objects behind
    # its back. (nft only changes tables inside the lab's own namespaces: no wrapper, faster.)
    if argv[0] == "ip" and shutil.which("setpriv") is not None:
        return ["setpriv", "--pdeathsig", "KILL", *argv]
    return list(argv)


def run(argv: Sequence[str], input: str | None = None, *, check: bool = True) -> str:
    """Run a command; its stdout, or CommandError with its stderr."""
    proc = subprocess.run(_wrap(argv), input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def run_many(jobs: Sequence[Job], parallel: int = PARALLEL) -> None:
    """Run jobs `parallel` at a time; all run, then the first failure (if any) is raised."""
    if not jobs:
        return
    if len(jobs) == 1:
        run(jobs[0].argv, jobs[0].input)
        return
    errors: list[CommandError] = []

    def one(job: Job) -> None:
        try:
            run(job.argv, job.input)
        except CommandError as exc:
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=min(parallel, len(jobs))) as pool:
        list(pool.map(one, jobs))
    if errors:
        if len(errors) > 1:
            log.error("%d more commands failed; first: %s", len(errors) - 1, errors[0])
        raise errors[0]


def ip_batch(commands: Sequence[str], netns: str | None = None, *, force: bool = False) -> Job:
    """A job running `ip -batch -` (in `netns` when given); `force` continues past errors."""
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    return Job(tuple(argv), "\n".join(commands) + "\n")


def nft_job(netns: str, text: str) -> Job:  # netns_path checks the name
    """A job applying `text` with `nft -f` inside `netns`: one atomic transaction."""
    return Job(("nsenter", f"--net={netns_path(netns)}", "nft", "-f", "-"), text)


def nft_apply(items: Sequence[tuple[str, str]], parallel: int = 16) -> None:
    """Apply each (network namespace, nft text) with one `nft -f` transaction in that namespace.

    A transaction that replaces rules waits for an RCU grace period in the kernel (~10 ms here),
    so many run at once. (libnftables in-process threads would save the process starts, but the
    library is not thread-safe: it crashed under concurrent contexts.) Every item is tried; then
    the first failure is raised.
    """
    run_many([nft_job(netns, text) for netns, text in items], parallel=parallel)


def sysctl_job(netns: str, settings: Iterable[str]) -> Job:
    return Job(("nsenter", f"--net={netns_path(netns)}", "sysctl", "-q", "-w", *settings))


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def delete_netns(names: Iterable[str]) -> list[str]:
    """Delete the namespaces that exist; the names that could not be deleted."""
    present = set(list_netns())
    targets = [check_netns_name(n) for n in names if n in present]
    if targets:
        run(
            ["ip", "-force", "-batch", "-"],
            "".join(f"netns del {n}\n" for n in targets),
            check=False,
        )
    left = set(list_netns())
    return [n for n in targets if n in left]


# --- routes in the host namespace ----------------------------------------------------------------


def host_routes() -> list[dict[str, object]]:
    out = run(["ip", "-j", "route", "show", "table", "main"])
    data = json.loads(out or "[]")
    return data if isinstance(data, list) else []


def free_metric(destinations: Sequence[str], base: int) -> int:
    """The lowest metric >= `base` that no host route to any of `destinations` uses."""
    taken = {int(str(r.get("metric", 0))) for r in host_routes() if r.get("dst") in destinations}
    metric = base
    while metric in taken:
        metric += 1
    return metric


def add_blackholes(destinations: Sequence[str], metric: int) -> None:
    commands = [f"route add blackhole {dst} metric {metric}" for dst in destinations]
    run(["ip", "-batch", "-"], "\n".join(commands) + "\n")


def delete_blackholes(routes: Iterable[tuple[str, int]]) -> list[str]:
    """Delete the recorded blackhole routes that exist; those that are still there."""
    present = {
        (str(r.get("dst")), int(str(r.get("metric", 0))))
        for r in host_routes()
        if r.get("type") == "blackhole"
    }
    targets = [(d, m) for d, m in routes if (d, m) in present]
    if targets:
        commands = "".join(f"route del blackhole {d} metric {m}\n" for d, m in targets)
        run(["ip", "-force", "-batch", "-"], commands, check=False)
        present = {
            (str(r.get("dst")), int(str(r.get("metric", 0))))
            for r in host_routes()
            if r.get("type") == "blackhole"
        }
    return [f"blackhole {d} metric {m}" for d, m in targets if (d, m) in present]


# --- cgroups -------------------------------------------------------------------------------------


def detect_cgroup_root() -> str:
    """The cgroup v2 mount: /sys/fs/cgroup (pure v2) or /sys/fs/cgroup/unified (hybrid)."""
    for candidate in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(os.path.join(candidate, "cgroup.controllers")):
            return candidate
    raise LabError(
        "no cgroup v2 hierarchy found at /sys/fs/cgroup or /sys/fs/cgroup/unified; "
        "give a cgroup v1 hierarchy with --cgroup-root"
    )


def check_cgroup_root(root: str) -> str:
    if not os.path.exists(os.path.join(root, "cgroup.procs")):
        raise LabError(f"{root} is not a cgroup hierarchy (no cgroup.procs)")
    return root


def make_cgroups(root: str, paths: Iterable[str]) -> None:
    for path in paths:
        os.makedirs(under(root, path), exist_ok=True)


def join_cgroup(root: str, path: str, pid: int = 0) -> None:
    """Move `pid` (0: the caller) into the cgroup ("" is the hierarchy's root)."""
    with open(os.path.join(under(root, path, root_itself=True), "cgroup.procs"), "w") as handle:
        handle.write(f"{pid}\n")


def cgroup_pids(root: str, top: str) -> list[int]:
    """Every pid in the cgroup `top` and below."""
    pids: list[int] = []
    base = under(root, top)
    for dirpath, _, filenames in os.walk(base):
        if "cgroup.procs" in filenames:
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as handle:
                    pids += [int(line) for line in handle if line.strip()]
            except OSError:
                continue
    return pids


def kill_cgroup(root: str, top: str) -> None:
    """SIGKILL every process in the subtree (cgroup.kill where the kernel has it)."""
    base = under(root, top)
    if not os.path.isdir(base):
        return
    kill_file = os.path.join(base, "cgroup.kill")
    if os.path.exists(kill_file):
        try:
            with open(kill_file, "w") as handle:
                handle.write("1\n")
        except OSError as exc:
            log.warning("cgroup.kill in %s: %s", base, exc)
    for pid in cgroup_pids(root, top):
        _signal(pid, signal.SIGKILL)


def remove_cgroup_tree(root: str, top: str, timeout: float = 5.0) -> list[str]:
    """rmdir the subtree bottom-up once its processes are gone; the paths left behind."""
    base = under(root, top)
    if not os.path.isdir(base):
        return []
    deadline = time.monotonic() + timeout
    while cgroup_pids(root, top) and time.monotonic() < deadline:
        time.sleep(0.01)
    left: list[str] = []
    for dirpath, _, _ in sorted(os.walk(base), key=lambda entry: -entry[0].count("/")):
        for _ in range(100):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    left.append(dirpath)
                    break
                time.sleep(0.01)
    return left


# --- processes -----------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields 3… of /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time), or None when there is no such process."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def is_running(record: RecordedProcess) -> bool:
    """Is the recorded process still the same, live process (not a zombie, not a recycled pid)?"""
    fields = _stat(record.pid)
    return fields is not None and int(fields[19]) == record.start and fields[0] not in ("Z", "X")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_processes(records: Iterable[Recorded], timeout: float = 3.0) -> list[Recorded]:
    """SIGKILL the recorded processes that are still theirs; those still running after `timeout`."""
    targets = [r for r in records if is_running(r)]
    for record in targets:
        _signal(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        left = [r for r in targets if is_running(r)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)
