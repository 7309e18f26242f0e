"""A real headless Chromium for page tests: Debian's ``chromium`` and ``chromium-driver``
packages (``.ci/run`` installs them; the tests install nothing and skip, saying so, without
them), driven by selenium."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1600,1000",
)


def ensure_chromium() -> None:
    """Skip the test, saying what to install, unless Chromium and its driver are both there."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: `apt-get install -y {' '.join(PACKAGES)}` "
                    "(as .ci/run does) to run the headless Chromium page tests")


@contextmanager
def headless_chromium() -> Iterator:
    """A selenium WebDriver over a fresh headless Chromium profile; quit on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="stagemesh-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        try:
            yield driver
        finally:
            driver.quit()
