"""The `keel` command: start local services, run pipelines and watch them, inspect and end runs.

Every command reads the engine address from --engine or KEEL_ENGINE, prints for people by default
and JSON with --json, and reports a failure as one line on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from keel_client.aio import AsyncKeelClient
from keel_client.channel import DEFAULT_DEADLINE, TlsConfig
from keel_client.display import event_line, op_lines, pretty_json, run_lines, seconds, span, summary_lines
from keel_client.errors import KeelClientError, UnavailableError
from keel_client.local_cluster import ClusterError, LocalCluster
from keel_client.models import Run, RunStatus, TerminalTarget, to_json_data
from keel_client.progress import ProgressView, follow_run
from keel_client.sync import KeelClient

DEFAULT_ENGINE = "127.0.0.1:7070"
DEFAULT_STORE = "127.0.0.1:7071"
DEFAULT_DATA_DIR = "keel-data"

ENVIRONMENT_HELP = f"""\
environment variables (a flag wins over its variable):
  KEEL_ENGINE     engine address HOST:PORT, like --engine (default {DEFAULT_ENGINE})
  KEEL_TOKEN      bearer token sent to the engine, like --token
  KEEL_TLS_CA     CA bundle to verify the engine's TLS certificate, like --tls-ca
  KEEL_TLS_CERT   client certificate for mutual TLS, like --tls-cert
  KEEL_TLS_KEY    client key for mutual TLS, like --tls-key
  KEEL_DATA_DIR   data directory of `keel up`, like --data-dir (default ./{DEFAULT_DATA_DIR})
  KEEL_DEBUG      set to 1 to show a traceback for unexpected errors

exit status: 0 success; 1 an error, or a run that ended failed or canceled; 2 bad usage
"""


class CliError(Exception):
    """A problem the user can fix, reported as one line."""


# ---- parser --------------------------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        # Sub-commands must not overwrite what was given before the sub-command name.
        return argparse.SUPPRESS if suppress else value

    env = os.environ.get
    parser.add_argument(
        "--engine", default=default(env("KEEL_ENGINE", DEFAULT_ENGINE)), help="engine HOST:PORT"
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON for machines")
    parser.add_argument(
        "--deadline",
        type=float,
        default=default(DEFAULT_DEADLINE),
        help=f"seconds each call may take (default {DEFAULT_DEADLINE:.0f})",
    )
    parser.add_argument("--token", default=default(env("KEEL_TOKEN")), help="bearer token for the engine")
    parser.add_argument(
        "--tls-ca", default=default(env("KEEL_TLS_CA")), help="CA file: use TLS to the engine"
    )
    parser.add_argument("--tls-cert", default=default(env("KEEL_TLS_CERT")), help="client certificate file")
    parser.add_argument("--tls-key", default=default(env("KEEL_TLS_KEY")), help="client key file")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keel` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="keel",
        description="Keel: durable pipelines on EngineService. Start services with `keel up`, "
        "run a pipeline with `keel run FILE --wait`, try it all with `keel demo`.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=summary,
            description=summary,
            epilog=ENVIRONMENT_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    data_dir = os.environ.get("KEEL_DATA_DIR", DEFAULT_DATA_DIR)
    up = command("up", "start a store and an engine on this machine until Ctrl-C or SIGTERM")
    up.add_argument(
        "--data-dir", default=data_dir, help=f"where the store keeps its data (default ./{data_dir})"
    )
    up.add_argument(
        "--store-listen", default=DEFAULT_STORE, help=f"store HOST:PORT (default {DEFAULT_STORE})"
    )
    up.add_argument("--engine-listen", help="engine HOST:PORT (default: the --engine address)")
    up.add_argument("--ops", nargs="+", default=[], metavar="MODULE", help="extra op modules for the engine")

    demo = command("demo", "start services, run the demo pipeline with live progress, stop the services")
    demo.add_argument("--data-dir", help="keep the services' data here (default: a temporary directory)")
    demo.add_argument(
        "--ops", nargs="+", default=[], metavar="MODULE", help="extra op modules for the engine"
    )

    run = command("run", "start a run of a pipeline file (JSON or YAML); --wait follows it to the end")
    run.add_argument(
        "pipeline_file", metavar="PIPELINE_FILE", help="a pipeline, or {pipeline, input, context}"
    )
    run.add_argument("--input", help="the run's input, as JSON")
    run.add_argument("--context", help="the run's initial context, a JSON object")
    run.add_argument("--run-id", help="a UUID for an idempotent start (default: a new one)")
    run.add_argument("--wait", action="store_true", help="show live progress until the run ends")

    wait = command("wait", "follow a run with live progress until it ends")
    wait.add_argument("run_id", metavar="RUN_ID")

    get = command("get", "show a run: steps, attempts, errors, children, final snapshot")
    get.add_argument("run_id", metavar="RUN_ID")

    ls = command("ls", "list runs, newest first")
    ls.add_argument("--status", action="append", choices=["running", "completed", "failed", "canceled"])
    ls.add_argument("--limit", type=int, default=20, help="most runs to show (default 20)")

    history = command("history", "show a run's events")
    history.add_argument("run_id", metavar="RUN_ID")
    history.add_argument("--follow", action="store_true", help="keep printing events until the run ends")

    cancel = command("cancel", "cancel a run")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.add_argument("--reason", default="", help="why, for the record")

    terminalize = command("terminalize", "move a run to a terminal status exactly once")
    terminalize.add_argument("run_id", metavar="RUN_ID")
    terminalize.add_argument("--target", required=True, choices=[target.value for target in TerminalTarget])
    terminalize.add_argument("--reason", default="", help="why (required with --target failed)")

    resume = command("resume", "make the engine drive a run nobody drives")
    resume.add_argument("run_id", metavar="RUN_ID")

    command("ops", "list the ops the engine can run, with their versions")
    return parser


# ---- helpers -------------------------------------------------------------------------------------


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsConfig(
        ca_file=Path(args.tls_ca) if args.tls_ca else None,
        cert_file=Path(args.tls_cert) if args.tls_cert else None,
        key_file=Path(args.tls_key) if args.tls_key else None,
    )


def _client(args: argparse.Namespace) -> KeelClient:
    return KeelClient(args.engine, deadline=args.deadline, tls=_tls(args), token=args.token)


def _async_client(args: argparse.Namespace, engine: str | None = None) -> AsyncKeelClient:
    return AsyncKeelClient(engine or args.engine, deadline=args.deadline, tls=_tls(args), token=args.token)


def _print_json(data: Any) -> None:
    print(json.dumps(to_json_data(data), sort_keys=True, ensure_ascii=False))


def _parse_json(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{flag} is not JSON: {error}") from None


def load_run_file(path: Path) -> dict[str, Any]:
    """A pipeline file as {pipeline, input?, context?, run_config?}; a bare pipeline is accepted too."""
    try:
        text = path.read_text()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        detail = " ".join(str(error).split())
        raise CliError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {detail}"
        ) from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a pipeline object (pipeline_id, steps), not {type(data).__name__}")
    if "pipeline" in data:
        unknown = set(data) - {"pipeline", "input", "context", "run_config"}
        if unknown:
            raise CliError(f"{path}: unknown top-level keys {', '.join(sorted(unknown))}")
        return data
    return {"pipeline": data}


def _final_report(run: Run, as_json: bool) -> int:
    if as_json:
        _print_json(run)
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


async def _follow(args: argparse.Namespace, run_id: str, engine: str | None = None) -> int:
    client = _async_client(args, engine)
    try:
        view = None
        if not args.json:
            in_place = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
            view = ProgressView(sys.stdout, in_place=in_place)
        run = await follow_run(client, run_id, view)
    except asyncio.CancelledError:
        # Ctrl-C stops the display, not the run.
        raise CliError(
            f"interrupted; run {run_id} goes on (follow it again with `keel wait {run_id}`)"
        ) from None
    finally:
        await client.close()
    return _final_report(run, args.json)


def _start(args: argparse.Namespace, spec: dict[str, Any], engine: str, *, print_json: bool) -> str:
    with KeelClient(engine, deadline=args.deadline, tls=_tls(args), token=args.token) as client:
        started = client.start_run(
            spec["pipeline"],
            input=spec.get("input"),
            context=spec.get("context"),
            run_config=spec.get("run_config"),
            run_id=getattr(args, "run_id", None),
        )
    if args.json:
        if print_json:
            _print_json(started)
    else:
        state = "started" if started.created else "already exists:"
        print(f"{state} run {started.run_id}", flush=True)
    return started.run_id


# ---- commands ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """`keel run`: start a run from a file, optionally following it to the end."""
    spec = load_run_file(Path(args.pipeline_file))
    if args.input is not None:
        spec["input"] = _parse_json(args.input, "--input")
    if args.context is not None:
        spec["context"] = _parse_json(args.context, "--context")
    run_id = _start(args, spec, args.engine, print_json=not args.wait)
    if not args.wait:
        return 0
    return asyncio.run(_follow(args, run_id))


def cmd_wait(args: argparse.Namespace) -> int:
    """`keel wait`: follow an existing run."""
    return asyncio.run(_follow(args, args.run_id))


def cmd_get(args: argparse.Namespace) -> int:
    """`keel get`: one run in full."""
    with _client(args) as client:
        run = client.get_run(args.run_id)
    if args.json:
        _print_json(run)
    else:
        print("\n".join(run_lines(run)))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """`keel ls`: a table of runs."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    with _client(args) as client:
        runs = list(
            client.iter_runs(statuses=args.status or (), limit=args.limit, page_size=min(args.limit, 1000))
        )
    if args.json:
        _print_json(runs)
    elif runs:
        print("\n".join(summary_lines(runs)))
    else:
        print("no runs")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """`keel history`: a run's events, up to now (or to the end with --follow)."""
    with _client(args) as client:
        head = client.get_run(args.run_id).head_seq
        events = []
        for event in client.watch_run(args.run_id):
            if args.follow:
                print(
                    json.dumps(to_json_data(event), sort_keys=True) if args.json else event_line(event),
                    flush=True,
                )
            else:
                events.append(event)
                if event.seq >= head:
                    break
    if not args.follow:
        if args.json:
            _print_json(events)
        else:
            print("\n".join(event_line(event) for event in events))
    return 0


def cmd_terminalize(args: argparse.Namespace) -> int:
    """`keel terminalize` and `keel cancel`."""
    target = getattr(args, "target", TerminalTarget.CANCELED.value)
    with _client(args) as client:
        result = client.terminalize(args.run_id, target, reason=args.reason)
    if args.json:
        _print_json({"run_id": args.run_id, **to_json_data(result)})
    elif result.outcome.value == "noop":
        print(f"run {args.run_id} was already {result.status.value}; nothing changed")
    else:
        print(f"run {args.run_id} is now {result.status.value}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """`keel resume`."""
    with _client(args) as client:
        resumed = client.resume_run(args.run_id)
    if args.json:
        _print_json(resumed)
    else:
        status = resumed.run.status.value if resumed.run else "unknown"
        verb = "resumed" if resumed.resumed else "not resumed (terminal or already driven)"
        print(f"run {args.run_id} {verb}; status {status}")
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    """`keel ops`: registered ops and versions."""
    with _client(args) as client:
        ops = client.list_ops()
    if args.json:
        _print_json(list(ops))
    else:
        print("\n".join(op_lines(ops)))
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def cmd_up(args: argparse.Namespace) -> int:
    """`keel up`: a store and an engine until Ctrl-C or SIGTERM."""
    stop = _stop_on_signals()
    data_dir = Path(args.data_dir).resolve()
    cluster = LocalCluster(
        data_dir=data_dir,
        store_listen=args.store_listen,
        engine_listen=args.engine_listen or args.engine,
        ops=args.ops,
    )
    cluster.start()
    try:
        if args.json:
            assert cluster.store is not None and cluster.engine is not None
            _print_json(
                {
                    "store": cluster.store_address,
                    "engine": cluster.engine_address,
                    "data_dir": str(data_dir),
                    "store_token_file": str(cluster.store_token_file),
                    "store_pid": cluster.store.process.pid,
                    "engine_pid": cluster.engine.process.pid,
                }
            )
        else:
            store_data, token = data_dir / "store", cluster.store_token_file
            print(f"store   {cluster.store_address}  (data {store_data}, token {token})")
            print(f"engine  {cluster.engine_address}")
            print(f"logs    {data_dir / 'logs'}")
            print(f"ready: export KEEL_ENGINE={cluster.engine_address}  (Ctrl-C stops both)")
        sys.stdout.flush()
        while not stop.wait(0.5):
            died = cluster.poll()
            if died is not None:
                code = died.process.returncode
                raise CliError(f"{died.name} exited with code {code}; log {died.log_path}")
    finally:
        print("stopping engine and store...", file=sys.stderr, flush=True)
        cluster.stop()
    return 0


def demo_pipeline_path() -> Path:
    """The demo pipeline shipped with the package."""
    return Path(str(resources.files("keel_client") / "examples" / "demo_pipeline.yaml"))


def cmd_demo(args: argparse.Namespace) -> int:
    """`keel demo`: services in a temporary directory, the demo pipeline with live progress, then stop."""
    spec = load_run_file(demo_pipeline_path())
    with tempfile.TemporaryDirectory(prefix="keel-demo-") as scratch:
        data_dir = Path(args.data_dir).resolve() if args.data_dir else Path(scratch)
        with LocalCluster(
            data_dir=data_dir, store_listen="127.0.0.1:0", engine_listen="127.0.0.1:0", ops=args.ops
        ) as cluster:
            if not args.json:
                print(
                    f"store {cluster.store_address} and engine {cluster.engine_address} are up ({data_dir})"
                )
                print(f"running the demo pipeline {demo_pipeline_path().name}:\n", flush=True)
            args.engine = cluster.engine_address
            run_id = _start(args, spec, cluster.engine_address, print_json=False)
            code = asyncio.run(_follow(args, run_id, cluster.engine_address))
            if not args.json:
                print("\nstopping engine and store...", flush=True)
    return code


COMMANDS = {
    "up": cmd_up,
    "demo": cmd_demo,
    "run": cmd_run,
    "wait": cmd_wait,
    "get": cmd_get,
    "ls": cmd_ls,
    "history": cmd_history,
    "cancel": cmd_terminalize,
    "terminalize": cmd_terminalize,
    "resume": cmd_resume,
    "ops": cmd_ops,
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keel` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UnavailableError as error:
        hint = (
            ""
            if error.code in ("store_unavailable", "store_unauthenticated")  # the engine answered
            else f" (is an engine running at {args.engine}? see `keel up`)"
        )
        print(f"keel: error: {_one_line(str(error))}{hint}", file=sys.stderr)
    except (KeelClientError, CliError) as error:
        print(f"keel: error: {_one_line(str(error))}", file=sys.stderr)
    except ClusterError as error:
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


if __name__ == "__main__":
    sys.exit(main())
