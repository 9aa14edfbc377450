"""The installed client against a live server: the example end to end, unary calls and
their typed errors, a client stream's rich error details, and the asyncio stub."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import example
import grpc
import pytest
from conftest import participation, timeline
from krisp_ingest_client import IngestError, connect, connect_async, typed_errors

from krisp.ingest.v1 import ingest_service_pb2 as api


def test_the_example_records_a_session_streams_and_feeds_sentiments(server: str) -> None:
    result = example.run(server, count=1000)
    assert result.receipt.items_stored == 1000
    assert not result.receipt.replayed
    assert result.feed.items_stored == 1000
    assert result.participation.talked_time.seconds == 600
    assert result.participation.microphone_used


def test_unary_calls_and_their_typed_errors(server: str) -> None:
    with connect(server) as client:
        user = client.stub.CreateUser(
            api.CreateUserRequest(external_id=f"u-{uuid.uuid4()}", country="US")
        ).user
        assert client.stub.GetUser(api.GetUserRequest(user_id=user.id)).user == user
        with pytest.raises(IngestError) as missing, typed_errors():
            client.stub.GetUser(api.GetUserRequest(user_id=str(uuid.uuid4())))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert not missing.value.retryable
        with pytest.raises(IngestError) as bad, typed_errors():
            client.stub.CreateUser(api.CreateUserRequest(external_id="", country="usa"))
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad.value.violations] == ["external_id", "country"]
        assert "country" in str(bad.value)


def test_an_invalid_stream_item_names_its_index_and_stores_nothing(server: str) -> None:
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    with connect(server) as client:
        p = participation(client.stub, start)
        frames = list(example.stream_frames(str(uuid.uuid4()), p.id, start, 600, 200))
        # Item 437 (in the third batch) ends before it starts.
        frames[3].batch.sentiments[37].ended_at.CopyFrom(example.ts(start))
        with pytest.raises(IngestError) as refused, typed_errors():
            client.stub.StreamSentiments(iter(frames))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in refused.value.violations] == ["sentiments[437].ended_at"]
        assert timeline(client.stub, p.id) == []


def test_the_asyncio_stub_calls_and_raises_typed_errors(server: str) -> None:
    async def calls() -> str:
        async with connect_async(server) as client:
            created = await client.stub.CreateUser(
                api.CreateUserRequest(external_id=f"a-{uuid.uuid4()}")
            )
            with pytest.raises(IngestError) as taken, typed_errors():
                await client.stub.CreateUser(
                    api.CreateUserRequest(external_id=created.user.external_id)
                )
            assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
            found = await client.stub.GetUser(api.GetUserRequest(user_id=created.user.id))
            return found.user.external_id

    assert asyncio.run(calls()).startswith("a-")
