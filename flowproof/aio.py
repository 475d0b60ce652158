"""What every long-running loop of flowproof shares: the clock, backoff, and the root-task runner.

Owns `Clock` (wall and monotonic time, injected so tests do not sleep), `Backoff` (exponential with
jitter, for reconnects and relists), `first_of` (wait for any of several events) and
`FrozenHeap` (long-lived objects kept out of the garbage collector's full scans, which
hold the event loop) and `run_root_tasks`, the one way a service runs its named root tasks: a task that ends or fails on its
own is logged the moment it does and stops the service with exit code 1; `stop` starts a bounded
graceful stop. It knows no service and does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from flowproof import __version__
from flowproof.errors import ConfigurationError

log = logging.getLogger("flowproof")


class ServiceSettings(Protocol):
    """What `run_service` needs of a service's settings dataclass."""

    @property
    def log_level(self) -> str: ...

    def describe(self) -> str: ...


S = TypeVar("S", bound=ServiceSettings)


class Clock(Protocol):
    """Time as a loop reads it: wall-clock seconds (`time`) and a monotonic reading."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()


class Backoff:
    """Exponential backoff with jitter: attempt n waits `min(max, initial * 2**n)` minus up to
    `jitter` of itself at random (`jitter=1`, the default, is full jitter: uniform in (0, step]).

    The one implementation (the agent's reconnects, the Kubernetes reflectors). Not stamina or
    tenacity, on purpose: they drive the retry of one call until it succeeds, sleeping on their
    own. Our loops run forever and need what they do not give: the wait reset after a healthy
    session (a stream that ran for an hour and broke starts again at `initial`), a wait that ends
    at once on the service's stop event (the caller sleeps, so SIGTERM is bounded), seeded
    randomness for tests instead of stamina's process-wide test switch, and failures that are not
    failures (a 410 relists at once, a missing CRD waits its own interval). What would be left to
    borrow is the two lines of arithmetic below.
    """

    def __init__(
        self,
        initial_seconds: float,
        max_seconds: float,
        jitter: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], not {jitter}")
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        step = min(self.max_seconds, self.initial_seconds * 2.0 ** min(self.attempt, 62))
        self.attempt += 1
        return step * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0


async def first_of(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def event_loop_lag(
    observe: Callable[[float], None], stop: asyncio.Event, *, interval_seconds: float = 0.05
) -> None:
    """Until `stop`, wake every `interval_seconds` and `observe` how late the wake-up came: the
    event loop's scheduling delay, which is how long something held the loop (a stall)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(interval_seconds)
        observe(max(0.0, loop.time() - started - interval_seconds))


class FrozenHeap:
    """Keeps a service's long-lived objects out of the cyclic garbage collector's full scans.

    Call `settled()` once the service has replaced its long-lived state (the collector: when a
    plan is applied). Everything alive then is frozen (`gc.freeze`): a full collection, which
    holds the GIL and so the event loop for as long as it walks every object (100-200 ms at
    10,000 pods), then walks only what is newer. What dies frozen is still freed by its
    reference count; only reference cycles that die frozen wait, until the next `settled()` at
    least `full_every_seconds` after the last full collection, which unfreezes everything and
    collects it once: one stall an hour by default (0.1-0.2 s at 10,000 pods, 0.5 s at 100,000:
    docs/scaling.md), in place of one every few plans.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK, *, full_every_seconds: float = 3600.0) -> None:
        self._clock = clock
        self._every = full_every_seconds
        self._full_at = clock.monotonic()
        self.freezes = 0
        self.full_collections = 0

    def settled(self) -> None:
        now = self._clock.monotonic()
        if now - self._full_at >= self._every:
            gc.unfreeze()
            gc.collect()
            self._full_at = now
            self.full_collections += 1
        gc.freeze()
        self.freezes += 1


@contextlib.contextmanager
def stop_event(stop: asyncio.Event | None = None) -> Iterator[asyncio.Event]:
    """The event a service stops on: `stop` as given (tests pass their own), else a new one that
    SIGTERM and SIGINT set while the block runs. Call it on the running event loop."""
    if stop is not None:
        yield stop
        return
    own = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, own.set)
    try:
        yield own
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_root_tasks(
    roots: Mapping[str, Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    *,
    grace_seconds: float = 30.0,
    logger: logging.Logger = log,
) -> int:
    """Run the named root tasks until `stop` is set or one of them ends; the exit code.

    A root task that ends or fails before `stop` is a failure (1): it is logged at once and the
    others are asked to stop. After `stop`, every root task gets `grace_seconds` to drain and
    return; one that fails or overruns (it is then cancelled) makes it a failure too.
    """

    def log_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("root task %s failed", task.get_name(), exc_info=task.exception())

    tasks = {asyncio.create_task(coro, name=name): name for name, coro in roots.items()}
    for task in tasks:
        task.add_done_callback(log_failure)
    stopper = asyncio.create_task(stop.wait(), name="stop_signal")
    try:
        waiting: set[asyncio.Future[Any]] = {*tasks, stopper}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in tasks if t in done and not stop.is_set()]
        if failed:
            logger.error("root task %s ended; stopping", ", ".join(tasks[t] for t in failed))
        stop.set()  # the graceful path: every root task drains and returns
        _, overran = await asyncio.wait(tasks, timeout=grace_seconds)
        if overran:
            logger.error("root task %s did not stop in time", ", ".join(tasks[t] for t in overran))
        broken = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        return 1 if failed or overran or broken else 0
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(stopper, *tasks, return_exceptions=True)


def run_service(
    name: str,
    argv: Sequence[str] | None,
    load: Callable[[Sequence[str], Mapping[str, str]], S],
    serve: Callable[[S], Coroutine[Any, Any, int]],
    logger: logging.Logger,
) -> int:
    """A service's `main`: settings from flags and environment (exit 2 when they cannot work),
    logging configured and the settings logged once, then `serve` until it returns its code."""
    try:
        settings = load(list(sys.argv[1:] if argv is None else argv), os.environ)
    except ConfigurationError as exc:
        print(f"flowproof {name}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.info("flowproof %s %s starting: %s", name, __version__, settings.describe())
    return asyncio.run(serve(settings))


__all__ = [
    "SYSTEM_CLOCK",
    "Backoff",
    "Clock",
    "FrozenHeap",
    "SystemClock",
    "event_loop_lag",
    "first_of",
    "run_root_tasks",
    "run_service",
]
