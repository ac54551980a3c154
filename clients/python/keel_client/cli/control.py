"""`keel cancel`, `keel terminalize`, `keel resume`: end a run exactly once, or make the engine drive it."""

from __future__ import annotations

import argparse

from keel_client.cli.options import answer, client, enum_argument
from keel_client.models import TerminalTarget, to_json_data


def cancel_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel cancel RUN_ID [--reason]`."""
    parser.add_argument("run_id", metavar="RUN_ID")
    parser.add_argument("--reason", default="", help="why, for the record")


def terminalize_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel terminalize RUN_ID --target T [--reason]`."""
    parser.add_argument("run_id", metavar="RUN_ID")
    parser.add_argument(
        "--target",
        required=True,
        type=enum_argument(TerminalTarget),
        metavar="TARGET",
        help="completed, failed or canceled (or TERMINAL_TARGET_CANCELED, ...)",
    )
    parser.add_argument("--reason", default="", help="why (required with --target failed)")


def cmd_terminalize(args: argparse.Namespace) -> int:
    """`keel terminalize` and `keel cancel` (whose target is always canceled)."""
    target = getattr(args, "target", TerminalTarget.CANCELED)
    with client(args) as keel:
        result = keel.terminalize(args.run_id, target, reason=args.reason)
    if result.outcome.value == "noop":
        text = f"run {args.run_id} was already {result.status.value}; nothing changed"
    else:
        text = f"run {args.run_id} is now {result.status.value}"
    return answer(args, {"run_id": args.run_id, **to_json_data(result)}, lambda: text)


def cmd_resume(args: argparse.Namespace) -> int:
    """`keel resume`."""
    with client(args) as keel:
        resumed = keel.resume_run(args.run_id)
    status = resumed.run.status.value if resumed.run else "unknown"
    verb = "resumed" if resumed.resumed else "not resumed (terminal or already driven)"
    return answer(args, resumed, lambda: f"run {args.run_id} {verb}; status {status}")
