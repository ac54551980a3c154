"""`keel cancel`, `keel terminalize`, `keel resume`, `keel rerun`, `keel signal`: end a run exactly
once, make the engine drive it, run it again from a step, or send it a signal."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from keel_client.cli.options import CliError, answer, client, enum_argument
from keel_client.cli.runs import follow
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


def rerun_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel rerun RUN_ID --from STEP [--run-id] [--wait]`."""
    parser.add_argument("run_id", metavar="RUN_ID", help="a completed, failed or canceled run")
    parser.add_argument(
        "--from",
        dest="from_step",
        required=True,
        metavar="STEP",
        help="the step to execute again, with every step that depends on it; the others are reused",
    )
    parser.add_argument("--run-id", dest="run_id_new", help="a UUID for the new run (default: a new one)")
    parser.add_argument("--wait", action="store_true", help="show live progress until the new run ends")


def cmd_rerun(args: argparse.Namespace) -> int:
    """`keel rerun`: a new run that reuses what RUN_ID did outside STEP and its descendants."""
    with client(args) as keel:
        rerun = keel.rerun_run(args.run_id, args.from_step, run_id_new=args.run_id_new)
    if args.wait:
        if not args.json:
            print(f"rerun of {args.run_id} from step {args.from_step!r}: run {rerun.run_id}", flush=True)
        return asyncio.run(follow(args, rerun.run_id))
    reused = [s.step_id for s in rerun.run.steps if s.reused_from_run_id] if rerun.run else []
    state = "started" if rerun.created else "already exists:"
    text = (
        f"{state} run {rerun.run_id}, a rerun of {args.run_id} from step {args.from_step!r}"
        f" (reused: {', '.join(reused) or 'nothing'})"
    )
    return answer(args, rerun, lambda: text)


def signal_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel signal RUN_ID NAME [--data JSON] [--id ID]`."""
    parser.add_argument("run_id", metavar="RUN_ID")
    parser.add_argument("name", metavar="NAME", help="the signal's name (what the run waits for)")
    parser.add_argument("--data", default="null", help="the payload, as JSON (default: null)")
    parser.add_argument(
        "--id",
        dest="signal_id",
        default=None,
        help="a signal id: sending it again delivers nothing more (default: a new one)",
    )


def cmd_signal(args: argparse.Namespace) -> int:
    """`keel signal`: send a named JSON payload to a run."""
    payload = _json_argument(args.data, "--data")
    with client(args) as keel:
        sent = keel.signal_run(args.run_id, args.name, payload, signal_id=args.signal_id)
    what = "sent" if sent.created else "already sent (nothing more delivered):"
    return answer(
        args,
        {"run_id": args.run_id, **to_json_data(sent)},
        lambda: f"signal {args.name} {what} {sent.signal_id} to run {args.run_id}",
    )


def _json_argument(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{flag} is not JSON: {error}") from None


def cmd_delete(args: argparse.Namespace) -> int:
    """`keel delete`: delete a terminal run with its tree."""
    with client(args) as keel:
        deleted = keel.delete_run(args.run_id)
    spawned = len(deleted.run_ids) - 1
    text = f"deleted run {args.run_id} and {spawned} run(s) it spawned ({deleted.streams} streams)"
    return answer(args, deleted, lambda: text)
