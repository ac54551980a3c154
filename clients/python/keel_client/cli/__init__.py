"""The `keel` command: start local services, run pipelines and watch them, inspect and end runs.

Every command reads the engine address from --engine or KEEL_ENGINE, prints for people by default
and JSON with --json, and reports a failure as one line on stderr with exit status 1. The commands
are registered in one place, `COMMANDS` below; each lives in the module of its kind.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keel_client.cli import control, local, queries, runs, web
from keel_client.cli.options import ENVIRONMENT_HELP, CliError, add_connection_options
from keel_client.errors import KeelClientError, UnavailableError
from keel_client.local_cluster import ClusterError

__all__ = ["COMMANDS", "CliError", "Command", "build_parser", "main"]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command that takes only the connection flags."""


@dataclass(frozen=True)
class Command:
    """One `keel` sub-command: its name, its one-line summary, its handler and its own arguments."""

    name: str
    summary: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments


COMMANDS: tuple[Command, ...] = (
    Command(
        "up",
        "start a store and an engine on this machine until Ctrl-C or SIGTERM",
        local.cmd_up,
        local.up_arguments,
    ),
    Command(
        "demo",
        "start services, run the demo pipeline with live progress, stop the services",
        local.cmd_demo,
        local.demo_arguments,
    ),
    Command(
        "run",
        "start a run of a pipeline file (JSON or YAML); --wait follows it to the end",
        runs.cmd_run,
        runs.run_arguments,
    ),
    Command("wait", "follow a run with live progress until it ends", runs.cmd_wait, queries.run_id_argument),
    Command(
        "get",
        "show a run: steps, attempts, errors, children, final snapshot",
        queries.cmd_get,
        queries.run_id_argument,
    ),
    Command("ls", "list runs, newest first", queries.cmd_ls, queries.ls_arguments),
    Command("history", "show a run's events", queries.cmd_history, queries.history_arguments),
    Command("cancel", "cancel a run", control.cmd_terminalize, control.cancel_arguments),
    Command(
        "terminalize",
        "move a run to a terminal status exactly once",
        control.cmd_terminalize,
        control.terminalize_arguments,
    ),
    Command(
        "resume", "make the engine drive a run nobody drives", control.cmd_resume, queries.run_id_argument
    ),
    Command(
        "delete",
        "delete a finished run now, with the runs it spawned (the store must accept deletes)",
        control.cmd_delete,
        queries.run_id_argument,
    ),
    Command(
        "rerun",
        "run a finished run again from a step, reusing the steps before it",
        control.cmd_rerun,
        control.rerun_arguments,
    ),
    Command(
        "signal",
        "send a signal (a name and a JSON payload) to a run",
        control.cmd_signal,
        control.signal_arguments,
    ),
    Command(
        "ops",
        "list the ops the engine can run and those workers declared, with versions and task queues",
        queries.cmd_ops,
    ),
    Command(
        "queues", "list task queues: backlog, running tasks, workers seen and their ops", queries.cmd_queues
    ),
    Command(
        "ui", "serve the web console for the engine until Ctrl-C or SIGTERM", web.cmd_ui, web.ui_arguments
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keel` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="keel",
        description="Keel: durable pipelines on EngineService. Start services with `keel up`, "
        "run a pipeline with `keel run FILE --wait`, try it all with `keel demo`.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    add_connection_options(common, suppress=True)
    sub_commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = sub_commands.add_parser(
            command.name,
            parents=[common],
            help=command.summary,
            description=command.summary,
            epilog=ENVIRONMENT_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keel` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except UnavailableError as error:
        hint = (
            ""
            if error.code in ("store_unavailable", "store_unauthenticated")  # the engine answered
            else f" (is an engine running at {args.engine}? see `keel up`)"
        )
        print(f"keel: error: {_one_line(str(error))}{hint}", file=sys.stderr)
    except (KeelClientError, CliError, ClusterError) as error:
        print(f"keel: error: {_one_line(str(error))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("keel: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `keel ls | head`: the reader left; say nothing more.
        sys.stderr.close()
    except Exception as error:
        if os.environ.get("KEEL_DEBUG") == "1":
            raise
        print(f"keel: unexpected error: {type(error).__name__}: {_one_line(str(error))}", file=sys.stderr)
    return 1
