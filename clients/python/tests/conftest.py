"""Starts a real krisp-ingest (the binary cargo built) on a fresh local PostgreSQL for the
test session. The client under test is the installed package (the wheel the test command
builds), never the source tree."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone

import krisp_ingest_client
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from krisp.ingest.v1 import ingest_service_pb2 as api
from krisp.ingest.v1 import resources_pb2 as res
from krisp.ingest.v1.ingest_service_pb2_grpc import IngestServiceStub

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(HERE))
BINARY = os.environ.get("KRISP_BIN", os.path.join(REPO, "target", "debug", "krisp-ingest"))

if os.path.commonpath([krisp_ingest_client.__file__, HERE]) == HERE:
    raise RuntimeError(
        "the tests import the client from the source tree; run them from the environment "
        "the built wheel is installed in (scripts/test.sh)"
    )


class Server:
    """A krisp-ingest on a fresh local PostgreSQL of its own, on a free loopback port,
    started with `args`; with `key_name`, an API key (`self.key`) is created first."""

    def __init__(self, args: Sequence[str] = (), key_name: str | None = None) -> None:
        if not os.path.exists(BINARY):
            subprocess.run(["cargo", "build", "--bin", "krisp-ingest"], cwd=REPO, check=True)
        root = tempfile.mkdtemp(prefix="krisp-py-")
        os.chmod(root, 0o755)  # as root, the cluster runs as `postgres`, which must reach it
        self.env = dict(
            os.environ,
            KRISP_DATA_DIR=os.path.join(root, "pg"),
            KRISP_LISTEN="127.0.0.1:0",
            KRISP_METRICS_LISTEN="off",
            RUST_LOG="info",
        )
        self.env.pop("DATABASE_URL", None)
        self.key: str | None = None
        if key_name:
            self.key = subprocess.run(
                [BINARY, "keys", "create", "--name", key_name, "--scope", "ingest", "--scope", "read"],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        self.process = subprocess.Popen(
            [BINARY, *args], env=self.env, stderr=subprocess.PIPE, text=True
        )
        self.address = ""
        seen = []
        assert self.process.stderr is not None
        for line in self.process.stderr:
            seen.append(line)
            match = re.search(r"listening on (\S+)", line)
            if match:
                self.address = match.group(1)
                break
        assert self.address, "krisp-ingest did not start:\n" + "".join(seen)
        # Keep draining its log so it never blocks on a full pipe.
        log = self.process.stderr
        threading.Thread(target=lambda: [None for _ in log], daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    running = Server()
    yield running.address
    running.stop()


T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def participation(stub: IngestServiceStub, start: datetime = T0) -> res.Participation:
    """A new user's open participation in a new call that started at `start`."""
    stub.UpsertTimezone(
        api.UpsertTimezoneRequest(timezone=res.Timezone(code="UTC", utc_offset=Duration()))
    )
    user = stub.CreateUser(api.CreateUserRequest(external_id=f"py-{uuid.uuid4()}")).user
    session = stub.CreateSession(
        api.CreateSessionRequest(session_type=res.SESSION_TYPE_CALL, started_at=ts(start))
    ).session
    return stub.JoinSession(
        api.JoinSessionRequest(
            user_id=user.id, session_id=session.id, timezone_code="UTC", connected_at=ts(start)
        )
    ).participation


def sentiment_item(seq: int, score: float = 0.5) -> api.FeedItem:
    """Item `seq` of a feed: a 1 s sentiment `seq` seconds after T0."""
    start = T0 + timedelta(seconds=seq)
    return api.FeedItem(
        sentiment=res.NewSentiment(
            started_at=ts(start),
            ended_at=ts(start + timedelta(seconds=1)),
            label=res.SENTIMENT_LABEL_POSITIVE,
            score=score,
        )
    )


def timeline(stub: IngestServiceStub, participation_id: str) -> list[res.TimelineEntry]:
    request = api.GetTimelineRequest(participation_id=participation_id, chunked=True)
    return [entry for response in stub.GetTimeline(request) for entry in response.entries]
