"""Building a handoff request, and what the broker answers to one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from ._state import StateDelta
from ._values import JsonValue, from_values, pack, to_timestamp
from .v1 import handoff_pb2 as pb

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


@dataclass(frozen=True)
class ToolResult:
    """A tool result a handoff relies on, with the time it was observed (checked
    against a contract's `max_tool_result_age`)."""

    tool: str
    """The tool's name."""
    observed_at: dt.datetime
    """When the result was observed (a naive datetime is UTC)."""
    result: Message
    """The result, any protobuf message."""

    def to_proto(self) -> pb.ToolResult:
        """As sent."""
        return pb.ToolResult(
            tool=self.tool, observed_at=to_timestamp(self.observed_at), result=pack(self.result)
        )


@dataclass(frozen=True)
class Receipt:
    """What the broker answered to an accepted handoff: durably stored."""

    handoff_id: str
    """The handoff's id."""
    sequence: int
    """Its position in the inbox stream (0 for a final handoff)."""
    duplicate: bool
    """True when the request repeated an accepted handoff."""
    depth: int
    """Its depth in the run."""
    state_revision: int
    """The run-state revision the handoff hands over (0: no state)."""
    answers: dict[str, JsonValue] = field(default_factory=dict)
    """Keys it asked for that the run state already held, with their values."""
    dropped_fields: list[str] = field(default_factory=list)
    """Payload fields the broker saw dropped on this edge."""

    @classmethod
    def from_proto(cls, r: pb.HandoffResponse) -> Receipt:
        """From a `HandoffResponse`."""
        return cls(
            handoff_id=r.handoff_id,
            sequence=r.sequence,
            duplicate=r.duplicate,
            depth=r.depth,
            state_revision=r.state_revision,
            answers=from_values(r.answers),
            dropped_fields=list(r.dropped_fields),
        )


@dataclass
class Handoff:
    """A handoff of `payload` to agent `target`, as a worker handler's return
    value (see `handoff.agent`): the worker sends it as the complete-and-handoff
    of the delivery it handled. The fields are the keyword arguments of
    `Delivery.handoff`.

    Example::

        return Handoff("aggregator", result, confidence=0.9, warnings=["partial"])
    """

    target: str
    """The agent that receives it."""
    payload: Message
    """The payload."""
    idempotency_key: str | None = None
    """Distinguishes several handoffs from one delivery to one target."""
    confidence: float | None = None
    """In [0, 1]; unset means 1."""
    tool_results: list[ToolResult] = field(default_factory=list)
    """Tool results the handoff relies on."""
    warnings: list[str] = field(default_factory=list)
    """What the receiver should know."""
    state_delta: StateDelta | None = None
    """Changes to the run state, applied atomically with the handoff."""
    asks_for: list[str] = field(default_factory=list)
    """Run-state keys the handoff asks for."""


@dataclass
class Final:
    """A final handoff: the run completes with `payload` as its result. As a
    worker handler's return value, or through `Delivery.final`.

    Example::

        return Final(report)
    """

    payload: Message
    """The run's result."""
    confidence: float | None = None
    """In [0, 1]; unset means 1."""
    tool_results: list[ToolResult] = field(default_factory=list)
    """Tool results the result relies on."""
    warnings: list[str] = field(default_factory=list)
    """What the owner should know."""
    state_delta: StateDelta | None = None
    """Changes to the run state, applied atomically with the handoff."""


def build_request(
    run_id: str,
    target: str | None,
    payload: Message,
    *,
    source_agent: str | None = None,
    idempotency_key: str | None = None,
    final: bool = False,
    confidence: float | None = None,
    tool_results: Iterable[ToolResult] = (),
    warnings: Iterable[str] = (),
    state_delta: StateDelta | None = None,
    asks_for: Iterable[str] = (),
    parents: Iterable[str] = (),
    trace_context: Mapping[str, str] | None = None,
    consumes: str | None = None,
    fan_out: bool = False,
) -> pb.HandoffRequest:
    """A `HandoffRequest` from keyword arguments (the broker checks the rest)."""
    req = pb.HandoffRequest(
        run_id=run_id,
        source_agent=source_agent or "",
        target_agent=target or "",
        payload=pack(payload),
        warnings=list(warnings),
        tool_results=[t.to_proto() for t in tool_results],
        parent_ids=list(parents),
        trace_context=dict(trace_context or {}),
        idempotency_key=idempotency_key or "",
        consumes=consumes or "",
        final=final,
        fan_out=fan_out,
        asks_for=list(asks_for),
    )
    if confidence is not None:
        req.confidence = confidence
    if state_delta is not None:
        req.state_delta.CopyFrom(state_delta.to_proto())
    return req


def trace_field(fields: Mapping[str, str], key: str) -> str | None:
    """The value of `key` in trace-context `fields`, whatever its case."""
    for k, v in fields.items():
        if k.lower() == key:
            return v
    return None


def continue_trace(into: dict[str, str], parent: Mapping[str, str]) -> None:
    """Fills `into` (a new handoff's trace context) with the W3C fields of
    `parent`, unless it names a `traceparent` already."""
    if trace_field(into, TRACEPARENT) is not None:
        return
    for key in (TRACEPARENT, TRACESTATE):
        value = trace_field(parent, key)
        if value is not None:
            into[key] = value
