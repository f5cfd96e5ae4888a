"""A PNG of a static HTML page taken by headless Chromium (the leaderboard's picture in the report).
Chromium is optional: without it no screenshot is taken and the caller says so in one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
# No network, no first-run or sync work, nothing kept between runs: the page is a local file.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")
WINDOW = (1500, 1000)
TIMEOUT_S = 90


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, png: Path, window: tuple[int, int] = WINDOW) -> str | None:
    """Write ``png`` from ``page``; returns None on success, else why not (one line)."""
    browser = find_browser()
    if browser is None:
        return f"no Chromium on PATH ({' / '.join(BROWSERS)}): {png.name} not written"
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="robbench-chromium-") as profile:
        tmp = Path(profile) / "shot.png"
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}/profile", f"--window-size={window[0]},{window[1]}",
               f"--screenshot={tmp}", page.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                                  env={**os.environ, "HOME": profile})
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"Chromium failed ({type(e).__name__}): {png.name} not written"
        if not tmp.exists() or tmp.stat().st_size == 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
            return f"Chromium wrote no screenshot (exit {proc.returncode}: {last}): {png.name} not written"
        shutil.move(str(tmp), png)
    return None
