"""The resuming live-feed helper against a live server: appends acknowledged once
committed, a cut mid-feed resumed without losing or repeating an item, Close."""

import uuid
from datetime import datetime, timedelta, timezone

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
import grpc
import pytest
from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import ingest_service_pb2_grpc as api_grpc
from krisp.ingest.v1 import resources_pb2 as res
from live_feed import LiveFeed

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def ts(when):
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def item(seq):
    start = T0 + timedelta(seconds=seq)
    return api.FeedItem(sentiment=res.NewSentiment(
        started_at=ts(start), ended_at=ts(start + timedelta(seconds=1)),
        label=res.SENTIMENT_LABEL_POSITIVE, score=0.5))


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield api_grpc.IngestServiceStub(channel)


def participation(stub):
    stub.UpsertTimezone(api.UpsertTimezoneRequest(timezone=res.Timezone(code="UTC", utc_offset=Duration())))
    user = stub.CreateUser(api.CreateUserRequest(external_id=f"live-{uuid.uuid4()}")).user
    session = stub.CreateSession(api.CreateSessionRequest(
        session_type=res.SESSION_TYPE_CALL, started_at=ts(T0))).session
    return stub.JoinSession(api.JoinSessionRequest(
        user_id=user.id, session_id=session.id, timezone_code="UTC", connected_at=ts(T0))).participation


def test_a_cut_feed_resumes_and_stores_every_item_once(stub):
    p = participation(stub)
    feed = LiveFeed(stub, str(uuid.uuid4()), p.id)
    assert feed.append([item(s) for s in range(1, 6)]) == 5
    feed.cut()  # as a dropped connection would
    assert feed.append([item(s) for s in range(6, 9)]) == 8
    assert feed.sessions == 2
    closed = feed.close()
    assert closed.items_stored == 8
    timeline = list(stub.GetTimeline(api.GetTimelineRequest(participation_id=p.id)))
    assert len(timeline) == 8


def test_an_invalid_item_is_raised_with_its_sequence_number(stub):
    p = participation(stub)
    feed = LiveFeed(stub, str(uuid.uuid4()), p.id)
    early = api.FeedItem(sentiment=res.NewSentiment(
        started_at=ts(T0 - timedelta(seconds=10)), ended_at=ts(T0 - timedelta(seconds=9)),
        label=res.SENTIMENT_LABEL_NEUTRAL))
    with pytest.raises(grpc.RpcError) as refused:
        feed.append([item(1), early])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[2].started_at" in refused.value.details()
