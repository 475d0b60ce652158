"""The live web view in headless Chromium (Debian's chromium driven by Playwright): the matrix
renders, a status change published by the loop turns its cell red without a reload, the
explanation opens, and everything works from the keyboard on a 1366×768 screen. Screenshots go
to test-artifacts/web/."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from collector.core.views import LoopStatus
from collector.metrics import CollectorMetrics
from collector.web.app import StateView, build_web_app
from collector.web.events import Broadcaster
from tests.e2e_support.samples import SampleLoop, large_snapshot, shop_snapshot, without

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="needs playwright: pip install playwright"
)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RED = "rgb(198, 40, 40)"
BLOCKED_CELL = "#matrix td[aria-label^='shop/frontend to shop/api:']"


@dataclass
class View:
    loop: SampleLoop
    page: Any
    url: str
    errors: list[str]

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path))
        return path

    async def focused(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.page.evaluate(
            """() => { const e = document.activeElement;
                return { tag: e.tagName, label: e.getAttribute('aria-label') || '', key: e.dataset.key || '',
                         outline: getComputedStyle(e).outlineStyle, status: e.dataset.status || '' }; }"""
        )
        return result


@pytest.fixture
async def view() -> AsyncIterator[View]:
    async with opened(LoopStatus(agent_nodes=frozenset({"node-1", "node-2"}))) as found:
        yield found


@contextlib.asynccontextmanager
async def opened(status: LoopStatus) -> AsyncIterator[View]:
    """The sample loop's web view, served with `status` and open in Chromium."""
    if not HAVE_CHROMIUM:
        pytest.skip("needs chromium: apt-get install -y chromium")
    broadcaster = Broadcaster()
    loop = SampleLoop(listener=broadcaster.on_loop_event)
    loop.probe_all()
    state_view = StateView(
        state=loop.state,
        loop_status=lambda: status,
        generation=lambda: loop.generation,
    )
    metrics = CollectorMetrics(CollectorRegistry(), state=loop.state)
    app = build_web_app(state_view=state_view, metrics=metrics, broadcaster=broadcaster)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    errors: list[str] = []
    try:
        async with playwright_api.async_playwright() as driver:
            browser = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1366, "height": 768})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                url = str(server.make_url("/"))
                await page.goto(url)
                await page.wait_for_selector("html[data-ready='1']", timeout=5000)
                yield View(loop, page, url, errors)
            finally:
                await browser.close()
    finally:
        await server.close()
    assert not errors, errors


async def test_the_matrix_renders_with_a_legend_in_words(view: View) -> None:
    page = view.page
    cells = await page.eval_on_selector_all(
        "#matrix td[data-status]", "tds => tds.map(t => t.getAttribute('aria-label'))"
    )
    # 4 declared pod pairs and the witness of the policy that lets the frontend reach the api.
    cell = view.loop.state.flows()
    between = [
        r
        for r in cell
        if r.planned.source.labels.get("app") == "frontend"
        and getattr(r.planned.destination, "labels", {}).get("app") == "api"
    ]
    assert len(between) == 5
    assert any(label.startswith("shop/frontend to shop/api: pass; 5 flows") for label in cells), (
        cells
    )
    rows = await page.eval_on_selector_all("#matrix tbody th", "ths => ths.map(t => t.title)")
    assert "shop/frontend" in rows and "monitoring/prometheus" in rows
    legend = await page.inner_text("#legend")
    for words in (
        "required blocked",
        "forbidden open",
        "policy mismatch",
        "enforcement drift",
        "pass",
    ):
        assert words in legend
    await page.wait_for_function(
        "() => document.querySelector('#totals').innerText.includes('pass 5')", timeout=3000
    )
    assert "live" in await page.inner_text("#live")
    fits = await page.evaluate("() => document.scrollingElement.scrollWidth <= window.innerWidth")
    assert fits, "the page must not scroll sideways on a 1366×768 screen"
    await view.shot("matrix")


async def test_a_published_break_turns_the_cell_red_without_a_reload(view: View) -> None:
    page = view.page
    await page.evaluate("() => { window.notReloaded = true; }")
    assert await page.get_attribute(BLOCKED_CELL, "data-status") == "PASS"
    view.loop.apply(without(shop_snapshot(), "frontend-to-api"))
    view.loop.probe_all()
    await page.wait_for_selector(f"{BLOCKED_CELL}[data-status='REQUIRED_BLOCKED']", timeout=3000)
    colour = await page.eval_on_selector(BLOCKED_CELL, "td => getComputedStyle(td).backgroundColor")
    assert colour == RED
    assert await page.evaluate("() => window.notReloaded === true")
    first = await page.inner_text("#mismatches li:first-child")
    assert "blocked" in first and "frontend-to-api" in first
    await page.wait_for_function(
        "() => document.querySelector('#totals').innerText.includes('blocked 1')", timeout=3000
    )
    await view.shot("break-turns-red")
    view.loop.apply(shop_snapshot())
    view.loop.probe_all()
    await page.wait_for_selector(f"{BLOCKED_CELL}[data-status='PASS']", timeout=3000)
    assert await page.inner_text("#mismatch-count") == "(0)"


async def test_the_explanation_opens_and_closes_from_the_keyboard(view: View) -> None:
    page = view.page
    view.loop.apply(without(shop_snapshot(), "frontend-to-api"))
    view.loop.probe_all()
    await page.wait_for_selector(f"{BLOCKED_CELL}[data-status='REQUIRED_BLOCKED']", timeout=3000)
    await page.focus(BLOCKED_CELL)
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#drill:not([hidden])")
    assert await page.inner_text("#drill-title") == "shop/frontend → shop/api"
    keys = await page.eval_on_selector_all(
        "#drill tr.flowrow", "trs => trs.map(t => t.dataset.key)"
    )
    assert len([k for k in keys if k.startswith("shop/shop/frontend-to-api:")]) == 4, keys
    assert keys[0].startswith("shop/shop/frontend-to-api:"), (
        "worst first (a drift sample may share the cell)"
    )
    row = await view.focused()
    assert row["tag"] == "TR" and row["key"].startswith("shop/shop/frontend-to-api:")
    await page.keyboard.press("ArrowDown")
    second = await view.focused()
    assert second["key"] != row["key"]
    loads = await page.evaluate("() => window.flowproof.loads")
    view.loop.apply(without(shop_snapshot(), "frontend-to-api"))  # a new generation: a full reload
    await page.wait_for_function(f"() => window.flowproof.loads > {loads}", timeout=3000)
    assert (await view.focused())["key"] == second["key"], "a reload keeps the focused row"
    await page.keyboard.press("Enter")
    await page.wait_for_selector(
        "#explain:not([hidden]) >> text=Deciding tier, policy, rule and action"
    )
    text = (await page.inner_text("#explain")).lower()  # headings are shown in capitals
    for part in (
        "declared allow",
        "shop/default-deny",
        "last probe results",
        "timeout",
        "2.00 s",
        "history",
        "confirmed by a retry",
    ):
        assert part in text, part
    await view.shot("explanation")
    await page.keyboard.press("Escape")
    assert await page.is_hidden("#explain")
    assert (await view.focused())["key"] == second["key"], (
        "Esc returns to the row the explanation came from"
    )
    await page.keyboard.press("Escape")
    assert await page.is_hidden("#drill")
    back = await view.focused()
    assert back["tag"] == "TD" and back["label"].startswith("shop/frontend to shop/api")


async def test_keyboard_navigation_in_the_matrix(view: View) -> None:
    page = view.page
    await page.keyboard.press("Tab")
    assert (await view.focused())["tag"] == "A", "the first Tab reaches the skip link"
    await page.keyboard.press("Enter")
    start = await view.focused()
    assert start["tag"] == "TD"
    assert start["outline"] != "none", "the focused cell shows its focus"
    seen = {start["label"]}
    for key in ("ArrowRight", "ArrowDown", "ArrowLeft", "ArrowUp"):
        await page.keyboard.press(key)
        now = await view.focused()
        assert now["tag"] == "TD"
        seen.add(now["label"])
    assert len(seen) >= 3, seen
    here = await view.focused()
    loads = await page.evaluate("() => window.flowproof.loads")
    view.loop.apply(shop_snapshot())  # a new generation: the matrix is drawn again
    await page.wait_for_function(f"() => window.flowproof.loads > {loads}", timeout=3000)
    assert (await view.focused())["label"].split(":")[0] == here["label"].split(":")[0], (
        "a redraw keeps the focus on the same cell"
    )
    await page.keyboard.press("Control+End")
    last = await view.focused()
    assert last["tag"] == "TD"
    tabbable = await page.eval_on_selector_all("#matrix td[tabindex='0']", "tds => tds.length")
    assert tabbable == 1, "one cell in the tab order: arrows move inside the grid"
    await page.keyboard.press("Tab")
    assert (await view.focused())["tag"] != "TD", "Tab leaves the grid"


async def test_filters_narrow_the_matrix_and_the_mismatches(view: View) -> None:
    page = view.page
    view.loop.apply(without(shop_snapshot(), "api-to-db"))
    view.loop.probe_all()
    await page.wait_for_selector("#matrix td[data-status='REQUIRED_BLOCKED']", timeout=3000)
    await page.select_option("#f-status", "REQUIRED_BLOCKED")
    statuses = await page.eval_on_selector_all(
        "#matrix td[data-status]", "tds => tds.map(t => t.dataset.status)"
    )
    assert statuses == ["REQUIRED_BLOCKED"]
    await page.select_option("#f-status", "")
    await page.fill("#f-text", "monitoring-scrapes")
    labels = await page.eval_on_selector_all(
        "#matrix td[data-status]", "tds => tds.map(t => t.getAttribute('aria-label'))"
    )
    assert len(labels) == 1 and labels[0].startswith("monitoring/prometheus to shop/api")
    await page.fill("#f-text", "")
    await page.select_option("#f-namespace", "monitoring")
    rows = await page.eval_on_selector_all("#matrix tbody th", "ths => ths.map(t => t.title)")
    assert "monitoring/prometheus" in rows and "shop/api" not in rows
    await view.shot("filtered")


async def test_a_wide_matrix_scrolls_in_its_box_and_mismatches_group_by_flow(view: View) -> None:
    page = view.page
    loads = await page.evaluate("() => window.flowproof.loads")
    view.loop.apply(large_snapshot(namespaces=2, workloads=10, flows_per_namespace=50))
    view.loop.probe_all()
    await page.wait_for_function(f"() => window.flowproof.loads > {loads}", timeout=5000)
    await page.wait_for_function(
        "() => document.querySelectorAll('#matrix td[data-status]').length > 100", timeout=5000
    )
    box = await page.evaluate(
        """() => { const s = document.getElementById('scroller').getBoundingClientRect();
            const m = document.getElementById('scroller');
            return { right: s.right, bottom: s.bottom, scrolls: m.scrollWidth > m.clientWidth,
                     width: window.innerWidth, height: window.innerHeight }; }"""
    )
    assert box["right"] <= box["width"] and box["bottom"] <= box["height"], box
    assert box["scrolls"], "the matrix is wider than the screen and scrolls inside its box"
    items = await page.eval_on_selector_all(
        "#mismatches button", "bs => bs.map(b => b.getAttribute('aria-label').split(',')[0])"
    )
    assert len(items) == len(set(items)), "one entry per declared flow, not one per pod pair"
    assert "more pod pairs" in await page.inner_text("#mismatches li:first-child")
    await view.shot("wide-matrix")


async def test_the_policies_view_lists_each_policy_and_opens_its_witnesses(view: View) -> None:
    page = view.page
    await page.wait_for_selector("#policies button[data-policy]", timeout=5000)
    listed = await page.eval_on_selector_all(
        "#policies button[data-policy]", "bs => bs.map(b => b.getAttribute('aria-label'))"
    )
    assert len(listed) == len(view.loop.snapshot.policies)
    assert any(label.startswith("proven: NetworkPolicy shop/") for label in listed), listed
    await page.wait_for_function(
        "() => document.getElementById('evidence').textContent.startsWith('policies ')"
    )
    first = page.locator("#policies button[data-policy]").first
    await first.focus()
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#policy:not([hidden]) tr.flowrow", timeout=5000)
    rows = await page.eval_on_selector_all("#policy tr.flowrow", "rs => rs.map(r => r.dataset.key)")
    assert rows and all(key.startswith("witness:") for key in rows)
    await view.shot("policies")
    await page.locator("#policy tr.flowrow").first.press("Enter")
    await page.wait_for_selector("#explain:not([hidden]) >> text=Witness of", timeout=5000)
    await page.keyboard.press("Escape")
    assert await page.locator("#explain").is_hidden()
    assert not await page.locator("#policy").is_hidden(), "Esc closes the topmost panel only"
    await page.keyboard.press("Escape")
    assert await page.locator("#policy").is_hidden()


async def test_a_standby_says_so_and_names_the_leader_in_its_header() -> None:
    status = LoopStatus(leading=False, leader="flowproof-collector-5d8c-x2k4p")
    async with opened(status) as view:
        await view.page.wait_for_function(
            "() => document.querySelector('#agents').innerText.includes('standby')", timeout=3000
        )
        header = await view.page.inner_text("#agents")
        assert header == (
            "standby collector: no agents, no results here · "
            "the leader is flowproof-collector-5d8c-x2k4p"
        )
        await view.shot("standby")
