"""Creating sockets inside other network namespaces, from one dedicated helper thread, in batches.

A socket keeps the namespace it was created in, so the helper thread enters a pod's namespace with
`setns(2)` (through ctypes: Python 3.11 has no `os.setns`), creates non-blocking sockets for every
request waiting for that namespace, and returns to its own namespace in `finally`. The event loop
then drives the sockets (connect, send, listen) and never blocks. Requests made in the same loop
iteration share one trip of the thread. Nothing else in the agent ever changes a thread's namespace;
if returning fails the helper is broken for good and every later call raises NetnsThreadBroken.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agent.errors import NamespaceError, NetnsThreadBroken

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class NetnsTarget:
    """A namespace file to enter (`/proc/PID/ns/net` or `/run/netns/NAME`).

    With `inode` set, the file must still name that namespace when entered: a pid reused by another
    process fails with NamespaceError instead of making sockets in a stranger's namespace.
    """

    path: str
    inode: int | None = None


@dataclass(frozen=True)
class SocketSpec:
    family: int
    type: int
    proto: int = 0


_Result = socket.socket | OSError
SocketCallback = Callable[[socket.socket | BaseException], None]
_Request = tuple[SocketSpec, SocketCallback]


def _libc_setns() -> ctypes._NamedFuncPointer:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def _setns(setns: ctypes._NamedFuncPointer, fd: int) -> None:
    if setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsSockets:
    """Makes sockets in network namespaces for the event loop; one helper thread, batched trips."""

    def __init__(self, *, batch_size: int = 64) -> None:
        self._batch_size = batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
        self._setns = _libc_setns()
        self._pending: dict[NetnsTarget, list[_Request]] = {}
        self._flush_scheduled = False
        self._broken: NetnsThreadBroken | None = None
        self.trips = 0
        """How many times the helper thread entered a namespace (for tests and the bench)."""

    async def create(self, target: NetnsTarget, spec: SocketSpec) -> socket.socket:
        """A non-blocking socket created inside `target`.

        Raises OSError when the kernel refuses the socket (EPROTONOSUPPORT for SCTP without the
        module), NamespaceError when the namespace cannot be entered, NetnsThreadBroken when the
        helper thread is unusable.
        """
        fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()

        def deliver(made: socket.socket | BaseException) -> None:
            if fut.done():  # the caller gave up meanwhile
                if isinstance(made, socket.socket):
                    made.close()
            elif isinstance(made, socket.socket):
                fut.set_result(made)
            else:
                fut.set_exception(made)

        self.request(target, spec, deliver)
        return await fut

    def request(self, target: NetnsTarget, spec: SocketSpec, callback: SocketCallback) -> None:
        """Ask for a socket inside `target`; `callback` gets it (or the error) on the event loop.

        Requests made in the same loop iteration share trips of the helper thread. The callback
        owns the socket: it must close it if it no longer wants it.
        """
        loop = asyncio.get_running_loop()
        if self._broken is not None:
            loop.call_soon(callback, self._broken)
            return
        self._pending.setdefault(target, []).append((spec, callback))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def close(self) -> None:
        """Stop the helper thread; sockets already handed out stay open."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for target, requests in pending.items():
            for start in range(0, len(requests), self._batch_size):
                chunk = requests[start : start + self._batch_size]
                specs = [spec for spec, _ in chunk]
                callbacks = [cb for _, cb in chunk]
                try:
                    trip = loop.run_in_executor(self._executor, self._create, target, specs)
                except RuntimeError as exc:  # closed: the agent is stopping
                    for cb in callbacks:
                        cb(NamespaceError(f"socket helper stopped: {exc}"))
                    continue
                trip.add_done_callback(functools.partial(self._deliver, callbacks=callbacks))

    def _deliver(
        self, trip: asyncio.Future[list[_Result]], *, callbacks: list[SocketCallback]
    ) -> None:
        if trip.cancelled():
            for cb in callbacks:
                cb(NamespaceError("socket helper stopped"))
            return
        exc = trip.exception()
        if exc is not None:
            if isinstance(exc, NetnsThreadBroken):
                self._broken = exc
            for cb in callbacks:
                cb(exc)
            return
        for cb, made in zip(callbacks, trip.result(), strict=True):
            cb(made)

    def _create(self, target: NetnsTarget, specs: list[SocketSpec]) -> list[_Result]:
        """In the helper thread: enter `target`, make the sockets, come back."""
        self.trips += 1
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NamespaceError(f"cannot open the helper thread's namespace: {exc}") from exc
        try:
            try:
                fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise NamespaceError(f"cannot open {target.path}: {exc.strerror}") from exc
            try:
                if target.inode is not None and os.fstat(fd).st_ino != target.inode:
                    raise NamespaceError(f"{target.path} names another namespace now")
                try:
                    _setns(self._setns, fd)
                except OSError as exc:
                    raise NamespaceError(f"cannot enter {target.path}: {exc.strerror}") from exc
                try:
                    return [self._make(spec) for spec in specs]
                finally:
                    try:
                        _setns(self._setns, own)
                    except OSError as exc:
                        raise NetnsThreadBroken(
                            f"cannot return from {target.path} to the agent's namespace: {exc}"
                        ) from exc
            finally:
                os.close(fd)
        finally:
            os.close(own)

    @staticmethod
    def _make(spec: SocketSpec) -> _Result:
        try:
            sock = socket.socket(spec.family, spec.type, spec.proto)
        except OSError as exc:
            return exc
        sock.setblocking(False)
        return sock


def sctp_supported() -> bool:
    """Whether this kernel can make SCTP sockets (the module is loaded or loadable)."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT):
            return False
        raise
    sock.close()
    return True
