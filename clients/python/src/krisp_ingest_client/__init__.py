"""Typed client of krisp-ingest (package krisp.ingest.v1): the generated messages and
stubs live in `krisp.ingest.v1`; this package adds connecting (TLS, mutual TLS, API
keys), the server's errors as one typed exception, and a pipelined, resuming live feed
for sync code and for asyncio."""

from .aio_live_feed import AsyncLiveFeed
from .connect import AsyncClient, Client, connect, connect_async, credentials
from .errors import FieldViolation, IngestError, typed_errors
from .live_feed import LiveFeed

__all__ = [
    "AsyncClient",
    "AsyncLiveFeed",
    "Client",
    "FieldViolation",
    "IngestError",
    "LiveFeed",
    "connect",
    "connect_async",
    "credentials",
    "typed_errors",
]
