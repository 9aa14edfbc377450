"""What a live feed holds between its appends and their acknowledgements; the same for
the sync and the asyncio helper, which only differ in how they wait."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

import grpc

from krisp.ingest.v1 import ingest_service_pb2 as api

from .errors import IngestError

# The server reads up to 1 MiB of a feed's appends ahead of its commits.
WINDOW_ITEMS = 4096
WINDOW_APPENDS = 32

Stub = TypeVar("Stub")


class Window:
    """Every item sent and not yet acknowledged, as the appends that carried it, in order.

    Acknowledgements come one per append, in order, each naming the feed's committed
    position; an append is kept until the position reaches its last item."""

    def __init__(self, max_items: int, max_appends: int, first_seq: int | None) -> None:
        if max_items < 1 or max_appends < 1:
            raise ValueError("the window must hold at least one item and one append")
        self.max_items = max_items
        self.max_appends = max_appends
        self.committed = 0
        self.next_seq = first_seq
        self.appends: deque[api.FeedAppend] = deque()
        self.items = 0

    def full(self) -> bool:
        return self.items >= self.max_items or len(self.appends) >= self.max_appends

    def add(self, items: Sequence[api.FeedItem]) -> api.LiveFeedRequest:
        """Numbers `items` on from the feed's position; the request that sends them."""
        if not items:
            raise ValueError("an append carries one item at least")
        if self.next_seq is None:
            raise RuntimeError("the feed is not open yet")
        append = api.FeedAppend(first_seq=self.next_seq, items=items)
        self.next_seq += len(items)
        self.appends.append(append)
        self.items += len(items)
        return api.LiveFeedRequest(append=append)

    def opened(self, committed_seq: int) -> list[api.LiveFeedRequest]:
        """The feed (re)opened at `committed_seq`: what to send again, in order."""
        if committed_seq < self.committed:
            raise RuntimeError(
                f"the server reports position {committed_seq}, below the {self.committed} "
                "it acknowledged before"
            )
        self.acknowledged(committed_seq)
        if self.next_seq is None:
            self.next_seq = committed_seq + 1
        return [api.LiveFeedRequest(append=append) for append in self.appends]

    def acknowledged(self, through: int) -> None:
        self.committed = max(self.committed, through)
        while self.appends:
            first = self.appends[0]
            last = first.first_seq + len(first.items) - 1
            if last <= through:
                self.appends.popleft()
                self.items -= len(first.items)
            elif first.first_seq <= through:
                # Only an ack of an append sent differently covers part of one.
                kept = first.items[through - first.first_seq + 1 :]
                self.items -= len(first.items) - len(kept)
                self.appends[0] = api.FeedAppend(first_seq=through + 1, items=kept)
                break
            else:
                break

    def reply(self, reply: api.LiveFeedResponse, expected: str) -> None:
        """Checks that `reply` is of the kind `expected` and takes its acknowledgement."""
        kind = reply.WhichOneof("frame")
        if kind != expected:
            raise RuntimeError(f"the server answered {kind} where {expected} was due")
        if kind == "ack":
            self.acknowledged(reply.ack.committed_through)


class Feed(Generic[Stub]):
    """What the sync and the asyncio feed share: settings, window, retry decisions.

    `first_seq`: the sequence number of the first item appended; by default the one after
    the feed's committed position. A process that numbers items itself (and may resend
    after a restart) gives it: a resend of items the server holds with other content is
    refused with ALREADY_EXISTS naming the item."""

    def __init__(
        self,
        stub: Stub,
        feed_id: str,
        participation_id: str,
        *,
        first_seq: int | None = None,
        window_items: int = WINDOW_ITEMS,
        window_appends: int = WINDOW_APPENDS,
        attempts: int = 8,
        backoff: float = 0.1,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.stub = stub
        self.feed_id = feed_id
        self.participation_id = participation_id
        self.attempts = attempts
        self.backoff = backoff
        self.metadata = tuple(metadata)
        self.window = Window(window_items, window_appends, first_seq)
        # Streams opened so far: 1 + the resumptions.
        self.sessions = 0

    @property
    def committed(self) -> int:
        """The feed's position the server acknowledged last."""
        return self.window.committed

    def open_request(self) -> api.LiveFeedRequest:
        return api.LiveFeedRequest(
            open=api.FeedOpen(feed_id=self.feed_id, participation_id=self.participation_id)
        )

    def failure(self, error: Exception, attempt: int) -> tuple[IngestError, float | None]:
        """The typed error of a failed attempt, and how long to wait before the next;
        None when the error is final or the attempts are spent."""
        typed = error if isinstance(error, IngestError) else None
        if typed is None and isinstance(error, grpc.RpcError):
            typed = IngestError.from_rpc_error(error)
        if typed is None:
            raise error
        if not typed.retryable or attempt + 1 >= self.attempts:
            return typed, None
        return typed, self.backoff * 2**attempt
