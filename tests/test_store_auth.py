"""Who may write to the store: a store started with a bearer token serves only engines given it.

Every refusal is checked twice: the call fails UNAUTHENTICATED with the ErrorInfo reason
`unauthenticated`, and a read with the token then shows that nothing was written. Engines and
stores run as real servers (in-process on 127.0.0.1:0, and as subprocesses from their console
scripts); `keel up`'s cluster is checked to protect its store with a token of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel_client import AsyncKeelClient, RunStatus
from keel_client.local_cluster import LocalCluster

from engine_service import EngineConfig, start_engine
from engine_service.store_client import StoreClient
from keel_core.errors import ErrorCategory, KeelError
from keel_core.security import bearer_metadata, token_from_flags
from keel_core.status import from_rpc_error
from store_service.server import StoreConfig, start_store
from tests.subprocess_services import BIN, running_service

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

TOKEN = "store-token-for-tests"
PIPELINE = {"pipeline_id": "guarded", "steps": [{"step_id": "a", "op_id": "keel.echo"}]}
REFUSALS: dict[str, tuple[tuple[str, str], ...] | None] = {
    "no token": None,
    "wrong token": bearer_metadata("not-the-token"),
    "token without the Bearer scheme": (("authorization", TOKEN),),
}


@pytest.fixture
async def guarded_store(tmp_path: Path) -> AsyncIterator[str]:
    """An in-process store that requires TOKEN; yields its address."""
    store = await start_store(
        StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store", auth_token=TOKEN)
    )
    try:
        yield f"127.0.0.1:{store.port}"
    finally:
        await store.drain(0.5)


def _append_request(stream_id: str) -> store_pb2.AppendEventsRequest:
    return store_pb2.AppendEventsRequest(
        stream_id=stream_id,
        expected_kind=store_pb2.EXPECTED_KIND_NO_STREAM,
        events=[store_pb2.EventData(type="Probe", payload=b"{}")],
    )


async def _head(stub: StoreServiceAsyncStub, stream_id: str) -> int:
    response = await stub.HeadSeq(
        store_pb2.HeadSeqRequest(stream_id=stream_id), metadata=bearer_metadata(TOKEN), timeout=5
    )
    return int(response.head_seq)


def _assert_refused(error: grpc.aio.AioRpcError, why: str) -> None:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, why
    info = from_rpc_error(error)
    assert info.code == "unauthenticated", why
    assert "authorization: Bearer" in info.message, why


async def test_store_with_a_token_refuses_calls_without_it_and_writes_nothing(guarded_store: str) -> None:
    async with grpc.aio.insecure_channel(guarded_store) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for why, metadata in REFUSALS.items():
            stream_id = f"run:{uuid.uuid4()}"
            with pytest.raises(grpc.aio.AioRpcError) as appended:
                await stub.AppendEvents(_append_request(stream_id), metadata=metadata, timeout=5)
            _assert_refused(appended.value, why)
            assert await _head(stub, stream_id) == 0, f"{why}: something was written"

            # All or nothing: trimming, reading and subscribing are refused the same way.
            with pytest.raises(grpc.aio.AioRpcError) as trimmed:
                await stub.TrimStream(
                    store_pb2.TrimStreamRequest(stream_id=stream_id, before_seq=1),
                    metadata=metadata,
                    timeout=5,
                )
            _assert_refused(trimmed.value, why)
            with pytest.raises(grpc.aio.AioRpcError) as read:
                await stub.ReadEvents(
                    store_pb2.ReadEventsRequest(stream_id=stream_id), metadata=metadata, timeout=5
                )
            _assert_refused(read.value, why)
            with pytest.raises(grpc.aio.AioRpcError) as subscribed:
                subscription = stub.SubscribeEvents(
                    store_pb2.SubscribeEventsRequest(stream_id=stream_id), metadata=metadata, timeout=5
                )
                async for _ in subscription:
                    pass
            _assert_refused(subscribed.value, why)

        stream_id = f"run:{uuid.uuid4()}"
        accepted = await stub.AppendEvents(
            _append_request(stream_id), metadata=bearer_metadata(TOKEN), timeout=5
        )
        assert accepted.head_seq == 1
        assert await _head(stub, stream_id) == 1


async def test_health_and_reflection_stay_open_on_a_store_with_a_token(guarded_store: str) -> None:
    async with grpc.aio.insecure_channel(guarded_store) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = [service.name async for reply in replies for service in reply.list_services_response.service]
        assert "keel.store.v1.StoreService" in names


async def test_reflection_is_open_on_an_engine_with_a_token_too(guarded_store: str) -> None:
    engine = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=guarded_store,
            failpoints="",
            auth_token="engine",
            store_auth_token=TOKEN,
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = [s.name async for reply in replies for s in reply.list_services_response.service]
        assert "keel.engine.v1.EngineService" in names
    finally:
        await engine.drain(0.5)


async def test_engine_given_the_token_completes_a_run_on_a_guarded_store_subprocess(tmp_path: Path) -> None:
    store_args = [str(BIN / "store-service"), "--listen=127.0.0.1:0", f"--data-dir={tmp_path / 'store'}"]
    with running_service(store_args, {"KEEL_STORE_AUTH_TOKEN": TOKEN}, "store-service listening on") as store:
        engine = await start_engine(
            EngineConfig(listen="127.0.0.1:0", store=store, failpoints="", store_auth_token=TOKEN)
        )
        try:
            async with AsyncKeelClient(f"127.0.0.1:{engine.port}") as client:
                started = await client.start_run(PIPELINE, input={"guarded": True}, wait=True)
        finally:
            await engine.drain(0.5)
        assert started.run is not None and started.run.status == RunStatus.COMPLETED
        async with grpc.aio.insecure_channel(store) as channel:
            assert await _head(store_pb2_grpc.StoreServiceStub(channel), f"run:{started.run_id}") >= 2


async def test_engine_without_the_store_token_does_not_start(guarded_store: str) -> None:
    for why, token in {"no token": None, "wrong token": "not-the-token"}.items():
        with pytest.raises(KeelError) as refused:
            await start_engine(
                EngineConfig(listen="127.0.0.1:0", store=guarded_store, store_auth_token=token)
            )
        assert refused.value.code == "store_unauthenticated", why
        assert "--store-auth-token" in refused.value.message, why


async def test_store_refusal_reaches_the_engine_as_store_unauthenticated_not_unauthenticated(
    guarded_store: str,
) -> None:
    # The engine's own callers did nothing wrong: they must not be told their token is bad.
    store = StoreClient(guarded_store, auth_token="not-the-token")
    try:
        stream_id = f"run:{uuid.uuid4()}"
        with pytest.raises(KeelError) as refused:
            await store.append(stream_id, [("Probe", b"{}")], expected_seq=None)
        assert refused.value.code == "store_unauthenticated"
        assert refused.value.category == ErrorCategory.UNAVAILABLE
    finally:
        await store.close()
    trusted = StoreClient(guarded_store, auth_token=TOKEN)
    try:
        assert await trusted.head(stream_id) == (0, "")
        await trusted.append(stream_id, [("Probe", b"{}")], expected_seq=None)
        assert (await trusted.head(stream_id))[0] == 1
    finally:
        await trusted.close()


def test_services_take_the_token_from_files_and_an_engine_without_it_fails_fast(tmp_path: Path) -> None:
    token_file = tmp_path / "store-token"
    token_file.write_text(TOKEN + "\n")  # as `echo` and secret mounts write it
    store_args = [
        str(BIN / "store-service"),
        "--listen=127.0.0.1:0",
        f"--data-dir={tmp_path / 'store'}",
        f"--auth-token-file={token_file}",
    ]
    engine = [str(BIN / "engine-service"), "--listen=127.0.0.1:0"]
    with running_service(store_args, {}, "store-service listening on") as store:
        refused = subprocess.run(
            engine,
            env={**_without_keel_env(), "KEEL_ENGINE_STORE": store},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert "listening on" not in refused.stdout
        errors = [json.loads(line) for line in refused.stderr.splitlines() if '"error"' in line]
        assert len(errors) == 1, refused.stderr
        assert errors[0]["error_code"] == "store_unauthenticated"
        assert "--store-auth-token" in errors[0]["msg"] and "Traceback" not in refused.stderr

        env = {"KEEL_ENGINE_STORE": store, "KEEL_ENGINE_STORE_AUTH_TOKEN_FILE": str(token_file)}
        with running_service(engine, env, "engine-service listening on") as address:
            pipeline_file = tmp_path / "pipeline.json"
            pipeline_file.write_text(json.dumps(PIPELINE))
            done = subprocess.run(
                [str(BIN / "keel"), f"--engine={address}", "--json", "run", str(pipeline_file), "--wait"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "completed"


def _without_keel_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}


async def test_keel_up_guards_its_store_with_a_token_only_its_engine_holds(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path, store_listen="127.0.0.1:0", engine_listen="127.0.0.1:0")
    await asyncio.to_thread(cluster.start)
    try:
        async with AsyncKeelClient(cluster.engine_address) as client:
            started = await client.start_run(PIPELINE, input={"up": True}, wait=True)
        assert started.run is not None and started.run.status == RunStatus.COMPLETED
        async with grpc.aio.insecure_channel(cluster.store_address) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            stream_id = f"run:{uuid.uuid4()}"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AppendEvents(_append_request(stream_id), timeout=5)
            _assert_refused(refused.value, "keel up's store without its token")
            assert cluster.store_token and cluster.store_token not in " ".join(
                str(arg)
                for arg in cluster.store.process.args  # type: ignore[union-attr]
            ), "the token must not be on the command line"
            # Its owner finds the token in the data directory, which no one else may read.
            token_file = cluster.store_token_file
            assert token_file.stat().st_mode & 0o777 == 0o600
            owner_token = token_file.read_text().strip()
            assert owner_token == cluster.store_token
            reads = await stub.HeadSeq(
                store_pb2.HeadSeqRequest(stream_id=stream_id),
                metadata=bearer_metadata(owner_token),
                timeout=5,
            )
            assert reads.head_seq == 0, "the refused append wrote something"
    finally:
        await asyncio.to_thread(cluster.stop)


def test_token_files_are_read_at_start_up_and_bad_ones_named(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text(TOKEN + "\r\n")
    assert token_from_flags(None, str(good), flag="--auth-token") == TOKEN
    assert token_from_flags(TOKEN, None, flag="--auth-token") == TOKEN
    assert token_from_flags(None, None, flag="--auth-token") is None
    with pytest.raises(ValueError, match="not both"):
        token_from_flags(TOKEN, str(good), flag="--auth-token")
    with pytest.raises(ValueError, match=r"--auth-token-file .*no such file"):
        token_from_flags(None, str(tmp_path / "missing"), flag="--auth-token")
    for body in ("", "\n", " padded\n", "two\nlines\n"):
        bad = tmp_path / "bad"
        bad.write_text(body)
        with pytest.raises(ValueError, match=r"--store-auth-token-file .*one line"):
            token_from_flags(None, str(bad), flag="--store-auth-token")
