"""Real Prometheus and Alertmanager (Debian packages) for end-to-end tests, and a webhook receiver.

    async with WebhookReceiver() as hook, \
            Alertmanager(tmp_path, webhook_url=hook.url) as am, \
            Prometheus(tmp_path, targets=[f"127.0.0.1:{port}"], rule_files=[short_rules(tmp_path)],
                       alertmanager=am.address) as prom:
        await prom.wait_for_query('flowproof_flow_status == 1')
        alert = await hook.wait_for_alert("FlowproofRequiredFlowBlocked", flow="frontend-to-api")

Both servers listen on free 127.0.0.1 ports with configs written to the test's directory, scrape
and evaluate every second, and are stopped by pid on exit. `short_rules` copies the project's
rules with every `for:` shortened, so the real expressions and annotations are what fires.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.e2e_support.processes import LOOPBACK, ManagedProcess, free_port, require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"


def short_rules(directory: Path, *, for_seconds: int = 1, source: Path = RULES) -> Path:
    """A copy of the rules file with every `for:` set to `for_seconds` (expressions unchanged)."""
    text = re.sub(r"(?m)^(\s*for:\s*)\S+", rf"\g<1>{for_seconds}s", source.read_text())
    path = directory / "rules.yaml"
    path.write_text(text)
    return path


class WebhookReceiver:
    """An Alertmanager webhook endpoint on 127.0.0.1 that keeps every notification it gets."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _receive(self, request: web.Request) -> web.Response:
        payload = await request.json()
        async with self._arrived:
            self.notifications.append(payload)
            self._arrived.notify_all()
        return web.Response(text="ok")

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/alerts", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, LOOPBACK, port).start()
        self.url = f"http://{LOOPBACK}:{port}/alerts"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every notification, in arrival order (status: firing or resolved)."""
        return [alert for n in self.notifications for alert in n.get("alerts", [])]

    async def wait_for_alert(
        self,
        alertname: str,
        *,
        status: str = "firing",
        timeout_seconds: float = 30.0,
        **labels: str,
    ) -> dict[str, Any]:
        """The first alert with this name, status and labels; TimeoutError naming what came."""

        def match(alert: Mapping[str, Any]) -> bool:
            got = alert.get("labels", {})
            return (
                alert.get("status") == status
                and got.get("alertname") == alertname
                and all(got.get(k) == v for k, v in labels.items())
            )

        deadline = time.monotonic() + timeout_seconds
        async with self._arrived:
            while True:
                for alert in self.alerts():
                    if match(alert):
                        return alert
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(a["labels"].get("alertname"), a.get("status")) for a in self.alerts()]
                    raise TimeoutError(
                        f"no {status} {alertname} {labels} in {timeout_seconds} s; got {seen}"
                    )
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    continue


class _Server:
    name = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(self.name, self.argv(), self.directory / f"{self.name}.log")
        self.process.start()
        try:
            await self.process.wait_ready(f"{self.url}/-/ready")
        except BaseException:
            self.process.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.process.stop()


class Alertmanager(_Server):
    """prometheus-alertmanager routing every alert to `webhook_url` at once (1 s group wait)."""

    name = "alertmanager"

    def __init__(self, directory: Path, *, webhook_url: str) -> None:
        super().__init__(directory / "alertmanager")
        self.binary = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
        config = {
            "route": {
                "receiver": "test",
                "group_by": ["alertname", "namespace", "expectation", "flow"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {"name": "test", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
            ],
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.directory / 'data'}",
            f"--web.listen-address={self.address}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]


class Prometheus(_Server):
    """prometheus scraping `targets` (host:port, /metrics) and evaluating `rule_files` every second."""

    name = "prometheus"

    def __init__(
        self,
        directory: Path,
        *,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
        alertmanager: str | None = None,
        job: str = "flowproof",
    ) -> None:
        super().__init__(directory / "prometheus")
        self.binary = require_binary("prometheus", "prometheus")
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                "scrape_timeout": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "honor_labels": True,
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        }
        if alertmanager is not None:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
            }
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address={self.address}",
            "--rules.alert.resend-delay=1s",
            "--log.level=warn",
        ]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar as one sample) `expr` gives now."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/api/v1/query", data={"query": expr}) as response,
        ):
            body = await response.json()
        if body.get("status") != "success":
            raise ValueError(f"query failed: {expr}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def query_range(
        self, expr: str, seconds: float = 60.0, step: float = 1.0
    ) -> list[dict[str, Any]]:
        now = time.time()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.url}/api/v1/query_range",
                data={"query": expr, "start": now - seconds, "end": now, "step": step},
            ) as response,
        ):
            body = await response.json()
        if body.get("status") != "success":
            raise ValueError(f"query failed: {expr}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def wait_for_query(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        *,
        timeout_seconds: float = 20.0,
    ) -> list[dict[str, Any]]:
        """Poll `expr` until `predicate(result)` holds (default: any sample)."""
        deadline = time.monotonic() + timeout_seconds
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = await self.query(expr)
            if predicate(result):
                return result
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{expr} did not hold in {timeout_seconds} s; last: {result}")


__all__ = ["Alertmanager", "Prometheus", "WebhookReceiver", "short_rules"]
