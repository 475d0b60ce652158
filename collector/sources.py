"""ManifestSource: manifest files and directories watched by polling, as a stream of snapshots.

Owns noticing that the files changed (path, device, inode, modification time and size of every
file, so an atomic rewrite by rename is seen), re-reading them with `inventory.load_snapshot`, and
handing each new snapshot with its ChangeEvent to an async consumer. A bad version (InputError) is
logged once and skipped: the last good snapshot stays. It reads files only; it must never evaluate
policies or import `kubernetes`, `grpc` or `aiohttp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from collector.core.changes import ChangeEvent, diff_snapshots
from collector.core.model import Snapshot
from collector.reading.manifests import DocumentCache, load_snapshot
from flowproof.aio import SYSTEM_CLOCK, Clock
from flowproof.errors import InputError

log = logging.getLogger(__name__)

Loader = Callable[[Sequence[str | os.PathLike[str]]], Snapshot]
Consumer = Callable[[Snapshot, ChangeEvent], Awaitable[None]]
FileStat = tuple[int, int, int, int]  # device, inode, mtime in ns, size
Fingerprint = dict[str, FileStat | None]  # None: the path given does not exist


def fingerprint(paths: Sequence[str | os.PathLike[str]]) -> Fingerprint:
    """The identity of every file under `paths` (hidden entries skipped, like the inventory)."""
    found: Fingerprint = {}

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            found[path] = None
            return
        found[path] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        add(os.path.join(root, name))
        else:
            add(path)
    return found


class ManifestSource:
    """Polls manifest paths every `poll_interval_seconds` and re-reads them when they change.

    `poll()` is one step (tests drive it directly); `run()` polls until `stop` is set. The
    generation counts the snapshots handed out, from 1. The change's `at` is the newest
    modification time among the files that changed, kept between the previous poll and now.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        clock: Clock = SYSTEM_CLOCK,
        poll_interval_seconds: float = 0.2,
        loader: Loader | None = None,
    ) -> None:
        if not paths:
            raise ValueError("ManifestSource needs at least one path")
        self.paths = [Path(p) for p in paths]
        self.clock = clock
        self.poll_interval_seconds = poll_interval_seconds
        self.documents = DocumentCache()  # a change re-parses only the files it changed
        self.loader = loader or functools.partial(load_snapshot, cache=self.documents)
        self.snapshot: Snapshot | None = None
        self.generation = 0
        self.last_error: InputError | None = None
        self.errors_total = 0  # bad versions seen (each counted and logged once)
        self._fingerprint: Fingerprint | None = None
        self._bad: Fingerprint | None = None
        self._last_poll: float | None = None

    def poll(self) -> tuple[Snapshot, ChangeEvent] | None:
        """Re-read the manifests if they changed; the new snapshot and its change, or None."""
        observed = self.clock.time()
        previous_poll, self._last_poll = self._last_poll, observed
        current = fingerprint(self.paths)
        if current == self._fingerprint:
            return None
        previous, self._fingerprint = self._fingerprint, current
        try:
            snapshot = self.loader(self.paths)
        except InputError as exc:
            self.last_error = exc
            if current != self._bad:
                self._bad = current
                self.errors_total += 1
                log.error(
                    "manifests unreadable, keeping the last good snapshot (generation %d): %s",
                    self.generation,
                    exc,
                )
            return None
        if self.last_error is not None:
            log.info("manifests readable again")
        self.last_error = None
        self._bad = None
        at = self._dated(previous, current, previous_poll, observed)
        change = diff_snapshots(
            self.snapshot, snapshot, generation=self.generation + 1, at=at, observed_at=observed
        )
        if self.snapshot is not None and change.empty:
            return None
        seen = set(self.snapshot.warnings) if self.snapshot is not None else set()
        for warning in snapshot.warnings:
            if warning not in seen:
                log.warning("manifests: %s", warning)
        self.snapshot = snapshot
        self.generation += 1
        log.info("snapshot generation %d: %s", self.generation, change.describe())
        return snapshot, change

    async def run(self, consumer: Consumer, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, awaiting `consumer` for every new snapshot."""
        while not stop.is_set():
            found = await asyncio.to_thread(self.poll)
            if found is not None:
                await consumer(*found)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_interval_seconds)

    @staticmethod
    def _dated(
        previous: Fingerprint | None,
        current: Fingerprint,
        previous_poll: float | None,
        observed: float,
    ) -> float:
        if previous is None or previous_poll is None:
            return observed
        times = [
            stat[2] / 1e9
            for path, stat in current.items()
            if stat is not None and previous.get(path) != stat
        ]
        if not times:  # only removals
            return observed
        return min(observed, max(previous_poll, max(times)))


__all__ = ["ManifestSource", "fingerprint"]
