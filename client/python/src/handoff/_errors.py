"""SDK errors: one exception hierarchy with a matchable `ErrorKind`.

Every failure the SDK raises is a `HandoffError`. Its `kind` is the class of
failure (mirroring the Rust SDK's `ErrorKind`), `reason` the broker's stable
cause (the `reason` of the `google.rpc.ErrorInfo` in the status details, such
as `DEPTH_CAP` or `STATE_CONFLICT`), `metadata` that ErrorInfo's names and
numbers, and `field_violations` the `google.rpc.BadRequest` fields of a
malformed request. Match on those, never on the message, which is for people.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

from .v1.reasons import DISPOSITIONS

__all__ = [
    "AlreadyExistsError",
    "ClosedError",
    "ConflictError",
    "ConnectError",
    "DecodeError",
    "Disposition",
    "ErrorKind",
    "FailedPreconditionError",
    "FieldViolation",
    "HandoffError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "TimedOutError",
    "UnavailableError",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ErrorKind(enum.Enum):
    """What went wrong, for callers to match on (`err.kind is ErrorKind.CONFLICT`)."""

    INVALID_ARGUMENT = "InvalidArgument"
    """Malformed request or bad name (INVALID_ARGUMENT, OUT_OF_RANGE)."""
    NOT_FOUND = "NotFound"
    """Unknown run, agent, contract or barrier (NOT_FOUND)."""
    ALREADY_EXISTS = "AlreadyExists"
    """The thing exists already, or conflicts with what exists (ALREADY_EXISTS)."""
    FAILED_PRECONDITION = "FailedPrecondition"
    """Cannot succeed in the current state: a contract, budget, depth cap, closed run."""
    PERMISSION_DENIED = "PermissionDenied"
    """Not allowed (PERMISSION_DENIED, UNAUTHENTICATED)."""
    UNAVAILABLE = "Unavailable"
    """The broker or NATS is unavailable; retrying with the same idempotency key is safe."""
    CONFLICT = "Conflict"
    """A concurrent change came first (ABORTED): read the state again, redo, retry."""
    TIMEOUT = "Timeout"
    """No answer in time (DEADLINE_EXCEEDED, or a settlement never confirmed)."""
    CONNECT = "Connect"
    """The broker could not be reached at all."""
    DECODE = "Decode"
    """A payload did not decode as the requested type."""
    CLOSED = "Closed"
    """The subscription or stream is closed (CANCELLED)."""
    OTHER = "Other"
    """Anything else (INTERNAL, UNKNOWN, ...)."""


class Disposition(enum.Enum):
    """What to do about an error (`err.disposition`), from the broker's table of
    reasons (`proto/handoff/v1/reasons.txt`, shared with the Rust SDK)."""

    RETRYABLE = "retryable"
    """The same request may succeed later: retry it (with the same idempotency
    key), backing off with jitter."""
    CONFLICT = "conflict"
    """A concurrent change came first: read again, redo, retry now."""
    TERMINAL = "terminal"
    """It will never succeed as it is: do not retry (a worker rejects the
    delivery with `err.summary()`)."""
    SUPERSEDED = "superseded"
    """The delivery is no longer the caller's (settled another way, delivered
    again, or gone): stop working on it and settle nothing."""


@dataclass(frozen=True)
class FieldViolation:
    """One malformed field of a request, from the broker's `google.rpc.BadRequest`."""

    field: str
    """Dot-separated path of the field in the request (`branches[2].branch_key`)."""
    description: str
    """Why the field was refused."""


class HandoffError(Exception):
    """An SDK error: a kind, the broker's message, and its status details.

    Example::

        try:
            await client.handoff(run_id, "worker", task)
        except HandoffError as err:
            if err.reason == "DEPTH_CAP":
                print("too deep:", err.metadata["depth"], err.metadata["max_depth"])
            else:
                raise
    """

    kind: ErrorKind = ErrorKind.OTHER

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | None = None,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.message = message
        """The broker's message (for people; it may change)."""
        self.code = code
        """The gRPC status code, when the error came from the broker."""
        self.reason = reason or None
        """The broker's stable reason (`SCHEMA_DRIFT`, `STATE_CONFLICT`, ...); `None`
        for errors the SDK raises itself."""
        self.metadata: dict[str, str] = dict(metadata or {})
        """The names and numbers behind the reason (the ErrorInfo's metadata)."""
        self.field_violations: list[FieldViolation] = list(field_violations)
        """The refused fields of a malformed request."""

    @property
    def disposition(self) -> Disposition:
        """What to do about it: the broker's table for a reason it knows; else by
        kind (unavailable, timed out, not reached, closed, or an unexplained
        failure such as a reset stream: retryable; a conflict: conflict;
        anything else: terminal)."""
        known = DISPOSITIONS.get(self.reason or "")
        if known is not None:
            return Disposition(known)
        if self.kind in (
            ErrorKind.UNAVAILABLE,
            ErrorKind.TIMEOUT,
            ErrorKind.CONNECT,
            ErrorKind.CLOSED,
            ErrorKind.OTHER,
        ):
            return Disposition.RETRYABLE
        if self.kind is ErrorKind.CONFLICT:
            return Disposition.CONFLICT
        return Disposition.TERMINAL

    def summary(self) -> str:
        """The reason and its metadata as one line, keys in order
        (`STATE_TOO_LARGE key=messages limit=65536 size=81046`); the message
        when there is no reason. What a worker rejects a delivery with on a
        terminal refusal."""
        if not self.reason:
            return self.message
        return " ".join([self.reason, *(f"{k}={v}" for k, v in sorted(self.metadata.items()))])

    def __str__(self) -> str:
        head = self.code.name if self.code is not None else self.kind.value
        if self.reason:
            head += f" [{self.reason}]"
        return f"{head}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class InvalidArgumentError(HandoffError):
    """A malformed request or a bad name (INVALID_ARGUMENT)."""

    kind = ErrorKind.INVALID_ARGUMENT


class NotFoundError(HandoffError):
    """An unknown run, agent, contract or barrier (NOT_FOUND)."""

    kind = ErrorKind.NOT_FOUND


class AlreadyExistsError(HandoffError):
    """The thing exists already with other content (ALREADY_EXISTS)."""

    kind = ErrorKind.ALREADY_EXISTS


class FailedPreconditionError(HandoffError):
    """Refused in the current state: a contract rule, a budget, the depth cap
    (FAILED_PRECONDITION)."""

    kind = ErrorKind.FAILED_PRECONDITION


class PermissionDeniedError(HandoffError):
    """Not allowed, or not authenticated (PERMISSION_DENIED, UNAUTHENTICATED)."""

    kind = ErrorKind.PERMISSION_DENIED


class UnavailableError(HandoffError):
    """The broker or NATS is unavailable; retry with the same idempotency key (UNAVAILABLE)."""

    kind = ErrorKind.UNAVAILABLE


class ConflictError(HandoffError):
    """A concurrent change came first (ABORTED, e.g. `STATE_CONFLICT`): re-read, redo, retry."""

    kind = ErrorKind.CONFLICT


class TimedOutError(HandoffError):
    """No answer in time."""

    kind = ErrorKind.TIMEOUT


class ConnectError(HandoffError):
    """The broker could not be reached."""

    kind = ErrorKind.CONNECT


class DecodeError(HandoffError):
    """A payload did not decode as the requested type."""

    kind = ErrorKind.DECODE


class ClosedError(HandoffError):
    """The subscription or stream is closed."""

    kind = ErrorKind.CLOSED


_BY_KIND: dict[ErrorKind, type[HandoffError]] = {
    cls.kind: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnavailableError,
        ConflictError,
        TimedOutError,
        ConnectError,
        DecodeError,
        ClosedError,
    )
}

_KIND_OF_CODE: dict[grpc.StatusCode, ErrorKind] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: ErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: ErrorKind.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: ErrorKind.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED: ErrorKind.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED: ErrorKind.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE: ErrorKind.UNAVAILABLE,
    grpc.StatusCode.ABORTED: ErrorKind.CONFLICT,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.TIMEOUT,
    grpc.StatusCode.CANCELLED: ErrorKind.CLOSED,
}

_CODE_OF_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error(kind: ErrorKind, message: str, **details: object) -> HandoffError:
    """An error of `kind` raised by the SDK itself, as the subclass of that kind."""
    cls = _BY_KIND.get(kind, HandoffError)
    return cls(message, kind=kind, **details)  # type: ignore[arg-type]


def from_status(
    code: grpc.StatusCode,
    message: str,
    details: bytes | None = None,
    reason: str | None = None,
) -> HandoffError:
    """The error of a broker status: its code, message and, from the encoded
    `google.rpc.Status` of `grpc-status-details-bin`, the ErrorInfo reason and
    metadata and the BadRequest field violations."""
    kind = _KIND_OF_CODE.get(code, ErrorKind.OTHER)
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    if details:
        found_reason, metadata, violations = _decode_details(details)
        reason = reason or found_reason
    cls = _BY_KIND.get(kind, HandoffError)
    return cls(
        message,
        kind=kind,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
    )


def from_settled(code: int, message: str, reason: str) -> HandoffError:
    """The error of a refused settlement on a subscription (`Settled` with a code)."""
    status = _CODE_OF_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return from_status(status, message, None, reason or None)


def from_rpc_error(err: grpc.RpcError) -> HandoffError:
    """The error of a failed call (a `grpc.aio.AioRpcError`)."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    message = (details_fn() if callable(details_fn) else None) or str(err)
    trailers_fn = getattr(err, "trailing_metadata", None)
    trailers = trailers_fn() if callable(trailers_fn) else None
    raw: bytes | None = None
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            raw = value
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return from_status(code, str(message), raw)


def _decode_details(raw: bytes) -> tuple[str | None, dict[str, str], list[FieldViolation]]:
    """Reason, metadata and field violations from an encoded `google.rpc.Status`;
    nothing when it does not decode (the code and message still stand)."""
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:
        return reason, metadata, violations
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason = str(info.reason) or None
            metadata = {str(k): str(v) for k, v in info.metadata.items()}
        elif detail.Is(bad.DESCRIPTOR) and detail.Unpack(bad):
            violations.extend(
                FieldViolation(str(v.field), str(v.description)) for v in bad.field_violations
            )
    return reason, metadata, violations
