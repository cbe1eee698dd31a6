"""The interactive review.html: self-contained, and driven in headless Chromium through rename, merge, drop, save.

The browser tests skip when Chromium, chromedriver or selenium is missing (CI installs them: see .ci/run).
Set HISTOSYNTH_REVIEW_SCREENSHOTS=docs/img to rewrite the screenshots of docs/review.md from the same run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app

runner = CliRunner()
K = 4
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,800", "--hide-scrollbars")


@pytest.fixture(scope="module")
def clustered(pcam_tiles: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`histosynth cluster` (k-means, K = 4) on the tiles' RGB averaged to 8x8, as in test_review.py."""
    cache = tmp_path_factory.mktemp("cache")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
              for p in pcam_tiles]
    np.save(cache / "latents.npy", np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0)
    with open(cache / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile"])
        w.writerows([[p.name] for p in pcam_tiles])
    out = tmp_path_factory.mktemp("clusters")
    r = runner.invoke(app, ["cluster", "--latents", str(cache), "--tiles", str(pcam_tiles[0].parent),
                            "--out", str(out), "--k-min", str(K), "--k-max", str(K), "--method", "kmeans",
                            "--no-kmeans-baseline", "--seeds", "0", "--max-points", "200"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def review_dir(clustered: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("review")
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(clustered), "--out", str(out), "--labels",
                            str(shared_data / "pcam" / "train_labels.csv"), "--n-centre", "8", "--n-random", "8"])
    assert r.exit_code == 0, r.output
    return out


def page_data(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page, re.S)
    assert match, "review.html has no embedded review data"
    return json.loads(match.group(1))


def sizes_of(clustered: Path) -> list[int]:
    with open(clustered / "assignments.csv", newline="") as f:
        clusters = [int(r["cluster"]) for r in csv.DictReader(f)]
    return [clusters.count(c) for c in range(K)]


def test_page_is_self_contained(review_dir: Path, clustered: Path) -> None:
    page = (review_dir / "review.html").read_text(encoding="utf-8")
    # No server, no network: every src/href is a data URI, a fragment or the Blob link the script sets.
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert not re.search(r"https?://|<link\b|@import|\bfetch\(|XMLHttpRequest", page)
    assert page.count("data:image/png;base64,") == K
    data = page_data(page)
    assert data["k"] == K and data["total"] == 48 and data["values"] == ["0", "1"]
    assert Path(data["labels_path"]).is_absolute() and data["labels_path"].endswith("train_labels.csv")
    assert [c["size"] for c in data["clusters"]] == sizes_of(clustered)
    assert sum(sum(c["counts"].values()) for c in data["clusters"]) == 48  # every PCam tile is labelled
    assert data["initial"] == {"names": [f"cluster_{c}" for c in range(K)], "exclude": [False] * K,
                               "label": [None] * K, "merges": [], "moves": [], "split": [None] * K,
                               "value_names": {}}
    for c in range(K):  # real form controls with labels, so screen readers and the keyboard reach them
        for control in (f"name-{c}", f"drop-{c}", f"select-{c}"):
            assert f'id="{control}"' in page and f'for="{control}"' in page


def test_page_starts_from_existing_edits(review_dir: Path, clustered: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    out.mkdir()
    tile = next(csv.DictReader(open(clustered / "assignments.csv", newline="")))
    (out / "clusters.yaml").write_text(yaml.safe_dump({
        "clusters": {c: {"name": "tumour" if c < 2 else f"cluster_{c}", "exclude": c == 3} for c in range(K)},
        "merges": [[1, 0]], "moves": [{"tile": tile["tile"], "to": 2}]}))
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(clustered), "--out", str(out), "--n-centre", "1",
                            "--n-random", "1"])
    assert r.exit_code == 0, r.output
    page = (out / "review.html").read_text(encoding="utf-8")
    assert "starts from the edits in the existing clusters.yaml" in page
    assert page_data(page)["initial"] == {
        "names": ["tumour", "tumour", "cluster_2", "cluster_3"], "exclude": [False, False, False, True],
        "label": [None] * K, "merges": [[0, 1]],
        "moves": [{"tile": tile["tile"], "to": 2, "from": int(tile["cluster"])}], "split": [None] * K,
        "value_names": {}}
    # A file that does not parse is named, and the page starts from the template.
    (out / "clusters.yaml").write_text("clusters: [oops\n")
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(clustered), "--out", str(out), "--n-centre", "1",
                            "--n-random", "1"])
    assert r.exit_code == 0, r.output
    page = (out / "review.html").read_text(encoding="utf-8")
    assert "starts from the template" in page and page_data(page)["initial"]["merges"] == []


# --- the page in a real browser -------------------------------------------------------------------------


def _browser() -> tuple[str, str]:
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chrome is None or driver is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does as root)")
    return chrome, driver


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (a start costs ~2 s); the page is loaded fresh by each test."""
    chrome_path, chromedriver = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome_path
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        # The page must read at 1280x800: make that the viewport, not the window around it.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def browser(chrome: Any, tmp_path: Path) -> Any:
    """The module's browser, saving downloads into this test's own folder (`browser.download_dir`)."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    chrome.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    chrome.download_dir = downloads
    return chrome


def _wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def _screenshot(driver: Any, name: str) -> None:
    """With HISTOSYNTH_REVIEW_SCREENSHOTS set, save a 1280x800 screenshot there (palette PNG, small in git)."""
    folder = os.environ.get("HISTOSYNTH_REVIEW_SCREENSHOTS")
    if not folder:
        return
    path = Path(folder) / f"review-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _classes(driver: Any) -> list[list[str]]:
    """The live class table: [id, name, clusters, tiles] per row."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#classes-body tr")
    return [[td.text for td in row.find_elements(By.TAG_NAME, "td")[:4]] for row in rows]


@pytest.mark.slow
def test_review_page_in_chromium(browser: Any, review_dir: Path, clustered: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get((review_dir / "review.html").as_uri())
    sizes = sizes_of(clustered)
    _wait_for(lambda: len(_classes(driver)) == K)
    assert _classes(driver) == [[str(c), f"cluster_{c}", str(c), str(sizes[c])] for c in range(K)]
    # Nothing was fetched: every resource the page used is inline.
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    _screenshot(driver, "start")
    el = driver.find_element

    # Rename: typing updates the live classes (ids follow the sorted names).
    name0 = el(By.ID, "name-0")
    name0.clear()
    name0.send_keys("tumour")
    assert _classes(driver)[-1][:3] == [str(K - 1), "tumour", "0"]
    assert el(By.ID, "badge-0").text == f"class {K - 1}: tumour"

    # A bad name is flagged at once, blocks saving, and its problem link focuses the input.
    name0.send_keys("/x")
    assert el(By.ID, "save").get_attribute("disabled") is not None
    assert name0.get_attribute("aria-invalid") == "true"
    problem = el(By.CSS_SELECTOR, "#problems a")
    assert "not a usable class name" in problem.text
    problem.click()
    assert driver.switch_to.active_element == name0
    name0.send_keys(Keys.BACK_SPACE, Keys.BACK_SPACE)
    assert el(By.ID, "save").get_attribute("disabled") is None

    # Merge: select clusters 1 and 2 and merge them; a name typed on one applies to the group.
    el(By.CSS_SELECTOR, "label[for=select-1]").click()
    assert el(By.ID, "merge").get_attribute("disabled") is not None  # one selected is not a merge
    el(By.ID, "select-2").click()
    el(By.ID, "merge").click()
    assert "Merged clusters 1, 2" in el(By.ID, "status").text
    name2 = el(By.ID, "name-2")
    name2.clear()
    name2.send_keys("stroma")
    assert el(By.ID, "name-1").get_attribute("value") == "stroma"
    assert el(By.ID, "unmerge-1").is_displayed() and not el(By.ID, "unmerge-0").is_displayed()

    # Drop, by keyboard: Tab from the name field reaches the drop box, Space ticks it, with a visible focus ring.
    name_3 = el(By.ID, "name-3")
    name_3.click()
    name_3.send_keys(Keys.TAB)
    drop3 = driver.switch_to.active_element
    assert drop3.get_attribute("id") == "drop-3"
    assert driver.execute_script("const s = getComputedStyle(document.activeElement);"
                                 "return s.outlineStyle + ' ' + s.outlineWidth") == "solid 3px"
    drop3.send_keys(Keys.SPACE)
    assert drop3.is_selected() and el(By.ID, "badge-3").text == "dropped"
    assert _classes(driver) == [["0", "stroma", "1, 2", str(sizes[1] + sizes[2])],
                                ["1", "tumour", "0", str(sizes[0])]]
    assert el(By.ID, "summary").text.startswith(f"2 classes from {K} clusters; {sizes[3]} of 48 tiles dropped")
    _screenshot(driver, "edited")

    # Save: a Blob download, and the same text in the textarea.
    el(By.ID, "save").click()
    saved = _wait_for(lambda: [p for p in driver.download_dir.glob("clusters*.yaml")])[0]
    text = _wait_for(lambda: saved.read_text(encoding="utf-8") if saved.stat().st_size else "")
    assert text == el(By.ID, "yaml").get_attribute("value")
    assert "Saved clusters.yaml (2 classes)" in el(By.ID, "save-status").text
    driver.execute_script("document.getElementById('save-title').scrollIntoView()")
    _screenshot(driver, "saved")

    # `review apply` accepts the saved file unchanged.
    label_map = tmp_path / "label_map.yaml"
    r = runner.invoke(app, ["review", "apply", str(saved), "--clusters", str(clustered), "--out", str(label_map)])
    assert r.exit_code == 0, r.output
    written = yaml.safe_load(label_map.read_text())
    assert [(c["id"], c["name"], c["clusters"], c["tiles"]) for c in written["classes"]] == [
        (0, "stroma", [1, 2], sizes[1] + sizes[2]), (1, "tumour", [0], sizes[0])]
    assert written["clusters"] == {0: "tumour", 1: "stroma", 2: "stroma", 3: None}
    assert written["excluded_tiles"] == sizes[3]


def test_review_page_conflicts_and_unmerge(browser: Any, review_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get((review_dir / "review.html").as_uri())
    _wait_for(lambda: len(_classes(driver)) == K)
    el = driver.find_element
    # Two kept clusters with one name: a problem that proposes the merge; merging resolves it.
    for c in (0, 3):
        el(By.ID, f"name-{c}").clear()
        el(By.ID, f"name-{c}").send_keys("tumour")
    assert 'both make class "tumour"' in el(By.ID, "problems").text
    assert el(By.ID, "save").get_attribute("disabled") is not None
    # A dropped and a kept cluster do not merge.
    el(By.ID, "drop-3").click()
    el(By.ID, "select-0").click()
    el(By.ID, "select-3").click()
    el(By.ID, "merge").click()
    assert "Not merged" in el(By.ID, "status").text
    el(By.ID, "drop-3").click()
    el(By.ID, "merge").click()
    assert el(By.ID, "problems").text == "" and _classes(driver)[-1][1:3] == ["tumour", "0, 3"]
    # Unmerge: the cluster leaves with its default name, focus stays on it, and the group is gone.
    el(By.ID, "unmerge-3").click()
    assert driver.switch_to.active_element.get_attribute("id") == "name-3"
    assert el(By.ID, "name-3").get_attribute("value") == "cluster_3"
    assert "merges: []" in el(By.ID, "yaml").get_attribute("value")


def test_review_page_splits_and_labels(browser: Any, review_dir: Path, clustered: Path, tmp_path: Path) -> None:
    """Split by label (named values) and into k-means parts, a cluster that stands for a label; apply agrees."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    driver = browser
    driver.get((review_dir / "review.html").as_uri())
    _wait_for(lambda: len(_classes(driver)) == K)
    el = driver.find_element
    page = page_data((review_dir / "review.html").read_text(encoding="utf-8"))
    counts = [c["counts"] for c in page["clusters"]]
    sizes = sizes_of(clustered)
    mixed = next(c for c in range(K) if len(counts[c]) == 2)  # a cluster with both PCam labels
    parted = next(c for c in range(K) if c != mixed and sizes[c] >= 2)
    plain = next(c for c in range(K) if c not in (mixed, parted))
    for value, name in (("0", "normal"), ("1", "tumour")):
        el(By.CSS_SELECTOR, f'input.value-name[data-value="{value}"]').send_keys(name)
    el(By.ID, f"name-{mixed}").clear()
    el(By.ID, f"name-{mixed}").send_keys("mixed")
    Select(el(By.ID, f"split-{mixed}")).select_by_value("label")
    assert el(By.ID, f"badge-{mixed}").text == "split into 2 classes"
    Select(el(By.ID, f"split-{parted}")).select_by_value("kmeans")
    n = el(By.ID, f"split-n-{parted}")
    n.clear()
    n.send_keys("999")  # more parts than tiles is a problem at once
    assert f"use 2..{sizes[parted]}" in el(By.ID, "problems").text
    assert el(By.ID, "save").get_attribute("disabled") is not None
    parts = min(3, sizes[parted])
    n.clear()
    n.send_keys(str(parts))
    Select(el(By.ID, f"label-{plain}")).select_by_value("0")
    rows = _classes(driver)
    expected = sorted(["mixed_normal", "mixed_tumour", f"cluster_{plain}",
                       *(f"cluster_{parted}_{i}" for i in range(parts))]
                      + [f"cluster_{c}" for c in range(K) if c not in (mixed, parted, plain)])
    assert [r[1] for r in rows] == expected
    assert {r[1]: r[3] for r in rows}["mixed_normal"] == str(counts[mixed]["0"])
    driver.execute_script(f"document.activeElement.blur(); document.getElementById('cluster-{mixed}').scrollIntoView()")
    _screenshot(driver, "splits")
    el(By.ID, "save").click()
    saved = _wait_for(lambda: [p for p in driver.download_dir.glob("clusters*.yaml")])[0]
    _wait_for(lambda: saved.stat().st_size > 0)

    label_map = tmp_path / "label_map.yaml"
    r = runner.invoke(app, ["review", "apply", str(saved), "--clusters", str(clustered), "--out", str(label_map)])
    assert r.exit_code == 0, r.output
    classes = {c["name"]: c for c in yaml.safe_load(label_map.read_text())["classes"]}
    assert sorted(classes) == expected and [classes[name]["id"] for name in expected] == list(range(len(expected)))
    for row in rows:  # the live table's sizes are what apply made, where the page could know them
        if not row[3].startswith("part of"):
            assert classes[row[1]]["tiles"] == int(row[3])
    assert (classes["mixed_normal"]["label"], classes["mixed_normal"]["label_name"]) == ("0", "normal")
    assert (classes["mixed_tumour"]["label"], classes["mixed_tumour"]["label_name"]) == ("1", "tumour")
    assert (classes[f"cluster_{plain}"]["label"], classes[f"cluster_{plain}"]["label_name"]) == ("0", "normal")
    assert sum(classes[f"cluster_{parted}_{i}"]["tiles"] for i in range(parts)) == sizes[parted]


def test_review_page_label_groups(browser: Any, clustered: Path, tmp_path: Path) -> None:
    """A `cluster --within-labels` run: clusters stand for their label group unless merged across groups."""
    from selenium.webdriver.common.by import By

    groups = {"0": "1", "1": "1", "2": "0", "3": "unlabelled"}
    folder = tmp_path / "clusters"
    shutil.copytree(clustered, folder)
    meta = json.loads((folder / "cluster.json").read_text())
    (folder / "cluster.json").write_text(json.dumps({**meta, "cluster_groups": groups}))
    r = runner.invoke(app, ["review", "sheets", "--clusters", str(folder), "--out", str(tmp_path / "review"),
                            "--n-centre", "2", "--n-random", "0"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "review" / "review.html").read_text(encoding="utf-8")
    assert page_data(page)["cluster_labels"] == {"0": "1", "1": "1", "2": "0"}  # "unlabelled" is no label
    assert '<option value="">its label group (1)</option>' in page

    driver = browser
    driver.get((tmp_path / "review" / "review.html").as_uri())
    _wait_for(lambda: len(_classes(driver)) == K)

    def label_column() -> dict[str, str]:
        rows = driver.find_elements(By.CSS_SELECTOR, "#classes-body tr")
        return {row.find_elements(By.TAG_NAME, "td")[1].text: row.find_elements(By.TAG_NAME, "td")[4].text
                for row in rows}

    assert label_column() == {"cluster_0": "= 1", "cluster_1": "= 1", "cluster_2": "= 0", "cluster_3": ""}
    for c in (0, 1, 2):  # one group across label groups 1 and 0: no single label
        driver.find_element(By.ID, f"select-{c}").click()
    driver.find_element(By.ID, "merge").click()
    assert label_column() == {"cluster_0": "", "cluster_3": ""}
    driver.find_element(By.ID, "save").click()
    saved = _wait_for(lambda: [p for p in driver.download_dir.glob("clusters*.yaml")])[0]
    _wait_for(lambda: saved.stat().st_size > 0)
    out = tmp_path / "label_map.yaml"
    r = runner.invoke(app, ["review", "apply", str(saved), "--clusters", str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [c.get("label") for c in yaml.safe_load(out.read_text())["classes"]] == [None, None]


def test_page_without_labels_and_with_an_empty_cluster() -> None:
    """No --labels: no label values and no split by label; an empty cluster starts dropped, as in the template."""
    from histosynth.review.page import PageCluster, initial_state, render_review_page

    state = initial_state(3, None, {"a.png": 0, "b.png": 2, "c.png": 2})
    assert state["exclude"] == [False, True, False]
    cards = [PageCluster(c, n, "iVBORw0KGgo=") for c, n in enumerate((1, 0, 2))]
    page = render_review_page(3, 3, "rule <b>", cards, state, labels_path=None)
    assert 'value="label"' not in page and 'id="values"' not in page and 'id="label-0"' not in page
    assert "rule &lt;b&gt;" in page and 'id="drop-1" data-cluster="1" class="drop" checked' in page
    data = page_data(page)
    assert data["labels_path"] is None and data["values"] == [] and data["initial"]["exclude"] == [False, True, False]
