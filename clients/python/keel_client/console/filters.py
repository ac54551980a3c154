"""The runs page's filters: URL query parameters to `list_runs` arguments (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from keel_client.display import DURATION_EXAMPLES, duration_of
from keel_client.models import RunStatus, parse_enum

DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 200
LISTABLE = (RunStatus.RUNNING, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)
_LINEAGES = {"": None, "all": None, "top": True, "children": False}


class FilterError(ValueError):
    """A filter the user typed that means nothing; the message says which and what is accepted."""


@dataclass(frozen=True)
class RunQuery:
    """What the runs page asks ListRuns for."""

    statuses: tuple[RunStatus, ...] = ()
    pipeline_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    started_after: datetime | None = None
    started_before: datetime | None = None
    top_level: bool | None = None
    parent_run_id: str = ""
    min_duration: timedelta | None = None
    max_duration: timedelta | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    page_token: str | None = None


def moment(text: str, name: str, now: datetime) -> datetime:
    """A time given as ISO 8601 (naive means UTC) or as an age like `30m` (that long before `now`)."""
    age = duration_of(text)
    if age is not None:
        return now - age
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise FilterError(
            f"{name}: {text!r} is neither an ISO 8601 time (2026-12-04T18:00:00Z) "
            "nor an age (90s, 30m, 1h, 2d)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def duration(text: str, name: str) -> timedelta:
    """A duration such as 90s, 30m, 1.5h or 2d."""
    found = duration_of(text)
    if found is None:
        raise FilterError(f"{name}: {text!r} is not a duration ({DURATION_EXAMPLES})")
    return found


def labels_of(texts: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` pairs, given one per parameter or comma-separated; the engine checks the rules."""
    labels: dict[str, str] = {}
    for text in texts:
        for pair in text.split(","):
            if not pair.strip():
                continue
            key, equals, value = pair.strip().partition("=")
            if not equals or not key.strip():
                raise FilterError(f"label: {pair.strip()!r} is not KEY=VALUE (for example team=billing)")
            labels[key.strip()] = value.strip()
    return labels


def statuses_of(texts: Sequence[str]) -> tuple[RunStatus, ...]:
    """Run statuses by name (`failed` or RUN_STATUS_FAILED), given one per parameter or comma-separated."""
    out: list[RunStatus] = []
    for text in texts:
        for name in text.split(","):
            if not name.strip():
                continue
            try:
                status = parse_enum(RunStatus, name)
            except ValueError as error:
                raise FilterError(f"status: {error}") from None
            if status not in LISTABLE:
                raise FilterError(f"status: {name!r} is not one of {', '.join(LISTABLE)}")
            if status not in out:
                out.append(status)
    return tuple(out)


def page_size_of(text: str) -> int:
    """A page size from 1 to MAX_PAGE_SIZE (empty: the default)."""
    if not text:
        return DEFAULT_PAGE_SIZE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise FilterError(f"page_size: {text!r} is not a whole number from 1 to {MAX_PAGE_SIZE}")
    return int(text)


def run_query(params: Mapping[str, Sequence[str]], now: datetime) -> RunQuery:
    """The query that the runs page's URL parameters (each a list of values) stand for."""

    def one(name: str) -> str:
        values = params.get(name, ())
        return values[-1].strip() if values else ""

    lineage = one("lineage")
    if lineage not in _LINEAGES:
        raise FilterError(f"lineage: {lineage!r} is not one of all, top, children")
    since, before = one("since"), one("before")
    shortest, longest = one("min_duration"), one("max_duration")
    min_duration = duration(shortest, "min_duration") if shortest else None
    max_duration = duration(longest, "max_duration") if longest else None
    if min_duration is not None and max_duration is not None and min_duration > max_duration:
        raise FilterError(f"min_duration: {shortest} is longer than max_duration {longest}")
    return RunQuery(
        statuses=statuses_of(params.get("status", ())),
        pipeline_id=one("pipeline"),
        labels=labels_of(params.get("label", ())),
        started_after=moment(since, "since", now) if since else None,
        started_before=moment(before, "before", now) if before else None,
        top_level=_LINEAGES[lineage],
        parent_run_id=one("parent"),
        min_duration=min_duration,
        max_duration=max_duration,
        page_size=page_size_of(one("page_size")),
        page_token=one("page_token") or None,
    )
