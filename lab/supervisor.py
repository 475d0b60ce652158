"""The lab's process supervisor (its "kubelet"): starts, reaps and outlives the pod servers.

One detached process per lab. It preloads the pod server (and the cluster DNS with it) and forks
one child per pod: the child joins the pod's cgroup, enters the pod's network namespace and
serves (lab/podserver.py). Being their parent, it reaps them (so a dead pod leaves no zombie),
and it enforces lagged changes when they fall due (the `lag` fault). It answers newline-delimited
JSON requests on a unix socket in the lab's state directory (the client side is
lab/processes.py) and exits by itself when that directory is gone. It never starts anything a
lab command did not ask for. It also forks and execs the lab's loop processes (the collector and
one agent per node) when asked, and reaps them like the servers. Every pod server is a fork of
it, so it imports only what it runs: no manifest reading, no policy compiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lab import podserver
from lab.applying import apply_due
from lab.errors import LabError
from lab.processes import ProcessSpec, socket_path
from lab.state import LabPaths, LabState
from lab.system import join_cgroup, netns_path, process_start, setns
from lab.teardown import down, teardown

log = logging.getLogger("lab.supervisor")

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
READY_TIMEOUT_SECONDS = 15.0
_libc = ctypes.CDLL(None, use_errno=True)


class Supervisor:
    def __init__(
        self,
        state_dir: Path,
        name: str,
        cgroup_root: str,
        listener: socket.socket,
        owner: tuple[int, int] = (0, 0),
    ) -> None:
        self.state_dir = state_dir
        self.name = name
        self.cgroup_root = cgroup_root
        self.listener = listener
        self.owner = owner
        self.children: dict[int, str] = {}
        self.next_due: float | None = 0.0  # check for lagged work at once
        self.known: LabState | None = None  # the last state read, to clean up if it vanishes
        self.known_stamp = 0

    @property
    def lab_root(self) -> Path:
        return self.state_dir / self.name

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            key = self.children.pop(pid, "?")
            log.info("%s (pid %d) exited with status %d", key, pid, status)

    def _forked(self, inherited: Sequence[int]) -> None:
        """In a forked child: drop the supervisor's sockets and pipes and its signal handling."""
        self.listener.close()
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _child(self, spec: ProcessSpec, ready: int, inherited: Sequence[int]) -> None:
        """In the forked child: become the pod's server. Never returns."""
        code = 1
        try:
            self._forked(inherited)
            _redirect(spec.log_file, 0o644, stdin=True)
            join_cgroup(self.cgroup_root, spec.cgroup)
            ns = os.open(netns_path(spec.netns), os.O_RDONLY | os.O_CLOEXEC)
            setns(ns)
            os.close(ns)
            _libc.prctl(PR_SET_NAME, f"fp:{spec.key.split('/')[-1]}"[:15].encode(), 0, 0, 0)
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
            )
            asyncio.run(podserver.serve(spec.server, ready))
            code = 0
        except BaseException:
            traceback.print_exc()
            with contextlib.suppress(OSError):
                os.write(ready, b"error: see " + spec.log_file.encode() + b"\n")
        finally:
            os._exit(code)

    def execute(self, message: dict[str, Any], inherited: Sequence[int] = ()) -> dict[str, Any]:
        """Fork and exec one loop process (collector, agent); its pid and start time."""
        argv = [str(a) for a in message["argv"]]
        env = message.get("env")
        role = str(message["role"])
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                self._forked(inherited)
                _redirect(message["log_file"], 0o600, stdin=False)
                join_cgroup(self.cgroup_root, message["cgroup"])
                os.execve(argv[0], argv, env if env is not None else dict(os.environ))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.children[pid] = role
        start = process_start(pid)
        if start is None:
            return {"ok": False, "error": f"{role} (pid {pid}) exited at once"}
        log.info("started %s (pid %d): %s", role, pid, " ".join(argv))
        return {"ok": True, "pid": pid, "start": start}

    def start(self, specs: list[ProcessSpec], inherited: Sequence[int] = ()) -> dict[str, Any]:
        pending: dict[int, tuple[int, ProcessSpec]] = {}
        started: list[dict[str, Any]] = []
        errors: list[str] = []
        for spec in specs:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                self._child(spec, w, [*inherited, *pending])
            os.close(w)
            self.children[pid] = spec.key
            pending[r] = (pid, spec)
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while pending and time.monotonic() < deadline:
            readable, _, _ = select.select(
                list(pending), [], [], max(0.0, deadline - time.monotonic())
            )
            for r in readable:
                pid, spec = pending.pop(r)
                line = os.read(r, 4096).decode(errors="replace").strip()
                os.close(r)
                start = process_start(pid)
                if line == "ok" and start is not None:
                    started.append({"key": spec.key, "pid": pid, "start": start})
                else:
                    errors.append(f"{spec.key}: {line or 'exited before it was ready'}")
        for r, (pid, spec) in pending.items():
            os.close(r)
            errors.append(f"{spec.key}: not ready after {READY_TIMEOUT_SECONDS:g}s")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if errors:
            for item in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(item["pid"], signal.SIGKILL)
            return {"ok": False, "error": "; ".join(errors)}
        return {"ok": True, "started": started}

    def shutdown(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 3
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)

    def handle(self, conn: socket.socket) -> bool:
        """Serve one request; False when the supervisor should exit."""
        conn.settimeout(5)
        data = b""
        with contextlib.suppress(OSError):
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        try:
            message = json.loads(data or b"{}")
            op = message.get("op")
            keep_going = True
            if op == "start":
                specs = [ProcessSpec.from_dict(p) for p in message["processes"]]
                reply = self.start(specs, inherited=[conn.fileno()])
            elif op == "exec":
                reply = self.execute(message, inherited=[conn.fileno()])
            elif op == "ping":
                reply = {"ok": True, "children": len(self.children)}
            elif op == "wake":
                self.next_due = 0.0
                reply = {"ok": True}
            elif op == "shutdown":
                self.shutdown()
                reply = {"ok": True}
                keep_going = False
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # a bad request must not take the pods' parent down
            log.exception("request failed")
            reply, keep_going = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, True
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.close()
        return keep_going

    def lagged_work(self) -> None:
        """Apply lagged enforcement that has fallen due (needs the lab lock: never waits for it)."""
        try:
            self.next_due = apply_due(self.state_dir, self.name)
        except Exception:
            log.exception("applying lagged enforcement failed")
            self.next_due = time.time() + 1

    def watch(self) -> str | None:
        """Why the lab must go now (its owner died, its state vanished), or None."""
        pid, start = self.owner
        if pid and process_start(pid) != start:
            return f"owner process {pid} is gone"
        path = self.lab_root / "state.json"
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return "the lab's state file is gone"
        if stamp != self.known_stamp:
            with contextlib.suppress(OSError, ValueError, LabError):
                self.known = LabState.from_json(path.read_text())
                self.known_stamp = stamp
        return None

    def abandon(self, reason: str) -> None:
        """Take the whole lab down (not only the pods): nobody else will."""
        log.warning("%s: taking lab %s down", reason, self.name)
        join_cgroup(self.cgroup_root, "")  # out of the lab's cgroups, which are about to go
        self.shutdown()
        paths = LabPaths(self.state_dir, self.name)
        if paths.exists():
            down(paths)
        elif self.known is not None and self.known.phase != "down":
            problems = teardown(paths, self.known)
            if problems:
                log.error("could not remove: %s", "; ".join(problems))

    def run(self) -> None:
        while True:
            self.reap()
            reason = self.watch()
            if reason is not None:
                try:
                    self.abandon(reason)
                except Exception:
                    log.exception("taking the lab down failed")
                return
            now = time.time()
            if self.next_due is not None and self.next_due <= now:
                self.lagged_work()
            timeout = 1.0
            if self.next_due is not None:
                timeout = min(timeout, max(0.0, self.next_due - time.time()))
            self.listener.settimeout(timeout)
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            if not self.handle(conn):
                return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.supervisor")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--cgroup-root", required=True)
    parser.add_argument("--cgroup", required=True)
    parser.add_argument("--log-file", required=True)
    parser.add_argument("--owner", default="0:0", help="PID:START of the process owning the lab")
    args = parser.parse_args(argv)
    owner_pid, _, owner_start = args.owner.partition(":")
    owner = (int(owner_pid), int(owner_start or 0))

    r, w = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(w)
        status = os.read(r, 4096).decode(errors="replace").strip()
        if status != "ok":
            print(f"supervisor failed: {status or 'no word'}", file=sys.stderr)
            return 1
        print(pid)
        return 0
    os.close(r)
    _detached(args, owner, w)


def _detached(args: argparse.Namespace, owner: tuple[int, int], ready: int) -> NoReturn:
    """In the forked child: become the detached supervisor, tell `ready`, run. Never returns."""
    code = 1
    try:
        os.setsid()
        _redirect(args.log_file, 0o644, stdin=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        join_cgroup(args.cgroup_root, args.cgroup)
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _libc.prctl(PR_SET_NAME, f"fp:{args.name}:sup"[:15].encode(), 0, 0, 0)
        path = socket_path(args.state_dir / args.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(16)
        # SIGCHLD must not be ignored (children would not be waitable); reaping is polled.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.write(ready, b"ok\n")
        os.close(ready)
        supervisor = Supervisor(args.state_dir, args.name, args.cgroup_root, listener, owner)
        log.info("supervisor of lab %s listening on %s", args.name, path)
        supervisor.run()
        code = 0
    except BaseException:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            os.write(ready, b"error: see " + args.log_file.encode() + b"\n")
    finally:
        os._exit(code)


def _redirect(log_file: str, mode: int, *, stdin: bool) -> None:
    """Send stdout and stderr to the end of `log_file` (`stdin`: and read stdin from /dev/null)."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if stdin:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)


if __name__ == "__main__":
    sys.exit(main())
