"""The pipelined live-feed helpers (sync and asyncio) against a live server: appends
pipelined within the window, a cut mid-feed resumed without losing or repeating an item,
an invalid item raised with its sequence number, and resends checked: the same items are
acknowledged, other content is ALREADY_EXISTS naming the item and stores nothing."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import grpc
import pytest
from conftest import T0, participation, sentiment_item, timeline, ts
from krisp_ingest_client import AsyncLiveFeed, IngestError, LiveFeed, connect, connect_async

from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import resources_pb2 as res


def items(first: int, last: int, score: float = 0.5) -> list[api.FeedItem]:
    return [sentiment_item(seq, score) for seq in range(first, last + 1)]


def scores(server: str, participation_id: str) -> list[float]:
    with connect(server) as client:
        return [round(e.sentiment.score, 2) for e in timeline(client.stub, participation_id)]


def test_a_pipelined_feed_cut_mid_way_stores_every_item_once(server: str) -> None:
    with connect(server) as client:
        p = participation(client.stub)
        feed = LiveFeed(client.stub, str(uuid.uuid4()), p.id, window_appends=4)
        for first in range(1, 200, 10):
            feed.append(items(first, first + 9))
            # Never more than the window unacknowledged.
            assert len(feed.window.appends) < 4
        feed.cut()  # appends in flight are lost with the stream, and resent
        feed.append(items(201, 210))
        assert feed.flush() == 210
        assert feed.sessions == 2
        closed = feed.close()
        assert closed.items_stored == 210
        assert len(timeline(client.stub, p.id)) == 210


def test_an_invalid_item_is_raised_with_its_sequence_number(server: str) -> None:
    with connect(server) as client:
        p = participation(client.stub)
        feed = LiveFeed(client.stub, str(uuid.uuid4()), p.id)
        early = api.FeedItem(
            sentiment=res.NewSentiment(
                started_at=ts(T0 - timedelta(seconds=10)),
                ended_at=ts(T0 - timedelta(seconds=9)),
                label=res.SENTIMENT_LABEL_NEUTRAL,
            )
        )
        feed.append(items(1, 3))
        with pytest.raises(IngestError) as refused:
            feed.append([sentiment_item(4), early])
            feed.flush()
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in refused.value.violations] == ["items[5].started_at"]
        assert len(timeline(client.stub, p.id)) == 3


def test_resends_are_acknowledged_when_identical_and_refused_otherwise(server: str) -> None:
    with connect(server) as client:
        p = participation(client.stub)
        feed_id = str(uuid.uuid4())
        first = LiveFeed(client.stub, feed_id, p.id)
        first.append(items(1, 5))
        assert first.flush() == 5
        first.cut()
        # A process that numbers its items itself resends 3..6 after a restart.
        again = LiveFeed(client.stub, feed_id, p.id, first_seq=3)
        again.append(items(3, 6))
        assert again.flush() == 6
        again.cut()
        other = LiveFeed(client.stub, feed_id, p.id, first_seq=4)
        with pytest.raises(IngestError) as refused:
            other.append(items(4, 8, score=0.9))
            other.flush()
        assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert "item 4 " in refused.value.details
        assert scores(server, p.id) == [0.5] * 6


def test_the_asyncio_feed_pipelines_resumes_and_checks_resends(server: str) -> None:
    with connect(server) as client:
        p = participation(client.stub)
    feed_id = str(uuid.uuid4())

    async def feed_it() -> api.FeedClosed:
        async with connect_async(server) as client:
            feed = AsyncLiveFeed(client.stub, feed_id, p.id, window_appends=4)
            for first in range(1, 100, 10):
                await feed.append(items(first, first + 9))
                assert len(feed.window.appends) < 4
            feed.cut()
            await feed.append(items(101, 110))
            assert await feed.flush() == 110
            assert feed.sessions == 2
            other = AsyncLiveFeed(client.stub, feed_id, p.id, first_seq=109)
            with pytest.raises(IngestError) as refused:
                await other.append(items(109, 112, score=0.9))
                await other.flush()
            assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
            assert "item 109 " in refused.value.details
            return await feed.close()

    closed = asyncio.run(feed_it())
    assert closed.items_stored == 110
    assert scores(server, p.id) == [0.5] * 110
