"""The installed client over mutual TLS with an API key, against a server that requires
both (certificates from scripts/test-pki.sh); and a key is never sent in the clear to a
host that is not loopback."""

from __future__ import annotations

import os
import subprocess
import tempfile

import example
import grpc
import pytest
from conftest import REPO, Server
from krisp_ingest_client import IngestError, connect, credentials, typed_errors

from krisp.ingest.v1 import ingest_service_pb2 as api


def test_mutual_tls_with_an_api_key() -> None:
    pki = tempfile.mkdtemp(prefix="krisp-py-pki-")
    subprocess.run([os.path.join(REPO, "scripts", "test-pki.sh"), pki], check=True)

    def path(name: str) -> str:
        return os.path.join(pki, name)

    server = Server(
        args=["--tls-cert", path("server.pem"), "--tls-key", path("server.key"),
              "--tls-client-ca", path("ca.pem")],
        key_name="python-client",
    )
    try:
        result = example.run(
            server.address, server.key, count=10, ca_file=path("ca.pem"),
            cert_file=path("client.pem"), key_file=path("client.key"),
        )
        assert result.receipt.items_stored == 10
        assert result.feed.items_stored == 10
        request = api.GetUserRequest(user_id=result.user.id)
        # Without the key: UNAUTHENTICATED.
        with connect(server.address, ca_file=path("ca.pem"), cert_file=path("client.pem"),
                     key_file=path("client.key")) as client:
            with pytest.raises(IngestError) as refused, typed_errors():
                client.stub.GetUser(request, timeout=10)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Without a client certificate the handshake fails.
        with connect(server.address, ca_file=path("ca.pem"), api_key=server.key) as client:
            with pytest.raises(IngestError) as refused, typed_errors():
                client.stub.GetUser(request, timeout=10)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_an_api_key_over_plaintext_goes_to_loopback_only() -> None:
    server = Server(key_name="loopback")
    try:
        assert server.key is not None
        with connect(server.address, api_key=server.key) as client:
            user = client.stub.CreateUser(api.CreateUserRequest(external_id="loopback-key")).user
            assert user.external_id == "loopback-key"
        with connect(server.address, api_key="not-a-key") as client:
            with pytest.raises(IngestError) as refused, typed_errors():
                client.stub.GetUser(api.GetUserRequest(user_id=user.id), timeout=10)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
    with pytest.raises(ValueError, match="over TLS only"):
        credentials("ingest.example.com:443", api_key="secret")
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        credentials("ingest.example.com:443", ca_file="ca.pem", cert_file="client.pem")
