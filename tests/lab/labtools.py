"""Helpers of the lab tests: unique lab names, test pods, and the check that nothing is left.

Every lab a test builds gets a name unique to this test session (`t<4 hex><counter>`) and a
temporary state directory, so parallel runs never collide. `leftovers` lists every namespace,
veth, route, nft table, cgroup or process carrying a lab's name that still exists. (A module
with its own name, not conftest, so that test modules import exactly this file.)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from lab.state import LabState
from lab.system import is_running
from tests.support.builders import pod

__all__ = ["assert_nothing_left", "lab_unavailable", "leftovers", "pod", "run", "unique_name"]

T = TypeVar("T")
SESSION = "t" + secrets.token_hex(2)
_COUNTER = itertools.count(1)


def lab_unavailable() -> str | None:
    """Why real labs cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, cgroups)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install {package})"
    if not any(
        os.path.exists(f"{root}/cgroup.controllers")
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
    ):
        return "needs a cgroup v2 hierarchy"
    return None


needs_lab = pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")


def unique_name() -> str:
    return f"{SESSION}{next(_COUNTER):x}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# --- the leftover check ---------------------------------------------------------------------------


def _cgroup_roots() -> list[str]:
    """The cgroup v2 mount and every v1 hierarchy (a lab may be told to use either)."""
    base = "/sys/fs/cgroup"
    if not os.path.isdir(base):
        return []
    return [base] + [
        os.path.join(base, d) for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))
    ]


def leftovers(name: str, state: LabState | None) -> list[str]:
    """Everything carrying the lab's name that still exists (empty when the lab is gone)."""
    found: list[str] = []
    prefix = f"{name}-"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line}" for line in links.splitlines() if f" {name}" in line]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {line}" for line in tables.splitlines() if name in line]
    if state is not None:
        routes = subprocess.run(
            ["ip", "route", "show", "type", "blackhole"], capture_output=True, text=True
        ).stdout
        for route in state.routes:
            wanted = f"blackhole {route.dst} metric {route.metric}"
            found += [f"route {line}" for line in routes.splitlines() if line.strip() == wanted]
    for root in _cgroup_roots():
        for top in (f"flowproof-{name}.slice", f"flowproof-{name}"):
            if os.path.isdir(os.path.join(root, top)):
                found.append(f"cgroup {os.path.join(root, top)}")
    marker = f"/flowproof-{name}"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cgroup") as handle:
                text = handle.read()
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] in "ZX":
            continue
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if f"{marker}/" in path + "/" or f"{marker}.slice/" in path + "/":
                found.append(f"process {pid} in {path}")
                break
    if state is not None:
        records = [*state.processes, *(p.server for p in state.pods if p.server)]
        found += [f"process {r.pid} ({r.role})" for r in records if is_running(r)]
    return found


def assert_nothing_left(name: str, state: LabState | None) -> None:
    left = leftovers(name, state)
    assert not left, f"lab {name} left behind: {left}"
