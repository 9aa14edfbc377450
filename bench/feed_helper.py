"""The Python driver of `krisp-bench helpers`: one live feed through the client package's
helper (sync or asyncio), `window` appends in flight at most. Prints `<items> <seconds>`:
the time from the first append to the close, the items built beforehand.

Usage: feed_helper.py <sync|asyncio> <host:port> <participation id> <items> <per append>
                      <window appends> <base unix seconds>
"""

import asyncio
import sys
import time
import uuid

from google.protobuf.timestamp_pb2 import Timestamp

from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import resources_pb2 as res
from krisp_ingest_client import AsyncLiveFeed, LiveFeed, connect, connect_async

LABELS = [res.SENTIMENT_LABEL_POSITIVE, res.SENTIMENT_LABEL_NEUTRAL, res.SENTIMENT_LABEL_NEGATIVE]


def stamp(ms: int) -> Timestamp:
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def appends(items: int, per_append: int, base: int) -> list[list[api.FeedItem]]:
    """Item i as the benchmark's fixtures make it: 100 ms segments from `base`."""
    def item(i: int) -> api.FeedItem:
        start = base * 1000 + i * 100
        return api.FeedItem(sentiment=res.NewSentiment(
            started_at=stamp(start), ended_at=stamp(start + 100), label=LABELS[i % 3],
            score=(i % 200) / 100.0 - 1.0))
    return [[item(i) for i in range(first, min(first + per_append, items))]
            for first in range(0, items, per_append)]


def sync(address: str, participation: str, batches: list[list[api.FeedItem]], window: int) -> tuple[int, float]:
    with connect(address) as client:
        feed = LiveFeed(client.stub, str(uuid.uuid4()), participation, window_appends=window)
        started = time.perf_counter()
        for items in batches:
            feed.append(items)
        closed = feed.close()
        return closed.items_stored, time.perf_counter() - started


async def asyncio_feed(address: str, participation: str, batches: list[list[api.FeedItem]], window: int) -> tuple[int, float]:
    async with connect_async(address) as client:
        feed = AsyncLiveFeed(client.stub, str(uuid.uuid4()), participation, window_appends=window)
        started = time.perf_counter()
        for items in batches:
            await feed.append(items)
        closed = await feed.close()
        return closed.items_stored, time.perf_counter() - started


def main() -> None:
    flavour, address, participation = sys.argv[1], sys.argv[2], sys.argv[3]
    items, per_append, window, base = (int(a) for a in sys.argv[4:8])
    batches = appends(items, per_append, base)
    if flavour == "sync":
        stored, seconds = sync(address, participation, batches, window)
    else:
        stored, seconds = asyncio.run(asyncio_feed(address, participation, batches, window))
    print(stored, seconds)


if __name__ == "__main__":
    main()
