"""Records a session end to end with the installed client: a user, a session, a
participation, a client stream of sentiments, a live feed of sentiments, the leave.

    pip install krisp-ingest-client   # or the wheel the test command builds
    python3 example.py [--server 127.0.0.1:50051] [--api-key KEY] \
        [--ca-file ca.pem [--cert-file client.pem --key-file client.key]]
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from google.protobuf import duration_pb2, timestamp_pb2

from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import resources_pb2 as res
from krisp_ingest_client import LiveFeed, connect


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def sentiment(start: datetime, i: int) -> res.NewSentiment:
    return res.NewSentiment(
        started_at=ts(start + timedelta(seconds=i)),
        ended_at=ts(start + timedelta(seconds=i + 1)),
        label=res.SENTIMENT_LABEL_POSITIVE if i % 2 else res.SENTIMENT_LABEL_NEUTRAL,
        score=0.5,
    )


def stream_frames(
    stream_id: str, participation_id: str, start: datetime, count: int, batch: int
) -> Iterator[api.StreamSentimentsRequest]:
    yield api.StreamSentimentsRequest(
        header=res.StreamHeader(stream_id=stream_id, participation_id=participation_id)
    )
    for first in range(0, count, batch):
        items = [sentiment(start, i) for i in range(first, min(first + batch, count))]
        yield api.StreamSentimentsRequest(batch=api.SentimentBatch(sentiments=items))
    yield api.StreamSentimentsRequest(trailer=res.StreamTrailer(item_count=count))


@dataclass
class Recorded:
    user: res.User
    participation: res.Participation
    receipt: res.StreamReceipt
    feed: api.FeedClosed


def run(
    target: str,
    api_key: str | None = None,
    count: int = 1000,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> Recorded:
    """Records a session end to end; `count` sentiments by a client stream and as many
    by a live feed."""
    with connect(
        target, ca_file=ca_file, cert_file=cert_file, key_file=key_file, api_key=api_key
    ) as client:
        stub = client.stub
        start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
        user = stub.CreateUser(
            api.CreateUserRequest(
                external_id=f"py-{uuid.uuid4()}", country="AM", request_id=str(uuid.uuid4())
            )
        ).user
        stub.UpsertTimezone(
            api.UpsertTimezoneRequest(
                timezone=res.Timezone(code="UTC", utc_offset=duration_pb2.Duration(seconds=0))
            )
        )
        session = stub.CreateSession(
            api.CreateSessionRequest(session_type=res.SESSION_TYPE_CALL, started_at=ts(start))
        ).session
        participation = stub.JoinSession(
            api.JoinSessionRequest(
                user_id=user.id, session_id=session.id, timezone_code="UTC", connected_at=ts(start)
            )
        ).participation
        receipt = stub.StreamSentiments(
            stream_frames(str(uuid.uuid4()), participation.id, start, count, 250)
        ).receipt
        feed = LiveFeed(stub, str(uuid.uuid4()), participation.id)
        later = start + timedelta(seconds=count)
        for first in range(0, count, 100):
            feed.append(
                [api.FeedItem(sentiment=sentiment(later, i)) for i in range(first, min(first + 100, count))]
            )
        closed = feed.close()
        left = stub.LeaveSession(
            api.LeaveSessionRequest(
                participation_id=participation.id,
                disconnected_at=ts(start + timedelta(hours=1)),
                talked_time=duration_pb2.Duration(seconds=600),
                microphone_used=True,
                speaker_used=True,
            )
        ).participation
        return Recorded(user, left, receipt, closed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--api-key", default=os.environ.get("KRISP_API_KEY"))
    parser.add_argument("--ca-file", help="PEM CA of the server's certificate (TLS)")
    parser.add_argument("--cert-file", help="client certificate (mutual TLS)")
    parser.add_argument("--key-file", help="client certificate's key (mutual TLS)")
    args = parser.parse_args()
    result = run(
        args.server, args.api_key, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file
    )
    print(f"user {result.user.id} ({result.user.external_id})")
    print(f"participation {result.participation.id}: talked {result.participation.talked_time.seconds} s")
    print(f"stream {result.receipt.stream_id}: {result.receipt.items_stored} sentiments committed")
    print(f"feed {result.feed.feed_id}: {result.feed.items_stored} sentiments committed")
