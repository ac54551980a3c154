"""What every `keel` command shares: the connection flags, the clients they build, and CliError."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keel_client.aio import AsyncKeelClient
from keel_client.channel import DEFAULT_DEADLINE, TlsConfig
from keel_client.display import DURATION_EXAMPLES, duration_of
from keel_client.models import E, parse_enum, proto_name, to_json_data
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


def add_connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--engine, --json, --deadline, --token and the TLS files, defaulting to the KEEL_* variables."""

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


def enum_argument(kind: type[E], accepted: Collection[E] = ()) -> Callable[[str], E]:
    """An argparse `type` reading a `kind` by value or proto name (`failed`, RUN_STATUS_FAILED), any case."""
    allowed = list(accepted) or [member for member in kind if member.value != "unspecified"]

    def convert(text: str) -> E:
        try:
            member = parse_enum(kind, text)
        except ValueError:
            member = None
        if member not in allowed:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(allowed)} (proto names like "
                f"{proto_name(allowed[0])} are accepted too)"
            )
        return member

    convert.__name__ = kind.__name__
    return convert


def label_pair(text: str) -> tuple[str, str]:
    """An argparse `type` reading `KEY=VALUE` (the value may be empty; the engine checks the rules)."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (for example team=billing)")
    return key, value


def label_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable `--label KEY=VALUE` option (into `args.label`, a list of pairs)."""
    parser.add_argument("--label", action="append", type=label_pair, metavar="KEY=VALUE", help=help_text)


def moment_argument(text: str) -> datetime:
    """An argparse `type` reading a time: ISO 8601 (naive is UTC) or an age like `30m` (that long ago)."""
    age = duration_of(text)
    if age is not None:
        return datetime.now(UTC) - age
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time (2026-12-04T18:00:00Z) nor an age (90s, 30m, 1h, 2d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def duration_argument(text: str) -> timedelta:
    """An argparse `type` reading a duration such as 90s, 30m, 1.5h or 2d."""
    duration = duration_of(text)
    if duration is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration ({DURATION_EXAMPLES})")
    return duration


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS files the flags name; None for a plaintext channel."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsConfig(
        ca_file=Path(args.tls_ca) if args.tls_ca else None,
        cert_file=Path(args.tls_cert) if args.tls_cert else None,
        key_file=Path(args.tls_key) if args.tls_key else None,
    )


def client(args: argparse.Namespace, engine: str | None = None) -> KeelClient:
    """A blocking client of `engine` (default: --engine) with the connection flags."""
    return KeelClient(engine or args.engine, deadline=args.deadline, tls=tls_config(args), token=args.token)


def async_client(args: argparse.Namespace, engine: str | None = None) -> AsyncKeelClient:
    """An asyncio client of `engine` (default: --engine) with the connection flags."""
    return AsyncKeelClient(
        engine or args.engine, deadline=args.deadline, tls=tls_config(args), token=args.token
    )


def print_json(data: Any) -> None:
    """One line of JSON on stdout (dataclasses and enums as plain JSON)."""
    print(json.dumps(to_json_data(data), sort_keys=True, ensure_ascii=False))


def answer(args: argparse.Namespace, result: Any, text: Callable[[], str]) -> int:
    """Print `result` as JSON with --json, else the text `text` makes of it; the exit status is 0."""
    if args.json:
        print_json(result)
    else:
        print(text())
    return 0
