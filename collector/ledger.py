"""What the collector delivered, and the key it seals assignments with, kept across its restarts.

Owns `DeliveryLedger` (the result and assignment ids delivered, bounded, oldest forgotten first;
with a state directory also appended to `delivered.jsonl` and read back at start, so a result an
agent re-sends after a collector restart, because its ack was lost, is acked and not delivered or
counted again) and `assignment_key` (the per-run secret of collector.core.sealing: random per
process, or kept in the state directory, mode 0600, so a restarted collector can still verify the
assignments its predecessor issued). A state directory is an emptyDir in a cluster and the lab's
own directory in the lab; without one, both live in memory only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO

from collector.core.sealing import KEY_BYTES
from flowproof.errors import ConfigurationError

log = logging.getLogger(__name__)

LEDGER_FILE = "delivered.jsonl"
KEY_FILE = "assignment.key"


class DeliveryLedger:
    """Result ids and assignment ids already delivered: at most `capacity` of each, and none older
    than `horizon_seconds` (the dispatcher refuses results of assignments issued longer ago than
    that anyway, so an older id can never come back to be counted twice)."""

    def __init__(
        self,
        capacity: int,
        path: Path | None = None,
        *,
        horizon_seconds: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._horizon = horizon_seconds
        self._monotonic = monotonic
        self._results: OrderedDict[str, float] = OrderedDict()
        self._assignments: OrderedDict[str, float] = OrderedDict()
        self._path = path
        self._file: IO[str] | None = None
        self._written = 0
        if path is not None:
            self._load(path)
            self._file = path.open("a", encoding="utf-8")
            self._file.write(json.dumps(["run", os.getpid(), time.time()]) + "\n")
            self._file.flush()

    def has_result(self, result_id: str) -> bool:
        return result_id in self._results

    def has_assignment(self, assignment_id: str) -> bool:
        return assignment_id in self._assignments

    def add(self, result_id: str, assignment_id: str) -> None:
        """Record a delivered result (kept in the file first, when there is one)."""
        if self._file is not None:
            self._file.write(json.dumps(["result", result_id, assignment_id]) + "\n")
            self._written += 1
        self._remember(self._results, result_id)
        self._remember(self._assignments, assignment_id)

    def add_assignment(self, assignment_id: str) -> None:
        """An assignment that must never be delivered (cancelled); in memory only."""
        self._remember(self._assignments, assignment_id)

    def flush(self) -> None:
        """Hand what was added to the operating system (it survives a killed process) and
        compact the file once it holds twice the capacity."""
        if self._file is None:
            return
        self._file.flush()
        if self._written > 2 * self._capacity and self._path is not None:
            self._compact(self._path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _remember(self, table: OrderedDict[str, float], key: str) -> None:
        now = self._monotonic()
        table[key] = now
        table.move_to_end(key)
        if len(table) > self._capacity:
            table.popitem(last=False)
        if self._horizon is not None:
            oldest = now - self._horizon
            while table and next(iter(table.values())) < oldest:
                table.popitem(last=False)

    def _load(self, path: Path) -> None:
        try:
            handle = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigurationError(f"state_dir: cannot read {path}: {exc.strerror}") from exc
        with handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, list) and len(entry) == 3 and entry[0] == "result":
                        if entry[1]:
                            self._remember(self._results, str(entry[1]))
                        if entry[2]:
                            self._remember(self._assignments, str(entry[2]))
        log.info("delivery ledger: %d results delivered before this start", len(self._results))

    def _compact(self, path: Path) -> None:
        assert self._file is not None
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for result_id in self._results:
                handle.write(json.dumps(["result", result_id, ""]) + "\n")
            for assignment_id in self._assignments:
                handle.write(json.dumps(["result", "", assignment_id]) + "\n")
        os.replace(tmp, path)
        self._file.close()
        self._file = path.open("a", encoding="utf-8")
        self._written = 0


def assignment_key(state_dir: str) -> bytes:
    """The key assignments are sealed with: kept in `state_dir` (created 0600 on first use), or
    random for this process when there is no state directory."""
    if not state_dir:
        return secrets.token_bytes(KEY_BYTES)
    path = Path(state_dir) / KEY_FILE
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES) + "\n")
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"state_dir: the assignment key {path}: {exc}") from exc
    if len(key) < KEY_BYTES:
        raise ConfigurationError(f"state_dir: the assignment key {path} is too short")
    return key


def ledger_path(state_dir: str) -> Path | None:
    return Path(state_dir) / LEDGER_FILE if state_dir else None


__all__ = ["DeliveryLedger", "assignment_key", "ledger_path"]
