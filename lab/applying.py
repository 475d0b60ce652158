"""Compiled rulesets into the kernel: each pod's table in one `nft -f` transaction.

Owns applying rulesets to the pods' namespaces (recording what the kernel has, by digest) and
applying lagged changes once they fall due (the `lag` fault; the supervisor calls `apply_due`).
It never compiles rules (lab/enforcement.py) nor decides what is due (lab/enforcing.py), and it
stays light: the supervisor, the parent of every pod server, imports it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from lab import system
from lab.enforcement import digest, transaction
from lab.state import LabPaths, LabState


def apply_rulesets(paths: LabPaths, state: LabState, rulesets: Mapping[str, str]) -> int:
    """Apply each pod's table in one `nft -f` transaction; how many pods were updated."""
    items: list[tuple[str, str]] = []
    done: dict[str, str] = {}
    paths.nft_dir.mkdir(parents=True, exist_ok=True)
    for key, text in sorted(rulesets.items()):
        record = state.pod(key)
        if record is None or record.host_network:
            continue
        Path(system.under(paths.nft_dir, key.replace("/", ".") + ".nft")).write_text(text)
        # A pod that never had a table gets a plain add: deleting a table in a transaction costs
        # an RCU grace period in the kernel, which `up` would pay once per pod.
        items.append((record.netns, text if key not in state.applied else transaction(text)))
        done[key] = digest(text)
    system.nft_apply(items)
    state.applied.update(done)
    return len(done)


def apply_due(state_dir: Path, name: str) -> float | None:
    """Apply lagged changes that have fallen due (called by the supervisor).

    Returns when to look again: the next due time, soon when the lab is busy, None when nothing
    is pending. Never waits for the lock, so a lab command waiting on the supervisor cannot
    deadlock with it.
    """
    paths = LabPaths(state_dir, name)
    try:
        with paths.locked(blocking=False):
            if not paths.exists():
                return None
            state = paths.load()
            if state.phase != "up":
                return None
            now = time.time()
            while state.pending and state.pending[0].due <= now:
                entry = state.pending.pop(0)
                apply_rulesets(paths, state, entry.rulesets)
                state.enforced_generation = entry.generation
                paths.save(state)
            return state.pending[0].due if state.pending else None
    except BlockingIOError:
        return time.time() + 0.02
