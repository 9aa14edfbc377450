"""Channels to krisp-ingest, sync and asyncio: TLS (the CA of the server's certificate),
mutual TLS (a client certificate and key) and an API key. The key travels as
`authorization: Bearer <key>` and only over TLS or to a loopback address, never in the
clear over a network."""

from __future__ import annotations

import ipaddress
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from krisp.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub

# gRPC's own default caps received messages at 4 MiB, as the server does.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credentials(
    target: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    api_key: str | None = None,
) -> grpc.ChannelCredentials | None:
    """The channel credentials for these settings; None for a plaintext channel.

    TLS when `ca_file` is given (with `cert_file` and `key_file`: mutual TLS). An API key
    without TLS is only sent to a loopback target (ValueError otherwise)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both cert_file and key_file")
    if cert_file is not None and ca_file is None:
        raise ValueError("a client certificate is only sent over TLS: give ca_file too")
    channel: grpc.ChannelCredentials | None = None
    if ca_file is not None:
        channel = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file),
            private_key=_read(key_file),
            certificate_chain=_read(cert_file),
        )
    if api_key is None:
        return channel
    if channel is None:
        if not _is_loopback(target):
            raise ValueError(
                f"an API key is sent over TLS only (or to a loopback address): give ca_file "
                f"to call {target} with a key"
            )
        channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.composite_channel_credentials(
        channel, grpc.access_token_call_credentials(api_key)
    )


class Client:
    """A sync channel and its stub; closes the channel on exit.

        with connect("127.0.0.1:50051") as client:
            user = client.stub.GetUser(GetUserRequest(user_id=...)).user
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = IngestServiceStub(channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """An asyncio channel and its stub; closes the channel on exit.

        async with connect_async("127.0.0.1:50051") as client:
            user = (await client.stub.GetUser(GetUserRequest(user_id=...))).user
    """

    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel
        self.stub = IngestServiceStub(channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()


def connect(
    target: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    api_key: str | None = None,
    options: tuple[tuple[str, Any], ...] = DEFAULT_OPTIONS,
) -> Client:
    """A sync client of the server at `target` ("host:port"); see `credentials`."""
    creds = credentials(
        target, ca_file=ca_file, cert_file=cert_file, key_file=key_file, api_key=api_key
    )
    if creds is None:
        return Client(grpc.insecure_channel(target, options=options))
    return Client(grpc.secure_channel(target, creds, options=options))


def connect_async(
    target: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    api_key: str | None = None,
    options: tuple[tuple[str, Any], ...] = DEFAULT_OPTIONS,
) -> AsyncClient:
    """An asyncio client of the server at `target`; see `credentials`. Call it inside
    the event loop that uses it."""
    creds = credentials(
        target, ca_file=ca_file, cert_file=cert_file, key_file=key_file, api_key=api_key
    )
    if creds is None:
        return AsyncClient(aio.insecure_channel(target, options=options))
    return AsyncClient(aio.secure_channel(target, creds, options=options))
