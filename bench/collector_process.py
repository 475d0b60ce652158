"""A real collector process for benchmarks: started on loopback ports with TLS, read from /proc.

Owns what benchmarks that talk to a real `flowproof collector` share: a free port, the
collector's certificate (the lab's CA), the process itself (`start_collector`, `stop_collector`),
a gRPC channel to it as an agent opens one, and its CPU time and RSS from /proc. Everything it
starts listens on 127.0.0.1 only; it never kills anything but the process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import grpc.aio

from lab.certs import issue

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (/proc/<pid>/stat), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def channel(port: int, ca: bytes | None, *, own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to the collector's gRPC port on 127.0.0.1 (TLS unless `ca` is None).

    `own_connection`: a TCP connection of its own, as each real agent has; without it grpc
    shares one connection among channels to the same address in the process.
    """
    options: list[tuple[str, int]] = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if ca is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


@dataclass
class CollectorProcess:
    """A started collector: its process, ports and the CA its certificate is checked against."""

    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    ca: bytes | None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


async def start_collector(
    *,
    manifests: Path,
    directory: Path,
    token: str,
    root: Path = ROOT,
    plaintext: bool = False,
    log_level: str = "WARNING",
    log_file: Path | None = None,
    extra: Sequence[str] = (),
) -> CollectorProcess:
    """`python -m flowproof.cli collector --source manifests` of checkout `root`, on 127.0.0.1.

    The certificate and key go to `directory`; its log goes to `log_file` (else nowhere).
    """
    issued = issue(["127.0.0.1"])
    (directory / "c.crt").write_bytes(issued.certificate)
    (directory / "c.key").write_bytes(issued.key)
    grpc_port, http_port = free_port(), free_port()
    tls = [] if plaintext else [
        "--tls-cert-file", str(directory / "c.crt"), "--tls-key-file", str(directory / "c.key"),
    ]  # fmt: skip
    with contextlib.ExitStack() as files:
        stderr = (
            files.enter_context(log_file.open("wb"))
            if log_file is not None
            else asyncio.subprocess.DEVNULL
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowproof.cli", "collector",
            "--source", "manifests", "--manifests", str(manifests),
            "--listen-address", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--http-port", str(http_port), *tls, "--log-level", log_level, *extra,
            cwd=root, env={**os.environ, "PYTHONPATH": str(root), "FLOWPROOF_TOKEN": token},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    return CollectorProcess(process, grpc_port, http_port, None if plaintext else issued.ca)


async def wait_serving(
    session: aiohttp.ClientSession, collector: CollectorProcess, *, limit_seconds: float = 30.0
) -> None:
    """Until /metrics answers 200; TimeoutError after `limit_seconds` or if the process ended."""
    async with asyncio.timeout(limit_seconds):
        while collector.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{collector.base}/metrics") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the collector exited with {collector.process.returncode}")


async def stop_collector(collector: CollectorProcess, *, grace_seconds: float = 15.0) -> None:
    """SIGTERM to the process started (by its pid), SIGKILL if it has not stopped in time."""
    process = collector.process
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace_seconds)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


__all__ = [
    "CollectorProcess",
    "channel",
    "cpu_seconds",
    "free_port",
    "rss_mib",
    "start_collector",
    "stop_collector",
    "wait_serving",
]
