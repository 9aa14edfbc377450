"""What a live feed holds between its appends and their acknowledgements; the same for
the sync and the asyncio helper, which only differ in how they wait."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from krisp.ingest.v1 import ingest_service_pb2 as api


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
