"""The report in real headless Chromium (Debian's ``chromium`` driven by Playwright).

Loads the file from a ``file://`` URL and checks: no console error, no page error, no failed
request, every image decodes, the findings section names the units killed in the model, and a
module named ``<script>alert(1)</script>`` runs nothing. At 800 px wide: the training curve and
the interventions are shown, every finding's link lands on its site's figure, nothing scrolls
sideways. Full-page screenshots are kept at ``test-artifacts/report.png`` and
``test-artifacts/report-800px.png``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reports.conftest import KILLED, XSS_SITE, TrainedRun

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("RELU_DOCTOR_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/test installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page with every console message, page error, failed request and dialog recorded."""

    def __init__(self, browser: Any, width: int = 1366, height: int = 768) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", self._dialog)

    def _dialog(self, d: Any) -> None:
        self.dialogs.append(d.message)
        d.dismiss()

    def open(self, path: Path) -> Any:
        self.page.goto(path.resolve().as_uri(), wait_until="load")
        self.page.wait_for_timeout(300)  # let late errors or dialogs surface
        return self.page


def test_report_loads_cleanly_and_names_dead_units(browser: Any, dead_run: TrainedRun) -> None:
    p = Page(browser)
    page = p.open(dead_run.report)
    assert [m for m in p.console if m[0] in ("error", "warning")] == []
    assert p.errors == [] and p.failed == []
    assert all(u.startswith(("file://", "data:")) for u in p.requests), p.requests
    images = page.evaluate(
        "Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, "
        "done: i.complete, alt: i.alt}))"
    )
    assert len(images) >= 4
    for img in images:
        assert img["done"] and img["w"] > 0 and img["h"] > 0, img
    findings = page.locator("#rd-findings")
    for site, units in KILLED.items():
        card = findings.locator("article.rd-finding", has=page.locator(f"code.rd-site:text-is('{site}')")).filter(
            has_text="dead units"
        ).first
        listed = card.locator(".rd-unit-list").inner_text()
        assert set(units) <= {int(u) for u in listed.split(",")}, (site, listed)
    # the verdict is the first thing on screen
    box = page.locator("#rd-verdict").bounding_box()
    assert box is not None and box["y"] < 768
    # no horizontal scrolling on a laptop-sized window
    assert page.evaluate("document.documentElement.scrollWidth") <= 1366
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    p.page.close()


def test_module_name_with_html_is_escaped_and_runs_nothing(browser: Any, xss_run: TrainedRun) -> None:
    p = Page(browser)
    page = p.open(xss_run.report)
    assert p.dialogs == []
    assert p.errors == [] and p.failed == []
    assert [m for m in p.console if m[0] == "error"] == []
    # the name is shown as text, in the findings and in the table
    assert page.locator(f"#rd-sites code:text-is('{XSS_SITE}')").count() == 1
    assert page.locator(f"#rd-findings code.rd-site:text-is('{XSS_SITE}')").count() >= 1
    # no element came from it: the only script is the inert JSON block, no stray <img>
    scripts = page.evaluate("Array.from(document.scripts).map(s => s.type)")
    assert scripts == ["application/json"]
    assert page.evaluate("Array.from(document.images).every(i => i.src.startsWith('data:image/png'))")
    data = page.evaluate("JSON.parse(document.getElementById('relu-doctor-data').textContent)")
    assert XSS_SITE in [s["site"] for s in data["sites"]]
    p.page.close()


def test_at_800px_curve_interventions_and_finding_links(browser: Any, treated_run: TrainedRun) -> None:
    p = Page(browser, width=800, height=900)
    page = p.open(treated_run.report)
    assert p.errors == [] and p.failed == []
    assert [m for m in p.console if m[0] in ("error", "warning")] == []
    # the training curve: a decoded figure, not the "nothing recorded" note
    curve = page.locator("#rd-training img")
    assert curve.count() == 1
    assert page.evaluate("(() => { const i = document.querySelector('#rd-training img'); "
                         "return i.complete && i.naturalWidth > 0; })()")
    data = page.evaluate("JSON.parse(document.getElementById('relu-doctor-data').textContent)")
    assert data["metrics"] == ["loss", "lr"]
    # the intervention: its row, numbered like its line on the charts, judged on its target
    rows = page.locator("#rd-interventions tbody tr")
    assert rows.count() == 1
    cells = [c.strip() for c in rows.first.locator("td").all_inner_texts()]
    assert cells[:4] == ["1", "12", "lr_rescue", "model"]
    assert "dead" in cells[5] and "→" in cells[5] and "not yet measured" not in cells[5]
    # every finding links to its site's figure, and following the link shows it
    cards = page.locator("#rd-findings article.rd-finding")
    assert cards.count() >= len(KILLED)
    for i in range(cards.count()):
        card = cards.nth(i)
        site = card.locator("code.rd-site").first.inner_text()
        link = card.locator("a.rd-link")
        href = link.get_attribute("href")
        assert href is not None and href.startswith("#"), (site, href)
        target = page.locator(href)
        assert target.count() == 1, (site, href)
        if site in KILLED:  # a drawn site: the link lands on its heatmap
            assert target.evaluate("e => e.tagName") == "FIGURE"
            assert target.locator("figcaption code").first.inner_text() == site
        link.click()
        page.wait_for_timeout(100)
        box = target.bounding_box()
        assert box is not None and -1 <= box["y"] < 900, (site, box)  # scrolled to it
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "report-800px.png"), full_page=True)
    p.page.close()


def test_at_800px_the_sites_table_fits_with_long_site_names(browser: Any, tmp_path: Path) -> None:
    """Deep models' site names (``mobilenet_v2.layer.13.conv_3x3.activation``) kept the
    sites table wider than its box at 800 px (856 px in 734), hiding the gradient columns
    until it was scrolled sideways: a long name now breaks anywhere in its cell."""
    from relu_doctor.reports import write_report
    from tests.reports.conftest import long_named_run

    long_named_run(tmp_path / "r")
    write_report(tmp_path / "r", tmp_path / "r.html")
    p = Page(browser, width=800, height=900)
    page = p.open(tmp_path / "r.html")
    client, scroll = page.evaluate("(() => { const w = document.querySelector("
                                   "'#rd-sites .rd-table-wrap'); "
                                   "return [w.clientWidth, w.scrollWidth]; })()")
    assert scroll <= client, (scroll, client)
