"""OpenTelemetry spans made by the SDK, when `opentelemetry-api` is installed
(the ``otel`` extra: ``pip install 'handoff[otel]'``); without it, none.

The spans go to the tracer provider the application set
(``opentelemetry.trace.set_tracer_provider``), under the tracer
``handoff-client``:

- a CLIENT span ``handoff <target>`` (``handoff (final)``, ``handoff barrier
  <id>``, ``fan-out <barrier>``) around each call that hands off, a child of
  the trace context the request carries, else of the current context; the
  request carries the span's own context, so the broker's ``send`` span is
  its child;
- a CONSUMER span ``process <agent>`` for each delivery, from its arrival
  until it is settled, a child of the context the delivery carries; the
  handoffs made from the delivery continue it.

Contexts travel as W3C ``traceparent`` / ``tracestate`` fields.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from ._handoff import TRACEPARENT, TRACESTATE, trace_field

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: Any = TraceContextTextMapPropagator()
except ImportError:  # pragma: no cover - the extra is not installed
    _trace = None  # type: ignore[assignment]
    _context = None  # type: ignore[assignment]
    _PROPAGATOR = None

TRACER = "handoff-client"


def enabled() -> bool:
    """Whether the SDK makes spans (`opentelemetry-api` is installed)."""
    return _trace is not None


def _parent(fields: Mapping[str, str]) -> Any:
    """The context `fields` name, when they hold a valid `traceparent`."""
    if _trace is None or trace_field(fields, TRACEPARENT) is None:
        return None
    carrier = {k.lower(): v for k, v in fields.items()}
    ctx = _PROPAGATOR.extract(carrier=carrier)
    if not _trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def process_span(agent: str, envelope: Any, attempt: int) -> Any:
    """The CONSUMER span of a delivery of `envelope` to `agent` (None: no
    spans)."""
    if _trace is None:
        return None
    tracer = _trace.get_tracer(TRACER)
    return tracer.start_span(
        f"process {agent}",
        context=_parent(envelope.trace_context),
        kind=_trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "handoff",
            "messaging.operation.type": "process",
            "messaging.destination.name": agent,
            "messaging.message.id": envelope.id,
            "gen_ai.agent.name": agent,
            "gen_ai.conversation.id": envelope.run_id,
            "handoff.attempt": attempt,
        },
    )


def call_span(name: str, run_id: str, fields: MutableMapping[str, str]) -> Any:
    """The CLIENT span of a call whose request carries `fields`: a child of
    them when they name a `traceparent`, else of the current context. Its own
    context is written into `fields`. None: no spans."""
    if _trace is None:
        return None
    parent = _parent(fields)
    tracer = _trace.get_tracer(TRACER)
    span = tracer.start_span(
        name,
        context=parent if parent is not None else _context.get_current(),
        kind=_trace.SpanKind.CLIENT,
        attributes={
            "messaging.system": "handoff",
            "messaging.operation.type": "send",
            "gen_ai.conversation.id": run_id,
        },
    )
    inject(span, fields)
    return span


def inject(span: Any, fields: MutableMapping[str, str]) -> bool:
    """Writes `span`'s context into `fields` (replacing their W3C fields);
    False, leaving them as they are, when there is no span."""
    if _trace is None or span is None or not span.get_span_context().is_valid:
        return False
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=_trace.set_span_in_context(span))
    for key in [k for k in fields if k.lower() in (TRACEPARENT, TRACESTATE)]:
        del fields[key]
    fields.update(carrier)
    return True


def end(span: Any, failure: BaseException | None = None) -> None:
    """Ends `span`, with status ERROR and the error's reason on `failure`."""
    if _trace is None or span is None:
        return
    if failure is not None:
        reason = getattr(failure, "reason", None)
        span.set_attribute("error.type", reason or type(failure).__name__)
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, str(failure)))
    span.end()
