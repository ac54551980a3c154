"""Take the screenshots in docs/console.md: the runs page and a live run page, in headless Chromium.

    .venv/bin/python tools/console_screenshots.py            # writes docs/images/console-*.png

It starts a store and an engine in a temporary directory, starts a few runs (one still running, with
retries, recorded facts and child runs), serves the console with `keel ui`, and drives Debian's
Chromium (/usr/bin/chromium, /usr/bin/chromedriver) with Selenium. Everything stops at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from keel_client import KeelClient, RunStatus
from keel_client.local_cluster import LocalCluster
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from keel_core.launcher import launcher_env

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
RETRIES = {"retry_policy": {"max_attempts": 4, "initial_backoff": 1.0}}


def batch_pipeline() -> dict[str, Any]:
    """A pipeline with a flaky step, a recorded call, a fan-out and a long last step."""
    return {
        "pipeline_id": "invoice-batch",
        "steps": [
            {"step_id": "fetch", "op_id": "keel.echo"},
            {
                "step_id": "charge",
                "op_id": "keel.fail_n_times",
                "op_config": {"n": 2},
                "depends_on": ["fetch"],
            },
            {
                "step_id": "notify",
                "op_id": "keel.io_call",
                "op_config": {"namespace": "keel.echo", "request": {"to": "ops"}, "fact_key": "notify-ops"},
                "depends_on": ["fetch"],
            },
            {
                "step_id": "render",
                "op_id": "keel.fan_out",
                "op_config": {"op_id": "keel.echo", "count": 3},
                "depends_on": ["charge", "notify"],
            },
            {
                "step_id": "settle",
                "op_id": "keel.sleep",
                "op_config": {"seconds": 600},
                "depends_on": ["render"],
            },
        ],
    }


def start_runs(keel: KeelClient) -> str:
    """A few finished runs of each status, then the batch run; returns the batch run's id once its
    last step runs."""
    for n in range(3):
        keel.start_run(
            {"pipeline_id": "nightly-report", "steps": [{"step_id": "build", "op_id": "keel.echo"}]},
            input={"day": n},
            labels={"team": "analytics"},
            wait=True,
        )
    broken = {"step_id": "load", "op_id": "keel.fail_n_times", "op_config": {"n": 1, "retryable": False}}
    keel.start_run({"pipeline_id": "import-ledger", "steps": [broken]}, labels={"team": "billing"}, wait=True)
    stuck = keel.start_run(
        {
            "pipeline_id": "import-ledger",
            "steps": [{"step_id": "wait", "op_id": "keel.sleep", "op_config": {"seconds": 600}}],
        },
        labels={"team": "billing"},
    )
    keel.cancel(stuck.run_id, reason="superseded")
    batch = keel.start_run(
        batch_pipeline(),
        input={"batch": "2026-12-05", "invoices": 3},
        labels={"team": "billing", "env": "prod"},
        run_config=RETRIES,
    )
    for event in keel.watch_run(batch.run_id):
        if event.type == "StepAttemptStarted" and event.data.get("step_id") == "settle":
            break
    assert keel.get_run(batch.run_id).status == RunStatus.RUNNING
    return batch.run_id


def browser(width: int, height: int) -> Any:
    """Headless Chromium from the distribution's packages."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(url: str, ready: str, path: Path, size: tuple[int, int]) -> None:
    """Open `url`, wait until the CSS selector `ready` matches, save a screenshot to `path`."""
    driver = browser(*size)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready))
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    """Start everything, take both screenshots, stop everything."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT, help="directory for the PNG files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="keel-shots-") as scratch,
        LocalCluster(
            data_dir=Path(scratch), store_listen="127.0.0.1:0", engine_listen="127.0.0.1:0"
        ) as cluster,
    ):
        with KeelClient(cluster.engine_address) as keel:
            run_id = start_runs(keel)
        keel_cli = Path(sys.executable).parent / "keel"
        ui = subprocess.Popen(
            [str(keel_cli), "ui", "--listen", "127.0.0.1:0", "--engine", cluster.engine_address],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **launcher_env()},
        )
        try:
            assert ui.stdout is not None
            url = ui.stdout.readline().split()[4]
            shoot(f"{url}/runs", "#runs-body tr[data-run-id]", args.out / "console-runs.png", (1400, 720))
            shoot(
                f"{url}/runs/{run_id}",
                '#children-tree li[data-status="completed"]',
                args.out / "console-run.png",
                (1400, 1750),
            )
        finally:
            ui.terminate()
            ui.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
