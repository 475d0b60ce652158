"""Guards every test suite shares: no test leaks an asyncio task, and no test is skipped in CI.

- An asyncio test whose body or fixtures leave a task running when they are done fails, naming
  the task: a leaked task is a loop that never stops (STYLE.md: loops stop fast). The check runs
  after every other fixture of the test is torn down and before its event loop closes (which
  would otherwise cancel the task silently).
- With FLOWPROOF_NO_SKIPS=1 (scripts/test.sh sets it), the run fails when any test was skipped
  for a reason other than one of ALLOWED_SKIPS: what the kernel of this machine kind lacks and no
  package can install. Everything else CI installs, so a skip there hides a test that never ran.
- Every test that needs the real control plane (the `controlplane_bin` fixture, directly or
  through another fixture) is marked `controlplane`, so that scripts/test.sh can run the others
  while kube-apiserver and etcd are being built (tests/support/controlplane.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.controlplane import controlplane_binaries

ALLOWED_SKIPS = ("kernel has no SCTP module",)
"""Skip reasons CI accepts: each names something the kernel lacks (FIELD-NOTES)."""
SETTLE_ROUNDS = 20
"""Event-loop turns a test's tasks get to finish after its fixtures are torn down."""


def _loop_scope(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("asyncio")
    if marker is None:
        return None
    return str(marker.kwargs.get("loop_scope") or marker.kwargs.get("scope") or "function")


@pytest.fixture(autouse=True)
def heap_unfrozen() -> Iterator[None]:
    """A collector run in the test process freezes the heap on every plan (FrozenHeap); each test
    starts and ends with nothing frozen, as a process of its own would."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def no_leaked_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an asyncio test that leaves a task pending (function-scoped loops only)."""
    if _loop_scope(request.node) != "function":
        yield
        return
    # Set up before the test's other fixtures, so torn down after them and before the loop closes.
    runner = request.getfixturevalue("_function_scoped_runner")
    yield
    loop = runner.get_loop()
    if loop.is_closed():
        return

    async def settle() -> list[asyncio.Task[object]]:
        me = asyncio.current_task()
        for _ in range(SETTLE_ROUNDS):
            left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not left:
                return []
            await asyncio.sleep(0)
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    leaked = loop.run_until_complete(settle())
    if leaked:
        names = ", ".join(sorted(f"{t.get_name()} ({t.get_coro()!r})" for t in leaked))
        for task in leaked:
            task.cancel()
        pytest.fail(f"the test leaked {len(leaked)} asyncio task(s) still running: {names}")


@pytest.fixture(scope="session")
def controlplane_bin() -> Path:
    """The directory holding kube-apiserver and etcd (built once; a failed build fails)."""
    return controlplane_binaries()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "controlplane_bin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.controlplane)


_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report)
        _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("FLOWPROOF_NO_SKIPS") != "1":
        return
    refused = [(n, r) for n, r in _SKIPPED if not any(a in r for a in ALLOWED_SKIPS)]
    if not refused:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(refused)} test(s) skipped for a reason CI does not accept:"]
    lines += [f"  {nodeid}: {reason}" for nodeid, reason in refused]
    text = "\n".join(lines)
    if reporter is not None:
        reporter.write_line(text, red=True)
    else:
        print(text)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
