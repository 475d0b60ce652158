"""Log lines that input can trigger at will, rate-limited and kept short.

Owns `LogLimiter`: the first few lines of a kind per interval get through, the rest are counted
and reported with the next line that does (`… and 57 more like it in the last 60 s`), so a flood
of refused streams or malformed requests costs one line a minute instead of a disk. It never
logs by itself and holds no module-level state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Window:
    started: float
    passed: int = 0
    suppressed: int = 0


@dataclass
class LogLimiter:
    """At most `burst` lines per `interval_seconds` for each kind of line."""

    burst: int = 3
    interval_seconds: float = 60.0
    monotonic: Callable[[], float] = time.monotonic
    _windows: dict[str, _Window] = field(default_factory=dict)

    def admit(self, kind: str) -> str | None:
        """None to drop the line; else a suffix for it (empty, or the count dropped before)."""
        now = self.monotonic()
        window = self._windows.get(kind)
        suffix = ""
        if window is None or now - window.started >= self.interval_seconds:
            if window is not None and window.suppressed:
                suffix = (
                    f" (and {window.suppressed} more like it in the last "
                    f"{now - window.started:.0f} s)"
                )
            window = self._windows[kind] = _Window(started=now)
            if len(self._windows) > 64:  # kinds are few; never let them grow without bound
                oldest = min(self._windows, key=lambda k: self._windows[k].started)
                del self._windows[oldest]
        if window.passed >= self.burst:
            window.suppressed += 1
            return None
        window.passed += 1
        if window.passed == self.burst and not suffix:
            suffix = " (more like it are counted, not logged, for a while)"
        return suffix
