"""Harness of the KubernetesSource tests, against the real API server or the fake one.

`Updates` is the source's on_update callback that records every update (checking that an update
of pods only says what a diff of its snapshots says) and lets a test wait for one; `running` starts a source from a kubeconfig, waits for its first snapshot and stops it at the
end; `changed` matches an update that holds one change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from collector.core.changes import diff_snapshots
from collector.kube import (
    InventoryUpdate,
    KubeConfiguration,
    KubernetesSource,
    KubeSourceSettings,
    ObjectChange,
    load_kube_config,
)

FAST = KubeSourceSettings(
    watch_timeout_seconds=30,
    resync_interval_seconds=0,
    backoff_initial_seconds=0.05,
    backoff_max_seconds=0.5,
    request_timeout_seconds=10,
    list_page_size=500,
    missing_crd_retry_seconds=0.3,
    stop_timeout_seconds=3,
)
"""Quick to recover, no resync, watches that outlast a test."""


class Updates:
    """The on_update callback of the tests: records every update and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[InventoryUpdate] = []
        self.pods_changes = 0  # updates of pods only, checked against a diff of the snapshots
        self._arrived = asyncio.Event()

    async def __call__(self, update: InventoryUpdate) -> None:
        if self.items:
            # Every update of pods only says what changed as a diff of the snapshots would (the
            # collector reads it from the update, never diffing them).
            change = update.pods_change(generation=len(self.items) + 1, at=0.0)
            if change is not None:
                diffed = diff_snapshots(
                    self.items[-1].snapshot, update.snapshot, generation=change.generation, at=0.0
                )
                assert change == diffed, f"{update.changes}: {change} but diffed {diffed}"
                self.pods_changes += 1
        self.items.append(update)
        self._arrived.set()

    @property
    def mark(self) -> int:
        return len(self.items)

    async def after(
        self, mark: int, predicate: Callable[[InventoryUpdate], bool], within: float = 1.0
    ) -> InventoryUpdate:
        """The first update after `mark` that satisfies `predicate`, within `within` seconds."""
        i = mark
        async with asyncio.timeout(within):
            while True:
                while i < len(self.items):
                    if predicate(self.items[i]):
                        return self.items[i]
                    i += 1
                self._arrived.clear()
                await self._arrived.wait()

    def changes_since(self, mark: int) -> list[ObjectChange]:
        return [c for u in self.items[mark:] for c in u.changes]


def changed(kind: str, key: str, action: str) -> Callable[[InventoryUpdate], bool]:
    return lambda u: any(c.kind == kind and c.key == key and c.action == action for c in u.changes)


@contextlib.asynccontextmanager
async def running(
    configuration: KubeConfiguration | str,
    settings: KubeSourceSettings = FAST,
    *,
    ready: Callable[[KubernetesSource], Awaitable[None]] | None = None,
    sync_seconds: float = 10.0,
) -> AsyncIterator[tuple[KubernetesSource, Updates]]:
    """A source from a kubeconfig path (or a configuration), running and synced; stopped and
    closed on exit. `ready(source)` is awaited once it has synced (e.g. until its watches are
    open)."""
    if isinstance(configuration, str):
        configuration = load_kube_config(configuration)
    updates = Updates()
    async with KubernetesSource(configuration, settings=settings, on_update=updates) as source:
        task = asyncio.create_task(source.run(), name="kube-source-under-test")
        try:
            synced = asyncio.ensure_future(source.wait_synced())
            done, _ = await asyncio.wait(
                {synced, task}, timeout=sync_seconds, return_when="FIRST_COMPLETED"
            )
            if synced not in done:
                synced.cancel()
                if task in done:
                    task.result()  # raises what ended run()
                raise AssertionError(f"the source did not sync within {sync_seconds} s")
            if ready is not None:
                await ready(source)
            yield source, updates
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
