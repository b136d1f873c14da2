"""report in a real browser: Debian's headless Chromium opens the rendered page from disk,
with no console errors, no request leaving the file, and both schemes side by side."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from conftest import ROOT
from test_report import render_report

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"

# CI sets SEGFLOW_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("SEGFLOW_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not REQUIRED,
                       reason=f"{CHROMIUM} not found: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    """The page loaded in Chromium, with everything it logged and requested."""
    rendered = render_report(tmp_path_factory)
    events = {"console": [], "errors": [], "requests": [], "dialogs": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: events["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: events["errors"].append(str(e)))
            page.on("request", lambda r: events["requests"].append(r.url))
            # An alert() would mean the escaped title ran as script.
            page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
            page.goto(rendered["args"]["out"].as_uri(), wait_until="load")
            yield {**rendered, "page": page, "events": events}
        finally:
            browser.close()


def test_loads_without_errors_or_network(opened):
    events = opened["events"]
    assert events["errors"] == [] and events["dialogs"] == []
    assert [m for m in events["console"] if m[0] in ("error", "warning")] == []
    outside = [u for u in events["requests"] if not u.startswith(("file:", "data:"))]
    assert outside == []
    broken = opened["page"].evaluate(
        "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
    assert broken == 0


def test_schemes_side_by_side_in_the_comparison_table(opened):
    page = opened["page"]
    boxes = []
    for name in opened["params"]["schemes"]:
        header = page.locator(f'#comparison-table th.scheme[data-scheme="{name}"]')
        assert header.is_visible() and header.inner_text().strip() == name
        boxes.append(header.bounding_box())
    first, second = boxes
    assert abs(first["y"] - second["y"]) < 2  # same row
    assert first["x"] + first["width"] <= second["x"]  # left to right, not overlapping
    assert second["x"] + second["width"] <= 1280  # both on screen without scrolling sideways
    assert first["y"] < 900 * 2  # near the top: the comparison comes early


def test_title_is_shown_as_text_and_screenshot_is_saved(opened):
    page = opened["page"]
    assert page.locator("h1").inner_text() == opened["params"]["report"]["title"]
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
