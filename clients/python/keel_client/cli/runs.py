"""`keel run` and `keel wait`: start a run from a file, and follow a run with live progress to its end."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from keel_client.cli.options import CliError, async_client, client, label_argument, print_json
from keel_client.display import pretty_json, seconds, span
from keel_client.models import Run, RunStatus
from keel_client.progress import ProgressView, follow_run


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel run PIPELINE_FILE [--input] [--context] [--run-id] [--wait]`."""
    parser.add_argument(
        "pipeline_file", metavar="PIPELINE_FILE", help="a pipeline, or {pipeline, input, context}"
    )
    parser.add_argument("--input", help="the run's input, as JSON")
    parser.add_argument("--context", help="the run's initial context, a JSON object")
    parser.add_argument("--run-id", help="a UUID for an idempotent start (default: a new one)")
    parser.add_argument("--wait", action="store_true", help="show live progress until the run ends")
    label_argument(parser, "label the run (repeatable; added to the file's `labels`)")
    parser.add_argument(
        "--signal",
        action="append",
        default=[],
        type=_signal_argument,
        metavar="NAME=JSON",
        help="send a signal with the start (repeatable; added to the file's `signals`)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """`keel run`: start a run from a file, optionally following it to the end."""
    spec = load_run_file(Path(args.pipeline_file))
    if args.input is not None:
        spec["input"] = _parse_json(args.input, "--input")
    if args.context is not None:
        spec["context"] = _parse_json(args.context, "--context")
    if args.label:
        spec["labels"] = {**dict(spec.get("labels") or {}), **dict(args.label)}
    if args.signal:
        spec["signals"] = [*(spec.get("signals") or []), *args.signal]
    run_id = start(args, spec, args.engine, print_started_json=not args.wait)
    if not args.wait:
        return 0
    return asyncio.run(follow(args, run_id))


def cmd_wait(args: argparse.Namespace) -> int:
    """`keel wait`: follow an existing run."""
    return asyncio.run(follow(args, args.run_id))


def _signal_argument(text: str) -> dict[str, Any]:
    name, equals, data = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        return {"name": name, "payload": json.loads(data)}
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"the payload of {name} is not JSON: {error}") from None


def _parse_json(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{flag} is not JSON: {error}") from None


def load_run_file(path: Path) -> dict[str, Any]:
    """A pipeline file as {pipeline, input?, context?, run_config?, labels?, signals?}; a bare
    pipeline is accepted too."""
    try:
        text = path.read_text()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None
    except yaml.YAMLError as error:
        raise CliError(_yaml_error(path, error)) from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a pipeline object (pipeline_id, steps), not {type(data).__name__}")
    if "pipeline" in data:
        unknown = set(data) - {"pipeline", "input", "context", "run_config", "labels", "signals"}
        if unknown:
            raise CliError(f"{path}: unknown top-level keys {', '.join(sorted(unknown))}")
        labels = data.get("labels", {})
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise CliError(f"{path}: labels must map keys to string values (quote numbers in YAML)")
        signals = data.get("signals", [])
        if not isinstance(signals, list) or not all(isinstance(s, dict) for s in signals):
            raise CliError(f"{path}: signals must be a list of {{name, payload, signal_id?}}")
        return data
    return {"pipeline": data}


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    # `FILE:LINE:COLUMN: problem` on one line, as compilers say it, so editors can jump there;
    # PyYAML's own text names "<unicode string>" and spreads over several lines.
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    detail = ", ".join(part for part in parts if part) or str(error)
    return f"{where}: not valid YAML: {' '.join(detail.split())}"


def start(args: argparse.Namespace, spec: dict[str, Any], engine: str, *, print_started_json: bool) -> str:
    """Start the run `spec` describes on `engine`, say so, and return its id."""
    with client(args, engine) as keel:
        started = keel.start_run(
            spec["pipeline"],
            input=spec.get("input"),
            context=spec.get("context"),
            run_config=spec.get("run_config"),
            run_id=getattr(args, "run_id", None),
            labels=spec.get("labels"),
            signals=spec.get("signals") or (),
        )
    if args.json:
        if print_started_json:
            print_json(started)
    else:
        state = "started" if started.created else "already exists:"
        print(f"{state} run {started.run_id}", flush=True)
    return started.run_id


async def follow(args: argparse.Namespace, run_id: str, engine: str | None = None) -> int:
    """Show the run's progress until it ends, then report it; the exit status says how it ended."""
    keel = async_client(args, engine)
    view = None
    try:
        if not args.json:
            in_place = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
            view = ProgressView(sys.stdout, in_place=in_place)
        run = await follow_run(keel, run_id, view)
    except asyncio.CancelledError:
        # Ctrl-C stops the display, not the run.
        raise CliError(
            f"interrupted; run {run_id} goes on (follow it again with `keel wait {run_id}`)"
        ) from None
    finally:
        if view is not None:
            view.close()  # the whole final picture, once, above the report
        await keel.close()
    return _final_report(run, args.json)


def _final_report(run: Run, as_json: bool) -> int:
    if as_json:
        print_json(run)
    else:
        took = seconds(span(run.created_at, run.completed_at))
        print(f"\nrun {run.run_id} {run.status.value} in {took}")
        if run.final_snapshot is not None:
            print(pretty_json(run.final_snapshot))
    if run.status is RunStatus.COMPLETED:
        return 0
    why = f"{run.error.code}: {run.error.message}" if run.error else (run.reason or "no reason recorded")
    print(f"keel: run {run.run_id} {run.status.value}: {why}", file=sys.stderr)
    return 1
