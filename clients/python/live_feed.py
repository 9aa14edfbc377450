"""A resuming live feed for krisp-ingest's LiveFeed RPC.

Keeps every item until the server acknowledges it; after any retryable error (a dropped
connection, a replica gone, the database briefly away, ABORTED because another stream
took the feed over) it opens the feed again and resends from the position the server
reports, so each item is stored exactly once. Errors that retrying cannot fix
(INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS) are raised.

    feed = LiveFeed(stub, feed_id=str(uuid.uuid4()), participation_id=p.id)
    feed.append([sentiment_item(...), event_item(...)])   # returns once committed
    receipt = feed.close()
"""

import queue
import time

import grpc
from krisp.ingest.v1 import ingest_service_pb2 as api

FINAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


class LiveFeed:
    def __init__(self, stub, feed_id, participation_id, attempts=8, backoff=0.1):
        self.stub = stub
        self.feed_id = feed_id
        self.participation_id = participation_id
        self.attempts = attempts
        self.backoff = backoff
        self.committed = 0
        self.next_seq = None
        self.pending = []  # (seq, FeedItem), not yet acknowledged
        self.sessions = 0
        self._requests = None
        self._replies = None

    def append(self, items):
        """Sends `items` (krisp.ingest.v1.FeedItem); returns the committed position once
        they are committed."""
        self._retrying(lambda: None)  # opened, so that numbering starts right
        for item in items:
            self.pending.append((self.next_seq, item))
            self.next_seq += 1
        return self._retrying(self._flush)

    def close(self):
        """Closes the feed once everything is acknowledged; returns its FeedClosed."""

        def close_now():
            self._flush()
            reply = self._send(api.LiveFeedRequest(close=api.FeedClose(final_seq=self.committed)))
            return reply.closed

        return self._retrying(close_now)

    def cut(self):
        """Drops the current stream (as a broken connection would); the next call resumes."""
        if self._replies is not None:
            self._replies.cancel()
        if self._requests is not None:
            self._requests.put(None)  # ends the request generator
        self._requests = self._replies = None

    def _retrying(self, work):
        for attempt in range(self.attempts):
            try:
                if self._replies is None:
                    self._open()
                return work()
            except grpc.RpcError as error:
                if error.code() in FINAL:
                    raise
                self.cut()
                time.sleep(self.backoff * (2 ** attempt))
        raise RuntimeError(f"feed {self.feed_id}: no success after {self.attempts} attempts")

    def _open(self):
        requests = queue.Queue()

        def stream():
            while True:
                message = requests.get()
                if message is None:
                    return
                yield message

        requests.put(api.LiveFeedRequest(open=api.FeedOpen(
            feed_id=self.feed_id, participation_id=self.participation_id)))
        replies = self.stub.LiveFeed(stream())
        opened = next(replies).opened
        self._requests, self._replies = requests, replies
        self.sessions += 1
        assert opened.committed_seq >= self.committed, "acknowledged items went missing"
        self._acknowledged(opened.committed_seq)
        if self.next_seq is None:
            self.next_seq = self.committed + 1

    def _flush(self):
        if self.pending:
            first = self.pending[0][0]
            reply = self._send(api.LiveFeedRequest(append=api.FeedAppend(
                first_seq=first, items=[item for _, item in self.pending])))
            self._acknowledged(reply.ack.committed_through)
        return self.committed

    def _send(self, message):
        self._requests.put(message)
        return next(self._replies)

    def _acknowledged(self, through):
        self.committed = through
        self.pending = [(seq, item) for seq, item in self.pending if seq > through]
