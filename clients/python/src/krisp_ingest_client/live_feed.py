"""A live feed for the LiveFeed RPC that keeps up: appends are pipelined up to a window,
every item is kept until acknowledged, and any retryable error (a dropped connection, a
replica gone, the database briefly away, ABORTED because another stream took the feed
over) reopens the feed and resends from the position the server reports, so each item is
stored exactly once. Errors retrying cannot fix are raised as IngestError.

    feed = LiveFeed(client.stub, feed_id=str(uuid.uuid4()), participation_id=p.id)
    for items in source:          # e.g. 100 items every second of a call
        feed.append(items)        # waits only while the window is full
    closed = feed.close()         # once everything is committed
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc

from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub

from ._window import Feed
from .errors import IngestError

T = TypeVar("T")


class _Stream:
    """One LiveFeed call: requests are queued and sent by gRPC's thread."""

    def __init__(self, stub: IngestServiceStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self.requests: queue.SimpleQueue[api.LiveFeedRequest | None] = queue.SimpleQueue()
        self.replies = stub.LiveFeed(self._drain(), metadata=tuple(metadata))

    def _drain(self) -> Iterator[api.LiveFeedRequest]:
        while (request := self.requests.get()) is not None:
            yield request

    def send(self, request: api.LiveFeedRequest) -> None:
        self.requests.put(request)

    def receive(self) -> api.LiveFeedResponse:
        try:
            return next(self.replies)
        except StopIteration:
            raise IngestError(grpc.StatusCode.UNAVAILABLE, "the feed's stream ended") from None

    def cancel(self) -> None:
        self.replies.cancel()
        self.requests.put(None)


class LiveFeed(Feed[IngestServiceStub]):
    """A resuming, pipelined feed of one participation (sync); see Feed for `first_seq`."""

    _stream: _Stream | None = None

    def append(self, items: Sequence[api.FeedItem]) -> int:
        """Sends `items` numbered on from the last append; waits (reading acks) while the
        window is full. Returns the committed position known so far."""
        self._retrying(self._open_stream)  # numbering goes on from the feed's position
        request = self.window.add(items)
        if self._stream is not None:
            self._stream.send(request)
        self._retrying(self._until_room)
        return self.committed

    def flush(self) -> int:
        """Waits until every item appended is committed; returns the position."""
        self._retrying(self._until_empty)
        return self.committed

    def close(self) -> api.FeedClosed:
        """Closes the feed once everything is committed; returns its receipt."""

        def close_now() -> api.FeedClosed:
            stream = self._open_stream()
            self._until_empty()
            stream.send(api.LiveFeedRequest(close=api.FeedClose(final_seq=self.committed)))
            reply = stream.receive()
            self.window.reply(reply, "closed")
            return reply.closed

        closed = self._retrying(close_now)
        self.cut()
        return closed

    def cut(self) -> None:
        """Drops the current stream, as a broken connection would; the next call resumes."""
        if self._stream is not None:
            self._stream.cancel()
        self._stream = None

    def _until_room(self) -> None:
        while self.window.full():
            self.window.reply(self._open_stream().receive(), "ack")

    def _until_empty(self) -> None:
        while self.window.appends:
            self.window.reply(self._open_stream().receive(), "ack")

    def _open_stream(self) -> _Stream:
        if self._stream is not None:
            return self._stream
        stream = _Stream(self.stub, self.metadata)
        stream.send(self.open_request())
        reply = stream.receive()
        self.window.reply(reply, "opened")
        self.sessions += 1
        for request in self.window.opened(reply.opened.committed_seq):
            stream.send(request)
        self._stream = stream
        return stream

    def _retrying(self, work: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                self._open_stream()
                return work()
            except (grpc.RpcError, IngestError) as error:
                failure, wait = self.failure(error, attempt)
                if wait is None:
                    raise failure from error
            self.cut()
            time.sleep(wait)
            attempt += 1
