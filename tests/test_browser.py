"""End to end in a real browser: `streamlit run` on the tiny demo, driven by Playwright + Debian chromium."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_models import tiny_demo

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                                                               "(`apt-get install chromium`; CI installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not become healthy at {url}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    manifest = tiny_demo(tmp_path_factory.mktemp("browser"))
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--", "--manifest", str(manifest)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _launch(p):  # noqa: ANN001, ANN202
    """Debian's chromium, headless, with no background networking (this machine reaches no other host)."""
    return p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   "--disable-component-update", "--disable-sync", "--no-first-run"])


def _open(browser, server: str, height: int = 1400):  # noqa: ANN001, ANN202
    """A new page on the dashboard, with the long timeouts a CPU-served model needs."""
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    page = browser.new_page(viewport={"width": 1500, "height": height})
    page.set_default_timeout(60_000)
    page.goto(server)
    return page


def _style_mean(page) -> str:
    caption = page.get_by_text(re.compile(r"style α \(mean\) = \d\.\d\d")).first
    return re.search(r"style α \(mean\) = (\d\.\d\d)", caption.inner_text()).group(1)


def test_generate_override_and_apply_in_browser(server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _open(browser, server, height=1700)
            page.get_by_role("textbox", name="Instruction", exact=True).fill(
                "List the vital signs. Flag each as low, normal or high. Use bullet points.")
            page.get_by_role("textbox", name="Input (optional clinical note)").fill(
                "72 yo M with shortness of breath.\nVitals: HR 135, SpO2 88.\nLabs: Na 128, K 4.1.")
            page.get_by_test_id("stExpander").filter(has_text="Generation settings").locator("summary").click()
            tokens = page.get_by_label("Max new tokens")
            tokens.fill("8")
            tokens.press("Tab")
            page.get_by_role("button", name="Generate").click()

            expect(page.get_by_text(re.compile(r"\d+ tokens in [\d.]+ s"))).to_be_visible()
            expect(page.locator(".js-plotly-plot").nth(1)).to_be_visible()  # the group and expert heatmaps (+ other tabs')
            before = _style_mean(page)

            slider = page.get_by_test_id("stSlider").filter(has_text="α style").get_by_role("slider")
            slider.focus()
            slider.press("Home")  # → 0.00: the only moved slider, so the only fixed override
            page.get_by_role("button", name="Apply").click()
            expect(page.get_by_text("style α (mean) = 0.00")).to_be_visible()
            assert before != "0.00", "the router already gave style 0; the test would not show a change"
            expect(page.get_by_text(re.compile(r"In effect: style α=0\.00"))).to_be_visible()
            assert "preset=" in page.url  # the link carries the preset
            page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # A long generation can be stopped; the partial answer and its routing are kept.
            tokens.fill("380")  # the most the tiny model's 512-token context leaves after this 123-token prompt
            tokens.press("Tab")
            page.get_by_role("button", name="Generate").click()
            time.sleep(0.8)
            page.get_by_role("button", name="Stop generating").click()
            expect(page.get_by_text(re.compile(r"finished: stopped"))).to_be_visible()
        finally:
            browser.close()


def _group_heatmap(page) -> list[list[float]]:
    """The group heatmap's values as plotly drew them (its full data: typed arrays decoded)."""
    from playwright.sync_api import expect

    plot = page.locator(".st-key-group_heatmap .js-plotly-plot")
    expect(plot).to_have_count(1)        # a rerun shows the previous run's chart until it has drawn the new one
    expect(plot).to_be_visible()
    return plot.evaluate("el => Array.from(el._fullData[0].z, row => Array.from(row))")


def test_a_copied_link_opens_the_same_heatmap_in_a_fresh_browser(server):
    """Issue 23 §5: the page's URL after Route only + Apply, opened in a fresh context (no cookies, no session), and
    embedded (`embed=true`: no sidebar, no form), shows the same heatmap values."""
    import numpy as np
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _open(browser, server)
            page.get_by_role("textbox", name="Instruction", exact=True).fill(
                "Summarise the labs in one sentence. Keep it formal.")
            page.get_by_role("textbox", name="Input (optional clinical note)").fill("Na 128, K 4.1, Hb 9.2.")
            page.get_by_role("button", name="Route only").click()
            _group_heatmap(page)
            slider = page.get_by_test_id("stSlider").filter(has_text="α style").get_by_role("slider")
            slider.focus()
            slider.press("Home")
            page.get_by_role("button", name="Apply").click()
            expect(page.get_by_text("style α (mean) = 0.00")).to_be_visible()
            page.wait_for_url(re.compile(r".*preset="))
            link, shown = page.url, _group_heatmap(page)
            assert "q=" in link and "note=" in link

            fresh = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            fresh.set_default_timeout(60_000)
            fresh.goto(link)
            expect(fresh.get_by_text("style α (mean) = 0.00")).to_be_visible()
            np.testing.assert_allclose(_group_heatmap(fresh), shown, atol=1e-6)

            fresh.goto(link + "&embed=true")
            np.testing.assert_allclose(_group_heatmap(fresh), shown, atol=1e-6)
            expect(fresh.get_by_role("textbox", name="Instruction", exact=True)).to_have_count(0)
            expect(fresh.get_by_test_id("stSidebar")).to_have_count(0)
            expect(fresh.get_by_test_id("stSlider")).to_have_count(0)
        finally:
            browser.close()


def test_the_dashboard_papercuts_are_gone_in_a_real_browser(server):
    """Issue 23 §6, as a user meets them in Chromium: an old answer is marked once Route only moved the routing on;
    Export shows the page's full link; the Experts tab's router card is not cut; per-token labels are readable and
    the caption names only what is drawn. (Compare's line breaks need an answer with several lines, which the tiny
    model does not write on demand: tests/test_app_papercuts.py checks them on a given answer.)"""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = _open(browser, server)
            page.get_by_role("textbox", name="Instruction", exact=True).fill("List the vital signs. Use bullets.")
            page.get_by_role("textbox", name="Input (optional clinical note)").fill("HR 135, SpO2 88.")
            page.get_by_test_id("stExpander").filter(has_text="Generation settings").locator("summary").click()
            tokens = page.get_by_label("Max new tokens")
            tokens.fill("12")
            tokens.press("Tab")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text(re.compile(r"\d+ tokens in [\d.]+ s .* fast decode"))).to_be_visible()
            expect(page.get_by_text("Earlier answer")).to_have_count(0)

            # An answer left on screen after Route only says it belongs to the earlier instruction.
            page.get_by_role("textbox", name="Instruction", exact=True).fill("Summarise the labs in one line.")
            page.get_by_role("button", name="Route only").click()
            expect(page.get_by_text("Earlier answer").first).to_be_visible()

            # Export shows the full link: instruction and note, not only a preset.
            page.get_by_role("tab", name="Export & presets").click()
            link = page.locator("code").filter(has_text="q=").first
            expect(link).to_be_visible()
            assert "note=" in link.inner_text() and link.inner_text().startswith("http")

            # The router card of the Experts tab is shown whole, not cut to an ellipsis.
            page.get_by_role("tab", name="Experts").click()
            card = page.get_by_text(re.compile(r"(softmax|sigmoid|flat) · (un)?trained")).first
            expect(card).to_be_visible()
            assert card.evaluate("e => e.scrollWidth <= e.clientWidth + 1")

            # Per token: readable labels, and no dashed line promised while answer tokens only are shown.
            page.get_by_role("tab", name="Prompt & routing").click()
            page.get_by_role("textbox", name="Instruction", exact=True).fill("List the vital signs. Use bullets.")
            radio = page.get_by_test_id("stRadio").filter(has_text="Routing granularity")
            if not radio.is_visible():
                page.get_by_test_id("stExpander").filter(has_text="Generation settings").locator("summary").click()
            radio.get_by_text("token", exact=True).click()
            expect(radio.get_by_role("radio", name="token")).to_be_checked()
            page.get_by_role("button", name="Generate").click()
            # token routing decodes row by row, never merged: this caption is the new answer's, not the first one's
            expect(page.get_by_text(re.compile(r"\d+ tokens in [\d.]+ s .* fused experts"))).to_be_visible()
            page.get_by_role("tab", name="Per token").click()
            plot = page.locator(".js-plotly-plot:visible").first
            expect(plot).to_be_visible()
            assert plot.evaluate("el => el._fullLayout.xaxis.tickfont.size") >= 14
            caption = page.get_by_text(re.compile("Hover the heatmap")).first
            assert "dashed" not in caption.inner_text()
        finally:
            browser.close()
