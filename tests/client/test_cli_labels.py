"""`keel run --label`, `keel get` labels, and `keel ls` columns and filters, against a real engine."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from tests.client.conftest import run_keel
from tests.client.test_cli import GOOD, assert_one_line_error


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    """test_cli's two-step pipeline (pipeline id `cli-good`) as a run file."""
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    return path


def ls(engine: str, *filters: str) -> list[dict[str, object]]:
    """`keel ls --json` with `filters`."""
    result = run_keel("ls", "--json", "--limit", "1000", *filters, engine=engine)
    assert result.code == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


def start(engine: str, path: Path, *labels: str) -> str:
    """Run `path` to its end with `--label` for each of `labels`; the run id."""
    flags = [part for label in labels for part in ("--label", label)]
    result = run_keel("run", str(path), "--wait", "--json", *flags, engine=engine)
    assert result.code == 0, result.stderr
    run_id: str = json.loads(result.stdout)["run_id"]
    return run_id


def test_labels_are_shown_and_ls_filters_by_them(engine_address: str, good_file: Path) -> None:
    team = f"t{uuid.uuid4().hex[:12]}"
    prod = start(engine_address, good_file, f"team={team}", "env=prod")
    dev = start(engine_address, good_file, f"team={team}", "env=dev")

    got = run_keel("get", prod, engine=engine_address)
    assert f"labels     env=prod,team={team}" in got.stdout

    assert [r["run_id"] for r in ls(engine_address, "--label", f"team={team}")] == [dev, prod]
    assert [r["run_id"] for r in ls(engine_address, "--label", f"team={team}", "--label", "env=prod")] == [
        prod
    ]
    summary = ls(engine_address, "--label", f"team={team}", "--label", "env=prod")[0]
    assert (summary["pipeline_id"], summary["labels"]) == ("cli-good", {"team": team, "env": "prod"})

    def ids(*filters: str) -> set[object]:
        return {r["run_id"] for r in ls(engine_address, "--label", f"team={team}", *filters)}

    assert ids("--pipeline", "cli-good") == {prod, dev}
    assert ids("--pipeline", "cli-other") == set()
    assert ids("--status", "completed") == {prod, dev}
    assert ids("--status", "failed") == set()
    assert ids("--since", "1h") == {prod, dev}
    assert ids("--started-before", "1h") == set()
    assert ids("--until", "2999-01-01T00:00:00Z") == {prod, dev}
    assert ids("--started-after", "2999-01-01T00:00:00") == set()
    assert ids("--top-level") == {prod, dev}
    assert ids("--children") == set()
    # Both runs ended within moments of their start, and their durations stopped there.
    assert ids("--min-duration", "0s", "--max-duration", "1d") == {prod, dev}
    assert ids("--min-duration", "1d") == set()
    assert ids("--max-duration", "1.5h", "--status", "running") == set()

    table = run_keel("ls", "--label", f"team={team}", "--label", "env=prod", engine=engine_address)
    header, row = table.stdout.splitlines()
    assert header.split() == ["RUN", "ID", "PIPELINE", "STATUS", "STARTED", "DURATION", "LABELS", "PARENT"]
    assert row.split()[:3] == [prod, "cli-good", "completed"]
    assert row.split()[-2:] == [f"env=prod,team={team}", "-"]
    empty = run_keel("ls", "--label", f"team={team}", "--children", engine=engine_address)
    assert empty.stdout.strip() == "no runs"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--label", "no-equals"], "KEY=VALUE"),
        (["--since", "yesterday-ish"], "ISO 8601"),
        (["--top-level", "--children"], "not allowed with"),
        (["--min-duration", "soon"], "not a duration (90s, 30m, 1.5h, 2d)"),
        (["--max-duration=-5m"], "not a duration"),
    ],
)
def test_bad_ls_flags_are_refused_before_any_call(
    engine_address: str, flags: list[str], fragment: str
) -> None:
    result = run_keel("ls", *flags, engine=engine_address)
    assert result.code == 2
    assert fragment in result.stderr


def test_ls_with_a_min_duration_longer_than_its_max_is_refused(engine_address: str) -> None:
    result = run_keel("ls", "--min-duration", "1h", "--max-duration", "5m", engine=engine_address)
    assert result.code == 1
    assert_one_line_error(result.stderr, "--min-duration must not be longer than --max-duration")


def test_a_label_the_engine_refuses_is_one_line(engine_address: str, good_file: Path) -> None:
    result = run_keel("run", str(good_file), "--label", "team=has space", engine=engine_address)
    assert result.code != 0
    assert_one_line_error(result.stderr, "invalid_labels", "Kubernetes")
    listed = run_keel("ls", "--label", "team=has space", engine=engine_address)
    assert_one_line_error(listed.stderr, "invalid_labels")
