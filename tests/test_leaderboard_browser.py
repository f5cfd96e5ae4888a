"""The leaderboard page in a real headless Chromium (selenium): it loads without console errors, a click
on the robust-accuracy header reorders the rows, the filter box hides rows, and the report's own
screenshot (leaderboard.png) is written. CI installs chromium, chromium-driver and selenium (.ci/run);
elsewhere the test is skipped when they are missing, in CI it fails."""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from test_report import VIEWS, build_store

DRIVER = shutil.which("chromedriver")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

MISSING = [name for name, ok in (("chromedriver", DRIVER), ("chromium", BROWSER), ("selenium", HAVE_SELENIUM)) if not ok]
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"needs {', '.join(MISSING)} (installed by .ci/run)", allow_module_level=True)

ROBUST = "robust accuracy % [95% CI]"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from robbench.report.write import build_report

    assert not MISSING, f"CI must provide {', '.join(MISSING)}"
    root = tmp_path_factory.mktemp("board")
    db, runs = build_store(root)
    (root / "views.toml").write_text(VIEWS)
    out = root / "out"
    result = build_report("all", out, db, runs, "md", root / "views.toml", screenshot=True)
    assert out / "leaderboard.png" in result.files and not result.notes
    return out / "leaderboard.html"


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield d
    d.quit()


def _first_table(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "table.board")[0]


def _entries(table) -> list[str]:
    from selenium.webdriver.common.by import By

    return [tr.get_attribute("data-entry") for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def _robust(table) -> list[float]:
    from selenium.webdriver.common.by import By

    col = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")].index(ROBUST)
    return [float(tr.find_elements(By.TAG_NAME, "td")[col].text.split()[0])
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def test_page_loads_without_console_errors(driver, page: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(page.as_uri())
    assert driver.title == "robbench leaderboard"
    logs = driver.get_log("browser")
    assert [e for e in logs if e["level"] in ("SEVERE", "ERROR")] == [], logs
    assert len(driver.find_elements(By.CSS_SELECTOR, "table.board")) == 3  # black-box, convergence, white-box
    png = page.with_name("leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] >= 800


def test_sorting_by_robust_accuracy_reorders_rows(driver, page: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(page.as_uri())
    table = _first_table(driver)
    before = _entries(table)
    header = [th for th in table.find_elements(By.CSS_SELECTOR, "thead th") if th.text == ROBUST][0]
    header.click()  # first click: descending, the ranked order
    assert _robust(table) == sorted(_robust(table), reverse=True)
    header.click()  # second click: ascending
    after = _entries(table)
    assert _robust(table) == sorted(_robust(table)) and after != before and sorted(after) == sorted(before)
    assert after == before[::-1]  # the fixture has no ties in this table
    assert header.get_attribute("aria-sort") == "ascending"
    driver.save_screenshot(str(page.with_name("sorted.png")))
    assert page.with_name("sorted.png").stat().st_size > 1000


def test_filter_box_hides_rows(driver, page: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(page.as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "table.board tbody tr")
    assert all(r.is_displayed() for r in rows) and len(rows) == 10
    driver.find_element(By.ID, "filter").send_keys("adp")
    shown = [r.get_attribute("data-entry") for r in rows if r.is_displayed()]
    assert shown == ["adp_resnet20_x3", "adp_resnet20_x3"]  # its black-box and white-box rows
    box = driver.find_element(By.ID, "filter")
    box.clear()
    box.send_keys("masking-free-nonsense")
    assert not any(r.is_displayed() for r in rows)


def test_rows_link_to_run_details(driver, page: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(page.as_uri())
    link = driver.find_elements(By.CSS_SELECTOR, "table.board tbody tr a")[0]
    entry = link.find_element(By.XPATH, "./ancestor::tr").get_attribute("data-entry")
    link.click()
    assert driver.current_url.split("#")[0].endswith("runs.html")
    section = driver.find_element(By.ID, driver.current_url.split("#")[1])
    assert entry in section.text
