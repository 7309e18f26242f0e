"""A real headless Chromium for page tests: Debian's ``chromium`` and ``chromium-driver``
packages, installed on first use when missing (CI runs as root with no stdin), driven by selenium."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1600,1000",
)


def ensure_chromium() -> None:
    """Install Chromium and its driver with apt-get unless both are there; AssertionError saying
    what to do when that cannot be done here."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise AssertionError(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `apt-get install -y {' '.join(PACKAGES)}` as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            output = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            raise AssertionError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{output}")


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
