"""bench leaderboard --html: a self-contained static site. Every link and image resolves to a file in
the site, no page names an outside address, and in a real headless browser (Debian's chromium driven
by Playwright, no browser download) the pages load, a header click reorders the rows, and no request
leaves the site."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from bench import records
from bench.grid import Grid
from bench.site import build_site

CHROMIUM = "/usr/bin/chromium"
GRID = Grid(name="demo", title="a demo grid", cells=tuple({"defense": d, "target": "insertion"}
                                                        for d in ("disp", "pruning", "oracle-filter", "fine-pruning")))
# (row, defense of the cell, seed) -> insertion CP; lavida-free, one model: rows are the table's rows
CP = {("backdoored", "disp", 0): 60.0, ("backdoored", "disp", 1): 64.0, ("clean", "disp", 0): 70.0,
      ("disp", "disp", 0): 50.0, ("disp", "disp", 1): 54.0, ("oracle-filter", "oracle-filter", 0): 66.0,
      ("fine-pruning", "fine-pruning", 0): 40.0}


def make_results(tmp_path) -> Path:
    """Records of the demo grid (pruning never computed), with outputs files and one figure."""
    res = tmp_path / "results"
    for (row, defense, seed), cp in CP.items():
        spec = {"model": "llada-v", "attack": "badnets", "target": "insertion", "defense": defense, "seed": seed,
                "poison_rate": 0.2}
        rel = records.write_outputs(res, f"run{seed}-{defense}-{row}", [
            {"id": "t0", "triggered": True, "prompt": "describe <b>it</b>", "output": "a cat & a dog",
             "verdicts": {"asr": True}},
            {"id": "t0", "triggered": False, "prompt": "describe it", "output": "a cat", "verdicts": {"asr": False}}])
        records.append(res, {"row": row, "spec": spec, "code_revision": "abc1234567", "outputs": str(rel),
                             "uses_oracle": row == "oracle-filter",
                             "defender_data": {"clean_slice": 64 if row == "fine-pruning" else 0},
                             "metrics": {"cp": {"value": cp, "ci": [cp - 5, cp + 5]}, "asr_wo": {"value": 0.0},
                                         "asr_wt": {"value": 100.0 - cp}}})
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(res / "demo.png")
    return res


def local_targets(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    refs = re.findall(r'(?:href|src)="([^"]+)"', text)
    return [(ref, (page.parent / unquote(ref.split("#")[0])).resolve()) for ref in refs]


def test_site_is_self_contained_and_every_link_resolves(tmp_path):
    res = make_results(tmp_path)
    pages = build_site(records.load(res), [GRID], tmp_path / "site", res, [res / "demo.png"])
    site = tmp_path / "site"
    assert {p.name for p in pages} >= {"index.html", "grid-demo.html"} and len(list(site.glob("cells/*.html"))) == 4
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text), page      # nothing outside the site
        assert "Content-Security-Policy" in text and "<script src" not in text
        for ref, target in local_targets(page):
            assert target.is_file() and site.resolve() in target.parents, (page.name, ref)
    grid = (site / "grid-demo.html").read_text()
    assert "62.00 ± 25.41" in grid                      # Backdoored CP: two seeds, mean and t-interval
    assert grid.count('class="badge oracle"') == 2 and grid.count('class="badge clean-data"') == 2   # legend + row
    assert re.search(r"<td>Pruning</td>(<td><span class=\"missing\">-</span></td>){3}", grid)   # missing, not zero
    cell = next(p for p in site.glob("cells/*.html") if "oracle-filter · poison" in p.read_text())
    assert "describe &lt;b&gt;it&lt;/b&gt;" in cell.read_text()          # outputs are text, never markup


def _browser():
    sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install --no-install-recommends chromium; .ci/run does)")
    return sync


def test_site_in_a_headless_browser_sorts_and_stays_offline(tmp_path):
    sync = _browser()
    res = make_results(tmp_path)
    build_site(records.load(res), [GRID], tmp_path / "site", res, [res / "demo.png"])
    site = (tmp_path / "site").resolve()
    outside, errors, seen = [], [], []
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: seen.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            def guard(route):
                url = urlparse(route.request.url)
                if url.scheme == "file" and (site == Path(unquote(url.path)) or site in Path(unquote(url.path)).parents):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()
            page.route("**/*", guard)
            page.goto((site / "index.html").as_uri())
            assert page.title() == "vl-backdoor-bench leaderboards"
            assert page.evaluate("document.querySelector('figure img').naturalWidth") > 0   # the figure loaded
            page.click("a[href='grid-demo.html']")
            assert page.url.endswith("grid-demo.html")
            col = page.evaluate("Array.from(document.querySelectorAll('thead th')).findIndex(t => t.textContent === 'insertion CP')")
            rows = lambda: page.evaluate(f"Array.from(document.querySelectorAll('tbody tr')).map(r => [r.cells[0].textContent, r.cells[{col}].textContent])")
            before = rows()
            page.click("thead th >> text='insertion CP'")
            asc = rows()
            assert asc != before
            assert [r[1] for r in asc] == ["40.00", "52.00 ± 25.41", "62.00 ± 25.41", "66.00", "70.00", "-"]
            assert asc[0][0].startswith("Fine-pruning") and "clean data" in asc[0][0]
            page.click("thead th >> text='insertion CP'")
            assert [r[1] for r in rows()] == ["70.00", "66.00", "62.00 ± 25.41", "52.00 ± 25.41", "40.00", "-"]
            page.click("tbody tr >> nth=0 >> a")                                # a cell page, then its outputs
            assert "/cells/" in page.url and page.locator("h1").inner_text().startswith("llada-v · badnets")
            hrefs = page.evaluate("Array.from(document.links).map(a => a.href)")
            for href in hrefs:
                path = Path(unquote(urlparse(href).path))
                assert path.is_file() and site in path.parents, href
        finally:
            browser.close()
    assert outside == [] and errors == []
    assert seen and all(urlparse(u).scheme == "file" and site in Path(unquote(urlparse(u).path)).parents for u in seen), seen
