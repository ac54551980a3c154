"""The runs page's URL filters, read without a server (keel_client.console.filters is pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from keel_client import RunStatus

pytest.importorskip("starlette")  # keel_client.console needs the console extra (conftest skips loudly)

from keel_client.console.filters import DEFAULT_PAGE_SIZE, FilterError, run_query

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


def test_every_filter_is_read() -> None:
    query = run_query(
        {
            "status": ["failed,RUN_STATUS_CANCELED", "failed"],
            "pipeline": ["billing"],
            "label": ["team=a, env=prod", "tier="],
            "since": ["90m"],
            "before": ["2026-12-05T08:30:00"],
            "lineage": ["children"],
            "parent": ["6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b"],
            "min_duration": ["90s"],
            "max_duration": ["1.5h"],
            "page_size": ["10"],
            "page_token": ["abc"],
        },
        NOW,
    )
    assert query.statuses == (RunStatus.FAILED, RunStatus.CANCELED)
    assert query.pipeline_id == "billing"
    assert query.labels == {"team": "a", "env": "prod", "tier": ""}
    assert query.started_after == NOW - timedelta(minutes=90)
    assert query.started_before == datetime(2026, 12, 5, 8, 30, tzinfo=UTC)
    assert query.top_level is False
    assert query.parent_run_id == "6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b"
    assert (query.min_duration, query.max_duration) == (timedelta(seconds=90), timedelta(minutes=90))
    assert (query.page_size, query.page_token) == (10, "abc")


def test_no_filter_means_every_run_on_a_default_page() -> None:
    query = run_query({}, NOW)
    assert query.statuses == () and query.labels == {} and query.top_level is None
    assert query.started_after is None and query.started_before is None
    assert query.min_duration is None and query.max_duration is None
    assert (query.page_size, query.page_token) == (DEFAULT_PAGE_SIZE, None)
    assert run_query({"lineage": ["top"]}, NOW).top_level is True


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"status": ["pending"]}, "status"),
        ({"status": ["asleep"]}, "status"),
        ({"label": ["=x"]}, "label"),
        ({"label": ["team"]}, "label"),
        ({"since": ["tomorrow"]}, "since"),
        ({"before": ["12/05/2026"]}, "before"),
        ({"lineage": ["siblings"]}, "lineage"),
        ({"min_duration": ["a while"]}, "min_duration"),
        ({"max_duration": ["2026-12-05T08:30:00"]}, "max_duration"),
        ({"min_duration": ["2h"], "max_duration": ["1h"]}, "min_duration"),
        ({"page_size": ["201"]}, "page_size"),
        ({"page_size": ["-1"]}, "page_size"),
    ],
)
def test_a_filter_that_means_nothing_is_named(params: dict[str, list[str]], named: str) -> None:
    with pytest.raises(FilterError, match=f"^{named}"):
        run_query(params, NOW)
