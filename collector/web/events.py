"""Server-sent events: every loop event the web view needs reaches open pages within a second.

Owns `Broadcaster` (fan-out to every open stream, each with a bounded queue: a page too slow to
keep up is told to resync instead of holding memory) and an event's data; the wire framing,
pings and send timeouts are aiohttp-sse's (collector.web.app). It never
decides a status; the stream handler in collector.web.app adds the flow's current row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from collector.loop import LoopEvent, ResultRecorded, SnapshotApplied, StatusChanged
from flowproof.aio import SYSTEM_CLOCK, Clock

CLIENT_QUEUE_SIZE = 10_000  # events a slow page may lag behind before it must reload


@dataclass(frozen=True)
class Event:
    """One published event: `kind` (status, result, snapshot, ...) and its JSON-able data."""

    id: int
    kind: str
    data: Mapping[str, Any]
    at: float
    flow_key: str | None = None
    """The flow the event is about: the stream sends that flow's current row with it."""


class Subscriber:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=size)
        self.overflowed = False


class Broadcaster:
    """Fans events out to every open event stream. Call `publish` on the event loop.

    `on_loop_event` takes the collector's typed events (`Collector.subscribe`); `publish` sends
    any event. A subscriber too slow to keep up loses its queue and is told to `resync` (reload
    everything) instead.
    """

    def __init__(self, *, queue_size: int = CLIENT_QUEUE_SIZE, clock: Clock = SYSTEM_CLOCK):
        self._queue_size = queue_size
        self._clock = clock
        self._subscribers: set[Subscriber] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self.published_total = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def on_loop_event(self, event: LoopEvent) -> None:
        """Publish what the page needs of a loop event (feedback latencies are metrics only)."""
        if isinstance(event, StatusChanged):
            self.publish("status", event.change.to_dict(), flow_key=event.flow_key)
        elif isinstance(event, ResultRecorded):
            result = event.result
            data = {
                "outcome": str(result.outcome),
                "latencySeconds": result.latency_seconds,
                "node": result.node,
            }
            self.publish("result", data, flow_key=event.flow_key)
        elif isinstance(event, SnapshotApplied):
            self.publish("snapshot", {"generation": event.generation, "change": event.change})

    def publish(self, kind: str, data: Mapping[str, Any], *, flow_key: str | None = None) -> None:
        """Send an event to every subscriber now (never blocks)."""
        self.published_total += 1
        event = Event(next(self._ids), kind, data, self._clock.time(), flow_key)
        for subscriber in self._subscribers:
            if subscriber.overflowed:
                continue
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                subscriber.overflowed = True

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscriber]:
        subscriber = Subscriber(self._queue_size)
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    def close(self) -> None:
        """End every open stream (on shutdown); later subscribers end at once."""
        self._closed = True
        for subscriber in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                subscriber.queue.put_nowait(None)
            subscriber.overflowed = True

    @property
    def closed(self) -> bool:
        return self._closed


def event_data(data: Mapping[str, Any]) -> str:
    """An event's data line: compact JSON (the stream's framing is aiohttp-sse's)."""
    return json.dumps(data, separators=(",", ":"), default=str)


__all__ = ["Broadcaster", "Event", "Subscriber", "event_data"]
