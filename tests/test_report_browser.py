"""The report in a real browser: headless Chromium opens the file from disk, every plot and image
renders with a non-zero size, nothing is fetched from anywhere, and a screenshot is taken in the
light and the dark theme.

Chromium and ChromeDriver are the Debian packages ``chromium`` and ``chromium-driver``;
``make test`` installs them when absent. Without them (no apt), the test is skipped and says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from robustlab.report.html import write_report

RUNS = Path(__file__).parent / "fixtures" / "report_runs"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium not installed: `make test` installs the Debian packages chromium "
    "and chromium-driver (apt-get install chromium chromium-driver)",
)

RENDERED = """
return [...document.querySelectorAll('svg.plot, img')].map(e => {
  const r = e.getBoundingClientRect();
  return {tag: e.tagName.toLowerCase(), label: e.getAttribute('aria-label') || e.alt,
          width: r.width, height: r.height,
          natural: e.tagName === 'IMG' ? [e.complete, e.naturalWidth, e.naturalHeight] : null};
});
"""


def _browser(dark: bool):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
    ):
        opts.add_argument(arg)
    if dark:
        opts.add_argument("--blink-settings=preferredColorScheme=0")  # 0: dark, 1: light
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_report_renders_in_chromium(tmp_path, theme):
    page = write_report([RUNS / "pgd-at", RUNS / "natural"], tmp_path / "report.html")
    driver = _browser(dark=theme == "dark")
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.resolve().as_uri())
        assert driver.title.startswith("robustlab report")
        shown = driver.execute_script(RENDERED)
        plots = [e for e in shown if e["tag"] == "svg"]
        images = [e for e in shown if e["tag"] == "img"]
        assert len(plots) >= 6 and len(images) >= 6
        for e in shown:
            assert e["width"] > 10 and e["height"] > 10, e
        for e in images:
            done, w, h = e["natural"]
            assert done and w > 0 and h > 0, e
        fetched = driver.execute_script(
            "return performance.getEntriesByType('resource').map(r => r.name)"
        )
        assert fetched == []
        dark = driver.execute_script("return matchMedia('(prefers-color-scheme: dark)').matches")
        assert dark == (theme == "dark")
        # the plots' text takes the page's colour: light text on the dark theme
        color = driver.execute_script(
            "return getComputedStyle(document.querySelector('svg.plot')).color"
        )
        rgb = [int(v) for v in color[color.index("(") + 1 : color.index(")")].split(",")[:3]]
        assert (sum(rgb) > 450) == (theme == "dark"), color
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(height + 100, 12000))
        shot = tmp_path / f"report-{theme}.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
