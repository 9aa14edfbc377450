"""The Python client against a live server: unary calls, a client stream, and the rich
error details of an invalid stream item."""

import uuid
from datetime import datetime, timedelta, timezone

import example
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import ingest_service_pb2_grpc as api_grpc
from krisp.ingest.v1 import resources_pb2 as res


@pytest.fixture
def client(server):
    with grpc.insecure_channel(server) as channel:
        yield api_grpc.IngestServiceStub(channel)


def test_the_example_records_a_session_and_streams_sentiments(server):
    result = example.run(server, count=1000)
    assert result["receipt"].items_stored == 1000
    assert not result["receipt"].replayed
    assert result["participation"].talked_time.seconds == 600
    assert result["participation"].microphone_used


def test_unary_calls_and_their_errors(client):
    user = client.CreateUser(api.CreateUserRequest(external_id=f"u-{uuid.uuid4()}", country="US")).user
    assert client.GetUser(api.GetUserRequest(user_id=user.id)).user == user
    with pytest.raises(grpc.RpcError) as missing:
        client.GetUser(api.GetUserRequest(user_id=str(uuid.uuid4())))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        client.CreateUser(api.CreateUserRequest(external_id="", country="usa"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in bad_request(bad.value).field_violations]
    assert fields == ["external_id", "country"]


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(error)
    assert status is not None, "no rich error details"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            found = error_details_pb2.BadRequest()
            detail.Unpack(found)
            return found
    raise AssertionError(f"no BadRequest detail in {status}")


def test_an_invalid_stream_item_names_its_index_and_stores_nothing(server, client):
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    example.run(server, count=1)  # makes sure the UTC timezone exists
    # A participation that is still open, for the stream.
    user = client.CreateUser(api.CreateUserRequest(external_id=f"s-{uuid.uuid4()}")).user
    session = client.CreateSession(
        api.CreateSessionRequest(session_type=res.SESSION_TYPE_MEETING, started_at=example.ts(start))
    ).session
    open_participation = client.JoinSession(
        api.JoinSessionRequest(user_id=user.id, session_id=session.id, timezone_code="UTC",
                               connected_at=example.ts(start))
    ).participation
    frames = list(example.stream_frames(str(uuid.uuid4()), open_participation.id, start, 600, 200))
    # Item 437 (in the third message) ends before it starts.
    bad = frames[3].batch.sentiments[37]
    bad.ended_at.CopyFrom(example.ts(start))
    with pytest.raises(grpc.RpcError) as refused:
        client.StreamSentiments(iter(frames))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(refused.value).field_violations
    assert [v.field for v in violations] == ["sentiments[437].ended_at"]
    timeline = list(client.GetTimeline(api.GetTimelineRequest(participation_id=open_participation.id)))
    assert timeline == []
