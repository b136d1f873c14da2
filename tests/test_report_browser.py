"""report in a real browser: Debian's headless Chromium opens the rendered page from disk,
with no console errors, no request leaving the file, both schemes side by side, and the
interactive parts working: hover thumbnails, pinning with similars, bucket filters,
sorting; injected names stay text; a large val set stays bounded."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from playwright.sync_api import sync_playwright

from conftest import ROOT
from stages import report
from test_report import build_pipeline, inflate, render_report, stage_args

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 900}

# CI sets SEGFLOW_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("SEGFLOW_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not REQUIRED,
                       reason=f"{CHROMIUM} not found: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, path: Path) -> tuple:
    """A fresh page on the file, with everything it logs, requests or alerts."""
    events = {"console": [], "errors": [], "requests": [], "dialogs": []}
    page = browser.new_page(viewport=VIEWPORT)
    page.on("console", lambda m: events["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on("request", lambda r: events["requests"].append(r.url))
    # An alert() would mean an escaped name ran as script.
    page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
    page.goto(path.as_uri(), wait_until="load")
    return page, events


def assert_clean(events: dict) -> None:
    assert events["errors"] == [] and events["dialogs"] == []
    assert [m for m in events["console"] if m[0] in ("error", "warning")] == []
    assert [u for u in events["requests"] if not u.startswith(("file:", "data:"))] == []


@pytest.fixture(scope="module")
def opened(tmp_path_factory, browser):
    """The report of the real pipeline outputs, loaded in Chromium."""
    rendered = render_report(tmp_path_factory)
    page, events = open_page(browser, rendered["args"]["out"])
    yield {**rendered, "page": page, "events": events}
    page.close()


def lonely_sample(page, scheme: str, kind: str = "map") -> str:
    """A sample whose point lies at least 12 px from every other point of its map (kind
    "map", or "ood": loss against the OOD score), so that hovering it cannot pick a
    neighbour."""
    return page.evaluate("""([scheme, kind]) => {
        const D = JSON.parse(document.getElementById('segflow-data').textContent);
        const s = D.per_scheme.find(x => x.name === scheme);
        const pts = s.img.map(i => [D.images.stem[i],
                                    segflowReport.point(scheme, D.images.stem[i], kind)]);
        let best = null, bestD = -1;
        for (const [stem, p] of pts) {
            let d = Infinity;
            for (const [other, q] of pts)
                if (other !== stem) d = Math.min(d, Math.hypot(p.x - q.x, p.y - q.y));
            if (d > bestD) { bestD = d; best = stem; }
        }
        return bestD >= 12 ? best : null;
    }""", [scheme, kind])


def point(page, scheme: str, stem: str, kind: str = "map") -> tuple[float, float]:
    panel = ".ood-panel" if kind == "ood" else ".map-panel:not(.ood-panel)"
    page.locator(f'{panel}[data-scheme="{scheme}"] canvas.map').scroll_into_view_if_needed()
    p = page.evaluate("([s, t, k]) => segflowReport.point(s, t, k)", [scheme, stem, kind])
    return p["x"], p["y"]


def expected_neighbours(root: Path, scheme: str, stem: str, k: int) -> list[str]:
    """The sample's k nearest samples as analyze wrote them (neighbours.csv, rank order), read
    here from the file, not from the page's data."""
    samples = pd.read_csv(root / "analysis" / scheme / "samples.csv", dtype={"file_name": str})
    stem_of = {int(i): Path(f).stem for i, f in zip(samples["image_id"], samples["file_name"])}
    [image_id] = [i for i, s in stem_of.items() if s == stem]
    table = pd.read_csv(root / "analysis" / scheme / "neighbours.csv")
    mine = table[table["image_id"] == image_id].sort_values("rank")
    assert 0 < len(mine) <= k
    return [stem_of[int(i)] for i in mine["neighbour_image_id"]]


# ---------------------------------------------------------------- the sample's report

def test_loads_without_errors_or_network(opened):
    page = opened["page"]
    assert_clean(opened["events"])
    assert page.evaluate("document.body.dataset.ready") == "1"
    # Lazy images far below the viewport (the samples table) load only when scrolled to:
    # make every image load now, so that "broken" means an image that does not decode.
    page.evaluate("Promise.all([...document.images].map(i => { i.loading = 'eager'; "
                  "return i.decode().catch(() => null); }))")
    broken = page.evaluate(
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
    assert second["x"] + second["width"] <= VIEWPORT["width"]  # no sideways scrolling
    # the Insights open the page (issue 17), the comparison follows them
    insights = page.locator("section#insights").bounding_box()
    comparison = page.locator("section#comparison").bounding_box()
    assert insights["y"] < VIEWPORT["height"]
    assert insights["y"] + insights["height"] <= comparison["y"] < first["y"]
    assert page.evaluate("document.querySelector('main > section').id") == "insights"
    assert page.evaluate("document.querySelector('main > section + section').id") == "comparison"


def test_comparison_table_has_a_row_per_class(opened):
    page, params = opened["page"], opened["params"]
    classes = list(dict.fromkeys(["background"] + [c for s in params["schemes"].values()
                                                    for c in s["classes"]]))
    rows = page.locator("#comparison-table tr[data-class]")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.class)") == classes
    for i in range(rows.count()):
        assert rows.nth(i).locator("td").count() == len(params["schemes"]) + 1  # + delta
    verdicts = page.locator("#verdicts li").all_inner_texts()
    assert any(v.startswith("person: ") for v in verdicts)


def test_hovering_a_point_shows_its_thumbnail_and_metadata(opened):
    page, scheme = opened["page"], next(iter(opened["params"]["schemes"]))
    stem = lonely_sample(page, scheme)
    assert stem is not None
    x, y = point(page, scheme, stem)
    page.mouse.move(x, y)
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    assert tooltip.get_attribute("data-stem") == stem
    image = tooltip.locator("img.tip-thumb")
    assert image.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert image.evaluate("i => i.complete && i.naturalWidth") > 0
    text = tooltip.inner_text()
    for needed in (stem, "loss", "cluster", "person fraction"):
        assert needed in text
    page.mouse.move(2, 2)
    assert not tooltip.is_visible()


def test_clicking_a_point_pins_it_in_every_map_with_its_similars(opened):
    page, params, root = opened["page"], opened["params"], opened["root"]
    names = list(params["schemes"])
    stem = lonely_sample(page, names[0])
    x, y = point(page, names[0], stem)
    page.mouse.click(x, y)
    k = params["analyze"]["similars"]["k"]
    for name in names:
        panel = page.locator(f'.map-panel[data-scheme="{name}"] .pinned')
        assert panel.count() == 1   # the latent map's panel; the OOD scatter has none
        assert f"Pinned: {stem}" in panel.inner_text()
        shown = panel.locator("button.similar").evaluate_all("bs => bs.map(b => b.dataset.stem)")
        assert shown == expected_neighbours(root, name, stem, k)
        assert len(shown) == min(k, 5)  # 6 val images: the 5 others
        assert panel.locator("button.similar img").count() == len(shown)  # all have thumbnails
    assert page.locator("#unpin").is_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#population").screenshot(path=str(ARTIFACTS / "report-map-pinned.png"))
    # a similar pins in turn; Unpin clears every map
    first = page.locator(f'.map-panel[data-scheme="{names[0]}"] button.similar').first
    target = first.get_attribute("data-stem")
    first.click()
    pinned = page.locator(f'.map-panel[data-scheme="{names[1]}"] .pinned')
    assert f"Pinned: {target}" in pinned.inner_text()
    page.locator("#unpin").click()
    assert page.locator(".pinned button.similar").count() == 0


def test_colour_by_loss_and_metadata_redraws_with_a_legend(opened):
    page = opened["page"]
    select = page.locator("#colour-by")
    options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
    assert {"cluster", "loss", "lq", "dloss", "person_fraction"} <= set(options)
    canvas = page.locator(".map-panel canvas.map").first
    before = canvas.evaluate("c => c.toDataURL()")
    select.select_option("loss")
    assert "loss" in page.locator(".map-panel .legend").first.inner_text()
    assert canvas.evaluate("c => c.toDataURL()") != before
    booleans = page.evaluate("""() => JSON.parse(document.getElementById('segflow-data')
        .textContent).fields.filter(f => f.kind === 'bool').map(f => f.key)""")
    for key in booleans[:1]:  # (6 val images may have no varying yes/no field)
        select.select_option(key)
        assert "yes" in page.locator(".map-panel .legend").first.inner_text()
    select.select_option("dloss")
    assert "lower" in page.locator(".map-panel .legend").first.inner_text()
    select.select_option("cluster")
    assert_clean(opened["events"])


def rows_count(page) -> int:
    return int(page.locator("#samples-count").get_attribute("data-count"))


def test_clicking_a_bucket_filters_the_samples_table(opened):
    page = opened["page"]
    page.locator("#f-reset").click()
    total = rows_count(page)
    assert total == 12  # 6 val images x 2 schemes
    buckets = page.locator("#histograms g.bucket")
    assert buckets.count() > 0
    # a bucket holding some but not all of its scheme's samples (flagged ones first)
    candidates = buckets.evaluate_all(
        "gs => gs.map((g, i) => [i, +g.dataset.count, g.classList.contains('flagged')])")
    index, count, _ = sorted((c for c in candidates if 0 < c[1] < 6),
                             key=lambda c: (not c[2], c[0]))[0]
    bucket = buckets.nth(index)
    scheme, field = bucket.get_attribute("data-scheme"), bucket.get_attribute("data-field")
    bucket.scroll_into_view_if_needed()
    bucket.click()
    assert rows_count(page) == count != total
    assert page.locator("#f-bucket").is_visible()
    assert set(page.locator("#samples-table tbody tr").evaluate_all(
        "rs => rs.map(r => r.dataset.scheme)")) == {scheme}
    assert page.locator(f"#samples-table th[data-key='m:{field}']").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#samples").screenshot(path=str(ARTIFACTS / "report-table-bucket.png"))
    page.locator("#f-bucket-clear").click()
    assert rows_count(page) == total
    # keyboard: a focused bucket filters with Enter too
    bucket.focus()
    page.keyboard.press("Enter")
    assert rows_count(page) == count
    page.locator("#f-reset").click()
    assert rows_count(page) == total


def column(page, key: str) -> list[float]:
    index = page.locator("#samples-table thead th").evaluate_all(
        "ths => ths.map(th => th.dataset.key)").index(key)
    texts = page.locator(f"#samples-table tbody tr td:nth-child({index + 1})").all_inner_texts()
    return [float(t) for t in texts if t != "—"]


def test_sorting_the_samples_table(opened):
    page = opened["page"]
    page.locator("#f-reset").click()
    header = page.locator("#samples-table th[data-key='loss'] button")
    header.click()
    direction = page.locator("#samples-table th[data-key='loss']").get_attribute("aria-sort")
    values = column(page, "loss")
    assert len(values) == 12
    assert values == sorted(values, reverse=direction == "descending")
    page.locator("#samples-table th[data-key='loss'] button").click()
    again = column(page, "loss")
    assert again == sorted(values, reverse=direction != "descending")
    page.locator("#samples-table th[data-key='lq'] button").click()
    quality = column(page, "lq")
    assert quality in (sorted(quality), sorted(quality, reverse=True)) and len(set(quality)) > 1


def test_other_filters_combine(opened):
    page, params = opened["page"], opened["params"]
    page.locator("#f-reset").click()
    page.locator("#f-scheme").select_option(label=next(iter(params["schemes"])))
    assert rows_count(page) == 6
    page.locator("#f-cluster").select_option("0")
    in_cluster = rows_count(page)
    assert 0 < in_cluster < 6
    page.locator("#f-cluster").select_option("all")
    page.locator("#f-field").select_option("person_fraction")
    page.locator("#f-field-min").fill("0.0001")
    with_people = rows_count(page)
    assert with_people < 6
    page.locator("#f-loss-max").fill("-1")
    assert rows_count(page) == 0
    page.locator("#f-reset").click()
    assert rows_count(page) == 12


def stems_of(root: Path, scheme: str) -> dict[int, str]:
    samples = pd.read_csv(root / "analysis" / scheme / "samples.csv", dtype={"file_name": str})
    return {int(i): Path(f).stem for i, f in zip(samples["image_id"], samples["file_name"])}


def shown_rows(page) -> list[tuple[str, str]]:
    return sorted(tuple(r) for r in page.locator("#samples-table tbody tr").evaluate_all(
        "rs => rs.map(r => [r.dataset.stem, r.dataset.scheme])"))


def test_an_insights_link_filters_the_samples_table_to_exactly_its_members(opened):
    """Each finding's link (analyze's per scheme, then compare's) shows exactly the
    finding's val images under its scheme, as insights.json lists them, whatever other
    filter was set; the chip clears it. Expected rows come from the files, not the page."""
    page, params, root = opened["page"], opened["params"], opened["root"]
    page.locator("#f-reset").click()
    total = rows_count(page)
    expected = []   # (scheme, its val images' stems) per link, in the page's order
    for s in params["schemes"]:
        stems = stems_of(root, s)
        for r in json.loads((root / "analysis" / s / "insights.json").read_text()):
            members = sorted((stems[i], s) for i in r["image_ids"] if i in stems)
            if members:
                expected.append((s, members))
    for r in json.loads((root / "compare" / "insights.json").read_text()):
        s = r["evidence"]["scheme"]
        stems = stems_of(root, s)
        members = sorted((stems[i], s) for i in r["image_ids"] if i in stems)
        if members:
            expected.append((s, members))
    # findings past report.insights_shown are collapsed: open them all to click their links
    page.evaluate("document.querySelectorAll('#insights details').forEach(d => d.open = true)")
    links = page.locator("#insights button.js-members")
    assert links.count() == len(expected)
    # a finding that is some but not all of its scheme's images, to tell a filter from none
    assert any(0 < len(members) < total // 2 for _, members in expected)
    for i, (scheme, members) in enumerate(expected):
        page.locator("#f-loss-max").fill("-1")   # a filter showing nothing: the link clears it
        assert rows_count(page) == 0
        link = links.nth(i)
        link.scroll_into_view_if_needed()
        link.click()
        assert rows_count(page) == len(members)
        assert shown_rows(page) == members, (scheme, link.get_attribute("data-label"))
        assert page.locator("#f-members").is_visible()
        assert page.locator("#f-scheme").input_value() == str(list(params["schemes"]).index(
            scheme))
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#samples").screenshot(path=str(ARTIFACTS / "report-table-insight.png"))
    page.locator("#f-members-clear").click()
    assert rows_count(page) == total and not page.locator("#f-members").is_visible()
    # the findings' thumbnails are the inlined ones, and they decode
    thumbs = page.locator("#insights img.js-thumb")
    assert thumbs.count() > 0
    assert thumbs.evaluate_all("is => is.every(i => i.src.startsWith('data:image/jpeg'))")
    assert_clean(opened["events"])


def test_an_insights_link_in_the_collapsed_block_filters_to_its_members(tmp_path_factory,
                                                                        browser):
    """With report.insights_shown 1, a scheme's findings past the first are in a collapsed
    block: opening it shows them, and a link there filters the table as an open one does."""
    pipeline = build_pipeline(tmp_path_factory)
    tmp_path = tmp_path_factory.mktemp("collapsed")
    params = copy.deepcopy(pipeline["params"])
    params["report"]["insights_shown"] = 1
    root = pipeline["root"]
    args = stage_args(root, out=tmp_path / "index.html")
    report.run(params, **args)
    page, events = open_page(browser, args["out"])
    hidden = None   # (scheme, stems) of the first collapsed finding with val images
    for s in params["schemes"]:
        stems = stems_of(root, s)
        members = [sorted((stems[i], s) for i in r["image_ids"] if i in stems) for r in
                   json.loads((root / "analysis" / s / "insights.json").read_text())[1:]]
        if hidden is None and any(members):
            hidden = (s, next(m for m in members if m))
    assert hidden is not None, "the run has a second finding with val images"
    scheme, members = hidden
    block = page.locator(f'#insights ol.findings[data-scheme="{scheme}"] + details.more-findings')
    link = block.locator("button.js-members").first
    assert not link.is_visible()   # collapsed
    block.locator("summary").click()
    assert link.is_visible()
    page.locator("#f-loss-max").fill("-1")
    assert rows_count(page) == 0
    link.click()
    assert rows_count(page) == len(members) and shown_rows(page) == members
    assert_clean(events)
    page.close()


def test_the_ood_scatter_plots_each_samples_loss_against_its_ood_score(opened):
    """Per scheme, loss (up) against analyze's ood_score (across): the sample farther right
    has the higher score, hovering a point shows that sample, with its score."""
    page, params, root = opened["page"], opened["params"], opened["root"]
    for s in params["schemes"]:
        samples = pd.read_csv(root / "analysis" / s / "samples.csv", dtype={"file_name": str})
        stems = [Path(f).stem for f in samples["file_name"]]
        xs = [page.evaluate("([s, t]) => segflowReport.point(s, t, 'ood').x", [s, t])
              for t in stems]
        ys = [page.evaluate("([s, t]) => segflowReport.point(s, t, 'ood').y", [s, t])
              for t in stems]
        order = np.argsort(samples["ood_score"].to_numpy(), kind="stable")
        assert all(np.diff(np.asarray(xs)[order]) >= 0)
        order = np.argsort(samples["loss"].to_numpy(), kind="stable")
        assert all(np.diff(np.asarray(ys)[order]) <= 0)   # canvas y grows downwards
    scheme = next(iter(params["schemes"]))
    stem = lonely_sample(page, scheme, "ood")
    assert stem is not None
    x, y = point(page, scheme, stem, "ood")
    page.mouse.move(x, y)
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    assert tooltip.get_attribute("data-stem") == stem
    assert "out-of-distribution score" in tooltip.inner_text()
    page.mouse.move(2, 2)
    assert not tooltip.is_visible()
    assert_clean(opened["events"])


def test_label_issue_galleries_mark_one_scheme_issues(opened):
    page, params, root = opened["page"], opened["params"], opened["root"]
    compare = pd.read_csv(root / "compare" / "label_issues.csv")
    for s in params["schemes"]:
        figures = page.locator(f'#issues figure.issue[data-scheme="{s}"]')
        issues = pd.read_csv(root / "analysis" / s / "label_issues.csv", dtype={"stem": str})
        assert figures.count() == int(issues["flagged"].sum())
        only = figures.evaluate_all("fs => fs.filter(f => f.dataset.only === '1').length")
        assert only == int((compare["only_in"] == s).sum())


def test_title_is_shown_as_text_and_screenshot_is_saved(opened):
    page = opened["page"]
    assert page.locator("h1").inner_text() == opened["params"]["report"]["title"]
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    page.locator("#f-reset").click()
    page.evaluate("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert_clean(opened["events"])


# ---------------------------------------------------------------- hostile names

PAYLOAD = "</script><script>alert(1)</script>"
FILE_PAYLOAD = "<img src=x onerror=alert(2)>"  # a file name cannot hold "/"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, browser):
    """The same outputs with a COCO category and a file name that are HTML and script."""
    pipeline = build_pipeline(tmp_path_factory)
    src, dest = pipeline["root"], tmp_path_factory.mktemp("hostile")
    import shutil
    for sub in ("data", "models", "predictions", "metrics", "analysis", "compare"):
        shutil.copytree(src / sub, dest / sub, symlinks=True)
    schemes = list(pipeline["params"]["schemes"])
    first = pd.read_csv(dest / "analysis" / schemes[0] / "samples.csv", dtype={"file_name": str})
    victim = Path(first["file_name"].iloc[0]).stem
    new = f"{FILE_PAYLOAD}{victim}"
    images = dest / "data" / "raw" / "images" / "val"
    (images / f"{victim}.jpg").rename(images / f"{new}.jpg")
    for s in schemes:
        for folder in (dest / "data" / "masks" / s / "val",
                       dest / "predictions" / s / "seed0" / "val"):
            (folder / f"{victim}.png").rename(folder / f"{new}.png")
        path = dest / "analysis" / s / "samples.csv"
        samples = pd.read_csv(path, dtype={"file_name": str})
        samples["file_name"] = samples["file_name"].replace(f"{victim}.jpg", f"{new}.jpg")
        samples.to_csv(path, index=False)
        clusters = pd.read_csv(dest / "analysis" / s / "clusters.csv")
        clusters["dominant_categories"] = f"{PAYLOAD} 100% (1.0x)"
        clusters.to_csv(dest / "analysis" / s / "clusters.csv", index=False)
        issues = pd.read_csv(dest / "analysis" / s / "label_issues.csv", dtype={"stem": str})
        hit = issues["stem"] == victim
        issues.loc[hit, "stem"] = new
        for col in ("figure", "region"):
            old = issues.loc[hit, col].dropna()
            for rel in old:
                (dest / "analysis" / s / rel).rename(
                    dest / "analysis" / s / rel.replace(victim, new))
            issues.loc[hit, col] = issues.loc[hit, col].str.replace(victim, new, regex=False)
        issues.to_csv(dest / "analysis" / s / "label_issues.csv", index=False)
        index = pd.read_csv(dest / "analysis" / s / "heatmaps" / "index.csv", dtype={"stem": str})
        hit = index["stem"] == victim
        for rel in index.loc[hit, "file"]:
            (dest / "analysis" / s / rel).rename(dest / "analysis" / s / rel.replace(victim, new))
        index.loc[hit, "file"] = index.loc[hit, "file"].str.replace(victim, new, regex=False)
        index.loc[hit, "stem"] = new
        index.to_csv(dest / "analysis" / s / "heatmaps" / "index.csv", index=False)
    params = copy.deepcopy(pipeline["params"])
    args = stage_args(dest)
    report.run(params, **args)
    html = args["out"].read_text(encoding="utf-8")
    page, events = open_page(browser, args["out"])
    yield {"page": page, "events": events, "html": html, "stem": new, "scheme": schemes[0]}
    page.close()


def test_injected_names_show_as_text_and_never_run(hostile):
    page, html = hostile["page"], hostile["html"]
    assert PAYLOAD not in html and FILE_PAYLOAD not in html
    assert_clean(hostile["events"])
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    cards = page.locator(".ccard .dominant").all_inner_texts()
    assert cards and all(text == f"{PAYLOAD} 100% (1.0x)" for text in cards)
    # the file name, in the JSON blob, reaches the table and the pinned panel as text
    page.locator("#f-text").fill("onerror")
    assert rows_count(page) == 2
    assert hostile["stem"] in page.locator("#samples-table tbody").inner_text()
    page.locator("#samples-table tbody button.link").first.click()
    pinned = page.locator(f'.map-panel[data-scheme="{hostile["scheme"]}"] .pinned')
    assert f"{hostile['stem']}.jpg" in pinned.inner_text()
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    assert_clean(hostile["events"])


# ---------------------------------------------------------------- a large val set

def test_a_large_val_set_opens_cleanly_with_bounded_thumbnails(tmp_path_factory, browser):
    pipeline = build_pipeline(tmp_path_factory)
    params = copy.deepcopy(pipeline["params"])
    params["report"]["max_thumbnails"] = 40
    args = inflate(pipeline, tmp_path_factory.mktemp("large"), 3000)
    report.run(params, **args)
    page, events = open_page(browser, args["out"])
    try:
        assert_clean(events)
        counts = page.evaluate("""() => {
            const D = JSON.parse(document.getElementById('segflow-data').textContent);
            return [D.thumbs.length, D.images.stem.length,
                    document.querySelectorAll('img[src^="data:"]').length];
        }""")
        assert counts[:2] == [40, 3006]
        assert rows_count(page) == 2 * 3006
        assert page.locator("#samples-table tbody tr").count() == 25  # one page
        page.locator("#page-next").click()
        assert "page 2 of" in page.locator("#page-info").inner_text()
        # a point without a thumbnail says so on hover
        stem = page.evaluate("""() => {
            const D = JSON.parse(document.getElementById('segflow-data').textContent);
            return D.images.stem[D.images.thumb.indexOf(-1)];
        }""")
        scheme = next(iter(params["schemes"]))
        x, y = point(page, scheme, stem)
        page.mouse.move(x, y)
        page.locator("#tooltip").wait_for(state="visible")
        hovered = page.locator("#tooltip").get_attribute("data-stem")
        has_thumb = page.evaluate("""(s) => {
            const D = JSON.parse(document.getElementById('segflow-data').textContent);
            return D.images.thumb[D.images.stem.indexOf(s)] >= 0; }""", hovered)
        tip = page.locator("#tooltip")
        assert (tip.locator("img").count() == 1) == has_thumb
        if not has_thumb:
            assert "no thumbnail" in tip.inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#population").screenshot(path=str(ARTIFACTS / "report-large-map.png"))
        assert_clean(events)
    finally:
        page.close()
