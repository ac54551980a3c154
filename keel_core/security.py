"""Transport security for both services: TLS and mutual TLS from files, and an optional bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc

from keel_core.errors import ErrorCategory, KeelError
from keel_core.interceptors import ServerInterceptor
from keel_core.status import to_rpc_status

# Probes from a service mesh must work without credentials, and so must reflection (grpcurl
# `list`/`describe`): it reveals the public schema, nothing stored.
UNAUTHENTICATED_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass(frozen=True)
class TlsFiles:
    """A server's PEM certificate and key, and optionally the CA client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS credentials; with `client_ca`, clients must present a certificate signed by it (mTLS)."""
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
        """TLS settings from `--tls-cert/--tls-key/--tls-client-ca` values; None when none is set.

        Files are read now, so a wrong path fails at start-up with the flag named, not at the
        first connection.
        """
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise ValueError("TLS needs both --tls-cert and --tls-key (a PEM certificate chain and its key)")
        files = cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
        _readable(files.cert, "--tls-cert")
        _readable(files.key, "--tls-key")
        if files.client_ca is not None:
            _readable(files.client_ca, "--tls-client-ca")
        return files


@dataclass(frozen=True)
class ClientTls:
    """PEM files for a client: the CA that signed the server (None: system roots), and a client cert."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_flags(
        cls, ca: str | None, cert: str | None, key: str | None, *, prefix: str = "--"
    ) -> ClientTls | None:
        """Client TLS settings from `{prefix}tls-ca/-cert/-key` values; None when none is set."""
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise ValueError(f"a client certificate needs both {prefix}tls-cert and {prefix}tls-key")
        files = cls(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)
        for path, flag in ((files.ca, "tls-ca"), (files.cert, "tls-cert"), (files.key, "tls-key")):
            if path is not None:
                _readable(path, prefix + flag)
        return files

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a secure channel (with a client certificate when one is given)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


def _readable(path: Path, flag: str) -> None:
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token` to a server running `BearerTokenInterceptor`."""
    return (("authorization", f"Bearer {token}"),)


def token_from_flags(token: str | None, token_file: str | None, *, flag: str) -> str | None:
    """A bearer token given directly (`{flag}`) or in a file (`{flag}-file`); None when neither is.

    The file is read now, so a wrong path or an empty file fails at start-up with the flag named.
    One trailing newline (what `echo` and most secret mounts add) is not part of the token.
    """
    if token and token_file:
        raise ValueError(f"give {flag} or {flag}-file, not both")
    if not token_file:
        return token or None
    path = Path(token_file)
    _readable(path, f"{flag}-file")
    text = path.read_text().removesuffix("\n").removesuffix("\r")
    if not text or text.strip() != text or not text.isprintable():
        raise ValueError(f"{flag}-file {path}: the token must be one line without surrounding spaces")
    return text


class BearerTokenInterceptor(ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call without `authorization: Bearer <token>`.

    Health checks and reflection are let through (UNAUTHENTICATED_METHODS).
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler_call_details.method in UNAUTHENTICATED_METHODS:
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusal(handler, "missing bearer token" if not presented else "invalid bearer token")


def _refusal(handler: grpc.RpcMethodHandler[Any, Any] | None, why: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that fails the call before any servicer code runs."""
    from grpc_status import rpc_status

    error = KeelError(
        "unauthenticated",
        f"{why}: send the header `authorization: Bearer <token>` configured on the server",
        category=ErrorCategory.UNAUTHENTICATED,
    )
    status = rpc_status.to_status(to_rpc_status(error))

    async def refuse_unary(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # pragma: no cover - makes this an async generator

    deserializer = handler.request_deserializer if handler else None
    serializer = handler.response_serializer if handler else None
    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)


if TYPE_CHECKING:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:  # grpc-stubs make them generic; the runtime classes are not subscriptable
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor


def bearer_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors adding `authorization: Bearer <token>` to every call (the client side of
    `BearerTokenInterceptor`).

    On the channel rather than at each call site, so that no call, including ones added later, goes
    out without it. Plain metadata rather than gRPC call credentials: those are refused on plaintext
    channels, and a token on a private network without TLS is a supported set-up. One interceptor
    per call shape: a grpc.aio channel files each interceptor under the first shape it implements.
    """
    if not token:
        raise ValueError("the bearer token must not be empty")
    header = bearer_metadata(token)[0]
    shapes = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    # The grpc stubs type interceptors loosely (a placeholder type): hence the cast.
    return [cast("grpc.aio.ClientInterceptor", shape(header)) for shape in shapes]


class _WithToken:
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryToken(_WithToken, _UnaryUnary):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_WithToken, _UnaryStream):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_WithToken, _StreamUnary):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(self._details(client_call_details), requests)


class _StreamStreamToken(_WithToken, _StreamStream):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), requests)
