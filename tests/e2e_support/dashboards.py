"""Every query of every panel of the Grafana dashboards, ready to run against a test Prometheus.

`panel_queries()` reads deploy/grafana/dashboards/*.json and substitutes Grafana's variables the
way a person looking at "All" would see them (`$namespace` -> `.*`, `$__rate_interval` -> a
window several scrape intervals long), so an end-to-end test can assert that each panel shows
something: a panel that can never show anything is a bug.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DEFAULT_VARIABLES = {
    "cluster": ".*",
    "namespace": ".*",
    "expectation": ".*",
    "__rate_interval": "10s",
    "__interval": "1s",
    "__range": "1m",
}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.dashboard}: {self.panel} ({self.ref})"


def substitute(expr: str, variables: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
    """`expr` with `$name` and `${name}` replaced; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from _panels(item.get("panels", []))


def panel_queries(
    directory: Path = DASHBOARDS, variables: Mapping[str, str] = DEFAULT_VARIABLES
) -> list[PanelQuery]:
    queries = []
    for path in sorted(directory.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in _panels(board.get("panels", [])):
            for query in panel.get("targets", []):
                if "expr" not in query:
                    continue
                queries.append(
                    PanelQuery(
                        dashboard=board["title"],
                        panel=panel["title"],
                        ref=query.get("refId", "A"),
                        expr=substitute(query["expr"], variables),
                        instant=bool(query.get("instant")),
                    )
                )
    return queries


__all__ = ["DASHBOARDS", "PanelQuery", "panel_queries", "substitute"]
