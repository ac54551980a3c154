"""The common server flags (keel_core.server_flags) as both services expose them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import pytest

from engine_service.server import parse_args as engine_args
from store_service.server import parse_args as store_args

Parse = Callable[[Sequence[str] | None], argparse.Namespace]
SERVICES = pytest.mark.parametrize(
    ("parse", "prefix", "listen"),
    [(store_args, "KEEL_STORE", "127.0.0.1:7071"), (engine_args, "KEEL_ENGINE", "127.0.0.1:7070")],
    ids=["store", "engine"],
)
# flag dest -> (environment variable suffix, a value to set)
COMMON = {
    "listen": ("LISTEN", "127.0.0.1:9"),
    "tls_cert": ("TLS_CERT", "cert.pem"),
    "tls_key": ("TLS_KEY", "key.pem"),
    "tls_client_ca": ("TLS_CLIENT_CA", "ca.pem"),
    "metrics_listen": ("METRICS_LISTEN", "127.0.0.1:0"),
    "log_level": ("LOG_LEVEL", "debug"),
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for prefix in ("KEEL_STORE", "KEEL_ENGINE"):
        for suffix, _ in [*COMMON.values(), ("GRACE", ""), ("EVENT_LOOP", "")]:
            monkeypatch.delenv(f"{prefix}_{suffix}", raising=False)
    monkeypatch.delenv("KEEL_EVENT_LOOP", raising=False)


@SERVICES
def test_common_flags_keep_their_defaults(parse: Parse, prefix: str, listen: str) -> None:
    args = parse([])
    assert (args.listen, args.grace, args.log_level, args.event_loop) == (listen, 10.0, "info", "asyncio")
    assert (args.tls_cert, args.tls_key, args.tls_client_ca, args.metrics_listen) == (None, None, None, None)


@SERVICES
def test_each_common_flag_reads_the_services_own_variable(
    parse: Parse, prefix: str, listen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for dest, (suffix, value) in COMMON.items():
        monkeypatch.setenv(f"{prefix}_{suffix}", value)
        assert getattr(parse([]), dest) == value, dest
    monkeypatch.setenv(f"{prefix}_GRACE", "2.5")
    assert parse([]).grace == 2.5
    assert parse(["--grace", "1"]).grace == 1.0  # a flag wins


@SERVICES
def test_a_bad_choice_from_the_environment_fails_loudly(
    parse: Parse, prefix: str, listen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{prefix}_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit):
        parse([])
