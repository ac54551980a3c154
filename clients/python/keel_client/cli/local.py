"""`keel up` and `keel demo`: a store and an engine on this machine (they need the server distribution)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path
from types import FrameType

from keel_client.cli.options import DEFAULT_DATA_DIR, DEFAULT_STORE, CliError, print_json
from keel_client.cli.runs import follow, load_run_file, start
from keel_client.local_cluster import LocalCluster, require_server


def up_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel up [--data-dir] [--store-listen] [--engine-listen] [--ops]`."""
    data_dir = os.environ.get("KEEL_DATA_DIR", DEFAULT_DATA_DIR)
    parser.add_argument(
        "--data-dir", default=data_dir, help=f"where the store keeps its data (default ./{data_dir})"
    )
    parser.add_argument(
        "--store-listen", default=DEFAULT_STORE, help=f"store HOST:PORT (default {DEFAULT_STORE})"
    )
    parser.add_argument("--engine-listen", help="engine HOST:PORT (default: the --engine address)")
    _ops_argument(parser)


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    """`keel demo [--data-dir] [--ops]`."""
    parser.add_argument("--data-dir", help="keep the services' data here (default: a temporary directory)")
    _ops_argument(parser)


def _ops_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops", nargs="+", default=[], metavar="MODULE", help="extra op modules for the engine"
    )


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def cmd_up(args: argparse.Namespace) -> int:
    """`keel up`: a store and an engine until Ctrl-C or SIGTERM."""
    require_server("keel up")
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
        _announce(cluster, data_dir, args.json)
        while not stop.wait(0.5):
            died = cluster.poll()
            if died is not None:
                code = died.process.returncode
                raise CliError(f"{died.name} exited with code {code}; log {died.log_path}")
    finally:
        print("stopping engine and store...", file=sys.stderr, flush=True)
        cluster.stop()
    return 0


def _announce(cluster: LocalCluster, data_dir: Path, as_json: bool) -> None:
    if as_json:
        assert cluster.store is not None and cluster.engine is not None
        print_json(
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


def demo_pipeline_path() -> Path:
    """The demo pipeline shipped with the package."""
    return Path(str(resources.files("keel_client") / "examples" / "demo_pipeline.yaml"))


def cmd_demo(args: argparse.Namespace) -> int:
    """`keel demo`: services in a temporary directory, the demo pipeline with live progress, then stop."""
    require_server("keel demo")
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
            run_id = start(args, spec, cluster.engine_address, print_started_json=False)
            code = asyncio.run(follow(args, run_id, cluster.engine_address))
            if not args.json:
                print("\nstopping engine and store...", flush=True)
    return code
