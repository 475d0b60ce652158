"""Fixtures for the lab tests: real labs that are taken down and checked after every test.

After each test its labs are taken down and `leftovers` (labtools.py) must find nothing that
carries their names — also when the test failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labtools import lab_unavailable, leftovers, unique_name

from lab.cluster import Manifests
from lab.config import LabSettings
from lab.lifecycle import Lab, manifests_from

# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_lab(state_dir: Path) -> Iterator[Callable[..., Lab]]:
    """Build labs for a test: `make_lab(manifests, nodes=3, …)`; all are removed and checked after."""
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(manifests: Manifests | None = None, **settings: Any) -> Lab:
        lab = Lab(unique_name(), state_dir)
        labs.append(lab)
        settings.setdefault("owner_pid", os.getpid())  # a killed test run leaves no lab behind
        lab.up(manifests or manifests_from(), LabSettings(**settings))
        return lab

    yield make
    problems = []
    for lab in labs:
        state = lab.paths.load() if lab.exists() else None
        if lab.exists():
            try:
                lab.down()
            except Exception as exc:  # report, and still check what is left
                problems.append(f"lab down {lab.name}: {exc}")
        left = leftovers(lab.name, state)
        if left:
            problems.append(f"lab {lab.name} left behind: {left}")
    assert not problems, "\n".join(problems)
