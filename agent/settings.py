"""The agent's settings: one frozen dataclass, loaded from flags and environment in one place.

Every field has a default (or is required), a base unit in its name and a docstring, which is also
its `--help` text. A field `foo_bar` is set by `--foo-bar` or `FLOWPROOF_AGENT_FOO_BAR` (the flag
wins). The token is read only from `FLOWPROOF_TOKEN` or a file (`--token-file`), never from a flag,
so it does not show in process listings. This module must never start anything.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowproof import settings as loader
from flowproof.errors import ConfigurationError
from flowproof.output import examples

ENV_PREFIX = "FLOWPROOF_AGENT_"


@dataclass(frozen=True)
class AgentSettings:
    node_name: str = ""
    """The Kubernetes node this agent serves (also NODE_NAME, e.g. from the downward API)."""
    collector_address: str = ""
    """host:port of the collector's gRPC endpoint (also FLOWPROOF_COLLECTOR); several, comma-
    separated, are tried in turn, each new stream on the next (replicas without a Service)."""
    token: str = field(default="", repr=False)
    """Shared secret sent as `authorization: Bearer ...`; from FLOWPROOF_TOKEN or --token-file."""
    ca_file: str = ""
    """PEM CA certificate(s) the collector's certificate must chain to (required): the stream,
    and so the token, goes only to a collector that proves its identity with TLS."""
    collector_server_name: str = ""
    """The name the collector's certificate must carry; empty: the host of collector_address
    (the lab's certificates carry `flowproof-collector` and the loopback address)."""
    proc_root: str = "/proc"
    """Where the node's /proc is mounted (the host's, with hostPID)."""
    max_in_flight: int = 1024
    """Assignments the agent holds at once; announced in the hello, the collector sends no more."""
    max_concurrency: int = 256
    """Probes running at the same time; the others wait their turn."""
    destination_rate_per_second: float = 50.0
    """Probes started per second towards one destination address, sustained."""
    destination_burst: int = 50
    """Probes that may start at once towards one destination before the rate applies."""
    max_probe_timeout_seconds: float = 30.0
    """Upper bound on an assignment's timeout; a longer one is cut to this."""
    result_buffer_size: int = 10_000
    """Results kept until the collector acks them; when full, the oldest is dropped and counted."""
    result_batch_size: int = 256
    """Results sent per message."""
    reconnect_initial_seconds: float = 0.5
    """First delay before reconnecting to the collector; doubles per failure, with jitter."""
    reconnect_max_seconds: float = 30.0
    """Longest delay between reconnect attempts."""
    hello_timeout_seconds: float = 10.0
    """How long to wait for the collector's hello-ack before giving up on a connection."""
    responder_max_lifetime_seconds: float = 60.0
    """A responder closes after this long even if its assignment never ends."""
    max_responders: int = 256
    """Responders open at once; a request beyond it is reported as failed."""
    socket_batch_size: int = 64
    """Sockets created per trip of the namespace helper thread."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM: how long to finish running probes and deliver their results before exiting."""
    listen_address: str = "0.0.0.0"
    """Address of the agent's read-only endpoints (gRPC health, /metrics)."""
    health_port: int = 9444
    """Port of the standard gRPC health service (0 disables it)."""
    metrics_port: int = 9445
    """Port of Prometheus /metrics (0 disables it)."""
    log_level: str = "INFO"
    """Python logging level name."""

    @property
    def collector_addresses(self) -> tuple[str, ...]:
        """Each host:port of `collector_address`, in the order they are tried."""
        return tuple(a.strip() for a in self.collector_address.split(",") if a.strip())

    def validate(self) -> None:
        """Raise ConfigurationError naming the first setting that cannot work."""
        if not self.node_name:
            raise ConfigurationError("node_name: required (--node-name or NODE_NAME)")
        entries = self.collector_address.split(",")
        for entry in entries:
            host, sep, port = entry.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                which = f"{entry!r} in {self.collector_address!r}" if len(entries) > 1 else ""
                raise ConfigurationError(
                    f"collector_address: {which or repr(self.collector_address)} is not "
                    "host:port (--collector-address or FLOWPROOF_COLLECTOR)"
                )
        if not self.token:
            raise ConfigurationError("token: required (FLOWPROOF_TOKEN or --token-file)")
        if not self.ca_file:
            raise ConfigurationError(
                "ca_file: required (--ca-file or FLOWPROOF_AGENT_CA_FILE): the CA that signed the "
                "collector's certificate"
            )
        if not os.access(self.ca_file, os.R_OK):
            raise ConfigurationError(f"ca_file: {self.ca_file!r} cannot be read")
        if not os.path.isdir(self.proc_root):
            raise ConfigurationError(f"proc_root: {self.proc_root!r} is not a directory")
        positive = (
            "max_in_flight",
            "max_concurrency",
            "destination_rate_per_second",
            "destination_burst",
            "max_probe_timeout_seconds",
            "result_buffer_size",
            "result_batch_size",
            "reconnect_initial_seconds",
            "reconnect_max_seconds",
            "hello_timeout_seconds",
            "responder_max_lifetime_seconds",
            "max_responders",
            "socket_batch_size",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name}: must be positive, not {getattr(self, name)}")
        for name in ("health_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigurationError(f"{name}: {getattr(self, name)} is outside 0-65535")
        if self.shutdown_grace_seconds < 0:
            raise ConfigurationError("shutdown_grace_seconds: must not be negative")
        if self.reconnect_max_seconds < self.reconnect_initial_seconds:
            raise ConfigurationError("reconnect_max_seconds: must be >= reconnect_initial_seconds")

    def describe(self) -> str:
        """One line for the start-up log: every setting, the token masked."""
        return loader.describe(self, secrets=("token",))


def build_parser() -> argparse.ArgumentParser:
    """Every setting as a flag, with its help and Examples (what `--help` prints)."""
    return loader.build_parser(
        AgentSettings,
        prog="flowproof agent",
        description="The flowproof node agent: probes from inside pod network namespaces.",
        secrets=("token",),
        epilog=examples(
        ("as the DaemonSet runs it (python -m agent in the image)",
         "NODE_NAME=node-a flowproof agent --collector-address flowproof-collector:9443 "
         "--token-file /var/run/secrets/flowproof/token"),
        ("every setting is also an environment variable",
         "FLOWPROOF_AGENT_LOG_LEVEL=DEBUG FLOWPROOF_TOKEN=s3cret flowproof agent"),
        ),
    )  # fmt: skip


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> AgentSettings:
    """Build and validate the settings from command-line flags, then environment, then defaults."""
    try:
        settings = loader.load(
            AgentSettings,
            argv,
            environ,
            parser=build_parser(),
            env_prefix=ENV_PREFIX,
            aliases={"node_name": ("NODE_NAME",), "collector_address": ("FLOWPROOF_COLLECTOR",)},
            secrets={"token": "FLOWPROOF_TOKEN"},
        )
    except loader.SettingsError as exc:
        raise ConfigurationError(str(exc)) from exc
    settings.validate()
    return settings
