"""Real parts for the console tests: a store and an engine, `keel ui` as a process, headless Chromium.

Chromium and its driver are Debian's (/usr/bin/chromium, /usr/bin/chromedriver, installed by
.ci/run); Selenium is given both paths, so nothing downloads a browser. Without them (or without
the console extra) the tests are skipped loudly, and fail in CI.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel_client import KeelClient
from keel_client.local_cluster import LocalCluster

from keel_core.launcher import launcher_env
from tests.conftest import IN_CI

CHROMIUM = Path(os.environ.get("KEEL_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("KEEL_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
KEEL = Path(sys.executable).parent / "keel"
TEST_OPS = str(Path(__file__).resolve().parent.parent / "engine" / "crash_ops.py")
# How long a browser wait lasts at most: a bound against hanging, never a measured threshold.
WAIT_SECONDS = 60.0


def _missing() -> str:
    needed = [name for name in ("starlette", "uvicorn", "selenium") if importlib.util.find_spec(name) is None]
    if needed:
        install = "pip install -e './clients/python[console]' -e '.[dev]'"
        return f"the console tests need {', '.join(needed)} ({install})"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"the console tests need {path} (apt-get install chromium chromium-driver)"
    return ""


@pytest.fixture(scope="session")
def console_requirements() -> None:
    """Skip loudly when the browser or the console extra is missing; fail in CI instead."""
    missing = _missing()
    if missing:
        if IN_CI:
            pytest.fail(f"{missing} -- in CI the browser tests must run", pytrace=False)
        pytest.skip(f"SKIPPED BROWSER: {missing}")


@pytest.fixture(scope="session")
def console_cluster(
    console_requirements: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """A store and an engine (with the test ops) on 127.0.0.1, ports picked by the OS."""
    with LocalCluster(
        data_dir=tmp_path_factory.mktemp("console-data"),
        store_listen="127.0.0.1:0",
        engine_listen="127.0.0.1:0",
        ops=[TEST_OPS],
    ) as running:
        yield running


@pytest.fixture(scope="session")
def keel(console_cluster: LocalCluster) -> Iterator[KeelClient]:
    """A client of the session's engine, for starting runs and checking what the console did."""
    with KeelClient(console_cluster.engine_address) as client:
        yield client


@pytest.fixture(scope="session")
def console_url(console_cluster: LocalCluster) -> Iterator[str]:
    """`keel ui` on 127.0.0.1:0 for the session's engine (it also stops if this process dies)."""
    process = subprocess.Popen(
        [
            str(KEEL),
            "ui",
            "--listen",
            "127.0.0.1:0",
            "--engine",
            console_cluster.engine_address,
            "--refresh",
            "0.5",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **launcher_env()},
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("keel ui: console on http://"), f"keel ui did not start: {banner!r}"
        yield banner.split()[4]
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def chrome(window: tuple[int, int] = (1400, 1000)) -> Any:
    """A headless Chromium driven by the system's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="session")
def browser(console_requirements: None) -> Iterator[Any]:
    """One headless Chromium for the session."""
    driver = chrome()
    try:
        yield driver
    finally:
        driver.quit()


def unique(prefix: str) -> str:
    """A pipeline id no other test uses (the session's engine is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
