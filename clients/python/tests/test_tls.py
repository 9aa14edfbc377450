"""The Python client over mutual TLS with an API key, against a server that requires
both (certificates from scripts/test-pki.sh)."""

import os
import subprocess
import tempfile

import grpc
import pytest

from conftest import REPO, Server
from example import open_channel, run
from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import ingest_service_pb2_grpc as api_grpc


def test_mutual_tls_with_an_api_key():
    pki = tempfile.mkdtemp(prefix="krisp-py-pki-")
    subprocess.run([os.path.join(REPO, "scripts", "test-pki.sh"), pki], check=True)
    path = lambda name: os.path.join(pki, name)  # noqa: E731
    server = Server(args=["--tls-cert", path("server.pem"), "--tls-key", path("server.key"),
                          "--tls-client-ca", path("ca.pem")], key_name="python-client")
    tls = dict(ca_file=path("ca.pem"), cert_file=path("client.pem"), key_file=path("client.key"))
    try:
        result = run(server.address, server.key, count=10, **tls)
        assert result["receipt"].items_stored == 10
        request = api.GetUserRequest(user_id=result["user"].id)
        with open_channel(server.address, **tls) as channel:
            client = api_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                client.GetUser(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        no_cert = dict(tls, cert_file=None, key_file=None)
        with open_channel(server.address, **no_cert) as channel:
            client = api_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                client.GetUser(request, timeout=10,
                               metadata=[("authorization", f"Bearer {server.key}")])
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
