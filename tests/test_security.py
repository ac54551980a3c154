"""TLS, mutual TLS and the bearer token, proved against real services with certificates made here.

A CA signs a server certificate for 127.0.0.1 (IP SAN) and a client certificate; a second,
untrusted CA signs an impostor client certificate. Every refusal is checked twice: the call fails
with the right status, and a trusted client then sees that nothing was written.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel_client import (
    AsyncKeelClient,
    KeelClient,
    RunStatus,
    TlsConfig,
    UnauthenticatedError,
    UnavailableError,
    wire,
)

from engine_service import EngineConfig, start_engine
from keel_core.security import ClientTls, TlsFiles
from keel_core.status import from_rpc_error
from store_service.server import StoreConfig, start_store
from tests.subprocess_services import BIN, running_service

TOKEN = "s3cret-token-for-tests"
PIPELINE = {"pipeline_id": "secure", "steps": [{"step_id": "a", "op_id": "keel.echo"}]}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and key written to files."""

    cert: Path
    key: Path


class TestCa:
    """A throwaway certificate authority."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / f"{name}.crt"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool) -> Issued:
        """A leaf certificate: for a server at 127.0.0.1 (IP SAN), or for a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names: list[x509.GeneralName] = [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = self.directory / f"{self.name}-{common_name}"
        issued = Issued(stem.with_suffix(".crt"), stem.with_suffix(".key"))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@dataclass(frozen=True)
class Pki:
    """The certificates of one test: a trusted CA and its leaves, and an untrusted CA's client."""

    ca: TestCa
    server: Issued
    client: Issued
    impostor: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an untrusted CA's client."""
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCa(directory, "keel-ca")
    rogue = TestCa(directory, "rogue-ca")
    return Pki(
        ca,
        ca.issue("store", server=True),
        ca.issue("engine", server=False),
        rogue.issue("engine", server=False),
    )


@dataclass
class SecureCluster:
    """An mTLS store and an engine (TLS + bearer token) that reaches it with its client certificate."""

    store_address: str
    engine_address: str


@pytest.fixture
async def mtls_store(tmp_path: Path, pki: Pki) -> AsyncIterator[str]:
    """A store that requires a client certificate signed by the test CA; yields its address."""
    store = await start_store(
        StoreConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "store",
            tls=TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca.cert),
        )
    )
    try:
        yield f"127.0.0.1:{store.port}"
    finally:
        await store.drain(0.5)


@pytest.fixture
async def secure_cluster(mtls_store: str, pki: Pki) -> AsyncIterator[SecureCluster]:
    """The mTLS store plus an engine serving TLS with a bearer token."""
    engine = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=mtls_store,
            failpoints="",
            tls=TlsFiles(pki.server.cert, pki.server.key),
            store_tls=ClientTls(pki.ca.cert, pki.client.cert, pki.client.key),
            auth_token=TOKEN,
        )
    )
    try:
        yield SecureCluster(mtls_store, f"127.0.0.1:{engine.port}")
    finally:
        await engine.drain(0.5)


def _store_channel(address: str, tls: ClientTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.channel_credentials())


async def _append(address: str, tls: ClientTls | None, stream_id: str) -> store_pb2.AppendEventsResponse:
    async with _store_channel(address, tls) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        response: store_pb2.AppendEventsResponse = await stub.AppendEvents(
            store_pb2.AppendEventsRequest(
                stream_id=stream_id,
                expected_kind=store_pb2.EXPECTED_KIND_NO_STREAM,
                events=[store_pb2.EventData(type="Probe", payload=b"{}")],
            ),
            timeout=5,
        )
        return response


async def _head(address: str, tls: ClientTls, stream_id: str) -> int:
    async with _store_channel(address, tls) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        response = await stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=stream_id), timeout=5)
        return response.head_seq


async def test_mtls_store_refuses_clients_without_a_trusted_certificate_and_writes_nothing(
    mtls_store: str, pki: Pki
) -> None:
    trusted = ClientTls(pki.ca.cert, pki.client.cert, pki.client.key)
    refused = {
        "no certificate": ClientTls(pki.ca.cert),
        "certificate from another CA": ClientTls(pki.ca.cert, pki.impostor.cert, pki.impostor.key),
    }
    for why, tls in refused.items():
        stream_id = f"probe-{uuid.uuid4()}"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _append(mtls_store, tls, stream_id)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, why  # the handshake fails
        assert await _head(mtls_store, trusted, stream_id) == 0, f"{why}: something was written"
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await _append(mtls_store, None, f"probe-{uuid.uuid4()}")
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

    stream_id = f"probe-{uuid.uuid4()}"
    assert (await _append(mtls_store, trusted, stream_id)).head_seq == 1
    assert await _head(mtls_store, trusted, stream_id) == 1


async def test_engine_reaches_an_mtls_store_with_its_client_certificate_and_completes_a_run(
    secure_cluster: SecureCluster, pki: Pki
) -> None:
    tls = TlsConfig(ca_file=pki.ca.cert)
    async with AsyncKeelClient(secure_cluster.engine_address, tls=tls, token=TOKEN) as client:
        started = await client.start_run(PIPELINE, input={"hello": "tls"}, wait=True)
    assert started.run is not None and started.run.status == RunStatus.COMPLETED
    trusted = ClientTls(pki.ca.cert, pki.client.cert, pki.client.key)
    assert await _head(secure_cluster.store_address, trusted, f"run:{started.run_id}") >= 2


async def test_engine_refuses_a_missing_or_wrong_token_and_writes_nothing(
    secure_cluster: SecureCluster, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert.read_bytes())
    trusted = ClientTls(pki.ca.cert, pki.client.cert, pki.client.key)
    async with grpc.aio.secure_channel(secure_cluster.engine_address, credentials) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        for why, metadata in {
            "missing token": None,
            "wrong token": (("authorization", "Bearer not-the-token"),),
            "token without the Bearer scheme": (("authorization", TOKEN),),
        }.items():
            run_id = str(uuid.uuid4())
            request = engine_pb2.StartRunRequest(
                pipeline=wire.pipeline_message(PIPELINE), run_id=run_id, wait=True
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StartRun(request, metadata=metadata, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, why
            error = from_rpc_error(caught.value)
            assert error.code == "unauthenticated", why
            assert "authorization: Bearer" in error.message, why
            assert await _head(secure_cluster.store_address, trusted, f"run:{run_id}") == 0, why

            # Streams are refused the same way.
            with pytest.raises(grpc.aio.AioRpcError) as watched:
                async for _ in stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id), metadata=metadata):
                    pass
            assert watched.value.code() == grpc.StatusCode.UNAUTHENTICATED, why

        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_sync_python_client_with_tls_and_token(secure_cluster: SecureCluster, pki: Pki) -> None:
    tls = TlsConfig(ca_file=pki.ca.cert)

    def refused_with_a_wrong_token() -> UnauthenticatedError:
        with KeelClient(secure_cluster.engine_address, tls=tls, token="wrong") as client:
            with pytest.raises(UnauthenticatedError) as refused:
                client.list_ops()
            return refused.value

    def run_with_the_token() -> RunStatus | None:
        with KeelClient(secure_cluster.engine_address, tls=tls, token=TOKEN) as client:
            started = client.start_run(PIPELINE, input={"sync": True}, wait=True)
            awaited = client.await_run(started.run_id, max_wait=10)
            return awaited.run.status if awaited.run else None

    # The sync client blocks; the servers live on this test's event loop, so it runs in a thread.
    assert (await asyncio.to_thread(refused_with_a_wrong_token)).code == "unauthenticated"
    assert await asyncio.to_thread(run_with_the_token) == RunStatus.COMPLETED


def test_services_and_cli_take_tls_and_token_from_flags_and_environment(tmp_path: Path, pki: Pki) -> None:
    store_args = [
        str(BIN / "store-service"),
        "--listen=127.0.0.1:0",
        f"--data-dir={tmp_path / 'store'}",
        f"--tls-cert={pki.server.cert}",
        f"--tls-key={pki.server.key}",
        f"--tls-client-ca={pki.ca.cert}",
    ]
    engine_env = {
        "KEEL_ENGINE_LISTEN": "127.0.0.1:0",
        "KEEL_ENGINE_TLS_CERT": str(pki.server.cert),
        "KEEL_ENGINE_TLS_KEY": str(pki.server.key),
        "KEEL_ENGINE_STORE_TLS_CA": str(pki.ca.cert),
        "KEEL_ENGINE_STORE_TLS_CERT": str(pki.client.cert),
        "KEEL_ENGINE_STORE_TLS_KEY": str(pki.client.key),
        "KEEL_ENGINE_AUTH_TOKEN": TOKEN,
    }
    pipeline_file = tmp_path / "pipeline.json"
    pipeline_file.write_text(json.dumps(PIPELINE))
    with (
        running_service(store_args, {}, "store-service listening on") as store,
        running_service(
            [str(BIN / "engine-service")],
            {**engine_env, "KEEL_ENGINE_STORE": store},
            "engine-service listening on",
        ) as engine,
    ):
        keel = [str(BIN / "keel"), f"--engine={engine}", f"--tls-ca={pki.ca.cert}"]
        refused = subprocess.run([*keel, "ops"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert "unauthenticated" in refused.stderr and "Traceback" not in refused.stderr
        done = subprocess.run(
            [*keel, "--json", "run", str(pipeline_file), "--wait"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "KEEL_TOKEN": TOKEN},
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "completed"


async def test_engine_with_mutual_tls_accepts_only_clients_holding_a_trusted_certificate(
    mtls_store: str, pki: Pki
) -> None:
    engine = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=mtls_store,
            failpoints="",
            tls=TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca.cert),
            store_tls=ClientTls(pki.ca.cert, pki.client.cert, pki.client.key),
        )
    )
    address = f"127.0.0.1:{engine.port}"
    try:
        for tls in (
            TlsConfig(ca_file=pki.ca.cert),  # no client certificate
            TlsConfig(pki.ca.cert, pki.impostor.cert, pki.impostor.key),  # one from another CA
        ):
            async with AsyncKeelClient(address, tls=tls, retries=False, deadline=5) as client:
                with pytest.raises(UnavailableError):  # the handshake fails
                    await client.list_ops()
        trusted = TlsConfig(pki.ca.cert, pki.client.cert, pki.client.key)
        async with AsyncKeelClient(address, tls=trusted) as client:
            started = await client.start_run(PIPELINE, wait=True)
        assert started.run is not None and started.run.status == RunStatus.COMPLETED
    finally:
        await engine.drain(0.5)
