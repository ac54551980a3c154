"""The console in a real headless Chromium: pages load, runs update live, actions act, filters filter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from keel_client import KeelClient, RunStatus

from tests.console.conftest import WAIT_SECONDS, unique

pytestmark = pytest.mark.slow


def wait_for(browser: Any, condition: Callable[[], Any], what: str) -> Any:
    """Wait (for a bounded time) until `condition()` is truthy and return it; page elements may be
    redrawn while it looks, which counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def attempt(_driver: Any) -> Any:
        try:
            return condition()
        except StaleElementReferenceException:
            return False

    try:
        return WebDriverWait(browser, WAIT_SECONDS, poll_frequency=0.1).until(attempt)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None


def css(browser: Any, selector: str) -> list[Any]:
    """The elements matching a CSS selector."""
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, selector))


def one(browser: Any, selector: str) -> Any:
    """The first element matching `selector`, once there is one."""
    return wait_for(browser, lambda: (css(browser, selector) or [None])[0], selector)


def attribute(browser: Any, selector: str, name: str) -> str | None:
    """An attribute of the first element matching `selector` (None when there is none)."""
    found = css(browser, selector)
    return found[0].get_attribute(name) if found else None


def ended(browser: Any) -> None:
    """Wait until the run page has followed its (terminal) run to the end: no more redraws come."""
    wait_for(browser, lambda: "ended" in one(browser, "#live").text, "the run's last event")


def shown_run_ids(browser: Any) -> list[str]:
    """The run ids of the runs table's rows, in order."""
    return [row.get_attribute("data-run-id") for row in css(browser, "#runs-body tr[data-run-id]")]


def pipeline(pipeline_id: str, *steps: dict[str, Any]) -> dict[str, Any]:
    """A pipeline dict shaped like the proto."""
    return {"pipeline_id": pipeline_id, "steps": list(steps)}


def gated(step_id: str, gate: Path, depends_on: tuple[str, ...] = ()) -> dict[str, Any]:
    """A step that makes one recorded call which answers once the file `gate` exists."""
    return {
        "step_id": step_id,
        "op_id": "test.gated_call",
        "op_config": {"gate": str(gate)},
        "depends_on": list(depends_on),
    }


def test_runs_page_shows_each_run_with_its_columns(browser: Any, console_url: str, keel: KeelClient) -> None:
    name = unique("columns")
    done = keel.start_run(
        pipeline(name, {"step_id": "a", "op_id": "keel.echo"}), labels={"team": "billing"}, wait=True
    )
    browser.get(f"{console_url}/runs?pipeline={name}")
    assert done.run is not None and done.run.created_at is not None
    year = str(done.run.created_at.year)

    def cells() -> dict[str, str] | None:
        # Read in one go: the table is redrawn every refresh, so a read may meet a stale row.
        rows = css(browser, f'#runs-body tr[data-run-id="{done.run_id}"]')
        if shown_run_ids(browser) != [done.run_id] or not rows:
            return None
        row = rows[0]
        found = {
            name: row.find_element("css selector", f".{name}").text
            for name in ("pipeline", "chip", "started")
        }
        return {
            "status": row.get_attribute("data-status"),
            "duration": row.find_element("css selector", ".duration").text,
            **found,
        }

    shown = wait_for(browser, cells, "the run")
    assert shown["status"] == "completed" and shown["pipeline"] == name and shown["chip"] == "team=billing"
    assert shown["started"].startswith(year) and shown["duration"] != ""


def test_filters_keep_only_matching_runs(browser: Any, console_url: str, keel: KeelClient) -> None:
    name = unique("filters")
    good = keel.start_run(
        pipeline(name, {"step_id": "a", "op_id": "keel.echo"}), labels={"team": "a"}, wait=True
    )
    other_team = keel.start_run(
        pipeline(name, {"step_id": "a", "op_id": "keel.echo"}), input=1, labels={"team": "b"}, wait=True
    )
    broken = keel.start_run(
        pipeline(
            name, {"step_id": "x", "op_id": "keel.fail_n_times", "op_config": {"n": 1, "retryable": False}}
        ),
        labels={"team": "a"},
        wait=True,
    )
    fan = keel.start_run(
        pipeline(
            name, {"step_id": "fan", "op_id": "keel.fan_out", "op_config": {"op_id": "keel.echo", "count": 2}}
        ),
        labels={"team": "fan"},
        wait=True,
    )
    assert broken.run is not None and broken.run.status == RunStatus.FAILED
    assert fan.run is not None and len(fan.run.children) == 2
    browser.get(f"{console_url}/runs")
    # The pipeline filter, typed into the form.
    field = one(browser, '#filters input[name="pipeline"]')
    field.send_keys(name)
    one(browser, "#apply").click()
    top_level = {good.run_id, other_team.run_id, broken.run_id, fan.run_id}
    wait_for(browser, lambda: set(shown_run_ids(browser)) == top_level, "the pipeline's runs")
    assert f"pipeline={name}" in browser.current_url
    # A label filter (the children carry no labels).
    field = one(browser, '#filters input[name="label"]')
    field.send_keys("team=a")
    one(browser, "#apply").click()
    wait_for(browser, lambda: set(shown_run_ids(browser)) == {good.run_id, broken.run_id}, "team=a's runs")
    # A status checkbox applies at once.
    one(browser, '#filters input[name="status"][value="failed"]').click()
    wait_for(browser, lambda: shown_run_ids(browser) == [broken.run_id], "the failed run")
    # Lineage: only the children of the pipeline's runs; each row names its parent.
    browser.get(f"{console_url}/runs?pipeline=keel.echo&lineage=children&page_size=100")
    children = {child.child_run_id for child in fan.run.children}
    parent_link = f'a[href="/runs/{fan.run_id}"]'
    wait_for(
        browser,
        lambda: (
            children <= set(shown_run_ids(browser))
            and len(css(browser, f"#runs-body tr[data-run-id] {parent_link}")) == len(children)
        ),
        "the fan-out's children, each naming its parent",
    )
    # The parent filter: exactly the fan-out's children.
    browser.get(f"{console_url}/runs?parent={fan.run_id}")
    wait_for(browser, lambda: set(shown_run_ids(browser)) == children, "the fan-out's children only")
    # A start-time filter: nothing of this pipeline started before the first run.
    assert good.run is not None and good.run.created_at is not None
    before = quote(good.run.created_at.isoformat())
    browser.get(f"{console_url}/runs?pipeline={name}&before={before}")
    wait_for(browser, lambda: css(browser, "#runs-body tr.empty"), "an empty table")
    # A filter that means nothing is explained, not ignored.
    browser.get(f"{console_url}/runs?since=yesterday-ish")
    wait_for(browser, lambda: css(browser, "#runs-error:not([hidden])"), "the filter's error")
    assert "since" in one(browser, "#runs-error").text


def test_duration_filters_keep_runs_by_how_long_they_lasted(
    browser: Any, console_url: str, keel: KeelClient, tmp_path: Path
) -> None:
    name = unique("durations")
    done = keel.start_run(pipeline(name, {"step_id": "a", "op_id": "keel.echo"}), wait=True).run_id
    live = keel.start_run(pipeline(name, gated("wait", tmp_path / "gate"))).run_id
    try:
        browser.get(f"{console_url}/runs?pipeline={name}")
        wait_for(browser, lambda: set(shown_run_ids(browser)) == {done, live}, "both runs")
        # Typed into the form: nothing here has lasted a day.
        one(browser, '#filters input[name="min_duration"]').send_keys("1d")
        one(browser, "#apply").click()
        wait_for(browser, lambda: css(browser, "#runs-body tr.empty"), "an empty table")
        assert "min_duration=1d" in browser.current_url
        # A running run's duration grows until now: the page's live refresh brings it in once it
        # has lasted a second (the finished run's duration stopped at its end).
        browser.get(f"{console_url}/runs?pipeline={name}&min_duration=1s")
        wait_for(browser, lambda: live in shown_run_ids(browser), "the running run, once it lasted 1s")
        browser.get(f"{console_url}/runs?pipeline={name}&max_duration=1d&status=completed")
        wait_for(browser, lambda: shown_run_ids(browser) == [done], "the finished run")
        assert one(browser, '#filters input[name="max_duration"]').get_attribute("value") == "1d"
        # A range that holds nothing is explained, not ignored.
        browser.get(f"{console_url}/runs?min_duration=2h&max_duration=1h")
        wait_for(browser, lambda: css(browser, "#runs-error:not([hidden])"), "the filter's error")
        assert "min_duration" in one(browser, "#runs-error").text
    finally:
        (tmp_path / "gate").touch()
        keel.await_run(live, max_wait=WAIT_SECONDS)


def test_runs_page_pages_through_runs(browser: Any, console_url: str, keel: KeelClient) -> None:
    name = unique("pages")
    started = [
        keel.start_run(pipeline(name, {"step_id": "a", "op_id": "keel.echo"}), input=i, wait=True).run_id
        for i in range(12)
    ]
    newest_first = list(reversed(started))
    browser.get(f"{console_url}/runs?pipeline={name}&page_size=10")
    wait_for(browser, lambda: shown_run_ids(browser) == newest_first[:10], "the first page")
    one(browser, "#page-next").click()
    wait_for(browser, lambda: shown_run_ids(browser) == newest_first[10:], "the second page")
    assert one(browser, "#page-next").get_attribute("disabled") is not None
    one(browser, "#page-prev").click()
    wait_for(browser, lambda: shown_run_ids(browser) == newest_first[:10], "the first page again")


def test_runs_page_updates_live(browser: Any, console_url: str, keel: KeelClient, tmp_path: Path) -> None:
    name = unique("live-list")
    browser.get(f"{console_url}/runs?pipeline={name}")
    wait_for(browser, lambda: css(browser, "#runs-body tr.empty"), "an empty table")
    started = keel.start_run(pipeline(name, gated("wait", tmp_path / "gate")))
    row = f'#runs-body tr[data-run-id="{started.run_id}"]'
    wait_for(browser, lambda: attribute(browser, row, "data-status") == "running", "the new run, running")
    (tmp_path / "gate").touch()
    wait_for(browser, lambda: attribute(browser, row, "data-status") == "completed", "the run completed")


def test_run_page_shows_a_step_finishing_live(
    browser: Any, console_url: str, keel: KeelClient, tmp_path: Path
) -> None:
    name = unique("live-run")
    started = keel.start_run(
        pipeline(
            name,
            {"step_id": "first", "op_id": "keel.echo"},
            gated("gate", tmp_path / "gate", depends_on=("first",)),
            {"step_id": "last", "op_id": "keel.echo", "depends_on": ["gate"]},
        ),
        input={"invoice": 42},
    )
    browser.get(f"{console_url}/runs/{started.run_id}")
    node = '#dag-svg g.node[data-step-id="gate"]'
    wait_for(browser, lambda: attribute(browser, node, "data-status") == "running", "the gated step running")
    # While the gate is closed the page keeps redrawing (events, the running bar), and shows this:
    wait_for(
        browser,
        lambda: (
            attribute(browser, '#dag-svg g.node[data-step-id="first"]', "data-status") == "completed"
            and attribute(browser, '#dag-svg g.node[data-step-id="last"]', "data-status") == "pending"
            and css(browser, '#timeline-svg g.bar[data-step-id="gate"][data-status="running"]')
            and '"invoice": 42' in one(browser, "#input pre").text
        ),
        "the first step completed, the last pending, the gated one's bar running, the input",
    )
    (tmp_path / "gate").touch()
    wait_for(
        browser, lambda: attribute(browser, node, "data-status") == "completed", "the gated step completed"
    )
    wait_for(
        browser,
        lambda: attribute(browser, "#run-status .badge", "data-status") == "completed",
        "the run completed",
    )
    wait_for(
        browser, lambda: css(browser, '#events-body tr[data-type="RunCompleted"]'), "the RunCompleted event"
    )
    ended(browser)
    # The step's recorded fact, from the events, and its output, from GetRun.
    facts = one(browser, '#steps-table tr[data-step-id="gate"] .facts-cell details')
    facts.find_element("css selector", "summary").click()
    assert "gate-gated" in facts.text
    output = one(browser, '#steps-table tr[data-step-id="gate"] .output details')
    output.find_element("css selector", "summary").click()
    assert str(tmp_path / "gate") in output.text
    assert css(browser, "#result pre")


def test_cancel_button_cancels_the_run(
    browser: Any, console_url: str, keel: KeelClient, tmp_path: Path
) -> None:
    started = keel.start_run(pipeline(unique("cancel"), gated("stuck", tmp_path / "never")))
    browser.get(f"{console_url}/runs/{started.run_id}")
    node = '#dag-svg g.node[data-step-id="stuck"]'
    wait_for(browser, lambda: attribute(browser, node, "data-status") == "running", "the step running")
    one(browser, "#cancel").click()
    one(browser, "#cancel-reason").send_keys("from the console test")
    one(browser, "#cancel-confirm").click()
    wait_for(
        browser,
        lambda: attribute(browser, "#run-status .badge", "data-status") == "canceled",
        "the run canceled",
    )
    assert "transitioned" in one(browser, "#action-result").text
    run = keel.get_run(started.run_id)
    assert run.status == RunStatus.CANCELED
    assert run.reason is not None and "from the console test" in run.reason
    wait_for(
        browser, lambda: one(browser, "#cancel").get_attribute("disabled") is not None, "cancel disabled"
    )


def test_terminalize_fails_a_run_with_a_reason(
    browser: Any, console_url: str, keel: KeelClient, tmp_path: Path
) -> None:
    started = keel.start_run(pipeline(unique("terminalize"), gated("stuck", tmp_path / "never")))
    browser.get(f"{console_url}/runs/{started.run_id}")
    wait_for(browser, lambda: css(browser, "#terminalize:not([disabled])"), "the terminalize button")
    from selenium.webdriver.support.ui import Select

    Select(one(browser, "#terminalize-target")).select_by_value("failed")
    one(browser, "#terminalize").click()
    # Failing needs a reason: the engine's refusal is shown, and the run goes on.
    wait_for(browser, lambda: "invalid_argument" in one(browser, "#action-result").text, "the refusal")
    assert keel.get_run(started.run_id).status == RunStatus.RUNNING
    one(browser, "#terminalize-reason").send_keys("operator gave up")
    one(browser, "#terminalize").click()
    wait_for(
        browser, lambda: attribute(browser, "#run-status .badge", "data-status") == "failed", "the run failed"
    )
    ended(browser)
    run = keel.get_run(started.run_id)
    assert run.status == RunStatus.FAILED and run.reason == "operator gave up"
    assert "operator gave up" in one(browser, "#header .reason").text


def test_run_page_shows_retries_waits_and_children(browser: Any, console_url: str, keel: KeelClient) -> None:
    started = keel.start_run(
        pipeline(
            unique("retries"),
            {"step_id": "flaky", "op_id": "keel.fail_n_times", "op_config": {"n": 2}},
            {
                "step_id": "fan",
                "op_id": "keel.fan_out",
                "op_config": {"op_id": "keel.echo", "count": 3},
                "depends_on": ["flaky"],
            },
        ),
        run_config={"retry_policy": {"max_attempts": 5, "initial_backoff": 0.05}},
        wait=True,
    )
    assert started.run is not None and started.run.status == RunStatus.COMPLETED
    browser.get(f"{console_url}/runs/{started.run_id}")
    ended(browser)
    bars = '#timeline-svg g.bar[data-step-id="flaky"]'
    wait_for(browser, lambda: len(css(browser, bars)) == 3, "three attempts of the flaky step")
    assert [bar.get_attribute("data-status") for bar in css(browser, bars)] == [
        "failed",
        "failed",
        "completed",
    ]
    assert len(css(browser, "#timeline-svg g.bar.wait")) == 2
    wait_for(
        browser,
        lambda: (
            [item.get_attribute("data-status") for item in css(browser, "#children-tree > li")]
            == ["completed"] * 3
        ),
        "the three children, completed",
    )
    assert css(browser, "#dag-svg path.edge")
    # The children section links the list of exactly these children.
    one(browser, "#children-list").click()
    children = {child.child_run_id for child in started.run.children}
    wait_for(browser, lambda: set(shown_run_ids(browser)) == children, "the runs page of the children")
    browser.back()
    ended(browser)
    first_child = started.run.children[0].child_run_id
    one(browser, f'#children-tree a[href="/runs/{first_child}"]').click()
    wait_for(
        browser,
        lambda: started.run_id[:8] in one(browser, "#header").text,
        "the child's page naming its parent",
    )


def test_pages_load_without_errors_in_the_browser_console(
    browser: Any, console_url: str, keel: KeelClient
) -> None:
    done = keel.start_run(pipeline(unique("clean"), {"step_id": "a", "op_id": "keel.echo"}), wait=True)
    browser.get_log("browser")  # reading the log empties it: only what these pages log is left
    browser.get(f"{console_url}/runs")
    one(browser, "#runs-body tr[data-run-id]")
    browser.get(f"{console_url}/runs/{done.run_id}")
    ended(browser)
    browser.get(f"{console_url}/queues")
    wait_for(browser, lambda: "updated" in one(browser, "#updated").text, "the queues read")
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_unknown_run_page_says_so(browser: Any, console_url: str) -> None:
    browser.get(f"{console_url}/runs/6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b")
    wait_for(browser, lambda: css(browser, "#run-error"), "an error")
    assert "No run 6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b" in one(browser, "#run-error").text


def test_rerun_from_a_step_opens_the_new_run(browser: Any, console_url: str, keel: KeelClient) -> None:
    done = keel.start_run(
        pipeline(
            unique("rerun"),
            {"step_id": "first", "op_id": "keel.echo"},
            {"step_id": "second", "op_id": "keel.echo", "depends_on": ["first"]},
        ),
        input={"n": 1},
        wait=True,
    )
    browser.get(f"{console_url}/runs/{done.run_id}")
    ended(browser)
    from selenium.webdriver.support.ui import Select

    Select(one(browser, "#rerun-step")).select_by_value("second")
    one(browser, "#rerun").click()
    wait_for(browser, lambda: done.run_id[:8] in one(browser, "#rerun-of").text, "the rerun's page")
    ended(browser)
    new_id = browser.current_url.rsplit("/", 1)[1]
    assert new_id != done.run_id
    assert "from step second" in one(browser, "#rerun-of").text
    assert attribute(browser, '#dag-svg g.node[data-step-id="first"]', "data-reused") == "1"
    assert attribute(browser, '#dag-svg g.node[data-step-id="second"]', "data-reused") is None
    assert done.run_id[:8] in one(browser, '#steps-table tr[data-step-id="first"] .reused').text
    rerun = keel.get_run(new_id)
    assert rerun.status == RunStatus.COMPLETED and rerun.rerun_of_run_id == done.run_id
    # The first run's page links its rerun.
    browser.get(f"{console_url}/runs/{done.run_id}")
    wait_for(browser, lambda: css(browser, f'#reruns a[href="/runs/{new_id}"]'), "the link to the rerun")


def test_queues_page_shows_backlog_and_workers(
    browser: Any, console_url: str, keel: KeelClient, tmp_path: Path
) -> None:
    served, idle = unique("served"), unique("idle")
    worker_id = unique("worker")
    script = Path(__file__).resolve().parent.parent / "workers" / "worker_process.py"
    worker = subprocess.Popen(
        [sys.executable, str(script), keel.target, served, str(tmp_path / "ledger"), worker_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "worker ready"
        remote = {"step_id": "inc", "op_id": "inc", "task_queue": served}
        done = keel.start_run(pipeline(unique("remote"), remote), input={"n": 1}, wait=True)
        assert done.run is not None and done.run.status == RunStatus.COMPLETED
        waiting = keel.start_run(pipeline(unique("waiting"), {**remote, "task_queue": idle}), input={"n": 1})
        browser.get(f"{console_url}/queues")
        wait_for(
            browser,
            lambda: css(browser, f'#queues-body tr[data-queue="{served}"][data-worker-id="{worker_id}"]'),
            "the worker",
        )
        wait_for(
            browser,
            lambda: (
                one(browser, f'#queues-body tr[data-queue="{idle}"] .backlog').text == "1"
                and "none seen" in one(browser, f'#queues-body tr[data-queue="{idle}"] .worker').text
            ),
            "the idle queue's backlog",
        )
        # The remote step's page says which worker ran it.
        browser.get(f"{console_url}/runs/{done.run_id}")
        ended(browser)
        assert (
            one(browser, '#steps-table tr[data-step-id="inc"] td.mono.small').text
            == f"{worker_id} @ {served}"
        )
        keel.cancel(waiting.run_id)
    finally:
        worker.kill()
        worker.wait()
        assert worker.stdout is not None
        worker.stdout.close()


def test_a_parked_step_shows_as_waiting(browser: Any, console_url: str, keel: KeelClient) -> None:
    """A durable timer (keel.sleep parks the attempt): the page says what the step waits for, draws the
    parked stretch on the timeline, and keeps it there once the step completed."""
    nap = {"step_id": "nap", "op_id": "keel.sleep", "op_config": {"seconds": 3600}}
    parked = keel.start_run(pipeline(unique("parked"), nap))
    browser.get(f"{console_url}/runs/{parked.run_id}")
    node = '#dag-svg g.node[data-step-id="nap"]'
    wait_for(browser, lambda: attribute(browser, node, "data-status") == "waiting", "the step waiting")
    wait_for(
        browser,
        lambda: (
            css(browser, '#timeline-svg g.parked[data-step-id="nap"][data-kind="timer"]')
            and "waiting for timer until"
            in one(browser, '#steps-table tr[data-step-id="nap"] .status-cell').text
        ),
        "the parked stretch and what it waits for",
    )
    keel.cancel(parked.run_id)
    wait_for(
        browser, lambda: attribute(browser, "#run-status .badge", "data-status") == "canceled", "the cancel"
    )
    short = keel.start_run(pipeline(unique("napped"), {**nap, "op_config": {"seconds": 0.2}}), wait=True)
    assert short.run is not None and short.run.status == RunStatus.COMPLETED
    browser.get(f"{console_url}/runs/{short.run_id}")
    ended(browser)
    assert attribute(browser, node, "data-status") == "completed"
    assert css(browser, '#timeline-svg g.parked[data-step-id="nap"][data-kind="timer"]')


def test_send_signal_wakes_the_waiting_step(browser: Any, console_url: str, keel: KeelClient) -> None:
    waits = {"step_id": "approve", "op_id": "keel.wait_signal", "op_config": {"name": "approval"}}
    started = keel.start_run(pipeline(unique("signal"), waits))
    browser.get(f"{console_url}/runs/{started.run_id}")
    node = '#dag-svg g.node[data-step-id="approve"]'
    wait_for(browser, lambda: attribute(browser, node, "data-status") == "waiting", "the step waiting")
    wait_for(
        browser,
        lambda: (
            "waiting for signal approval"
            in one(browser, '#steps-table tr[data-step-id="approve"] .status-cell').text
            and one(browser, "#signal-name").get_attribute("value") == "approval"
        ),
        "what the step waits for, offered as the signal to send",
    )
    one(browser, "#signal-payload").send_keys("{not json")
    one(browser, "#signal-send").click()
    wait_for(browser, lambda: "not JSON" in one(browser, "#action-result").text, "the payload refused")
    assert keel.get_run(started.run_id).status == RunStatus.RUNNING
    one(browser, "#signal-payload").clear()
    one(browser, "#signal-payload").send_keys('{"approved_by": "console"}')
    one(browser, "#signal-send").click()
    wait_for(
        browser,
        lambda: attribute(browser, "#run-status .badge", "data-status") == "completed",
        "the run completed",
    )
    assert "signal approval sent" in one(browser, "#action-result").text
    ended(browser)
    output = one(browser, '#steps-table tr[data-step-id="approve"] .output details')
    output.find_element("css selector", "summary").click()
    assert '"approved_by": "console"' in output.text
    assert one(browser, "#signal-send").get_attribute("disabled") is not None
    assert keel.get_run(started.run_id).step("approve").output == {"approved_by": "console"}
