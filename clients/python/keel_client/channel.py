"""How the clients reach the engine: channel options, gRPC's built-in retry of UNAVAILABLE, TLS and a token.

Retries use gRPC's own retry machinery (a `retryPolicy` in the channel's service config), so they
also cover a connection that fails before a call leaves the client, and they stay within the call's
deadline. Every EngineService method is listed, which is only sound because each one is idempotent
*as this client calls it*:

- StartRun: the client always sends a run id (a UUIDv7 it picks when the caller gives none), and a
  start with an existing run id and the same manifest returns that run instead of a second one;
- ResumeRun, SpawnChild (child id = uuid5(parent, fact key)), AwaitChild, GetRun, ListRuns,
  AwaitRun, ListOps: repeating them changes nothing;
- Terminalize: a repeat after an unseen success answers NOOP with the same terminal status;
- WatchRun: gRPC retries a stream only until its first message; after that the client itself
  resumes the stream after the last event it delivered (see `WATCH_RECONNECTS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENGINE_SERVICE = "keel.engine.v1.EngineService"
DEFAULT_DEADLINE = 30.0  # seconds per call, unless a method says otherwise
RETRY_MAX_ATTEMPTS = 5  # gRPC caps maxAttempts at 5
WATCH_RECONNECTS = 5  # consecutive reconnects of a broken WatchRun stream before giving up
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": ENGINE_SERVICE}],
            "retryPolicy": {
                "maxAttempts": RETRY_MAX_ATTEMPTS,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the engine: a CA bundle to verify it, and optionally a client certificate for mutual TLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these files describe."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


def channel_options(retries: bool) -> list[tuple[str, str | int]]:
    """Options for a channel to the engine, with the retry service config unless `retries` is False."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        options.append(("grpc.service_config", json.dumps(SERVICE_CONFIG)))
    return options


def call_metadata(token: str | None) -> tuple[tuple[str, str | bytes], ...] | None:
    """The metadata every call carries: a bearer token when one is configured."""
    if token is None:
        return None
    return (("authorization", f"Bearer {token}"),)
