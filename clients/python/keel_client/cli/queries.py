"""`keel get`, `keel ls`, `keel history`, `keel ops`: what the engine knows, for people or as JSON."""

from __future__ import annotations

import argparse
import json

from keel_client.cli.options import (
    CliError,
    answer,
    client,
    duration_argument,
    enum_argument,
    label_argument,
    moment_argument,
    print_json,
)
from keel_client.display import event_line, op_lines, queue_lines, run_lines, summary_lines
from keel_client.models import RunEvent, RunStatus, to_json_data


def run_id_argument(parser: argparse.ArgumentParser) -> None:
    """The RUN_ID positional argument."""
    parser.add_argument("run_id", metavar="RUN_ID")


def ls_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel ls [--status S]... [--pipeline ID] [--label K=V]... [--since T] [--until T]
    [--min-duration D] [--max-duration D] [--top-level | --children] [--parent RUN_ID] [--limit N]`."""
    statuses = (RunStatus.RUNNING, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)
    parser.add_argument(
        "--status",
        action="append",
        type=enum_argument(RunStatus, statuses),
        metavar="STATUS",
        help="only runs with this status (repeatable): running, completed, failed, canceled "
        "(or RUN_STATUS_FAILED, ...)",
    )
    parser.add_argument("--pipeline", default="", metavar="ID", help="only runs of this pipeline (or op) id")
    label_argument(parser, "only runs with this label (repeatable: every one must match)")
    for flag, alias, dest, what in (
        ("--since", "--started-after", "since", "started at or after"),
        ("--until", "--started-before", "until", "started before"),
    ):
        parser.add_argument(
            flag,
            alias,
            dest=dest,
            type=moment_argument,
            metavar="TIME",
            help=f"only runs {what} TIME: ISO 8601 (UTC unless it has an offset) or an age such as "
            "90s, 30m, 1h, 2d (that long ago)",
        )
    for flag, dest, what in (
        ("--min-duration", "min_duration", "at least"),
        ("--max-duration", "max_duration", "at most"),
    ):
        parser.add_argument(
            flag,
            dest=dest,
            type=duration_argument,
            metavar="DURATION",
            help=f"only runs that lasted {what} DURATION, such as 90s, 30m, 1.5h, 2d (a finished run "
            "from its start to its end, a running one until now)",
        )
    lineage = parser.add_mutually_exclusive_group()
    lineage.add_argument(
        "--top-level", dest="top_level", action="store_const", const=True, help="only runs no run spawned"
    )
    lineage.add_argument(
        "--children", dest="top_level", action="store_const", const=False, help="only child runs"
    )
    parser.add_argument("--parent", default="", metavar="RUN_ID", help="only the runs this run spawned")
    parser.add_argument("--limit", type=int, default=20, help="most runs to show (default 20)")


def history_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel history RUN_ID [--follow]`."""
    run_id_argument(parser)
    parser.add_argument("--follow", action="store_true", help="keep printing events until the run ends")


def cmd_get(args: argparse.Namespace) -> int:
    """`keel get`: one run in full."""
    with client(args) as keel:
        run = keel.get_run(args.run_id)
    return answer(args, run, lambda: "\n".join(run_lines(run)))


def cmd_ls(args: argparse.Namespace) -> int:
    """`keel ls`: a table of runs."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    if (
        args.min_duration is not None
        and args.max_duration is not None
        and args.min_duration > args.max_duration
    ):
        raise CliError("--min-duration must not be longer than --max-duration")
    with client(args) as keel:
        runs = list(
            keel.iter_runs(
                statuses=args.status or (),
                limit=args.limit,
                page_size=min(args.limit, 1000),
                pipeline_id=args.pipeline,
                labels=dict(args.label or ()),
                started_after=args.since,
                started_before=args.until,
                top_level=args.top_level,
                parent_run_id=args.parent,
                min_duration=args.min_duration,
                max_duration=args.max_duration,
            )
        )
    return answer(args, runs, lambda: "\n".join(summary_lines(runs)) if runs else "no runs")


def cmd_history(args: argparse.Namespace) -> int:
    """`keel history`: a run's events, up to now (or to the end with --follow)."""
    with client(args) as keel:
        head = keel.get_run(args.run_id).head_seq
        events: list[RunEvent] = []
        for event in keel.watch_run(args.run_id):
            if args.follow:
                line = json.dumps(to_json_data(event), sort_keys=True) if args.json else event_line(event)
                print(line, flush=True)
            else:
                events.append(event)
                if event.seq >= head:
                    break
    if not args.follow:
        if args.json:
            print_json(events)
        else:
            print("\n".join(event_line(event) for event in events))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    """`keel ops`: registered ops and versions."""
    with client(args) as keel:
        ops = keel.list_ops()
    return answer(args, list(ops), lambda: "\n".join(op_lines(ops)))


def cmd_queues(args: argparse.Namespace) -> int:
    """`keel queues`: task queues with their backlog, running tasks and recent workers."""
    with client(args) as keel:
        queues = keel.list_queues()
    return answer(args, list(queues), lambda: "\n".join(queue_lines(queues)))
