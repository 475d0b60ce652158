"""Builders of test data shared by the unit and the lab suites."""

from __future__ import annotations

from typing import Any

from collector.core.model import ContainerPort, Pod


def pod(
    namespace: str,
    name: str,
    labels: dict[str, str] | None = None,
    ports: tuple[tuple[int, str, str | None], ...] = ((80, "TCP", "web"), (81, "UDP", "echo")),
    **kwargs: Any,
) -> Pod:
    """A pod for a test lab; ports as (number, protocol, name)."""
    return Pod(
        namespace=namespace,
        name=name,
        labels=labels or {"app": name},
        ports=tuple(ContainerPort(port=p, protocol=proto, name=n) for p, proto, n in ports),  # type: ignore[arg-type]
        **kwargs,
    )
