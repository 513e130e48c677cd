"""The study report: one offline HTML file (tables, inline SVG plots, recipes, machine, versions)
and the ledger as CSV, written by `squeeze report`."""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser

from conftest import ROOT
from core.jobs.client import run_inline
from core.jobs.spec import JobSpec


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.external, self.circles, self.text = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.circles += tag == "circle"
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith(("#", "data:")):
                self.external.append(v)  # anything a browser would have to fetch

    def handle_data(self, data):
        self.text.append(data)


def write_study(tiny_model, tiny_eval, out):
    """A baseline and an rtn 4-bit run in the ledger, then `squeeze report out`."""
    for steps in ([], [{"technique": "rtn", "bits": 4, "group_size": 32}]):
        assert run_inline(JobSpec(model=tiny_model, recipe={"steps": steps}, eval=tiny_eval)).outcome == "done"
    r = subprocess.run([sys.executable, "-m", "core.cli", "report", str(out)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out


def test_the_report_is_one_offline_page_with_tables_plots_and_recipes(tiny_model, tiny_eval, home, tmp_path):
    out = write_study(tiny_model, tiny_eval, tmp_path / "study.html")
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert page.external == [] and "script" not in page.tags  # nothing to fetch, nothing to run
    assert page.tags.count("svg") == 2 and page.circles == 2 * 2  # 2 runs on both plots
    assert "rtn bits=4 group_size=32 symmetric" in text and "technique: rtn" in text  # the recipe as YAML
    assert "baseline" in text and "torch" in text and "cores" in text  # table, versions, machine
    csv_out = tmp_path / "runs.csv"
    assert subprocess.run([sys.executable, "-m", "core.cli", "report", str(csv_out)], cwd=ROOT,
                          capture_output=True).returncode == 0
    rows = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"baseline", "rtn bits=4 group_size=32 symmetric"}
    assert all(float(r["ppl"]) > 1 for r in rows)


def test_a_report_with_an_unknown_extension_or_no_runs_is_one_clear_line(home, tmp_path):
    r = subprocess.run([sys.executable, "-m", "core.cli", "report", str(tmp_path / "x.html")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0 and "no runs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.html").exists()


def test_the_report_renders_in_headless_chromium_offline_with_no_failed_requests(tiny_model, tiny_eval, home,
                                                                                   tmp_path):
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (apt install chromium; ./studio test does this as root)"
    out = write_study(tiny_model, tiny_eval, tmp_path / "study.html")
    url = out.resolve().as_uri()
    requests, failed, errors = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_context(offline=True, viewport={"width": 1280, "height": 900}).new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url, wait_until="load")
            # the results table as a reader sees it: a header and one row per run
            rows = page.locator("table").first.locator("tr")
            assert rows.count() == 3 and "baseline" in rows.nth(2).inner_text() + rows.nth(1).inner_text()
            # both trade-off plots laid out at full size, with a visible dot per run
            plots = page.locator("svg")
            assert plots.count() == 2
            for k in range(2):
                box = plots.nth(k).bounding_box()
                assert box and box["width"] >= 600 and box["height"] >= 350
                assert plots.nth(k).locator("circle").count() == 2
                assert plots.nth(k).locator("circle").first.is_visible()
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    assert requests == [url], f"the page asked for more than itself: {requests}"
    assert failed == [] and errors == []
    assert len(shot) > 20_000  # a rendered page, not a blank one
