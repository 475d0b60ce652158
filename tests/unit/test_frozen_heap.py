"""The frozen heap (flowproof.aio.FrozenHeap): what is alive when the collector settles is out of
the garbage collector's scans, and reference cycles that die frozen are collected once a period."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from bench.synthetic import make_cluster, with_expectations
from collector.core.changes import diff_snapshots
from collector.loop import Collector
from collector.runtime import keep_heap_frozen
from collector.settings import CollectorSettings
from flowproof.aio import FrozenHeap
from tests.support.clock import ManualClock


class Node:
    """One half of a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Nothing frozen (tests/conftest.py) and no garbage left from before."""
    gc.collect()
    yield
    gc.collect()


def test_what_is_alive_when_settled_is_frozen_and_the_rest_is_not() -> None:
    heap = FrozenHeap(ManualClock())
    before = Node()
    assert gc.get_freeze_count() == 0
    heap.settled()
    after = Node()
    frozen = gc.get_freeze_count()
    assert frozen > 0 and heap.freezes == 1
    assert gc.is_tracked(before) and gc.is_tracked(after)
    assert not any(o is before for o in gc.get_objects()), "frozen: in no generation"
    assert any(o is after for o in gc.get_objects()), "made after: the collector scans it"


def test_a_cycle_that_dies_frozen_is_collected_at_the_next_full_collection() -> None:
    clock = ManualClock()
    heap = FrozenHeap(clock, full_every_seconds=600)
    ref = cycle()
    heap.settled()  # the cycle is alive, so frozen
    gc.collect()
    assert ref() is not None, "a frozen cycle is not collected"
    clock.advance(599)
    heap.settled()
    gc.collect()
    assert ref() is not None and heap.full_collections == 0
    clock.advance(1)
    heap.settled()  # a period after the last full collection: everything collected once
    assert ref() is None and heap.full_collections == 1
    assert gc.get_freeze_count() > 0, "frozen again after the full collection"


def test_a_cycle_that_dies_before_it_is_frozen_is_collected_as_ever() -> None:
    heap = FrozenHeap(ManualClock())
    heap.settled()
    ref = cycle()
    gc.collect()
    assert ref() is None


def test_the_collector_freezes_the_heap_each_time_a_plan_is_applied() -> None:
    snapshot = with_expectations(make_cluster(200, 4, 12, 3), 5, 1)
    collector = Collector(CollectorSettings(token="t", source="manifests"))
    heap = keep_heap_frozen(collector)

    async def plan() -> None:
        await collector.on_snapshot(snapshot, diff_snapshots(None, snapshot, generation=1, at=0.0))

    asyncio.run(plan())
    assert heap.freezes == 1
    plan_objects = {id(f) for f in collector.planner.plan.flows.values()}
    assert plan_objects and not plan_objects & {id(o) for o in gc.get_objects()}, (
        "the applied plan is frozen"
    )
