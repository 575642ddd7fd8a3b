"""The documentation site: it builds strictly, the guides' examples run, and it renders.

- ``mkdocs build --strict`` (mkdocs.yml: Material, mkdocstrings) into a temporary folder: a
  broken link, a missing page, an unresolved reference or any warning fails it.
- Every fenced ``python`` block of ``docs/guides/*.md`` runs, the blocks of one page in order in
  one namespace, in a fresh working folder (small n, CPU, Fashion-MNIST found by robustlab as
  usual). A block titled ``python title="net.py"`` is written to that file instead of run.
  ``py`` blocks are shown only (they need a trained checkpoint or a process group).
- Headless Chromium opens the built home page and the ``rl.evaluate`` reference page over a
  local HTTP server and checks they render: the search box is there, the content is not blank
  (pixel spread of a screenshot). The screenshots are kept in ``$ROBUSTLAB_DOCS_SHOTS`` (default:
  the test's temporary folder).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from test_report_browser import CHROMIUM, DRIVER, _browser

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
FENCE = re.compile(r"^```python(?P<attrs>[^\n]*)\n(?P<code>.*?)^```\s*$", re.M | re.S)
TITLE = re.compile(r'title="([^"]+)"')

try:
    import mkdocs  # noqa: F401
    import mkdocstrings  # noqa: F401
except ImportError:
    MKDOCS = False
else:
    MKDOCS = True
needs_mkdocs = pytest.mark.skipif(
    not MKDOCS,
    reason="mkdocs / mkdocstrings not installed: they are in the dev extras "
    "(pip install -e '.[dev]', or `make install`)",
)


def blocks(page: Path) -> list[tuple[str | None, str]]:
    """The fenced ``python`` blocks of ``page`` in order: (file title or None, code)."""
    out = []
    for m in FENCE.finditer(page.read_text()):
        title = TITLE.search(m["attrs"])
        out.append((title.group(1) if title else None, m["code"]))
    return out


def test_block_extraction_reads_titles_and_skips_other_languages(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        '```python title="net.py"\nA = 1\n```\n\n```py\nnot run\n```\n\n```python\nB = 2\n```\n'
    )
    assert blocks(page) == [("net.py", "A = 1\n"), (None, "B = 2\n")]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not MKDOCS:
        pytest.skip("mkdocs / mkdocstrings not installed: they are in the dev extras")
    out = tmp_path_factory.mktemp("site")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@needs_mkdocs
def test_site_builds_strictly_with_every_page(site):
    for page in ("index.html", "getting-started.html", "benchmarks.html"):
        assert (site / page).is_file(), page
    for guide in GUIDES:
        assert (site / "guides" / f"{guide.stem}.html").is_file(), guide.name
    reference = (site / "reference/evaluate.html").read_text()
    assert (
        'id="robustlab.evaluate"' in reference
        and 'id="robustlab.ThreatModel"' in (site / "reference/threat.html").read_text()
    )
    # the benchmarks page includes BENCHMARKS.md as it stands, not a copy
    first = (ROOT / "BENCHMARKS.md").read_text().splitlines()[0].lstrip("# ").strip()
    assert first in (site / "benchmarks.html").read_text()


@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_examples_run(page, tmp_path, monkeypatch):
    code = blocks(page)
    runnable = [c for title, c in code if title is None]
    if not runnable:
        pytest.skip(f"{page.name} has no runnable python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for k, (title, source) in enumerate(code):
        if title is not None:
            (tmp_path / title).write_text(source)
            continue
        try:
            exec(compile(source, f"{page.name}[block {k}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, python block {k} failed:\n{source}") from e


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@needs_mkdocs
@pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium not installed: `make test` installs the Debian packages chromium "
    "and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_site_renders_in_chromium(site, tmp_path):
    from PIL import Image, ImageStat

    shots = Path(os.environ.get("ROBUSTLAB_DOCS_SHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    driver = _browser(dark=False)
    try:
        driver.set_page_load_timeout(60)
        for name, path, anchor in (
            ("home", "/index.html", "robustlab"),
            ("evaluate", "/reference/evaluate.html", "robustlab.evaluate"),
        ):
            driver.get(base + path)
            assert driver.execute_script(
                "return !!document.querySelector('input.md-search__input')"
            ), f"{path}: no search box"
            height = driver.execute_script(
                "const e = document.getElementById(arguments[0]);"
                "return e ? e.getBoundingClientRect().height : 0",
                anchor,
            )
            assert height > 10, f"{path}: the heading #{anchor} is missing or not rendered"
            shot = shots / f"docs_{name}.png"
            assert driver.save_screenshot(str(shot))
            with Image.open(shot) as im:
                spread = ImageStat.Stat(im.convert("L")).stddev[0]
            assert spread > 10, f"{shot}: a blank page (pixel standard deviation {spread:.1f})"
    finally:
        driver.quit()
        server.shutdown()
