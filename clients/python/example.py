"""Records a session end to end and streams sentiments, with stubs generated from the protos.

    ./generate.sh && python3 example.py [--server 127.0.0.1:50051] [--api-key KEY] \
        [--ca-file ca.pem [--cert-file client.pem --key-file client.key]]
"""

import argparse
import os
import sys
import uuid
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gen"))

import grpc  # noqa: E402
from google.protobuf import duration_pb2, timestamp_pb2  # noqa: E402
from krisp.ingest.v1 import ingest_service_pb2 as api  # noqa: E402
from krisp.ingest.v1 import ingest_service_pb2_grpc as api_grpc  # noqa: E402
from krisp.ingest.v1 import resources_pb2 as res  # noqa: E402


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def stream_frames(stream_id: str, participation_id: str, start: datetime, count: int, batch: int):
    yield api.StreamSentimentsRequest(
        header=res.StreamHeader(stream_id=stream_id, participation_id=participation_id)
    )
    for first in range(0, count, batch):
        items = [
            res.NewSentiment(
                started_at=ts(start + timedelta(seconds=i)),
                ended_at=ts(start + timedelta(seconds=i + 1)),
                label=res.SENTIMENT_LABEL_POSITIVE if i % 2 else res.SENTIMENT_LABEL_NEUTRAL,
                score=0.5,
            )
            for i in range(first, min(first + batch, count))
        ]
        yield api.StreamSentimentsRequest(batch=api.SentimentBatch(sentiments=items))
    yield api.StreamSentimentsRequest(trailer=res.StreamTrailer(item_count=count))


def open_channel(target: str, ca_file: str | None = None, cert_file: str | None = None,
            key_file: str | None = None) -> grpc.Channel:
    """A channel to `target`: TLS when `ca_file` (the CA of the server's certificate) is
    given, with a client certificate for mutual TLS; plaintext otherwise (loopback)."""
    if not ca_file:
        return grpc.insecure_channel(target)

    def read(path):
        with open(path, "rb") as file:
            return file.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file) if key_file else None,
        certificate_chain=read(cert_file) if cert_file else None,
    )
    return grpc.secure_channel(target, credentials)


def run(target: str, api_key: str | None = None, count: int = 1000, **tls) -> dict:
    """Records a session end to end; `tls`: ca_file, cert_file, key_file (see open_channel)."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    with open_channel(target, **tls) as channel:
        client = api_grpc.IngestServiceStub(channel)
        start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
        user = client.CreateUser(
            api.CreateUserRequest(external_id=f"py-{uuid.uuid4()}", country="AM", request_id=str(uuid.uuid4())),
            metadata=metadata,
        ).user
        client.UpsertTimezone(
            api.UpsertTimezoneRequest(timezone=res.Timezone(code="UTC", utc_offset=duration_pb2.Duration(seconds=0))),
            metadata=metadata,
        )
        session = client.CreateSession(
            api.CreateSessionRequest(session_type=res.SESSION_TYPE_CALL, started_at=ts(start)),
            metadata=metadata,
        ).session
        participation = client.JoinSession(
            api.JoinSessionRequest(user_id=user.id, session_id=session.id, timezone_code="UTC", connected_at=ts(start)),
            metadata=metadata,
        ).participation
        receipt = client.StreamSentiments(
            stream_frames(str(uuid.uuid4()), participation.id, start, count, 250), metadata=metadata
        ).receipt
        left = client.LeaveSession(
            api.LeaveSessionRequest(
                participation_id=participation.id,
                disconnected_at=ts(start + timedelta(hours=1)),
                talked_time=duration_pb2.Duration(seconds=600),
                microphone_used=True,
                speaker_used=True,
            ),
            metadata=metadata,
        ).participation
        return {"user": user, "session": session, "participation": left, "receipt": receipt}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--api-key", default=os.environ.get("KRISP_API_KEY"))
    parser.add_argument("--ca-file", help="PEM CA of the server's certificate (TLS)")
    parser.add_argument("--cert-file", help="client certificate (mutual TLS)")
    parser.add_argument("--key-file", help="client certificate's key (mutual TLS)")
    args = parser.parse_args()
    result = run(args.server, args.api_key, ca_file=args.ca_file, cert_file=args.cert_file,
                 key_file=args.key_file)
    print(f"user {result['user'].id} ({result['user'].external_id})")
    print(f"participation {result['participation'].id}: talked {result['participation'].talked_time.seconds} s")
    print(f"stream {result['receipt'].stream_id}: {result['receipt'].items_stored} sentiments committed")
