"""The live feed of live_feed.py for asyncio: the same window, resumption and errors,
over one grpc.aio stream-stream call.

    feed = AsyncLiveFeed(client.stub, feed_id=str(uuid.uuid4()), participation_id=p.id)
    await feed.append(items)      # waits only while the window is full
    closed = await feed.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc import aio

from krisp.ingest.v1 import ingest_service_pb2 as api

from ._window import Feed
from .errors import IngestError

if TYPE_CHECKING:
    # The asyncio stub's type exists in the generated .pyi only.
    from krisp.ingest.v1.ingest_service_pb2_grpc import IngestServiceAsyncStub

    _Call = aio.StreamStreamCall[api.LiveFeedRequest, api.LiveFeedResponse]

T = TypeVar("T")


class AsyncLiveFeed(Feed["IngestServiceAsyncStub"]):
    """A resuming, pipelined feed of one participation (asyncio); see LiveFeed."""

    _call: _Call | None = None

    async def append(self, items: Sequence[api.FeedItem]) -> int:
        """Sends `items`; waits (reading acks) while the window is full. Returns the
        committed position known so far."""
        await self._retrying(self._open_call)
        request = self.window.add(items)
        if self._call is not None:
            try:
                await self._call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError):
                self.cut()  # resent by the next open
        await self._retrying(self._until_room)
        return self.committed

    async def flush(self) -> int:
        """Waits until every item appended is committed; returns the position."""
        await self._retrying(self._until_empty)
        return self.committed

    async def close(self) -> api.FeedClosed:
        """Closes the feed once everything is committed; returns its receipt."""

        async def close_now() -> api.FeedClosed:
            call = await self._open_call()
            await self._until_empty()
            await call.write(api.LiveFeedRequest(close=api.FeedClose(final_seq=self.committed)))
            reply = await self._receive(call)
            self.window.reply(reply, "closed")
            return reply.closed

        closed = await self._retrying(close_now)
        self.cut()
        return closed

    def cut(self) -> None:
        """Drops the current stream, as a broken connection would; the next call resumes."""
        if self._call is not None:
            self._call.cancel()
        self._call = None

    async def _until_room(self) -> None:
        while self.window.full():
            self.window.reply(await self._receive(await self._open_call()), "ack")

    async def _until_empty(self) -> None:
        while self.window.appends:
            self.window.reply(await self._receive(await self._open_call()), "ack")

    @staticmethod
    async def _receive(call: _Call) -> api.LiveFeedResponse:
        reply = await call.read()
        if reply is aio.EOF or not isinstance(reply, api.LiveFeedResponse):
            raise IngestError(grpc.StatusCode.UNAVAILABLE, "the feed's stream ended")
        return reply

    async def _open_call(self) -> _Call:
        if self._call is not None:
            return self._call
        call: _Call = self.stub.LiveFeed(metadata=aio.Metadata(*self.metadata))
        self._call = call
        await call.write(self.open_request())
        reply = await self._receive(call)
        self.window.reply(reply, "opened")
        self.sessions += 1
        for request in self.window.opened(reply.opened.committed_seq):
            await call.write(request)
        return call

    async def _retrying(self, work: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                await self._open_call()
                return await work()
            except (grpc.RpcError, IngestError) as error:
                failure, wait = self.failure(error, attempt)
                if wait is None:
                    raise failure from error
            self.cut()
            await asyncio.sleep(wait)
            attempt += 1
