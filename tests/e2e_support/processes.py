"""Processes a test starts (Prometheus, Alertmanager, ...): free loopback ports, start, wait until
ready, stop by the recorded pid, also when the test fails.

Everything listens on 127.0.0.1 only. A process is stopped by its own pid (SIGTERM, then SIGKILL
after a grace period), never by name; its output goes to a log file in the test's directory, which
`ManagedProcess.log_tail()` shows when something goes wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on the loopback address right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, package: str) -> str:
    """The path of `name`, or skip the test saying which Debian package provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name}: apt-get install -y {package}")
    return path


class ManagedProcess:
    """One child process, stopped by its pid."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop(self, grace_seconds: float = 5.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(grace_seconds)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, url: str, timeout_seconds: float = 20.0) -> None:
        """Poll `url` until it answers 200; fail with the log when the process dies or times out."""
        deadline = time.monotonic() + timeout_seconds
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"{self.name} not ready at {url} in {timeout_seconds} s:\n{self.log_tail()}"
        )


__all__ = ["LOOPBACK", "ManagedProcess", "free_port", "require_binary"]
