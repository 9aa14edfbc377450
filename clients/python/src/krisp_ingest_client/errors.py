"""The server's errors as one typed exception: the status code, the message, and the
google.rpc details the server attaches (every field violation of a BadRequest, the
reason of an ErrorInfo)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"

# Codes a retry of the same request cannot change.
FINAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


@dataclass(frozen=True)
class FieldViolation:
    """One wrong field: `field` is its path, e.g. "sentiments[437].ended_at" or, in a live
    feed, "items[12].started_at" (12 being the item's sequence number)."""

    field: str
    description: str


@dataclass(frozen=True)
class IngestError(Exception):
    """A call the server refused or could not complete."""

    code: grpc.StatusCode
    details: str
    violations: tuple[FieldViolation, ...] = ()
    # google.rpc.ErrorInfo's reason, e.g. "OUTCOME_UNKNOWN" (the call may be stored).
    reason: str | None = None
    metadata: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        for violation in self.violations:
            text += f"\n  {violation.field}: {violation.description}"
        return text

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (UNAVAILABLE, ABORTED, ...)."""
        return self.code not in FINAL

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> IngestError:
        """The typed form of an error a sync or asyncio call raised."""
        code = grpc.StatusCode.UNKNOWN
        details = str(error)
        trailers: Iterable[tuple[str, str | bytes]] = ()
        if isinstance(error, grpc.Call):
            code = error.code()
            details = error.details() or ""
            trailers = error.trailing_metadata() or ()
        elif isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            details = error.details() or ""
            trailers = error.trailing_metadata() or ()
        violations: list[FieldViolation] = []
        reason = None
        text: list[tuple[str, str]] = []
        for key, value in trailers:
            if key == DETAILS_KEY and isinstance(value, bytes):
                for detail in status_pb2.Status.FromString(value).details:
                    if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                        bad = error_details_pb2.BadRequest()
                        detail.Unpack(bad)
                        violations += [
                            FieldViolation(v.field, v.description) for v in bad.field_violations
                        ]
                    elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        reason = info.reason
            elif isinstance(value, str):
                text.append((key, value))
        return cls(code, details, tuple(violations), reason, tuple(text))


@contextmanager
def typed_errors() -> Iterator[None]:
    """Raises the grpc.RpcError of any call made inside as an IngestError."""
    try:
        yield
    except grpc.RpcError as error:
        raise IngestError.from_rpc_error(error) from error
