"""Leader election on a coordination.k8s.io/v1 Lease: one of several collector replicas acts.

The leader plans, takes agents' streams and writes to the cluster; a standby watches the cluster
(its plan is ready) and tries to take the Lease every retry period. The rules are client-go's:

- A standby takes a Lease held by another only once it has seen the Lease's record unchanged for
  `leaseDurationSeconds` on its own monotonic clock (never by comparing `renewTime` with its wall
  clock, so clock skew between nodes cannot hand the Lease over early). A Lease released (holder
  "") or missing is taken at once. Every write carries the resourceVersion read, so of two
  replicas trying at once the API server lets one win (409 for the other).
- The leader renews every retry period. When no renewal has succeeded for the renew deadline, or
  the Lease turns out to be held by another, it stops leading: `run` raises `LeadershipLost`
  and the process exits (1) so Kubernetes restarts it as a standby. The renew deadline is shorter
  than the lease duration, so an old leader has stopped acting before a standby may take over.
- On a graceful stop the leader releases the Lease (holder "", duration 1 s) so a standby takes
  it within one retry period instead of one lease duration.

    elector = LeaseElector(kube_client, namespace="flowproof", name="flowproof-collector",
                           identity=pod_name, timing=LeaseTiming(15, 10, 2))
    await elector.run(stop)   # a root task; elector.leading is set while this replica leads
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from collector.kube import KubeApiError, LeaseRecord, micro_time
from collector.settings import JITTER
from flowproof.errors import FlowproofError
from flowproof.logs import LogLimiter

log = logging.getLogger(__name__)


class LeaseStore(Protocol):
    """The Lease requests the elector makes (KubeClient's)."""

    async def read_lease(self, namespace: str, name: str) -> LeaseRecord | None: ...

    async def create_lease(
        self, namespace: str, name: str, record: LeaseRecord
    ) -> LeaseRecord | None: ...

    async def replace_lease(
        self, namespace: str, name: str, record: LeaseRecord
    ) -> LeaseRecord | None: ...


class LeadershipLost(FlowproofError):
    """The leader could not renew its Lease in time, or found it held by another."""


@dataclass(frozen=True)
class LeaseTiming:
    duration_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0


class LeaseElector:
    """Competes for one Lease; `leading` is set while this replica holds it. Use from one loop."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not identity:
            raise ValueError("the elector needs an identity")
        self._store = store
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._timing = timing or LeaseTiming()
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self.leading = asyncio.Event()
        """Set while this replica holds the Lease (from acquiring it until it stops leading)."""
        self.holder = ""
        """The holder last seen in the Lease ("" before the first read, or when released)."""
        self.transitions = 0
        """`leaseTransitions` last seen: how often the Lease changed hands."""
        self.acquired_at: float | None = None
        """Monotonic time this replica last took the Lease."""
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._limiter = LogLimiter()

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for the Lease, then lead until `stop` (release it) or until it is lost (raise)."""
        while not stop.is_set():
            if await self._attempt():
                break
            period = self._timing.retry_period_seconds
            await _wait(stop, self._rng.uniform(period, period * JITTER))
        if stop.is_set():
            return
        self.acquired_at = self._clock()
        self.leading.set()
        log.info(
            "leading: holding lease %s/%s as %s (transitions %d)",
            self.namespace,
            self.name,
            self.identity,
            self.transitions,
        )
        try:
            await self._renew_until(stop)
        finally:
            self.leading.clear()
        await self._release()

    async def _renew_until(self, stop: asyncio.Event) -> None:
        deadline = self._timing.renew_deadline_seconds
        renewed = self._clock()
        while True:
            await _wait(stop, self._timing.retry_period_seconds)
            if stop.is_set():
                return
            left = renewed + deadline - self._clock()
            ok = False
            if left > 0:
                try:
                    async with asyncio.timeout(left):
                        ok = await self._attempt()
                except TimeoutError:
                    ok = False
            if ok:
                renewed = self._clock()
                continue
            if self._observed is not None and self.holder not in ("", self.identity):
                raise LeadershipLost(
                    f"lease {self.namespace}/{self.name} is held by {self.holder!r} now"
                )
            if self._clock() - renewed >= deadline:
                raise LeadershipLost(
                    f"lease {self.namespace}/{self.name} not renewed for {deadline:g} s "
                    "(the renew deadline)"
                )

    async def _attempt(self) -> bool:
        """Acquire or renew once; whether this replica holds the Lease now."""
        try:
            return await self._try_acquire_or_renew()
        except KubeApiError as exc:
            suffix = self._limiter.admit("lease request failed")
            if suffix is not None:
                log.warning("lease %s/%s: %s%s", self.namespace, self.name, exc, suffix)
            return False

    async def _try_acquire_or_renew(self) -> bool:
        now = micro_time(self._wall())
        duration = max(1, round(self._timing.duration_seconds))
        current = await self._store.read_lease(self.namespace, self.name)
        if current is None:
            created = await self._store.create_lease(
                self.namespace,
                self.name,
                LeaseRecord(
                    holder=self.identity,
                    duration_seconds=duration,
                    acquired_at=now,
                    renewed_at=now,
                    transitions=0,
                ),
            )
            if created is None:
                return False  # another replica created it first
            self._observe(created)
            return True
        self._observe(current)
        ours = current.holder == self.identity
        if current.holder and not ours:
            valid_for = current.duration_seconds or duration
            if self._clock() < self._observed_at + valid_for:
                return False
        written = await self._store.replace_lease(
            self.namespace,
            self.name,
            replace(
                current,
                holder=self.identity,
                duration_seconds=duration,
                acquired_at=current.acquired_at if ours else now,
                renewed_at=now,
                transitions=current.transitions if ours else current.transitions + 1,
            ),
        )
        if written is None:
            return False  # written by another replica since we read it
        self._observe(written)
        return True

    def _observe(self, record: LeaseRecord) -> None:
        """Remember the record and when it last changed (on this replica's monotonic clock)."""
        seen = replace(record, resource_version="")
        if self._observed is None or seen != self._observed:
            self._observed = seen
            self._observed_at = self._clock()
        if record.holder != self.holder:
            log.info(
                "lease %s/%s is held by %s",
                self.namespace,
                self.name,
                record.holder or "nobody (released)",
            )
        self.holder = record.holder
        self.transitions = record.transitions

    async def _release(self) -> None:
        """Hand the Lease back (holder "") if this replica still holds it; bounded, best effort."""
        try:
            async with asyncio.timeout(self._timing.renew_deadline_seconds):
                current = await self._store.read_lease(self.namespace, self.name)
                if current is None or current.holder != self.identity:
                    return
                now = micro_time(self._wall())
                written = await self._store.replace_lease(
                    self.namespace,
                    self.name,
                    replace(
                        current, holder="", duration_seconds=1, acquired_at=now, renewed_at=now
                    ),
                )
        except (KubeApiError, TimeoutError) as exc:
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, exc)
            return
        if written is not None:
            self._observe(written)
            log.info("released lease %s/%s", self.namespace, self.name)


async def when_leading(
    elector: LeaseElector, stop: asyncio.Event, start: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run `start()` once this replica leads (nothing if `stop` comes first): a root task that
    only the leader runs (dispatching, writing statuses, reports and probe pods)."""
    waiter = asyncio.ensure_future(elector.leading.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if elector.leading.is_set() and not stop.is_set():
        await start()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await stop.wait()
